"""IP allowlists through Authorize over a real channel: a key's allowed_ip_ranges, the client_ip a check
gives, IPv4-mapped addresses, changes in force at once, and INVALID_ARGUMENT naming the field for anything
that is not an address or a range."""

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask

from apikeyd.domain.ip_ranges import MAX_IP_LENGTH, MAX_IP_RANGES
from apikeyd.v1 import api_keys_pb2 as pb
from tests.conftest import authorize, create_key, rpc_error

R = pb.AuthorizeResponse
RANGES = ("192.0.2.0/24", "2001:db8::/32")


def _update(stub, name: str, **fields) -> pb.ApiKey:
    return stub.UpdateApiKey(
        pb.UpdateApiKeyRequest(api_key=pb.ApiKey(name=name, **fields), update_mask=FieldMask(paths=list(fields)))
    )


@pytest.mark.parametrize(
    ("client_ip", "code"),
    [
        ("192.0.2.7", R.OK),
        ("192.0.2.255", R.OK),
        ("192.0.3.0", R.IP_NOT_ALLOWED),
        ("198.51.100.1", R.IP_NOT_ALLOWED),
        ("2001:db8::5", R.OK),
        ("2001:DB8:ffff::1", R.OK),
        ("2001:db9::1", R.IP_NOT_ALLOWED),
        ("::ffff:192.0.2.7", R.OK),  # what a dual-stack socket reports for an IPv4 client
        ("::ffff:198.51.100.1", R.IP_NOT_ALLOWED),
        ("::ffff:c000:207", R.OK),  # the same mapped address, written in hex
        ("", R.IP_NOT_ALLOWED),  # a key with ranges needs an address
    ],
)
def test_a_key_with_ranges_is_allowed_only_from_inside_them(stub, account, client_ip, code):
    created = create_key(stub, account, allowed_ip_ranges=list(RANGES))
    response = authorize(stub, created.secret, "messages:send", client_ip=client_ip)
    assert (response.code, response.allowed) == (code, code == R.OK), response.message
    assert response.has_limits, "an answer that depends on the client's address is never cached by a client"
    assert response.key_id == created.api_key.key_id
    if code != R.OK:
        assert ("allowed_ip_ranges" if client_ip else "no client_ip") in response.message


def test_a_key_without_ranges_is_allowed_from_anywhere_and_may_be_cached(stub, account):
    key = create_key(stub, account).secret
    for client_ip in ("", "198.51.100.1", "2001:db9::1", "::ffff:10.0.0.1"):
        response = authorize(stub, key, client_ip=client_ip)
        assert response.code == R.OK and not response.has_limits


@pytest.mark.parametrize(
    "client_ip", ["not-an-ip", "192.0.2.7/32", "192.0.2.256", "192.0.2.7:443", "fe80::1%eth0", "[2001:db8::1]", "\x00"]
)
def test_a_client_ip_that_is_not_an_address_is_invalid_argument_whatever_the_key(stub, account, client_ip):
    for key in (create_key(stub, account, allowed_ip_ranges=list(RANGES)).secret, create_key(stub, account).secret, "nope"):
        error = rpc_error(lambda k=key: authorize(stub, k, client_ip=client_ip))
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert error.details().startswith("client_ip:"), error.details()
    too_long = "1" * (MAX_IP_LENGTH + 1)
    error = rpc_error(lambda: authorize(stub, "nope", client_ip=too_long))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT and "client_ip" in error.details()


def test_the_address_is_checked_after_the_key_is_usable_and_before_project_and_scopes(stub, account):
    created = create_key(stub, account, ("reports:read",), project_id="p1", allowed_ip_ranges=["192.0.2.0/24"])
    key = created.secret
    outside = "198.51.100.1"
    assert authorize(stub, key, "messages:send", project_id="p2", client_ip=outside).code == R.IP_NOT_ALLOWED
    assert authorize(stub, key, "messages:send", project_id="p2", client_ip="192.0.2.1").code == R.PROJECT_MISMATCH
    stub.RevokeApiKey(pb.RevokeApiKeyRequest(name=created.api_key.name, reason="test"))
    assert authorize(stub, key, client_ip=outside, project_id="p1").code == R.REVOKED


def test_a_check_from_outside_spends_no_credits(stub, account):
    key = create_key(stub, account, credits=pb.Credits(remaining=1), allowed_ip_ranges=["192.0.2.0/24"]).secret
    assert authorize(stub, key, client_ip="198.51.100.1").code == R.IP_NOT_ALLOWED
    inside = authorize(stub, key, client_ip="192.0.2.1")
    assert (inside.code, inside.credits_remaining) == (R.OK, 0)


def test_ranges_set_changed_and_cleared_are_in_force_on_the_very_next_check(stub, account):
    created = create_key(stub, account)
    key, name = created.secret, created.api_key.name
    for _ in range(2):  # the second answer comes from the server's cache
        assert authorize(stub, key, client_ip="198.51.100.1").code == R.OK
    assert list(_update(stub, name, allowed_ip_ranges=["192.0.2.0/24"]).allowed_ip_ranges) == ["192.0.2.0/24"]
    assert authorize(stub, key, client_ip="198.51.100.1").code == R.IP_NOT_ALLOWED
    assert authorize(stub, key, client_ip="192.0.2.9").code == R.OK
    _update(stub, name, allowed_ip_ranges=["198.51.100.0/24"])
    assert authorize(stub, key, client_ip="192.0.2.9").code == R.IP_NOT_ALLOWED
    assert authorize(stub, key, client_ip="::ffff:198.51.100.1").code == R.OK
    assert list(_update(stub, name, allowed_ip_ranges=[]).allowed_ip_ranges) == []
    response = authorize(stub, key, client_ip="192.0.2.9")
    assert response.code == R.OK and not response.has_limits


def test_ranges_are_kept_in_canonical_form(stub, account):
    written = ["2001:DB8::/32", "::ffff:192.0.2.0/120", "10.0.0.1", "10.0.0.1/32"]
    created = create_key(stub, account, allowed_ip_ranges=written)
    canonical = ["10.0.0.1/32", "192.0.2.0/24", "2001:db8::/32"]
    assert list(created.api_key.allowed_ip_ranges) == canonical
    assert list(stub.GetApiKey(pb.GetApiKeyRequest(name=created.api_key.name)).allowed_ip_ranges) == canonical


BAD_RANGES = {
    "too many": ([f"10.0.{i // 256}.{i % 256}/32" for i in range(MAX_IP_RANGES + 1)], f"at most {MAX_IP_RANGES}"),
    "too long": (["1" * (MAX_IP_LENGTH + 1)], str(MAX_IP_LENGTH)),
    "host bits": (["192.0.2.1/24"], "did you mean 192.0.2.0/24?"),
    "prefix past 32": (["10.0.0.0/33"], "not an IP address or CIDR range"),
    "a host name": (["example.com"], "not an IP address or CIDR range"),
    "empty": ([""], "not an IP address or CIDR range"),
    "NUL": (["10.0.0.0/8\x00"], "not an IP address or CIDR range"),
}


@pytest.mark.parametrize("case", sorted(BAD_RANGES))
def test_bad_ranges_on_create_and_update_are_invalid_argument_naming_the_field(stub, account, case):
    ranges, says = BAD_RANGES[case]
    created = create_key(stub, account)
    calls = {
        "create": lambda: create_key(stub, account, allowed_ip_ranges=ranges),
        "update": lambda: _update(stub, created.api_key.name, allowed_ip_ranges=ranges),
    }
    for call in calls.values():
        error = rpc_error(call)
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "allowed_ip_ranges" in error.details() and says in error.details(), error.details()
    unchanged = stub.GetApiKey(pb.GetApiKeyRequest(name=created.api_key.name))
    assert list(unchanged.allowed_ip_ranges) == [] and unchanged.etag == created.api_key.etag
