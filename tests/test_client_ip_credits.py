"""apikeyd.client with IP allowlists and credits, over real channels against a real apikeyd: client_ip and
cost reach the server, keys with either are asked of the server every time (never answered from the
cache), bad values are refused as the server refuses them, and the integrations pass the peer's address."""

import asyncio
from collections.abc import Callable

import grpc
import pytest
from starlette.testclient import TestClient

from apikeyd.client import AsyncClient, AuthCode, AuthorizeError, Client, Connection
from apikeyd.client.grpc_auth import _peer_ip
from apikeyd.v1 import api_keys_pb2 as pb
from tests import test_client_integrations as integrations
from tests.conftest import RunningServer, create_key, wait_for
from tests.test_client import authorize_calls, cached, watching
from tests.test_client_integrations import Echo, Issued, asgi_app, bearer, error_of, issue, refused

issued, start_echo = integrations.issued, integrations.start_echo  # its fixtures: a tenant's keys, the echo servers
RANGES = ["192.0.2.0/24", "2001:db8::/32"]


@pytest.fixture
def clients():
    made: list[Client] = []
    yield made
    for client in made:
        client.close()


def test_client_ip_and_cost_reach_the_server_and_such_keys_are_asked_every_time(server, account, clients):
    client = watching(server, account, clients)
    plain = create_key(server.stub, account).secret
    cached(client, plain)  # the stream is up and answers are kept: what follows is not kept by choice
    ranged = create_key(server.stub, account, allowed_ip_ranges=RANGES).secret
    answers = [
        ("192.0.2.7", AuthCode.OK),
        ("::ffff:192.0.2.7", AuthCode.OK),
        ("2001:db8::1", AuthCode.OK),
        ("198.51.100.1", AuthCode.IP_NOT_ALLOWED),
        ("", AuthCode.IP_NOT_ALLOWED),
    ]
    for client_ip, code in answers * 2:
        calls = authorize_calls(server)
        assert client.authorize(ranged, client_ip=client_ip).code is code
        assert authorize_calls(server) == calls + 1, "a key with ranges is never answered from the cache"
    paid = create_key(server.stub, account, credits=pb.Credits(remaining=5)).secret
    assert [client.authorize(paid, cost=2).credits_remaining for _ in range(2)] == [3, 1]
    exhausted = client.authorize(paid, cost=2)
    assert (exhausted.code, exhausted.credits_remaining) == (AuthCode.CREDITS_EXHAUSTED, 1)
    assert client.authorize(paid).credits_remaining == 0  # cost unset: 1
    assert client.authorize(plain, client_ip="198.51.100.1").allowed
    assert client.cache.stats.hits > 0


def test_a_key_given_ranges_after_it_was_cached_is_refused_from_outside_once_the_change_arrives(server, account, clients):
    client = watching(server, account, clients)
    created = create_key(server.stub, account)
    cached(client, created.secret, client_ip="198.51.100.1")
    ranged = pb.ApiKey(name=created.api_key.name, allowed_ip_ranges=RANGES)
    server.stub.UpdateApiKey(pb.UpdateApiKeyRequest(api_key=ranged, update_mask={"paths": ["allowed_ip_ranges"]}))

    def refused_from_outside() -> bool:
        return client.authorize(created.secret, client_ip="198.51.100.1").code is AuthCode.IP_NOT_ALLOWED

    wait_for(refused_from_outside, "the client refusing the address after the change")
    calls = authorize_calls(server)
    assert client.authorize(created.secret, client_ip="192.0.2.1").allowed
    assert authorize_calls(server) == calls + 1


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"client_ip": "not-an-ip"}, "client_ip"),
        ({"client_ip": "fe80::1%eth0"}, "client_ip"),
        ({"cost": -1}, "cost"),
        ({"cost": 10**9 + 1}, "cost"),
    ],
)
def test_a_bad_client_ip_or_cost_is_refused_as_the_server_refuses_it_even_for_a_cached_key(
    server, account, clients, fields, field
):
    client = watching(server, account, clients)
    key = create_key(server.stub, account).secret
    cached(client, key)
    with pytest.raises(AuthorizeError) as local:
        client.authorize(key, **fields)
    with pytest.raises(grpc.RpcError) as remote:
        server.stub.Authorize(pb.AuthorizeRequest(key=key, **fields))
    assert local.value.code is remote.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert local.value.details == remote.value.details() and local.value.details.startswith(f"{field}:")


def test_the_async_client_passes_client_ip_and_cost(server: RunningServer, account: str) -> None:
    watcher = create_key(server.stub, account, ("apikeys:authorize",)).secret
    ranged = create_key(server.stub, account, allowed_ip_ranges=RANGES).secret
    paid = create_key(server.stub, account, credits=pb.Credits(remaining=3)).secret

    async def run() -> list[object]:
        async with AsyncClient(Connection(server.address, watcher)) as client:
            return [
                (await client.authorize(ranged, client_ip="192.0.2.9")).code,
                (await client.authorize(ranged, client_ip="198.51.100.9")).code,
                (await client.authorize(paid, cost=3)).credits_remaining,
                (await client.authorize(paid)).code,
            ]

    assert asyncio.run(run()) == [AuthCode.OK, AuthCode.IP_NOT_ALLOWED, 0, AuthCode.CREDITS_EXHAUSTED]


# --- the integrations ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("peer", "address"),
    [
        ("ipv4:192.0.2.1:5000", "192.0.2.1"),
        ("ipv6:%5B2001:db8::1%5D:5000", "2001:db8::1"),  # as grpc writes it
        ("ipv6:[::1]:5000", "::1"),
        ("ipv6:%5B::ffff:192.0.2.1%5D:5000", "::ffff:192.0.2.1"),
        ("ipv6:%5Bfe80::1%25eth0%5D:5000", "fe80::1"),  # the scope names this host's interface
        ("unix:/run/app.sock", ""),
        ("unix-abstract:app", ""),
        ("ipv4:not-an-address:1", ""),
    ],
)
def test_grpcs_peer_string_as_a_client_ip(peer, address):
    assert _peer_ip(peer) == address


def test_grpc_the_peer_address_counts_for_keys_with_ranges_and_spent_credits_are_resource_exhausted(
    server: RunningServer, issued: Issued, start_echo: Callable[..., Echo]
) -> None:
    echo = start_echo(issued.connection)
    local = issue(server, issued.account, allowed_ip_ranges=["127.0.0.0/8"]).secret
    elsewhere = issue(server, issued.account, allowed_ip_ranges=RANGES).secret
    assert echo.send(metadata=bearer(local))
    error = refused(lambda: echo.send(metadata=bearer(elsewhere)), elsewhere)
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "127.0.0.1" in (error.details() or "") and "allowed_ip_ranges" in (error.details() or "")
    paid = issue(server, issued.account, credits=pb.Credits(remaining=1)).secret
    assert echo.send(metadata=bearer(paid))
    error = refused(lambda: echo.send(metadata=bearer(paid)), paid)
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    trailers = dict(error.trailing_metadata() or ())
    assert trailers["x-apikeyd-credits-remaining"] == "0" and "retry-after" not in trailers


def test_asgi_the_client_address_counts_for_keys_with_ranges_and_spent_credits_are_429(server, issued: Issued) -> None:
    ranged = issue(server, issued.account, allowed_ip_ranges=RANGES).secret
    headers = {"authorization": f"Bearer {ranged}"}
    with TestClient(asgi_app(issued.connection), client=("192.0.2.7", 5000)) as http:
        assert http.post("/messages", headers=headers).status_code == 200
    with TestClient(asgi_app(issued.connection), client=("198.51.100.1", 5000)) as http:
        answer = http.post("/messages", headers=headers)
        assert (answer.status_code, error_of(answer, ranged)) == (403, "IP_NOT_ALLOWED")
    # TestClient's own client, ("testclient", 50000), is no address: such keys are refused, others not.
    with TestClient(asgi_app(issued.connection)) as http:
        answer = http.post("/messages", headers=headers)
        assert (answer.status_code, error_of(answer, ranged)) == (403, "IP_NOT_ALLOWED")
        assert http.post("/messages", headers={"authorization": f"Bearer {issued.key}"}).status_code == 200
        paid = issue(server, issued.account, credits=pb.Credits(remaining=1)).secret
        assert http.post("/messages", headers={"authorization": f"Bearer {paid}"}).status_code == 200
        answer = http.post("/messages", headers={"authorization": f"Bearer {paid}"})
        assert (answer.status_code, error_of(answer, paid)) == (429, "CREDITS_EXHAUSTED")
        assert answer.headers["x-apikeyd-credits-remaining"] == "0" and "retry-after" not in answer.headers
