"""A key kept to IP ranges is kept to them when it calls the management API too (issue 12): a leaked key
with `apikeys:write` must not manage keys, or lift its own ranges, from outside them."""

import grpc

from apikeyd.domain.ip_ranges import grpc_peer_host
from apikeyd.v1 import api_keys_pb2 as pb
from tests.conftest import create_key, rpc_error


def test_a_key_outside_its_ranges_cannot_manage_keys(server, account):
    created = create_key(server.stub, account, ("apikeys:read", "apikeys:write"), allowed_ip_ranges=["203.0.113.0/24"])
    as_key = server.stub_for(created.secret)  # the test's client is 127.0.0.1
    error = rpc_error(lambda: as_key.GetApiKey(pb.GetApiKeyRequest(name=created.api_key.name)))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "outside the key's allowed_ip_ranges" in (error.details() or "")


def test_a_key_inside_its_ranges_manages_keys(server, account):
    created = create_key(server.stub, account, ("apikeys:read",), allowed_ip_ranges=["127.0.0.0/8", "::1/128"])
    as_key = server.stub_for(created.secret)
    assert as_key.GetApiKey(pb.GetApiKeyRequest(name=created.api_key.name)).allowed_ip_ranges == ["127.0.0.0/8", "::1/128"]


def test_grpc_peer_strings():
    assert grpc_peer_host("ipv4:203.0.113.5:51234") == "203.0.113.5"
    assert grpc_peer_host("ipv6:[2001:db8::1]:51234") == "2001:db8::1"
    assert grpc_peer_host("ipv6:%5B2001:db8::1%5D:51234") == "2001:db8::1"
    assert grpc_peer_host("ipv6:[fe80::1%25eth0]:1") == "fe80::1"
    assert grpc_peer_host("unix:/tmp/apikeyd.sock") == "" and grpc_peer_host("") == "" and grpc_peer_host("ipv6:garbage") == ""
