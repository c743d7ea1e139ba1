"""domain/ip_ranges.py against the `ipaddress` module: for any networks and addresses, IPv4 and IPv6, the
integer matching says what `address in network` says, with an IPv4-mapped IPv6 address taken as its IPv4
address; and validate_ranges gives one canonical form, or INVALID_ARGUMENT naming allowed_ip_ranges."""

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from apikeyd.domain.errors import InvalidArgument
from apikeyd.domain.ip_ranges import (
    MAX_IP_LENGTH,
    MAX_IP_RANGES,
    compile_ranges,
    contains,
    parse_address,
    validate_ranges,
)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
MAPPED = ipaddress.ip_network("::ffff:0:0/96")

v4_addresses = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
v6_addresses = st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address)
mapped_addresses = v4_addresses.map(lambda a: ipaddress.IPv6Address(int(MAPPED.network_address) | int(a)))
addresses: st.SearchStrategy[Address] = st.one_of(v4_addresses, v6_addresses, mapped_addresses)


def _networks(address: st.SearchStrategy[Address], bits: int) -> st.SearchStrategy[Network]:
    return st.builds(lambda a, prefix: ipaddress.ip_network(f"{a}/{prefix}", strict=False), address, st.integers(0, bits))


networks = st.one_of(_networks(v4_addresses, 32), _networks(v6_addresses, 128), _networks(mapped_addresses, 128))


def _as_ipv4(address: Address) -> Address:
    """What a client address means: a dual-stack socket's IPv4-mapped address is the IPv4 client."""
    return address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped else address


def _expected(network: Network, address: Address) -> bool:
    address = _as_ipv4(address)
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96 and network.subnet_of(MAPPED):
        network = ipaddress.ip_network(f"{network.network_address.ipv4_mapped}/{network.prefixlen - 96}")
    return address.version == network.version and address in network


def _near(network: Network) -> st.SearchStrategy[Address]:
    """Addresses at and just past a network's edges, where an off-by-one in a mask would show."""
    first, last = int(network.network_address), int(network.broadcast_address)
    top = 2**network.max_prefixlen - 1
    edges = [first, last, max(first - 1, 0), min(last + 1, top)]
    return st.sampled_from(edges).map(ipaddress.ip_address if network.version == 4 else ipaddress.IPv6Address)


@given(network=networks, address=addresses)
def test_contains_says_what_ipaddress_says_for_any_network_and_address(network, address):
    ranges = compile_ranges(validate_ranges([str(network)]))
    assert contains(ranges, parse_address(str(address))) is _expected(network, address)


@given(network=networks, data=st.data())
def test_contains_at_the_edges_of_a_network(network, data):
    address = data.draw(_near(network))
    ranges = compile_ranges(validate_ranges([str(network)]))
    assert contains(ranges, parse_address(str(address))) is _expected(network, address)


@given(several=st.lists(networks, max_size=8), address=addresses)
def test_an_address_is_allowed_when_any_range_holds_it(several, address):
    ranges = compile_ranges(validate_ranges([str(n) for n in several]))
    assert contains(ranges, parse_address(str(address))) is any(_expected(n, address) for n in several)


@given(address=v4_addresses, prefix=st.integers(0, 32))
def test_a_mapped_client_is_matched_by_the_ipv4_range_and_a_mapped_range_is_the_ipv4_one(address, prefix):
    v4 = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
    mapped_range = f"::ffff:{v4.network_address}/{prefix + 96}"
    assert validate_ranges([mapped_range]) == (str(v4),)
    mapped_client = f"::ffff:{address}"
    assert parse_address(mapped_client) == (4, int(address))
    assert contains(compile_ranges((str(v4),)), parse_address(mapped_client))


def test_an_ipv6_range_wider_than_the_mapped_block_does_not_hold_ipv4_clients():
    """IPv4 clients are matched by IPv4 ranges only, however they arrive: `::/0` is every IPv6 client and
    no IPv4 one, so allowing everyone takes `0.0.0.0/0` and `::/0`."""
    everything_v6 = compile_ranges(validate_ranges(["::/0"]))
    assert contains(everything_v6, parse_address("2001:db8::1"))
    assert not contains(everything_v6, parse_address("::ffff:192.0.2.1"))
    assert not contains(everything_v6, parse_address("192.0.2.1"))


@given(several=st.lists(networks, max_size=12))
def test_validate_ranges_is_canonical_sorted_without_repeats_and_idempotent(several):
    written = [str(n) for n in several] + [str(n) for n in several[:2]]  # repeats
    canonical = validate_ranges(written)
    assert validate_ranges(list(canonical)) == canonical
    assert len(set(canonical)) == len(canonical)
    parsed = [ipaddress.ip_network(value) for value in canonical]  # strict: no host bits
    assert [str(n) for n in parsed] == list(canonical)
    assert parsed == sorted(parsed, key=lambda n: (n.version, n.network_address, n.prefixlen))
    assert all(not (n.version == 6 and n.prefixlen >= 96 and n.subnet_of(MAPPED)) for n in parsed)


@pytest.mark.parametrize(
    ("written", "canonical"),
    [
        (["192.0.2.1"], ("192.0.2.1/32",)),
        (["2001:DB8:0:0::/32"], ("2001:db8::/32",)),
        (["2001:db8::/32", "10.0.0.0/8", "10.0.0.0/8"], ("10.0.0.0/8", "2001:db8::/32")),
        (["::ffff:192.0.2.0/120"], ("192.0.2.0/24",)),
        (["::ffff:0:0/96"], ("0.0.0.0/0",)),
    ],
)
def test_canonical_forms(written, canonical):
    assert validate_ranges(written) == canonical


@pytest.mark.parametrize(
    ("written", "says"),
    [
        (["192.0.2.1/24"], "did you mean 192.0.2.0/24?"),
        (["2001:db8::1/32"], "did you mean 2001:db8::/32?"),
        (["10.0.0.0/33"], "is not an IP address or CIDR range"),
        (["example.com"], "is not an IP address or CIDR range"),
        (["fe80::/64%eth0"], "is not an IP address or CIDR range"),
        (["192.0.2.0/24", ""], "entry 1"),
        (["1" * (MAX_IP_LENGTH + 1)], f"a CIDR range has at most {MAX_IP_LENGTH}"),
        (["10.0.0.0/8"] * (MAX_IP_RANGES + 1), f"at most {MAX_IP_RANGES} ranges"),
    ],
)
def test_a_wrong_range_is_invalid_argument_naming_the_field(written, says):
    with pytest.raises(InvalidArgument) as refused:
        validate_ranges(written)
    assert refused.value.field == "allowed_ip_ranges"
    assert says in str(refused.value)


@pytest.mark.parametrize(
    "value", ["", "not-an-ip", "192.0.2.1/32", "192.0.2.256", "fe80::1%eth0", "1.2.3.4:80", "[::1]", "1" * 65]
)
def test_a_wrong_client_address_is_invalid_argument_naming_client_ip(value):
    with pytest.raises(InvalidArgument) as refused:
        parse_address(value)
    assert refused.value.field == "client_ip"
