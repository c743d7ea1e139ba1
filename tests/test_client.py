"""apikeyd.client against a real server over real channels: the same decisions as the server, from a cache
that every change reaches, and never an allow past the lease once the stream is gone."""

import asyncio
import signal
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest

from apikeyd.client import AsyncClient, AuthCode, AuthorizeError, Client, Connection
from apikeyd.config import Settings
from apikeyd.v1 import api_keys_pb2 as pb
from tests.conftest import RunningServer, create_key, free_port, held_hasher, wait_for

SCOPES = ("messages:send:{example.com}", "reports:read")


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    made: list[Client] = []
    yield made
    for client in made:
        client.close()


def watching(server: RunningServer, account: str, clients: list[Client], **options: Any) -> Client:
    token = create_key(server.stub, account, ("apikeys:authorize",)).secret
    client = Client(Connection(server.address, token), **options)
    clients.append(client)
    return client


def cached(client: Client, key: str, *scopes: str, **fields: Any) -> None:
    """Until the client answers `key` from its cache (a new stream's first lease stores nothing)."""

    def hit() -> bool:
        before = client.cache.stats.hits
        client.authorize(key, scopes, **fields)
        return client.cache.stats.hits > before

    wait_for(hit, "the key answered from the client's cache")


def server_says(server: RunningServer, key: str, scopes: tuple[str, ...] = (), **fields: Any) -> pb.AuthorizeResponse:
    return server.stub.Authorize(pb.AuthorizeRequest(key=key, required_scopes=scopes, **fields))


def same(decision: Any, response: pb.AuthorizeResponse) -> bool:
    return (
        int(decision.code) == response.code
        and decision.message == response.message
        and tuple(decision.missing_scopes) == tuple(response.missing_scopes)
        and (decision.key.key_id if decision.key else "") == response.key_id
    )


def authorize_calls(server: RunningServer) -> int:
    return sum(n for (method, _), n in server.app.metrics.rpc_counts.items() if method == "Authorize")


def _update(server: RunningServer, name: str, **fields: Any) -> None:
    server.stub.UpdateApiKey(pb.UpdateApiKeyRequest(api_key=pb.ApiKey(name=name, **fields), update_mask={"paths": list(fields)}))


CHANGES: dict[str, Callable[[RunningServer, str], Any]] = {
    "revoke": lambda server, name: server.stub.RevokeApiKey(pb.RevokeApiKeyRequest(name=name, reason="leaked")),
    "disable": lambda server, name: _update(server, name, state=pb.ApiKey.DISABLED),
    "delete": lambda server, name: server.stub.DeleteApiKey(pb.DeleteApiKeyRequest(name=name)),
    "narrow scopes": lambda server, name: _update(server, name, scopes=["reports:read"]),
    "rotate": lambda server, name: server.stub.RotateApiKey(pb.RotateApiKeyRequest(name=name)),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_change_reaches_the_client_and_its_answer_is_the_servers(server, account, clients, change):
    client = watching(server, account, clients)
    created = create_key(server.stub, account, SCOPES)
    key = created.secret
    cached(client, key, "messages:send", resource="example.com")
    CHANGES[change](server, created.api_key.name)
    decision = wait_for(
        lambda: (d := client.authorize(key, ["messages:send"], resource="example.com")).allowed is False and d,
        f"the client refusing after {change}",
    )
    assert same(decision, server_says(server, key, ("messages:send",), resource="example.com"))


def test_expiry_is_decided_by_the_client_alone_as_the_server_would(server, account, clients):
    client = watching(server, account, clients)
    expire = pb.ApiKey().expire_time
    expire.FromDatetime(datetime.now(UTC) + timedelta(seconds=3))
    key = create_key(server.stub, account, SCOPES, expire_time=expire).secret
    cached(client, key)
    misses = client.cache.stats.misses
    decision = wait_for(lambda: (d := client.authorize(key)).code is AuthCode.EXPIRED and d, "the key expiring")
    assert client.cache.stats.misses == misses  # from the cache, no call
    assert same(decision, server_says(server, key))


def test_every_cached_decision_is_the_servers(server, account, clients):
    client = watching(server, account, clients)
    key = create_key(server.stub, account, SCOPES, project_id="p1", labels={"team": "mail"}).secret
    cached(client, key, project_id="p1")
    cases = [
        ((), "", "p1"),
        (("messages:send",), "example.com", "p1"),
        (("messages:send",), "other.com", "p1"),
        (("messages:send", "billing:write"), "example.com", "p1"),
        (("reports:read",), "", "p2"),
        (("reports:read",), "", ""),
    ]
    for scopes, resource, project in cases:
        hits = client.cache.stats.hits
        decision = client.authorize(key, scopes, resource=resource, project_id=project)
        assert client.cache.stats.hits == hits + 1
        response = server_says(server, key, scopes, resource=resource, project_id=project)
        assert same(decision, response), (scopes, resource, project)
        assert dict(decision.key.labels) == dict(response.labels) and decision.key.project_id == "p1"


def test_bad_requests_are_refused_as_the_server_refuses_them_and_malformed_keys_cost_no_call(server, account, clients):
    client = watching(server, account, clients)
    calls = authorize_calls(server)
    assert client.authorize("not a key").code is AuthCode.MALFORMED
    for key, scopes in [("A" * 300, ()), ("AK_x", ("bad scope!",))]:
        with pytest.raises(AuthorizeError) as caught:
            client.authorize(key, scopes)
        with pytest.raises(grpc.RpcError) as remote:
            server_says(server, key, scopes)
        assert caught.value.code == remote.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details == remote.value.details()
    assert authorize_calls(server) == calls + 2  # the test's own


def test_a_key_with_rate_limits_is_checked_by_the_server_every_time(server, account, clients):
    client = watching(server, account, clients)
    limit = pb.RateLimit(limit=3)
    limit.period.FromTimedelta(timedelta(minutes=1))
    key = create_key(server.stub, account, SCOPES, rate_limits=[limit]).secret
    cached(client, create_key(server.stub, account, SCOPES).secret)  # past a new stream's first lease
    hits = client.cache.stats.hits
    codes = [client.authorize(key).code for _ in range(4)]
    assert codes == [AuthCode.OK] * 3 + [AuthCode.RATE_LIMITED]
    assert client.cache.stats.hits == hits


def test_a_client_with_a_wrong_credential_gets_no_stream_and_asks_the_server_every_time(server, account, clients):
    key = create_key(server.stub, account, SCOPES).secret
    for token, code in [
        ("AK_" + "x" * 40, grpc.StatusCode.UNAUTHENTICATED),
        (create_key(server.stub, account, ("apikeys:read",)).secret, grpc.StatusCode.PERMISSION_DENIED),
    ]:
        client = Client(Connection(server.address, token))
        clients.append(client)
        wait_for(lambda: client.follower.last_error == code, f"the stream refused with {code.name}")  # noqa: B023
        decisions = [client.authorize(key, ["reports:read"]) for _ in range(3)]
        assert all(d.allowed for d in decisions) and client.cache.stats.hits == 0 and not client.cache.trusted


def test_an_answer_in_flight_across_a_change_is_not_kept(server, account, clients):
    """The server's verification read the row before the revocation: its OK goes to the check that asked,
    but the client must not keep it, and the next check is refused."""
    client = watching(server, account, clients)
    cached(client, create_key(server.stub, account, SCOPES).secret)  # past a new stream's first lease
    created = create_key(server.stub, account, SCOPES)
    with held_hasher(server, "verify") as (reached, release):
        pending = asyncio.run_coroutine_threadsafe(asyncio.to_thread(client.authorize, created.secret), server.loop)
        assert reached.wait(10)
        position = client.follower.position
        server.stub.RevokeApiKey(pb.RevokeApiKeyRequest(name=created.api_key.name))
        wait_for(lambda: client.follower.position > position, "the client hearing of the revocation")
        # A check that arrives now must not get the answer of the call made before the change.
        late = asyncio.run_coroutine_threadsafe(asyncio.to_thread(client.authorize, created.secret), server.loop)
        release.set()
        assert pending.result(10).allowed  # what the server read before the change
        assert late.result(10).code is AuthCode.REVOKED
    assert client.authorize(created.secret).code is AuthCode.REVOKED


def test_a_reconnected_client_resumes_and_misses_no_change(database_url, account, clients):
    """The stream is cut (its server stops), a key is revoked through another server meanwhile, and the
    server comes back on the same address: the client resumes from its position, drops the revoked key and
    keeps the rest of its cache."""
    settings = Settings.load(environ={}, database_url=database_url)
    address = f"127.0.0.1:{free_port()}"
    first = RunningServer(settings, listen=address)
    other = RunningServer(settings)
    servers = [first, other]
    try:
        client = watching(first, account, clients)
        revoked, kept = (create_key(first.stub, account, SCOPES) for _ in range(2))
        cached(client, revoked.secret)
        cached(client, kept.secret)
        first.stop()
        wait_for(lambda: not client.cache.trusted, "the client noticing the cut")
        other.stub.RevokeApiKey(pb.RevokeApiKeyRequest(name=revoked.api_key.name))
        servers.append(RunningServer(settings, listen=address))
        wait_for(lambda: client.cache.trusted, "the resumed stream's heartbeat")
        assert client.follower.streams >= 2
        hits = client.cache.stats.hits
        assert client.authorize(kept.secret).allowed and client.cache.stats.hits == hits + 1  # kept: resumed
        assert client.authorize(revoked.secret).code is AuthCode.REVOKED
    finally:
        for running in servers:
            running.stop()


def test_no_allow_past_the_lease_once_the_server_stops_answering(tmp_path, account, clients):
    """SIGSTOP of a real `apikeyd serve`: no heartbeat comes, and no check is allowed from the cache later
    than a lease after the last one; then checks fail (AuthorizeError), never allow."""
    import os
    import subprocess

    from tests.conftest import APIKEYD, ServeProcess

    url = f"sqlite:///{tmp_path}/apikeyd.db"
    subprocess.run([APIKEYD, "migrate", "--database-url", url], check=True, capture_output=True, timeout=60)
    operator = subprocess.run(
        [APIKEYD, "admin-key", "create", "--display-name", "ops", "--database-url", url],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout.strip()
    port = free_port()
    env = {**os.environ, "APIKEYD_METRICS_LISTEN": "", "APIKEYD_EXT_AUTHZ_LISTEN": ""}
    process = ServeProcess(["--listen", f"127.0.0.1:{port}", "--database-url", url], env)
    try:
        admin = Client(Connection(f"127.0.0.1:{port}", operator), watch=False)
        clients.append(admin)
        grpc.channel_ready_future(admin._channel).result(timeout=30)
        token = admin.keys.create(account, "watcher", ["apikeys:authorize"]).secret
        key = admin.keys.create(account, "service", list(SCOPES)).secret
        client = Client(Connection(f"127.0.0.1:{port}", token, timeout=0.5))
        clients.append(client)
        cached(client, key)
        process.process.send_signal(signal.SIGSTOP)
        allowed_at: list[float] = []
        failures = 0
        deadline = time.monotonic() + 3 * client.cache.lease
        while time.monotonic() < deadline:
            try:
                if client.authorize(key).allowed:
                    allowed_at.append(time.monotonic())
            except AuthorizeError:
                failures += 1
        assert allowed_at and failures > 0
        assert max(allowed_at) < client.follower.last_heartbeat + client.cache.lease
        process.process.send_signal(signal.SIGCONT)
        wait_for(lambda: client.cache.trusted, "the stream back after SIGCONT", timeout=20)
        assert client.authorize(key).allowed
    finally:
        process.process.send_signal(signal.SIGCONT)
        process.stop()


def test_a_hundred_asyncio_clients_all_hear_of_a_revocation(server, account):
    token = create_key(server.stub, account, ("apikeys:authorize",)).secret
    created = create_key(server.stub, account, SCOPES)

    async def scenario() -> list[AuthCode]:
        many = [AsyncClient(Connection(server.address, token)) for _ in range(100)]
        try:
            async def warm(client: AsyncClient) -> None:
                while True:
                    hits = client.cache.stats.hits
                    await client.authorize(created.secret)
                    if client.cache.stats.hits > hits:
                        return
                    await asyncio.sleep(0.01)

            await asyncio.wait_for(asyncio.gather(*map(warm, many)), 30)
            await asyncio.to_thread(server.stub.RevokeApiKey, pb.RevokeApiKeyRequest(name=created.api_key.name))

            async def refused(client: AsyncClient) -> AuthCode:
                while (decision := await client.authorize(created.secret)).allowed:
                    await asyncio.sleep(0.001)
                return decision.code

            return await asyncio.wait_for(asyncio.gather(*map(refused, many)), 30)
        finally:
            await asyncio.gather(*(client.close() for client in many))

    assert asyncio.run(scenario()) == [AuthCode.REVOKED] * 100
    wait_for(lambda: len(server.app.streams) == 0, "the closed clients' streams gone")


def test_keys_outside_the_watchers_reach_are_never_kept(server, account, clients):
    """By default Authorize answers for any account, but the stream reports only the watcher's: a key of
    another account must be asked about every time, or its revocation would never reach the cache."""
    client = watching(server, account, clients)
    cached(client, create_key(server.stub, account, SCOPES).secret)  # past a new stream's first lease
    theirs = create_key(server.stub, f"{account}-other", SCOPES)
    hits = client.cache.stats.hits
    assert all(client.authorize(theirs.secret).allowed for _ in range(3))
    assert client.cache.stats.hits == hits
    server.stub.RevokeApiKey(pb.RevokeApiKeyRequest(name=theirs.api_key.name))
    assert client.authorize(theirs.secret).code is AuthCode.REVOKED


def test_the_connection_never_shows_its_token():
    token = "AK_" + "t" * 40
    assert token not in repr(Connection("127.0.0.1:1", token)) and token not in str(Connection("127.0.0.1:1", token))


@pytest.mark.parametrize(("scopes", "labels", "name"), [(1, 0, "svc"), (10, 5, "some key"), (100, 64, "é" * 255)])
def test_an_entrys_weight_is_never_below_what_it_takes(scopes, labels, name):
    import tracemalloc

    from apikeyd.authorizer.cache import CachedKey
    from apikeyd.client.local import weight
    from apikeyd.domain import decide
    from apikeyd.domain.model import KeyState, VerifiedKey
    from apikeyd.domain.scopes import ScopeSet

    def verified_entry(i: int, scopes: int, labels: int, name: str) -> CachedKey:
        """As the client keeps an answer: the decoded key, its ScopeSet, its allowed Decision."""
        key = VerifiedKey(
            key_id=f"{i:036d}", account_id=f"acct-{i}", project_id="p" * 63, display_name=name,
            scopes=tuple(f"res{j}x{i}:act{j}:{{dom{j}x{i}.example.com}}" for j in range(scopes)),
            labels={f"l{j}x{i}": f"v{j}y{i}" for j in range(labels)},
            state=KeyState.ACTIVE, rate_limits=(), revoke_time=None,
        )
        return CachedKey(key, decide.allowed(key, None, None), ScopeSet(key.scopes), None, None, 0.0)

    tracemalloc.start()
    try:
        entries = [verified_entry(i, scopes, labels, name) for i in range(100)]
        taken = tracemalloc.get_traced_memory()[0] / len(entries)
    finally:
        tracemalloc.stop()
    assert weight(entries[0].key) >= taken


def test_a_key_too_large_to_keep_is_asked_about_every_time(server, account, clients):
    client = watching(server, account, clients)
    cached(client, create_key(server.stub, account, SCOPES).secret)  # past a new stream's first lease
    big = create_key(
        server.stub, account, tuple(f"res{i}:act:{{d{i}.example.com}}" for i in range(100)),
        labels={f"l{i}": "v" * 63 for i in range(64)}, display_name="é" * 255,
    ).secret
    hits = client.cache.stats.hits
    assert all(client.authorize(big).allowed for _ in range(3)) and client.cache.stats.hits == hits


def test_an_answer_the_server_marks_stale_is_never_kept():
    """stale: given from what the server verified before its database went away (stale-if-error); true then,
    and perhaps not once the database is back (tests/test_database_outage.py sees the server mark it)."""
    from apikeyd.client.local import LocalCache, Miss
    from apikeyd.domain import keys
    from apikeyd.domain.access import Reach

    cache = LocalCache()
    cache.reach = Reach(True, "", "")
    cache.restart(time.monotonic() - 2 * cache.lease)  # long enough ago that nothing is held
    cache.synced(time.monotonic())
    presented, _ = keys.generate("AK_", keys.new_lookup_id())
    answer = pb.AuthorizeResponse(allowed=True, code=0, key_id="k", account_id="a", name="accounts/a/apiKeys/k")
    for stale in (True, False):
        miss = cache.lookup(presented, (), "", "")
        assert isinstance(miss, Miss)
        answer.stale = stale
        cache.learn(miss, answer)
        assert isinstance(cache.lookup(presented, (), "", ""), Miss) is stale  # still a miss only if stale


def test_expiry_is_decided_on_the_servers_clock_not_a_slow_hosts(server, account, clients, monkeypatch):
    import types

    from apikeyd.client import follow, local

    slow = types.SimpleNamespace(time=lambda: time.time() - 120, monotonic=time.monotonic)  # 2 minutes behind
    monkeypatch.setattr(local, "time", slow)
    monkeypatch.setattr(follow, "time", slow)
    client = watching(server, account, clients)
    expire = pb.ApiKey().expire_time
    expire.FromDatetime(datetime.now(UTC) + timedelta(seconds=3))
    key = create_key(server.stub, account, SCOPES, expire_time=expire).secret
    cached(client, key)
    decision = wait_for(lambda: (d := client.authorize(key)).code is AuthCode.EXPIRED and d, "the key expiring")
    assert same(decision, server_says(server, key))


def test_no_stream_before_the_servers_feed_has_made_its_first_read(make_server, account, monkeypatch):
    """Its first read sets the feed's position from the table and reads no event: a stream subscribed
    before it would get a heartbeat vouching for changes it was never sent."""
    from apikeyd.authorizer import feed as feed_module

    real = feed_module.key_changes.start_position
    failing = [True]

    def start_position(*args: Any) -> Any:
        if failing[0]:
            raise OSError("the database is not there yet")
        return real(*args)

    monkeypatch.setattr(feed_module.key_changes, "start_position", start_position)
    server = make_server()
    token = create_key(server.stub, account, ("apikeys:authorize",)).secret
    stub = server.stub_for(token)
    with pytest.raises(grpc.RpcError) as refused:
        next(iter(stub.WatchApiKeyChanges(pb.WatchApiKeyChangesRequest(resume_after=1), timeout=10)))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "first read" in refused.value.details()
    failing[0] = False
    wait_for(lambda: server.app.feed.position is not None, "the feed's first read")
    assert next(iter(stub.WatchApiKeyChanges(pb.WatchApiKeyChangesRequest(), timeout=10))).reach.account_id == account


def test_concurrent_misses_of_one_key_share_one_call(server, account, clients):
    client = watching(server, account, clients)
    cached(client, create_key(server.stub, account, SCOPES).secret)  # past a new stream's first lease
    position = client.follower.position
    key = create_key(server.stub, account, SCOPES).secret
    # Its CREATED change first: one arriving during the call would rightly keep its answer out.
    wait_for(lambda: client.follower.position > position, "the client hearing of the new key")
    calls = authorize_calls(server)
    with held_hasher(server, "verify") as (reached, release):
        checks = [
            asyncio.run_coroutine_threadsafe(asyncio.to_thread(client.authorize, key, scopes), server.loop)
            for scopes in [(), ("reports:read",), ("billing:write",)] * 7
        ]
        assert reached.wait(10)
        wait_for(lambda: len(client._flights) == 1, "one call in flight")
        release.set()
        decisions = [check.result(10) for check in checks]
    assert [d.code for d in decisions] == [AuthCode.OK, AuthCode.OK, AuthCode.INSUFFICIENT_SCOPE] * 7
    assert authorize_calls(server) == calls + 1  # the joiners decided from the entry the one call left


def test_one_scope_may_be_given_as_a_string(server, account, clients):
    client = watching(server, account, clients)
    key = create_key(server.stub, account, SCOPES).secret
    assert client.authorize(key, "reports:read").allowed
    assert client.authorize(key, "billing:write").missing_scopes == ("billing:write",)


@pytest.mark.parametrize("change", ["revoke", "disable"])
def test_a_refusal_kept_in_the_cache_says_what_the_server_says(server, account, clients, change):
    client = watching(server, account, clients)
    created = create_key(server.stub, account, SCOPES)
    CHANGES[change](server, created.api_key.name)
    cached(client, created.secret)  # past the hold after the change: the refusal itself is kept
    hits = client.cache.stats.hits
    decision = client.authorize(created.secret)
    assert client.cache.stats.hits == hits + 1 and not decision.allowed
    assert same(decision, server_says(server, created.secret))
