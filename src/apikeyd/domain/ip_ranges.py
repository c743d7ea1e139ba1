"""IP allowlists: a key's allowed CIDR ranges, and whether a client's address is inside one.

Ranges are parsed by the `ipaddress` module and kept as (version, network, mask) integers, so a check is a
few integer operations per range, with no object made. An IPv4-mapped IPv6 address (`::ffff:192.0.2.1`, what
a dual-stack socket reports for an IPv4 client) is matched as its IPv4 address, so a range written in
IPv4 covers such a client; a scope id (`fe80::1%eth0`) is refused, as no range can name one.
"""

import ipaddress
import urllib.parse

from apikeyd.domain.echo import quote
from apikeyd.domain.errors import InvalidArgument

MAX_IP_RANGES = 100
MAX_IP_LENGTH = 64  # the longest text form of an IPv6 address is 45 characters

Ranges = tuple[tuple[int, int, int], ...]  # (version, network, mask)


def validate_ranges(values: list[str] | tuple[str, ...], field: str = "allowed_ip_ranges") -> tuple[str, ...]:
    """The ranges in canonical form (`192.0.2.0/24`, `2001:db8::/32`), sorted and without repeats."""
    if len(values) > MAX_IP_RANGES:
        raise InvalidArgument(field, f"at most {MAX_IP_RANGES} ranges, got {len(values)}")
    networks: set[ipaddress.IPv4Network | ipaddress.IPv6Network] = set()
    for index, value in enumerate(values):
        if len(value) > MAX_IP_LENGTH:
            raise InvalidArgument(field, f"entry {index} is {len(value)} characters; a CIDR range has at most {MAX_IP_LENGTH}")
        try:
            network = ipaddress.ip_network(value)
        except ValueError:
            try:
                loose = ipaddress.ip_network(value, strict=False)
            except ValueError:
                raise InvalidArgument(
                    field, f"entry {index}, {quote(value)}, is not an IP address or CIDR range such as 203.0.113.0/24"
                ) from None
            raise InvalidArgument(field, f"entry {index}, {quote(value)}, has host bits set: did you mean {loose}?") from None
        if isinstance(network, ipaddress.IPv6Network) and network.network_address.scope_id is not None:
            raise InvalidArgument(field, f"entry {index}, {quote(value)}, has a scope id; write the range without `%...`")
        if isinstance(network, ipaddress.IPv6Network) and network.network_address.ipv4_mapped is not None and network.prefixlen >= 96:
            # Written as IPv4-mapped: kept as the IPv4 range it means, which is how clients are matched.
            network = ipaddress.ip_network(f"{network.network_address.ipv4_mapped}/{network.prefixlen - 96}")
        networks.add(network)
    return tuple(str(n) for n in sorted(networks, key=lambda n: (n.version, n.network_address, n.prefixlen)))


def compile_ranges(ranges: tuple[str, ...]) -> Ranges:
    """Validated ranges (validate_ranges) as integers, for `contains`."""
    compiled = []
    for value in ranges:
        network = ipaddress.ip_network(value)
        compiled.append((network.version, int(network.network_address), int(network.netmask)))
    return tuple(compiled)


def parse_address(value: str, field: str = "client_ip") -> tuple[int, int]:
    """(version, address) of a client address; an IPv4-mapped IPv6 address is its IPv4 address."""
    if len(value) > MAX_IP_LENGTH:
        raise InvalidArgument(field, f"at most {MAX_IP_LENGTH} characters, got {len(value)}")
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        raise InvalidArgument(field, f"{quote(value)} is not an IPv4 or IPv6 address") from None
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id is not None:
            raise InvalidArgument(field, f"{quote(value)} has a scope id; send the address without `%...`")
        if address.ipv4_mapped is not None:
            return 4, int(address.ipv4_mapped)
    return address.version, int(address)


def grpc_peer_host(peer: str) -> str:
    """The host in a grpc peer string (`ipv4:192.0.2.1:5000`, `ipv6:%5B2001:db8::1%5D:5000`, percent-encoded
    as grpc writes it), without a link-local scope id: it names an interface of this host, which no range
    can. Empty for a unix socket or anything else, which no range contains."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return ""
    host = urllib.parse.unquote(rest).rpartition(":")[0]
    return host.removeprefix("[").removesuffix("]").partition("%")[0]


def contains(ranges: Ranges, address: tuple[int, int]) -> bool:
    version, value = address
    for range_version, network, mask in ranges:
        if range_version == version and value & mask == network:
            return True
    return False
