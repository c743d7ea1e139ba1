"""Usage analytics (issue 12): Authorize outcomes counted per key in memory, flushed into minute, hour and day
buckets, kept for their retention, and read back with ListApiKeyUsage and `apikeyd keys usage`, on SQLite
and PostgreSQL. Counts are compared with the codes the test itself was answered, never with a guess."""

import asyncio
import os
import sqlite3
import subprocess
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from apikeyd.authorizer.usage import MAX_HELD, UsageCounter, UsageFlusher
from apikeyd.domain import keys
from apikeyd.domain.decision import AuthCode
from apikeyd.domain.model import KeyState, VerifiedKey
from apikeyd.domain.usage import Granularity, KeyCounts
from apikeyd.store import usage as store_usage
from apikeyd.store.repository import Repository
from apikeyd.v1 import api_keys_pb2 as pb
from apikeyd.v1 import api_keys_pb2_grpc as pb_grpc
from tests.conftest import (
    APIKEYD,
    ISSUED_SECRETS,
    BearerCredentials,
    ServeProcess,
    _migrate,
    authorize,
    create_key,
    free_port,
    rpc_error,
    wait_for,
)
from tests.test_cli import as_json, cli, ok

C = grpc.StatusCode
R = pb.AuthorizeResponse
GRANULARITIES = {pb.MINUTE: Granularity.MINUTE, pb.HOUR: Granularity.HOUR, pb.DAY: Granularity.DAY}
EVERY_CODE = {
    "OK", "RATE_LIMITED", "CREDITS_EXHAUSTED", "INSUFFICIENT_SCOPE", "PROJECT_MISMATCH", "EXPIRED", "DISABLED",
    "REVOKED", "IP_NOT_ALLOWED",
}


def stamp(when: datetime) -> Timestamp:
    value = Timestamp()
    value.FromDatetime(when)
    return value


def list_usage(stub: Any, parent: str, granularity: int, since: timedelta = timedelta(days=2), **fields: Any) -> list[pb.ApiKeyUsage]:
    """Every page, followed to the end."""
    fields.setdefault("start_time", stamp(datetime.now(UTC) - since))
    request = pb.ListApiKeyUsageRequest(parent=parent, granularity=granularity, **fields)
    found: list[pb.ApiKeyUsage] = []
    for _ in range(1000):
        page = stub.ListApiKeyUsage(request)
        found.extend(page.usage)
        if not page.next_page_token:
            return found
        request.page_token = page.next_page_token
    raise AssertionError("still more pages after 1000")


def summed(buckets: list[pb.ApiKeyUsage]) -> dict[str, Counter[str]]:
    """Counts by key id and code, over all buckets; each bucket's total checked against its counts."""
    by_key: dict[str, Counter[str]] = {}
    for bucket in buckets:
        assert bucket.total == sum(bucket.counts.values()) and all(bucket.counts.values()), bucket
        by_key.setdefault(bucket.key_id, Counter()).update(dict(bucket.counts))
    return by_key


class Tally:
    """The codes this test was answered, by key id."""

    def __init__(self, stub: Any) -> None:
        self.stub = stub
        self.codes: dict[str, Counter[str]] = {}

    def check(self, created: pb.CreateApiKeyResponse, *scopes: str, **fields: Any) -> str:
        code = R.Code.Name(authorize(self.stub, created.secret, *(scopes or ("messages:send",)), **fields).code)
        self.codes.setdefault(created.api_key.key_id, Counter())[code] += 1
        return code


def seed(repository: Repository, account: str, key_ids: list[str], days: int, project: str = "") -> None:
    """`days` daily buckets for each key, written as the flush writes them (one check each at 00:00 UTC)."""
    today = Granularity.DAY.start_of(datetime.now(UTC))
    for day in range(days):
        counted = {key_id: KeyCounts(account, project) for key_id in key_ids}
        for entry in counted.values():
            entry.counts[AuthCode.OK] = 1
        store_usage.add(repository, (today - timedelta(days=day)).timestamp(), counted)


def new_ids(count: int) -> list[str]:
    return sorted(str(uuid.uuid4()) for _ in range(count))


# --- counting and flushing ------------------------------------------------------------------------------


def test_every_outcome_code_is_counted_into_minute_hour_and_day_buckets(make_server, account):
    server = make_server(last_used_flush_interval=3600)
    stub = server.stub
    tally = Tally(stub)
    limited = create_key(
        stub, account, project_id="p1", allowed_ip_ranges=["10.0.0.0/8"],
        rate_limits=[pb.RateLimit(limit=3, period=Duration(seconds=86400))],
    )
    inside = {"project_id": "p1", "client_ip": "10.1.2.3"}
    for _ in range(4):
        tally.check(limited, **inside)  # three OK, then RATE_LIMITED
    tally.check(limited, project_id="p1", client_ip="192.0.2.1")
    tally.check(limited, project_id="p2", client_ip="10.1.2.3")
    tally.check(limited, "billing:read", **inside)
    spending = create_key(stub, account, credits=pb.Credits(remaining=1))
    tally.check(spending)
    tally.check(spending)
    switched = create_key(stub, account)
    stub.UpdateApiKey(
        pb.UpdateApiKeyRequest(
            api_key=pb.ApiKey(name=switched.api_key.name, state=pb.ApiKey.DISABLED),
            update_mask={"paths": ["state"]},
        )
    )
    tally.check(switched)
    stub.RevokeApiKey(pb.RevokeApiKeyRequest(name=switched.api_key.name))
    tally.check(switched)
    expiring = create_key(stub, account, expire_time=stamp(datetime.now(UTC) + timedelta(seconds=1)))
    wait_for(lambda: tally.check(expiring) == "EXPIRED", "the key to expire")
    # No key behind these: nothing to count them under.
    assert authorize(stub, "not-a-key").code == R.MALFORMED
    assert authorize(stub, keys.generate("AK_", keys.new_lookup_id())[0]).code == R.NOT_FOUND
    assert set().union(*tally.codes.values()) == EVERY_CODE

    server.run(server.app.usage.flush())
    parent = f"accounts/{account}/apiKeys/-"
    for value, granularity in GRANULARITIES.items():
        buckets = list_usage(stub, parent, value)
        assert summed(buckets) == tally.codes, granularity
        for bucket in buckets:
            start = bucket.start_time.ToDatetime(tzinfo=UTC)
            assert granularity.start_of(start) == start and bucket.granularity == value
            assert bucket.api_key == f"accounts/{account}/apiKeys/{bucket.key_id}"
        assert {b.project_id for b in buckets if b.key_id == limited.api_key.key_id} == {"p1"}
        assert [(b.key_id, b.start_time.ToDatetime()) for b in buckets] == sorted(
            (b.key_id, b.start_time.ToDatetime()) for b in buckets
        )
    one = list_usage(stub, limited.api_key.name, pb.DAY)
    assert summed(one) == {limited.api_key.key_id: tally.codes[limited.api_key.key_id]}


def test_the_counts_of_two_servers_on_one_database_add_up(make_server, account):
    first, second = make_server(), make_server()
    created = create_key(first.stub, account)
    for server, checks in ((first, 3), (second, 2), (first, 1)):
        for _ in range(checks):
            assert authorize(server.stub, created.secret, "messages:send").allowed
        server.run(server.app.usage.flush())
    assert summed(list_usage(first.stub, created.api_key.name, pb.DAY)) == {created.api_key.key_id: Counter(OK=6)}


def test_sigterm_writes_every_count_before_the_exit(database_url, account, tmp_path):
    """A real `apikeyd serve` that would not flush for an hour: SIGTERM's drain writes what it counted."""
    operator = subprocess.run(
        [APIKEYD, "admin-key", "create", "--display-name", "ops", "--database-url", database_url],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout.strip()
    ISSUED_SECRETS.add(operator)
    port = free_port()
    env = {**os.environ, "APIKEYD_METRICS_LISTEN": "", "APIKEYD_EXT_AUTHZ_LISTEN": ""}
    process = ServeProcess(
        ["--listen", f"127.0.0.1:{port}", "--database-url", database_url, "--last-used-flush-interval", "3600"], env
    )
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(channel).result(timeout=30)
        stub = pb_grpc.ApiKeyServiceStub(grpc.intercept_channel(channel, BearerCredentials(operator)))
        tally = Tally(stub)
        created = create_key(stub, account)
        for _ in range(5):
            tally.check(created)
        tally.check(created, "billing:read")
        channel.close()
    finally:
        assert process.stop() == 0, process.stderr
    repository = Repository.from_url(database_url)
    try:
        for granularity in Granularity:
            found, _ = store_usage.page(
                repository, account, "", (), granularity, datetime.now(UTC) - timedelta(days=1),
                datetime.now(UTC) + timedelta(days=1), 100, None,
            )
            totals: Counter[str] = Counter()
            for usage in found:
                totals.update({code.name: count for code, count in usage.counts.items()})
            assert {created.api_key.key_id: totals} == tally.codes, granularity
    finally:
        repository.close()


def test_a_flush_the_database_refuses_keeps_its_counts_for_the_next(make_server, account, tmp_path):
    url = f"sqlite:///{tmp_path / 'own.db'}"
    _migrate(url)
    server = make_server(database_url=url, last_used_flush_interval=3600)
    created = create_key(server.stub, account)
    for _ in range(3):
        assert authorize(server.stub, created.secret, "messages:send").allowed
    with sqlite3.connect(tmp_path / "own.db") as db:
        db.execute("ALTER TABLE key_usage RENAME TO key_usage_away")
    server.run(server.app.usage.flush())  # fails: no such table
    with sqlite3.connect(tmp_path / "own.db") as db:
        assert db.execute("SELECT count(*) FROM key_usage_away").fetchone() == (0,)
        db.execute("ALTER TABLE key_usage_away RENAME TO key_usage")
    assert authorize(server.stub, created.secret, "messages:send").allowed
    server.run(server.app.usage.flush())
    assert summed(list_usage(server.stub, created.api_key.name, pb.MINUTE)) == {created.api_key.key_id: Counter(OK=4)}


def test_retention_deletes_old_buckets_per_granularity_a_bounded_number_at_a_time(make_server, account):
    server = make_server(
        usage_retention_minute=3600, usage_retention_hour=2 * 86400, usage_retention_day=10 * 86400,
        usage_cleanup_rows=5, last_used_flush_interval=3600,
    )
    repository = server.app.repository
    ids = new_ids(8)
    now = time.time()
    for age in (20 * 86400, 3 * 3600, 120):  # past every retention; past the minute's only; within all
        counted = {key_id: KeyCounts(account, "") for key_id in ids}
        for entry in counted.values():
            entry.counts[AuthCode.OK] = 1
        store_usage.add(repository, now - age, counted)

    def kept(granularity: int) -> int:
        return len(list_usage(server.stub, f"accounts/{account}/apiKeys/-", granularity, since=timedelta(days=30)))

    days_before = kept(pb.DAY)  # 16 or 24: 3 hours and 2 minutes ago may be one day or two
    assert (kept(pb.MINUTE), kept(pb.HOUR)) == (24, 24)
    deleted = server.run(server.app.usage.clean_up())
    assert 0 < deleted <= 3 * 5  # at most usage_cleanup_rows per granularity
    wait_for(lambda: server.run(server.app.usage.clean_up()) == 0, "every old bucket deleted", timeout=60)
    assert kept(pb.MINUTE) == 8  # 2 minutes ago
    assert kept(pb.HOUR) == 16  # 3 hours and 2 minutes ago
    assert kept(pb.DAY) == days_before - 8  # not 20 days ago


def test_a_counter_past_max_keys_asks_for_a_flush_at_once(tmp_path, account):
    """The early flush: with an hour to the next one, a counter that reaches its bound of keys wakes the
    flush loop, which writes them."""
    url = f"sqlite:///{tmp_path / 'own.db'}"
    _migrate(url)
    repository = Repository.from_url(url)
    counter = UsageCounter(max_keys=10)
    ids = new_ids(10)
    keys_ = [VerifiedKey(key_id, account, "", "k", (), {}, KeyState.ACTIVE, (), None) for key_id in ids]

    async def run() -> None:
        with ThreadPoolExecutor(1) as pool:
            flusher = UsageFlusher(counter, repository, pool, {}, 1)
            waiting = asyncio.create_task(flusher.wait(3600))
            for key in keys_[:9]:
                counter.count(key, AuthCode.OK)
            await asyncio.sleep(0)  # the loop turns; the wait goes on
            assert not waiting.done()
            counter.count(keys_[9], AuthCode.OK)
            await asyncio.wait_for(waiting, 10)
            await flusher.flush()

    try:
        asyncio.run(run())
        found, _ = store_usage.page(
            repository, account, "", (), Granularity.MINUTE, datetime.now(UTC) - timedelta(hours=1),
            datetime.now(UTC) + timedelta(hours=1), 100, None,
        )
        assert sorted(usage.key_id for usage in found) == ids
    finally:
        repository.close()


def test_while_writes_fail_the_oldest_minutes_go_first_past_max_held():
    now = [1_000_000.0 * 60]
    counter = UsageCounter(clock=lambda: now[0])
    per_minute = MAX_HELD // 4
    keys_ = [VerifiedKey(f"k{i}", "a", "", "k", (), {}, KeyState.ACTIVE, (), None) for i in range(per_minute)]
    held: list[tuple[float, Any]] = []
    for minute in range(6):  # six minutes of failed flushes: two more than fit
        for key in keys_:
            counter.count(key, AuthCode.OK)
        held = counter.take()
        assert counter.put_back(held) == (per_minute if minute >= 4 else 0)
        now[0] += 60
    kept = counter.take()
    assert [start for start, _ in kept] == [now[0] - 60 * n for n in (4, 3, 2, 1)]
    assert sum(len(minute) for _, minute in kept) == MAX_HELD


# --- reading --------------------------------------------------------------------------------------------


def test_a_month_of_daily_usage_for_a_hundred_keys_is_one_call(server, account):
    ids = new_ids(100)
    seed(server.app.repository, account, ids, days=30)
    request = pb.ListApiKeyUsageRequest(
        parent=f"accounts/{account}/apiKeys/-", granularity=pb.DAY, key_ids=ids,
        start_time=stamp(datetime.now(UTC) - timedelta(days=29)), page_size=10_000,
    )
    page = server.stub.ListApiKeyUsage(request)
    assert len(page.usage) == 3000 and not page.next_page_token
    assert [(u.key_id, u.start_time.seconds) for u in page.usage] == sorted((u.key_id, u.start_time.seconds) for u in page.usage)
    assert {u.key_id for u in page.usage} == set(ids) and all(u.counts == {"OK": 1} for u in page.usage)
    fewer = server.stub.ListApiKeyUsage(pb.ListApiKeyUsageRequest(
        parent=f"accounts/{account}/apiKeys/-", granularity=pb.DAY, key_ids=ids[:3],
        start_time=stamp(datetime.now(UTC) - timedelta(days=6)),
    ))
    assert len(fewer.usage) == 3 * 7 and {u.key_id for u in fewer.usage} == set(ids[:3])


def test_pages_follow_each_other_without_repeats_or_gaps(server, account):
    ids = new_ids(5)
    seed(server.app.repository, account, ids, days=9)
    parent = f"accounts/{account}/apiKeys/-"
    whole = list_usage(server.stub, parent, pb.DAY, since=timedelta(days=30), page_size=10_000)
    assert len(whole) == 45
    for size in (1, 7, 44, 45):
        paged = list_usage(server.stub, parent, pb.DAY, since=timedelta(days=30), page_size=size)
        assert paged == whole, size
    default = server.stub.ListApiKeyUsage(pb.ListApiKeyUsageRequest(
        parent=parent, granularity=pb.MINUTE, start_time=stamp(datetime.now(UTC) - timedelta(days=30)), page_size=2,
    ))
    assert len(default.usage) == 2 and default.next_page_token
    # A token is bound to the request it came from: another granularity, range or key set is refused.
    for changed in ({"granularity": pb.HOUR}, {"key_ids": ids[:1]}, {"start_time": stamp(datetime(2020, 1, 1, tzinfo=UTC))}):
        fields = {"parent": parent, "granularity": pb.MINUTE, "start_time": stamp(datetime.now(UTC) - timedelta(days=30))}
        error = rpc_error(lambda fields=fields, changed=changed: server.stub.ListApiKeyUsage(
            pb.ListApiKeyUsageRequest(**{**fields, **changed}, page_token=default.next_page_token)
        ))
        assert error.code() == C.INVALID_ARGUMENT and error.details().startswith("page_token:"), changed


def test_each_caller_sees_the_usage_within_its_reach(server, account):
    stub = server.stub
    in_p1, in_p2, account_wide = new_ids(3)
    repository = server.app.repository
    seed(repository, account, [in_p1], days=1, project="p1")
    seed(repository, account, [in_p2], days=1, project="p2")
    seed(repository, account, [account_wide], days=1)
    parent = f"accounts/{account}/apiKeys/-"

    def seen(caller: Any, name: str = parent, **fields: Any) -> set[str]:
        return {u.key_id for u in list_usage(caller, name, pb.DAY, **fields)}

    assert seen(stub) == {in_p1, in_p2, account_wide}  # the operator, from another account
    reader = server.stub_for(create_key(stub, account, ("apikeys:read",)).secret)
    assert seen(reader) == {in_p1, in_p2, account_wide}
    project_reader = server.stub_for(create_key(stub, account, ("apikeys:read",), project_id="p1").secret)
    assert seen(project_reader) == {in_p1}
    assert seen(project_reader, key_ids=[in_p2, account_wide]) == set()
    assert seen(project_reader, f"accounts/{account}/apiKeys/{in_p2}") == set()
    other = f"acct-{uuid.uuid4().hex[:10]}"
    tenant = server.stub_for(create_key(stub, other, ("apikeys:read",)).secret)
    assert seen(tenant, f"accounts/{other}/apiKeys/-", key_ids=[in_p1]) == set()  # another account's key
    for name in (parent, f"accounts/{account}/apiKeys/{in_p1}"):
        error = rpc_error(lambda name=name: list_usage(tenant, name, pb.DAY))
        assert error.code() == C.PERMISSION_DENIED, name
    no_read = server.stub_for(create_key(stub, account, ("apikeys:write",)).secret)
    error = rpc_error(lambda: list_usage(no_read, parent, pb.DAY))
    assert error.code() == C.PERMISSION_DENIED and "apikeys:read" in error.details()
    denied = stub.ListAuditEvents(pb.ListAuditEventsRequest(parent=f"accounts/{account}", filter="kind = DENIED"))
    assert [e.method for e in denied.audit_events] == ["ListApiKeyUsage"]


def _bad_requests(account: str) -> list[tuple[str, dict[str, Any]]]:
    one = f"accounts/{account}/apiKeys/{uuid.uuid4()}"
    every = f"accounts/{account}/apiKeys/-"
    start = stamp(datetime.now(UTC) - timedelta(hours=1))
    good: dict[str, Any] = {"parent": every, "granularity": pb.HOUR, "start_time": start}
    return [
        ("parent", {**good, "parent": ""}),
        ("parent", {**good, "parent": f"accounts/{account}"}),
        ("parent", {**good, "parent": f"accounts/{account}/apiKeys/NOT-A-UUID"}),
        ("parent", {**good, "parent": "accounts/-/apiKeys/-"}),
        ("parent", {**good, "parent": "x" * 500}),
        ("granularity", {**good, "granularity": pb.USAGE_GRANULARITY_UNSPECIFIED}),
        ("granularity", {**good, "granularity": 42}),
        ("start_time", {k: v for k, v in good.items() if k != "start_time"}),
        ("start_time", {**good, "start_time": Timestamp(seconds=2**62)}),
        ("end_time", {**good, "end_time": Timestamp(seconds=-(2**62))}),
        ("end_time", {**good, "end_time": start}),
        ("end_time", {**good, "end_time": stamp(datetime.now(UTC) - timedelta(days=1))}),
        ("key_ids", {**good, "parent": one, "key_ids": [str(uuid.uuid4())]}),
        ("key_ids", {**good, "key_ids": new_ids(1001)}),
        ("key_ids", {**good, "key_ids": ["not-a-key-id"]}),
        ("key_ids", {**good, "key_ids": [str(uuid.uuid4()).upper()]}),
        ("key_ids", {**good, "key_ids": ["k" * 37]}),
        ("page_size", {**good, "page_size": -1}),
        ("page_token", {**good, "page_token": "garbage"}),
        ("page_token", {**good, "page_token": "t" * 2000}),
    ]


def test_bad_input_is_invalid_argument_naming_the_field(server, account):
    for field, fields in _bad_requests(account):
        error = rpc_error(lambda fields=fields: server.stub.ListApiKeyUsage(pb.ListApiKeyUsageRequest(**fields)))
        assert error.code() == C.INVALID_ARGUMENT, (field, error.code(), error.details())
        assert error.details().startswith(f"{field}:"), (field, error.details())


# --- the command line -----------------------------------------------------------------------------------


def test_keys_usage_prints_a_table_and_json(make_server, account):
    server = make_server(last_used_flush_interval=3600)
    created = create_key(server.stub, account)
    for scopes in (("messages:send",), ("messages:send",), ("billing:read",)):
        authorize(server.stub, created.secret, *scopes)
    server.run(server.app.usage.flush())
    key_id = created.api_key.key_id
    table = ok(cli(server, "keys", "usage", "-", "--account", account, "--granularity", "day"))
    header, row = table.stdout.splitlines()
    assert header.split() == ["KEY", "ID", "START", "TOTAL", "OK", "DENIED"]
    assert row.split()[0] == key_id and row.split()[2:] == ["3", "2", "INSUFFICIENT_SCOPE=1"]
    assert "1 bucket shown" in table.stderr and "no more pages" in table.stderr
    document = as_json(cli(server, "keys", "usage", key_id, "--account", account, "--granularity", "minute", "--json"))
    assert [(u["key_id"], u["total"], u["counts"]) for u in document["usage"]] == [
        (key_id, "3", {"OK": "2", "INSUFFICIENT_SCOPE": "1"})
    ]
    until_before = cli(server, "keys", "usage", created.api_key.name, "--since", "2d", "--until", "1d", "--json")
    assert as_json(until_before)["usage"] == []
    refused = cli(server, "keys", "usage", "-", "--account", account, "--since", "soon")
    assert refused.exit_code == 2 and "--since" in refused.stderr
    assert cli(server, "keys", "usage", created.api_key.name, "--key-id", key_id).exit_code == 2


def test_two_replicas_flushing_the_same_keys_take_their_row_locks_in_one_order():
    """Every flush adds to the same hour and day rows of its keys; two replicas that lock them in the order
    each first saw its keys deadlock on PostgreSQL (50 of 60 transactions did before the rows were sorted)."""
    import threading
    import time as clock
    import uuid as uuids

    from apikeyd.domain.decision import AuthCode
    from apikeyd.domain.usage import KeyCounts
    from apikeyd.store import usage as store_usage
    from apikeyd.store.repository import Repository
    from tests.conftest import _migrate, scratch_postgres_database

    with scratch_postgres_database("apikeyd_usage_locks") as (_, url):
        _migrate(url)
        repository = Repository.from_url(url, 8)
        account = f"acct-{uuids.uuid4().hex[:8]}"
        ids = [str(uuids.uuid4()) for _ in range(300)]
        failures: list[BaseException] = []
        minute = clock.time() // 60 * 60

        def flush(order: list[str]) -> None:
            for _ in range(10):
                counted = {key_id: KeyCounts(account, "") for key_id in order}
                for entry in counted.values():
                    entry.counts[AuthCode.OK] = 1
                try:
                    store_usage.add(repository, minute, counted)
                except Exception as error:  # reported below
                    failures.append(error)

        threads = [threading.Thread(target=flush, args=(order,)) for order in (ids, ids[::-1], ids, ids[::-1])]
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=300)
        finally:
            repository.close()
        assert not failures, f"{len(failures)} of 40 flushes failed: {failures[0]!r}"


@pytest.mark.parametrize("seconds", [1e11, float("inf"), float("nan")])
def test_a_retention_past_100_years_is_refused_at_start(seconds):
    from apikeyd.app import App, StartupError
    from apikeyd.config import Settings

    with pytest.raises(StartupError, match="APIKEYD_USAGE_RETENTION_DAY"):
        App(Settings.load(environ={}, database_url="sqlite://", usage_retention_day=seconds)).close()
