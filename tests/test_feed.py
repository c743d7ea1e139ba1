"""The change feed: two servers on one database, changes made through A take effect on B (which had the key
cached) within the bound, a verification in flight on B cannot cache the old state, and B distrusts its
cache while its feed is lost, then recovers by itself."""

import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.field_mask_pb2 import FieldMask
from sqlalchemy import create_engine, func, select

from apikeyd.authorizer.cache import VerifiedKeyCache
from apikeyd.authorizer.feed import ChangeFeed
from apikeyd.domain import keys
from apikeyd.domain.model import EventKind, KeyChange
from apikeyd.store.models import KeyEventRow
from apikeyd.v1 import api_keys_pb2 as pb
from tests.conftest import POSTGRES_ADMIN_URL, RunningServer, authorize, create_key, held_hasher

R = pb.AuthorizeResponse
BOUND = 1.0  # seconds: a change acknowledged by one process is in force on every process by then


def _pair(make_server: Callable[..., RunningServer]) -> tuple[RunningServer, RunningServer]:
    return make_server(), make_server()


def _wait_for(condition: Callable[[], Any], timeout: float = 5.0) -> float:
    """Seconds until `condition()` is true, polling tightly; fails after `timeout`."""
    started = time.perf_counter()
    while not condition():
        if time.perf_counter() - started > timeout:
            pytest.fail(f"not within {timeout} s")
        time.sleep(0.001)
    return time.perf_counter() - started


def _caught_up(server: RunningServer) -> None:
    """Wait until `server`'s feed has applied every event committed so far (an event applied while a key is
    being verified rightly keeps that verification out of the cache)."""
    with server.app.repository.engine.connect() as connection:
        top = connection.execute(select(func.max(KeyEventRow.id))).scalar_one_or_none() or 0
    _wait_for(lambda: (server.app.feed.position or 0) >= top, timeout=BOUND * 3)


def _cached_on(server: RunningServer, secret: str, *scopes: str) -> None:
    """Authorize twice on `server`: the second answer must come from its cache."""
    _caught_up(server)
    assert authorize(server.stub, secret, *scopes).code == R.OK
    hits = server.app.cache.stats.hits
    assert authorize(server.stub, secret, *scopes).code == R.OK
    assert server.app.cache.stats.hits == hits + 1


def test_a_revoke_through_a_is_in_force_on_b_within_the_bound(make_server, account, database_url):
    a, b = _pair(make_server)
    created = [create_key(a.stub, account) for _ in range(20)]
    for key in created:
        _cached_on(b, key.secret)
    delays = []
    for key in created:
        time.sleep(random.uniform(0, 0.3))  # not in step with B's poll, which the previous wait ended on
        a.stub.RevokeApiKey(pb.RevokeApiKeyRequest(name=key.api_key.name))
        delays.append(_wait_for(lambda k=key: authorize(b.stub, k.secret).code == R.REVOKED, timeout=BOUND * 3))
    delays.sort()
    p50 = statistics.median(delays)
    p99 = delays[min(len(delays) - 1, int(0.99 * len(delays)))]
    backend = database_url.split(":", 1)[0]
    print(f"\npropagation on {backend}: p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, max {delays[-1] * 1000:.1f} ms")
    assert p99 < BOUND


def _narrow(stub, name):
    mask = FieldMask(paths=["scopes"])
    return stub.UpdateApiKey(pb.UpdateApiKeyRequest(api_key=pb.ApiKey(name=name, scopes=["domains:read"]), update_mask=mask))


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            lambda stub, name: stub.UpdateApiKey(
                pb.UpdateApiKeyRequest(
                    api_key=pb.ApiKey(name=name, state=pb.ApiKey.DISABLED), update_mask=FieldMask(paths=["state"])
                )
            ),
            R.DISABLED,
        ),
        (lambda stub, name: stub.RotateApiKey(pb.RotateApiKeyRequest(name=name, grace_period=Duration())), R.EXPIRED),
        (lambda stub, name: stub.DeleteApiKey(pb.DeleteApiKeyRequest(name=name)), R.NOT_FOUND),
        (_narrow, R.INSUFFICIENT_SCOPE),
    ],
    ids=["disable", "rotate-no-grace", "delete", "narrow-scopes"],
)
def test_every_change_through_a_takes_effect_on_b(make_server, account, change, expected):
    a, b = _pair(make_server)
    created = create_key(a.stub, account, scopes=("messages:send:all",))
    _cached_on(b, created.secret, "messages:send")
    change(a.stub, created.api_key.name)
    _wait_for(lambda: authorize(b.stub, created.secret, "messages:send").code == expected, timeout=BOUND)


def test_a_key_created_on_a_after_b_remembered_its_string_as_unknown_works_on_b(
    make_server, account, monkeypatch
):
    a, b = _pair(make_server)
    secret, parsed = keys.generate(a.app.settings.account_key_prefix, keys.new_lookup_id())
    _caught_up(b)
    assert authorize(b.stub, secret).code == R.NOT_FOUND
    negative = b.app.cache.stats.negative_hits
    assert authorize(b.stub, secret).code == R.NOT_FOUND
    assert b.app.cache.stats.negative_hits == negative + 1  # B now remembers it as unknown
    monkeypatch.setattr(keys, "generate", lambda prefix, lookup_id: (secret, parsed))
    assert create_key(a.stub, account).secret == secret
    monkeypatch.undo()
    _wait_for(lambda: authorize(b.stub, secret).code == R.OK, timeout=BOUND)


def test_a_verification_in_flight_on_b_during_a_revoke_on_a_does_not_cache_the_old_state(make_server, account):
    a, b = _pair(make_server)
    created = create_key(a.stub, account)
    _caught_up(b)  # B has seen the create: nothing pending
    with held_hasher(b, "verify") as (reached, release):
        in_flight = b.stub.Authorize.future(pb.AuthorizeRequest(key=created.secret))
        assert reached.wait(30)  # B has read the key as ACTIVE and waits before argon2
        applied = b.app.feed.applied
        a.stub.RevokeApiKey(pb.RevokeApiKeyRequest(name=created.api_key.name))
        _wait_for(lambda: b.app.feed.applied > applied, timeout=BOUND)  # B's feed has applied the revoke
        release.set()
        assert in_flight.result().code == R.OK  # it began before the revoke and read the key as it was
    assert authorize(b.stub, created.secret).code == R.REVOKED  # at once: the old state was not cached


def test_b_distrusts_its_cache_while_its_feed_is_lost_and_recovers(make_server, account, database_url):
    a, b = _pair(make_server)
    created = create_key(a.stub, account)
    other = create_key(a.stub, account)
    _cached_on(b, created.secret)
    _cached_on(b, other.secret)
    feed = b.app.feed
    real_fetch = feed._fetch

    def failing_fetch(*args: Any) -> Any:
        raise RuntimeError("the feed's database read fails (test)")

    feed._fetch = failing_fetch  # type: ignore[method-assign]
    try:
        if database_url.startswith("postgresql"):
            pid = feed.listener_pid()
            assert pid is not None
            with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
                assert admin.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0]
        _wait_for(lambda: b.app.feed.lost, timeout=BOUND * 3)
        assert not b.app.cache.trusted
        # A change B's feed cannot see: B answers from the database, not from its cache.
        a.stub.RevokeApiKey(pb.RevokeApiKeyRequest(name=created.api_key.name))
        hits = b.app.cache.stats.hits
        assert authorize(b.stub, created.secret).code == R.REVOKED
        assert authorize(b.stub, other.secret).code == R.OK
        assert authorize(b.stub, other.secret).code == R.OK
        assert b.app.cache.stats.hits == hits  # nothing served from the cache
        assert b.app.feed.lost and not b.app.cache.trusted
    finally:
        feed._fetch = real_fetch  # type: ignore[method-assign]
    _wait_for(lambda: not b.app.feed.lost and b.app.cache.trusted, timeout=BOUND * 5)
    _cached_on(b, other.secret)  # caching again
    if database_url.startswith("postgresql"):
        assert feed.listener_pid() not in (None, pid)  # listening on a new connection
        # ... and woken by it: a revoke through A reaches B within the bound again.
        a.stub.RevokeApiKey(pb.RevokeApiKeyRequest(name=other.api_key.name))
        _wait_for(lambda: authorize(b.stub, other.secret).code == R.REVOKED, timeout=BOUND)


# --- the pieces on their own (no database) ---------------------------------------------------------------


def test_the_cache_applies_remote_changes_by_key_id_and_spoils_verifications_in_flight():
    from tests.test_cache import _entry

    cache = VerifiedKeyCache()
    cache.put(b"d1", _entry("l1", 1e12), "l1", cache.generation("l1"))
    cache.put(b"d2", _entry("l2", 1e12), "l2", cache.generation("l2"))
    in_flight = cache.generation("l3")  # a verification of another key has read the database
    cache.remember_bad(b"bad")
    cache.apply_remote_changes(["id-l1"], created=False)
    assert cache.get(b"d1") is None and cache.get(b"d2") is not None
    assert not cache.put(b"d3", _entry("l3", 1e12), "l3", in_flight)  # its key may be the one changed
    assert cache.is_known_bad(b"bad")
    cache.apply_remote_changes(["id-unknown"], created=True)
    assert not cache.is_known_bad(b"bad")  # a create elsewhere forgets the unknown strings
    unknown_in_flight = cache.generation("l4")
    cache.apply_remote_changes([], created=True)
    cache.remember_bad(b"late", "l4", unknown_in_flight)
    assert not cache.is_known_bad(b"late")  # nor may a verification in flight remember one


def test_a_following_cache_trusts_its_entries_for_the_lease_past_each_sync_only():
    from tests.test_cache import Clock, _entry

    clock = Clock()
    cache = VerifiedKeyCache(clock=clock)
    assert cache.put(b"d1", _entry("l1", 1e12), "l1", cache.generation("l1"))
    assert cache.get(b"d1") is not None  # no feed: this process sees every change itself
    cache.follow(lease=1.0)
    assert cache.get(b"d1") is None and not cache.trusted  # not before the feed's first read
    cache.synced(clock.now)
    assert cache.get(b"d1") is not None
    clock.now += 0.999
    assert cache.get(b"d1") is not None
    clock.now += 0.001
    assert cache.get(b"d1") is None and not cache.trusted  # the feed went quiet: a lease, not a hope
    cache.remember_bad(b"bad")
    assert not cache.is_known_bad(b"bad")  # the key may have been created elsewhere meanwhile
    cache.synced(clock.now - 0.5)
    assert cache.get(b"d1") is not None and cache.is_known_bad(b"bad")
    cache.synced(clock.now - 2.0)  # an older read finishing late moves nothing back
    assert cache.get(b"d1") is not None


def test_a_suspended_cache_keeps_its_entries_but_trusts_none_until_the_feed_has_caught_up():
    from tests.test_cache import Clock, _entry

    clock = Clock()
    cache = VerifiedKeyCache(clock=clock)
    cache.follow(lease=1.0)
    cache.synced(clock.now)
    cache.put(b"d1", _entry("l1", 1e12), "l1", cache.generation("l1"))
    cache.suspend()
    assert cache.get(b"d1") is None and len(cache) == 1
    assert cache.put(b"d2", _entry("l2", 1e12), "l2", cache.generation("l2"))  # a fresh read is as good as any
    cache.apply_remote_changes(["id-l1"], created=False)  # the catch-up read applies what was missed
    clock.now += 0.1
    cache.synced(clock.now)
    assert cache.get(b"d1") is None and cache.get(b"d2") is not None


def test_stale_entries_serve_within_stale_if_error_past_the_last_sync_and_never_a_dropped_key():
    from tests.test_cache import Clock, _entry

    clock = Clock()
    cache = VerifiedKeyCache(ttl=60, stale_if_error=30, clock=clock)
    cache.follow(lease=1.0)
    cache.synced(clock.now)
    cache.put(b"d1", _entry("l1", clock.now + 60), "l1", cache.generation("l1"))
    cache.put(b"d2", _entry("l2", clock.now + 60), "l2", cache.generation("l2"))
    cache.invalidate("l2", "id-l2")  # changed here: gone, not stale
    cache.suspend()
    clock.now += 29.9
    assert cache.get(b"d1") is None
    assert cache.stale(b"d1") is not None and cache.stale(b"d2") is None
    assert cache.stats.stale_hits == 1
    clock.now += 0.1
    assert cache.stale(b"d1") is None  # 30 s past the last sync
    clock.now += 40
    cache.synced(clock.now)  # the feed is back, but the entry is past its TTL: no hit, still the fallback
    assert cache.get(b"d1") is None
    cache.suspend()
    assert cache.stale(b"d1") is not None
    refusing = VerifiedKeyCache(stale_if_error=0, clock=clock)
    refusing.put(b"d1", _entry("l1", clock.now + 60), "l1", refusing.generation("l1"))
    assert refusing.stale(b"d1") is None


def test_the_feed_looks_again_for_ids_skipped_below_its_position_until_their_transactions_end():
    """A gap is dropped once seen, or once a read begins after every transaction that was running when it
    was first missed has ended: (ended_below, started_below) are PostgreSQL transaction ids (Horizon)."""
    engine = create_engine("sqlite://")
    cache = VerifiedKeyCache()
    feed = ChangeFeed(engine, cache)
    try:
        feed._apply(10, [], [i for i in range(1, 11) if i != 7], (5, 8))  # 7 was not committed at start
        assert feed._gaps == {7: 8}
        feed._apply(None, [KeyChange(12, "k12", "a", "", EventKind.REVOKED)], [], (6, 9))  # 11 commits after 12
        assert feed._gaps == {7: 8, 11: 9} and feed.position == 12
        feed._apply(None, [KeyChange(11, "k11", "a", "", EventKind.REVOKED)], [], (7, 9))
        assert feed._gaps == {7: 8} and feed.position == 12
        assert feed.applied == 2
        assert feed.low_water == 6  # what a change stream may say it has sent everything up to
        for _ in range(3):  # however long it takes: transaction 7 (below 8) has not ended
            feed._apply(None, [], [], (7, 9))
        assert feed._gaps == {7: 8}
        feed._apply(None, [], [], (8, 9))  # every transaction below 8 has ended: 7 was rolled back
        assert feed._gaps == {} and feed.low_water == 12
    finally:
        feed._executor.shutdown()
        engine.dispose()


@pytest.mark.parametrize("outcome", ["commit", "rollback"])
def test_a_writer_stalled_between_its_insert_and_its_commit_is_waited_for_as_long_as_it_runs(
    make_server, database_url, account, outcome
):
    """PostgreSQL hands out event ids at insert time. A writer that stalls before its commit (a SIGSTOP, a
    lock) leaves a gap below the feed's position: the feed must still read it when it commits, however late,
    and give it up only once the writer's transaction has ended without it."""
    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite's writers take turns: no gaps")
    server = make_server()
    created = create_key(server.stub, account)
    _cached_on(server, created.secret)
    writer = psycopg.connect(database_url.replace("postgresql+psycopg://", "postgresql://"))
    try:
        writer.execute("UPDATE api_keys SET state = 'REVOKED', revision = revision + 1 WHERE key_id = %s", (created.api_key.key_id,))
        held = writer.execute(
            "INSERT INTO key_events (key_id, account_id, project_id, kind, time, changed_fields, details, actor_key_id,"
            " actor_name, actor_display_name, peer, method) VALUES (%s, %s, '', 'revoked', now(), '[]', '{}', '', '',"
            " '', '', '') RETURNING id",
            (created.api_key.key_id, account),
        ).fetchone()[0]
        later = create_key(server.stub, account)  # a later id commits first
        _wait_for(lambda: (server.app.feed.position or 0) > held)
        reads = server.app.feed.reads
        _wait_for(lambda: server.app.feed.reads >= reads + 4, timeout=10)  # read again and again meanwhile
        assert held in server.app.feed._gaps and server.app.feed.low_water < held
        assert authorize(server.stub, created.secret).code == R.OK  # the writer has not committed
        writer.commit() if outcome == "commit" else writer.rollback()
        if outcome == "commit":
            _wait_for(lambda: authorize(server.stub, created.secret).code == R.REVOKED, timeout=BOUND * 3)
        _wait_for(lambda: held not in server.app.feed._gaps, timeout=BOUND * 3)
        assert server.app.feed.low_water >= held
        assert authorize(server.stub, later.secret).code == R.OK
    finally:
        writer.close()
