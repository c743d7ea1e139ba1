"""Envoy's answers for IP allowlists and credits, through a real Envoy on each example config (as in
tests/test_envoy.py): 403 IP_NOT_ALLOWED from outside a key's ranges, whatever x-forwarded-for a client
forges, and with APIKEYD_XFF_TRUSTED_HOPS only the entry its own proxies wrote; 429 CREDITS_EXHAUSTED with
what is left. Then Check over gRPC for a route's cost and the source address's forms."""

import json

import pytest
from envoy.config.core.v3 import address_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from google.rpc import code_pb2

from apikeyd.app import App, StartupError
from apikeyd.config import Settings
from apikeyd.v1 import api_keys_pb2 as pb
from tests import test_envoy
from tests.conftest import create_key
from tests.test_envoy import CONFIGS, assert_refused, denial, header_values, proxy_for

proxy, check = test_envoy.proxy, test_envoy.check  # its fixtures: Envoy on each example config, and Check

OUTSIDE = "192.0.2.0/24"  # TEST-NET-1: never this machine's address


def test_a_key_with_ranges_is_allowed_from_inside_and_refused_403_from_outside(proxy, server, account):
    inside = create_key(server.stub, account, allowed_ip_ranges=["127.0.0.0/8"])
    outside = create_key(server.stub, account, allowed_ip_ranges=[OUTSIDE, "2001:db8::/32"])
    response = proxy.get("/", x_api_key=inside.secret)
    assert response.status == 200, response.body
    assert proxy.service.requests[0]["x-apikey-id"] == inside.api_key.key_id
    proxy.service.requests.clear()
    body = assert_refused(proxy.get("/", x_api_key=outside.secret), 403, "IP_NOT_ALLOWED", proxy, outside.secret)
    assert "127.0.0.1" in body["message"] and "allowed_ip_ranges" in body["message"]
    # With APIKEYD_XFF_TRUSTED_HOPS=0 (the default) x-forwarded-for is the client's to write, and ignored.
    forged = proxy.get("/", ("x-forwarded-for", "192.0.2.1"), ("x-forwarded-for", "192.0.2.2"), x_api_key=outside.secret)
    assert_refused(forged, 403, "IP_NOT_ALLOWED", proxy, outside.secret)
    still = proxy.get("/v1/messages", x_api_key=inside.secret, x_forwarded_for="192.0.2.1", x_sender_domain="example.com")
    assert still.status == 200, "a route's own http_service sends the downstream address too"


def test_a_key_whose_credits_are_spent_gets_429_with_what_is_left(proxy, server, account):
    created = create_key(server.stub, account, credits=pb.Credits(remaining=1))
    key = created.secret
    first = proxy.get("/", x_api_key=key, x_apikey_credits_remaining="999")
    assert first.status == 200, first.body
    assert first.headers["x-apikeyd-credits-remaining"] == "0"
    (seen,) = proxy.service.requests
    assert seen["x-apikey-credits-remaining"] == "0", "the service sees what apikeyd says, not the client"
    proxy.service.requests.clear()
    second = proxy.get("/", x_api_key=key)
    body = assert_refused(second, 429, "CREDITS_EXHAUSTED", proxy, key)
    assert "0 credits left" in body["message"]
    assert second.headers["x-apikeyd-credits-remaining"] == "0"
    assert "retry-after" not in second.headers, "waiting does not bring credits back"
    plain = proxy.get("/", x_api_key=create_key(server.stub, account).secret, x_apikey_credits_remaining="5")
    assert plain.status == 200 and "x-apikeyd-credits-remaining" not in plain.headers
    assert "x-apikey-credits-remaining" not in proxy.service.requests[0], "a client's made-up header is removed"


@pytest.mark.parametrize("transport", sorted(CONFIGS))
def test_with_one_trusted_hop_only_the_entry_the_proxy_appended_counts(make_server, account, tmp_path, transport):
    """The test plays the one trusted proxy in front of Envoy: the rightmost x-forwarded-for entry is the
    address it saw; anything left of it is what the client sent, forged or not."""
    server = make_server(xff_trusted_hops=1)
    key = create_key(server.stub, account, allowed_ip_ranges=["198.51.100.7/32"]).secret
    local = create_key(server.stub, account, allowed_ip_ranges=["127.0.0.0/8"]).secret
    plain = create_key(server.stub, account).secret
    with proxy_for(server, transport, tmp_path) as proxy:
        assert proxy.get("/", x_api_key=key, x_forwarded_for="198.51.100.7").status == 200
        assert proxy.get("/", x_api_key=key, x_forwarded_for="203.0.113.1, 198.51.100.7").status == 200
        proxy.service.requests.clear()
        for forwarded in ("198.51.100.7, 203.0.113.1", "198.51.100.7,::ffff:203.0.113.1"):
            assert_refused(proxy.get("/", x_api_key=key, x_forwarded_for=forwarded), 403, "IP_NOT_ALLOWED", proxy, key)
        # No header: fewer entries than hops, so the downstream address (this test, on 127.0.0.1) counts.
        assert_refused(proxy.get("/", x_api_key=key), 403, "IP_NOT_ALLOWED", proxy, key)
        assert proxy.get("/", x_api_key=local).status == 200
        proxy.service.requests.clear()
        assert_refused(proxy.get("/", x_api_key=local, x_forwarded_for="198.51.100.7"), 403, "IP_NOT_ALLOWED", proxy, local)
        junk = assert_refused(proxy.get("/", x_api_key=key, x_forwarded_for="1.2.3.4, junk"), 400, "INVALID_ARGUMENT", proxy, key)
        assert junk["message"].startswith("x-forwarded-for header:"), junk
        assert proxy.get("/", x_api_key=plain, x_forwarded_for="junk").status == 200, "keys without ranges never read it"


def test_a_negative_number_of_trusted_hops_does_not_start(database_url):
    with pytest.raises(StartupError, match="APIKEYD_XFF_TRUSTED_HOPS"):
        App(Settings.load(environ={"APIKEYD_XFF_TRUSTED_HOPS": "-1"}, database_url=database_url))


# --- Check over gRPC ---------------------------------------------------------------------------------


def check_from(source: str, headers: dict[str, str], **extensions: str) -> external_auth_pb2.CheckRequest:
    http = attribute_context_pb2.AttributeContext.HttpRequest(method="GET", path="/", headers=headers)
    peer = attribute_context_pb2.AttributeContext.Peer(
        address=address_pb2.Address(socket_address=address_pb2.SocketAddress(address=source, port_value=40000))
    )
    return external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            source=peer, request=attribute_context_pb2.AttributeContext.Request(http=http), context_extensions=extensions
        )
    )


def test_a_routes_cost_is_what_each_allowed_request_spends(check, server, account):
    key = create_key(server.stub, account, credits=pb.Credits(remaining=5)).secret
    remaining = []
    for _ in range(2):
        response = check(check_from("127.0.0.1", {"x-api-key": key}, cost="2"))
        assert response.status.code == code_pb2.OK, response
        remaining.append(header_values(response.ok_response.response_headers_to_add)["x-apikeyd-credits-remaining"])
        assert header_values(response.ok_response.headers)["x-apikey-credits-remaining"] == remaining[-1]
    assert remaining == ["3", "1"]
    assert check(check_from("127.0.0.1", {"x-api-key": key}, cost="0")).status.code == code_pb2.OK
    refused = check(check_from("127.0.0.1", {"x-api-key": key}, cost="2"))
    assert refused.status.code == code_pb2.RESOURCE_EXHAUSTED
    status, code, headers = denial(refused)
    assert (status, code, headers["x-apikeyd-credits-remaining"]) == (429, "CREDITS_EXHAUSTED", "1")
    assert "costs 2" in json.loads(refused.denied_response.body)["message"]
    one = check(check_from("127.0.0.1", {"x-api-key": key}))  # unset: 1
    assert header_values(one.ok_response.response_headers_to_add)["x-apikeyd-credits-remaining"] == "0"


@pytest.mark.parametrize("cost", ["x", "-1", "1.5", "1000000001", "99999999999", "\u00b2"])
def test_a_route_with_a_cost_that_is_no_count_of_credits_answers_500(check, cost):
    status, code, _ = denial(check(check_from("127.0.0.1", {"x-api-key": "AK_whatever"}, cost=cost)))
    assert (status, code) == (500, "MISCONFIGURED")


@pytest.mark.parametrize(
    ("source", "ranges", "allowed"),
    [
        ("::ffff:192.0.2.1", [OUTSIDE], True),  # a dual-stack listener's IPv4 client
        ("::ffff:198.51.100.1", [OUTSIDE], False),
        ("::1", ["::1/128"], True),
        ("2001:db8::1", [OUTSIDE], False),
        ("", [OUTSIDE], False),  # a unix socket's peer has no address
    ],
)
def test_the_source_address_in_its_forms(check, server, account, source, ranges, allowed):
    key = create_key(server.stub, account, allowed_ip_ranges=ranges).secret
    response = check(check_from(source, {"x-api-key": key}))
    if allowed:
        assert response.status.code == code_pb2.OK, response
    else:
        assert response.status.code == code_pb2.PERMISSION_DENIED
        assert denial(response)[:2] == (403, "IP_NOT_ALLOWED")


def test_with_two_trusted_hops_a_shorter_header_falls_back_to_the_downstream_address(make_server, account):
    server = make_server(xff_trusted_hops=2)
    ask = external_auth_pb2_grpc.AuthorizationStub(server.channel).Check
    key = create_key(server.stub, account, allowed_ip_ranges=["198.51.100.0/24"]).secret
    cases = [
        ("203.0.113.9", "198.51.100.1, 203.0.113.9", True),  # the second from the right
        ("203.0.113.9", "198.51.100.1, 203.0.113.9, 203.0.113.10", False),
        ("198.51.100.1", "203.0.113.9", True),  # one entry for two hops: the downstream address
        ("203.0.113.10", "198.51.100.1", False),  # ... which a client cannot write
    ]
    for source, forwarded, allowed in cases:
        response = ask(check_from(source, {"x-api-key": key, "x-forwarded-for": forwarded}))
        assert (response.status.code == code_pb2.OK) is allowed, (source, forwarded, response)
