"""Credits (issue 12): a key's budget of uses, spent by Authorize in the database.

What must hold, over real channels and a real database: an allowed check spends its cost and a denied one
nothing (neither credits nor rate-limit budget); two servers spending one balance never spend more than it
holds; a refill comes at its boundary; Redis going away changes nothing about a balance; a worker killed in
the middle of spends leaves the balance exact; bad values get INVALID_ARGUMENT naming the field."""

import os
import shutil
import signal
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.field_mask_pb2 import FieldMask

from apikeyd.config import Settings
from apikeyd.domain.credits import Calendar, Credits, Refill, RefillMode
from apikeyd.v1 import api_keys_pb2 as pb
from apikeyd.v1 import api_keys_pb2_grpc as pb_grpc
from tests.conftest import (
    RunningServer,
    authorize,
    create_key,
    free_port,
    rpc_error,
    scratch_postgres_database,
    wait_for,
)
from tests.test_database_outage import postgres as postgres  # the fixture: a PostgreSQL server of the test's own
from tests.test_ratelimits_redis import _limits, _start_redis, _stop
from tests.test_ratelimits_redis import redis_prefix as redis_prefix  # the fixture
from tests.test_worker_faults import _operator_key
from tests.test_workers import _new_connection, supervisor

R = pb.AuthorizeResponse


def _credits(remaining: int, **refill: object) -> pb.Credits:
    return pb.Credits(remaining=remaining, refill=pb.CreditRefill(**refill) if refill else None)


def _remaining(stub: pb_grpc.ApiKeyServiceStub, name: str) -> int:
    return stub.GetApiKey(pb.GetApiKeyRequest(name=name)).credits.remaining


# --- spending ------------------------------------------------------------------------------------


def test_allowed_checks_spend_their_cost_and_the_last_credit_is_the_last(server, account):
    created = create_key(server.stub, account, credits=_credits(3))
    secret, name = created.secret, created.api_key.name
    assert created.api_key.credits.remaining == 3
    answers = [authorize(server.stub, secret, "messages:send") for _ in range(4)]
    assert [a.code for a in answers] == [R.OK, R.OK, R.OK, R.CREDITS_EXHAUSTED]
    assert [a.credits_remaining for a in answers] == [2, 1, 0, 0]
    assert all(a.HasField("credits_remaining") and a.has_limits for a in answers)
    denied = answers[-1]
    assert not denied.allowed and denied.key_id == created.api_key.key_id
    assert "0 credits left" in denied.message and "costs 1" in denied.message
    got = server.stub.GetApiKey(pb.GetApiKeyRequest(name=name))
    assert got.credits.remaining == 0
    assert got.etag == created.api_key.etag, "spending is not a change to the key"


def test_cost_is_what_an_allowed_check_spends_and_a_denied_one_spends_nothing(server, account):
    created = create_key(server.stub, account, credits=_credits(10))
    secret = created.secret
    assert authorize(server.stub, secret, cost=4).credits_remaining == 6
    too_dear = authorize(server.stub, secret, cost=7)
    assert too_dear.code == R.CREDITS_EXHAUSTED and too_dear.credits_remaining == 6
    free = authorize(server.stub, secret, cost=0)
    assert free.code == R.OK and free.credits_remaining == 6
    assert authorize(server.stub, secret, cost=6).credits_remaining == 0
    assert authorize(server.stub, secret, cost=0).code == R.OK  # 0 is never too few
    assert _remaining(server.stub, created.api_key.name) == 0


def test_keys_without_credits_ignore_the_cost_and_say_nothing_of_credits(server, account):
    secret = create_key(server.stub, account).secret
    answer = authorize(server.stub, secret, cost=1000)
    assert answer.code == R.OK and not answer.HasField("credits_remaining") and not answer.has_limits


@pytest.mark.parametrize("cost", [-1, 10**9 + 1, -(2**63)])
def test_a_bad_cost_is_invalid_argument_naming_it(server, account, cost):
    secret = create_key(server.stub, account, credits=_credits(5)).secret
    error = rpc_error(lambda: authorize(server.stub, secret, cost=cost))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "cost" in (error.details() or "")
    assert _remaining(server.stub, create_key(server.stub, account, credits=_credits(5)).api_key.name) == 5


def test_a_check_denied_before_the_credits_spends_none(server, account):
    created = create_key(server.stub, account, ("messages:send:all",), credits=_credits(2), project_id="p1")
    secret = created.secret
    assert authorize(server.stub, secret, "domains:write", project_id="p1").code == R.INSUFFICIENT_SCOPE
    assert authorize(server.stub, secret, "messages:send", project_id="p2").code == R.PROJECT_MISMATCH
    assert _remaining(server.stub, created.api_key.name) == 2


def test_a_rate_limited_check_spends_no_credits_and_a_credit_denial_takes_no_rate_budget(server, account):
    created = create_key(server.stub, account, credits=_credits(1), rate_limits=_limits((2, 3600)))
    secret = created.secret
    first = authorize(server.stub, secret)
    assert first.code == R.OK and first.remaining == 1 and first.credits_remaining == 0
    # Out of credits: denied, and the rate limit's last request is given back.
    for _ in range(5):
        assert authorize(server.stub, secret).code == R.CREDITS_EXHAUSTED
    server.stub.UpdateApiKey(
        pb.UpdateApiKeyRequest(
            api_key=pb.ApiKey(name=created.api_key.name, credits=_credits(5)), update_mask=FieldMask(paths=["credits.remaining"])
        )
    )
    second = authorize(server.stub, secret)
    assert second.code == R.OK and second.remaining == 0, "the credit denials must not have used the rate budget"
    third = authorize(server.stub, secret)
    assert third.code == R.RATE_LIMITED
    assert _remaining(server.stub, created.api_key.name) == 4, "the rate-limited check spent a credit"


def test_with_shared_rate_limits_a_credit_denial_gives_the_budget_back(make_server, account, redis_prefix):
    server = make_server(rate_limit_url="redis://127.0.0.1:6379/0", rate_limit_prefix=redis_prefix)
    created = create_key(server.stub, account, credits=_credits(0), rate_limits=_limits((1, 3600)))
    for _ in range(3):
        assert authorize(server.stub, created.secret).code == R.CREDITS_EXHAUSTED
    server.stub.UpdateApiKey(
        pb.UpdateApiKeyRequest(
            api_key=pb.ApiKey(name=created.api_key.name, credits=_credits(2)), update_mask=FieldMask(paths=["credits.remaining"])
        )
    )
    assert authorize(server.stub, created.secret).code == R.OK
    assert authorize(server.stub, created.secret).code == R.RATE_LIMITED
    assert _remaining(server.stub, created.api_key.name) == 1


def test_setting_credits_takes_effect_at_once_for_a_cached_key(server, account):
    created = create_key(server.stub, account)
    assert authorize(server.stub, created.secret).code == R.OK  # now cached, without credits
    server.stub.UpdateApiKey(
        pb.UpdateApiKeyRequest(api_key=pb.ApiKey(name=created.api_key.name, credits=_credits(0)), update_mask=FieldMask(paths=["credits"]))
    )
    assert authorize(server.stub, created.secret).code == R.CREDITS_EXHAUSTED
    server.stub.UpdateApiKey(pb.UpdateApiKeyRequest(api_key=pb.ApiKey(name=created.api_key.name), update_mask=FieldMask(paths=["credits"])))
    answer = authorize(server.stub, created.secret)
    assert answer.code == R.OK and not answer.HasField("credits_remaining")


def test_the_audit_log_records_what_credits_were_and_became(server, account):
    created = create_key(server.stub, account, credits=_credits(5))
    server.stub.UpdateApiKey(
        pb.UpdateApiKeyRequest(
            api_key=pb.ApiKey(name=created.api_key.name, credits=_credits(100, amount=100, calendar=pb.CreditRefill.DAILY)),
            update_mask=FieldMask(paths=["credits"]),
        )
    )
    events = server.stub.ListAuditEvents(pb.ListAuditEventsRequest(parent=f"accounts/{account}", filter="kind = UPDATED"))
    (event,) = events.audit_events
    assert list(event.changed_fields) == ["credits"]
    assert event.details["credits"] == "remaining=100 refill=100 daily replace"
    assert event.details["previous.credits"] == "remaining=5"


# --- two servers, one balance ---------------------------------------------------------------------


@pytest.mark.parametrize("shared_limits", [False, True], ids=["no-redis", "redis"])
def test_two_servers_spending_one_balance_never_spend_more_than_it_holds(make_server, account, shared_limits, request):
    settings = {}
    if shared_limits:
        settings = {"rate_limit_url": "redis://127.0.0.1:6379/0", "rate_limit_prefix": request.getfixturevalue("redis_prefix")}
    servers = [make_server(**settings), make_server(**settings)]
    credits = 60
    extra = {"rate_limits": _limits((10_000, 60))} if shared_limits else {}
    secret = create_key(servers[0].stub, account, credits=_credits(credits), **extra).secret
    codes: list[int] = []
    lock = threading.Lock()

    def spend(stub: pb_grpc.ApiKeyServiceStub) -> None:
        for _ in range(40):
            code = authorize(stub, secret).code
            with lock:
                codes.append(code)

    threads = [threading.Thread(target=spend, args=(s.stub,)) for s in servers for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(codes) == 240
    assert codes.count(R.OK) == credits, "exactly the balance, not one more, not one fewer"
    assert codes.count(R.CREDITS_EXHAUSTED) == 240 - credits


# --- refills --------------------------------------------------------------------------------------


def test_a_refill_comes_at_its_boundary_over_the_api(server, account):
    created = create_key(
        server.stub, account, credits=_credits(2, amount=2, every=Duration(seconds=1), mode=pb.CreditRefill.REPLACE)
    )
    due = created.api_key.credits.next_refill_time.ToDatetime(tzinfo=UTC)
    assert timedelta(0) < due - created.api_key.create_time.ToDatetime(tzinfo=UTC) <= timedelta(seconds=1)
    spent = [authorize(server.stub, created.secret, cost=2), authorize(server.stub, created.secret)]
    before = datetime.now(UTC)
    if before < due:  # still inside the first interval: nothing comes back early
        assert [a.code for a in spent] == [R.OK, R.CREDITS_EXHAUSTED]
    refilled = wait_for(
        lambda: (answer := authorize(server.stub, created.secret, cost=0)).credits_remaining == 2 and answer,
        "the refill", timeout=10,
    )
    assert datetime.now(UTC) >= due and refilled.code == R.OK
    assert server.stub.GetApiKey(pb.GetApiKeyRequest(name=created.api_key.name)).credits.next_refill_time.ToDatetime(
        tzinfo=UTC
    ) > due


_T0 = datetime(2026, 12, 31, 23, 0, tzinfo=UTC)


def test_refill_arithmetic_at_and_around_the_boundaries():
    every = Refill(10, RefillMode.REPLACE, every=timedelta(hours=1))
    credits = Credits(3, every, _T0 + timedelta(hours=1))
    assert credits.refilled(_T0 + timedelta(hours=1) - timedelta(microseconds=1)).remaining == 3
    at = credits.refilled(_T0 + timedelta(hours=1))
    assert (at.remaining, at.next_refill) == (10, _T0 + timedelta(hours=2))
    late = credits.refilled(_T0 + timedelta(hours=5, minutes=30))  # REPLACE: one amount however many were missed
    assert (late.remaining, late.next_refill) == (10, _T0 + timedelta(hours=6))

    add = Credits(3, Refill(10, RefillMode.ADD, every=timedelta(hours=1), cap=25), _T0 + timedelta(hours=1))
    assert add.refilled(_T0 + timedelta(hours=1)).remaining == 13
    assert add.refilled(_T0 + timedelta(hours=2)).remaining == 23  # two intervals: twice the amount
    assert add.refilled(_T0 + timedelta(hours=9)).remaining == 25  # up to the cap
    assert Credits(40, add.refill, add.next_refill).refilled(_T0 + timedelta(hours=3)).remaining == 40  # never down

    daily = Refill(5, calendar=Calendar.DAILY)
    assert daily.first_due(_T0) == datetime(2027, 1, 1, tzinfo=UTC)
    monthly = Refill(5, calendar=Calendar.MONTHLY)
    assert monthly.first_due(_T0) == datetime(2027, 1, 1, tzinfo=UTC)
    assert monthly.first_due(datetime(2027, 1, 1, tzinfo=UTC)) == datetime(2027, 2, 1, tzinfo=UTC)
    missed = Credits(0, monthly, datetime(2027, 1, 1, tzinfo=UTC)).refilled(datetime(2027, 3, 15, tzinfo=UTC))
    assert (missed.remaining, missed.next_refill) == (5, datetime(2027, 4, 1, tzinfo=UTC))


# --- Redis that goes away, a worker that is killed ------------------------------------------------


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="skipped: no redis-server binary")
def test_redis_killed_and_restarted_empty_neither_resets_nor_refills_a_balance(make_server, account):
    port = free_port()
    own_redis = _start_redis(port)
    try:
        server = make_server(rate_limit_url=f"redis://127.0.0.1:{port}/0")
        created = create_key(server.stub, account, credits=_credits(6), rate_limits=_limits((100, 3600)))
        assert [authorize(server.stub, created.secret).credits_remaining for _ in range(2)] == [5, 4]
        _stop(own_redis)  # mid-run: the rate limits cannot be checked (policy: allow), the credits still can
        down = [authorize(server.stub, created.secret) for _ in range(2)]
        assert [(a.code, a.credits_remaining) for a in down] == [(R.OK, 3), (R.OK, 2)]
        own_redis = _start_redis(port)  # empty: it kept nothing
        wait_for(lambda: authorize(server.stub, created.secret, cost=0).limit == 100, "limits shared again")
        after = [authorize(server.stub, created.secret) for _ in range(3)]
        assert [(a.code, a.credits_remaining) for a in after] == [(R.OK, 1), (R.OK, 0), (R.CREDITS_EXHAUSTED, 0)]
    finally:
        _stop(own_redis)


@pytest.fixture(params=["sqlite", "postgresql"])
def own_database(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/apikeyd.db"
        return
    with scratch_postgres_database("apikeyd_credits") as (_, url):
        yield url


def test_a_worker_killed_mid_spend_leaves_the_balance_exact(tmp_path, own_database):
    """Spends from several threads while worker 0 is SIGKILLed: no check beyond the balance is allowed, and
    the balance in the database is the initial one minus every spend that committed, which is every allowed
    answer plus at most the checks whose answers died with the worker."""
    credits = 150
    with supervisor(tmp_path, database_url=own_database) as running:
        victim = running.serving_workers()[0]
        token = _operator_key(own_database)
        channel = _new_connection(running.port, token)
        stub = pb_grpc.ApiKeyServiceStub(channel)
        created = create_key(stub, "credits-faults", credits=_credits(credits))
        allowed, lost, denied = [0], [0], [0]
        lock = threading.Lock()

        def spend() -> None:
            while True:
                with lock:
                    if allowed[0] + denied[0] >= credits + 60:
                        return
                conn = _new_connection(running.port)
                try:
                    code = pb_grpc.ApiKeyServiceStub(conn).Authorize(pb.AuthorizeRequest(key=created.secret), timeout=30).code
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.UNAVAILABLE, error
                    with lock:
                        lost[0] += 1
                    continue
                finally:
                    conn.close()
                with lock:
                    if code == R.OK:
                        allowed[0] += 1
                    else:
                        assert code == R.CREDITS_EXHAUSTED
                        denied[0] += 1

        threads = [threading.Thread(target=spend, daemon=True) for _ in range(6)]
        for thread in threads:
            thread.start()
        running.wait_for(lambda: allowed[0] >= 30)
        os.kill(victim["pid"], signal.SIGKILL)
        for thread in threads:
            thread.join(timeout=180)
        assert not any(thread.is_alive() for thread in threads)
        remaining = wait_for(lambda: _try_remaining(stub, created.api_key.name), "the balance", timeout=60)[0]
        channel.close()
        spent = credits - remaining
        assert allowed[0] <= spent <= allowed[0] + lost[0], (allowed, lost, remaining)
        assert remaining == 0 and allowed[0] <= credits
        running.stop()


def _try_remaining(stub: pb_grpc.ApiKeyServiceStub, name: str) -> tuple[int] | None:
    try:
        return (stub.GetApiKey(pb.GetApiKeyRequest(name=name), timeout=10).credits.remaining,)
    except grpc.RpcError:
        return None


# --- bad values -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("credits", "field"),
    [
        (_credits(-1), "credits.remaining"),
        (_credits(10**15 + 1), "credits.remaining"),
        (_credits(5, amount=0, calendar=pb.CreditRefill.DAILY), "credits.refill.amount"),
        (_credits(5, amount=-3, calendar=pb.CreditRefill.DAILY), "credits.refill.amount"),
        (_credits(5, amount=10**15 + 1, calendar=pb.CreditRefill.DAILY), "credits.refill.amount"),
        (_credits(5, amount=5), "credits.refill"),  # no interval
        (_credits(5, amount=5, calendar=pb.CreditRefill.CALENDAR_UNSPECIFIED), "credits.refill.calendar"),
        (_credits(5, amount=5, calendar=99), "credits.refill.calendar"),
        (_credits(5, amount=5, every=Duration(seconds=0)), "credits.refill.every"),
        (_credits(5, amount=5, every=Duration(seconds=367 * 86400)), "credits.refill.every"),
        (_credits(5, amount=5, every=Duration(seconds=60, nanos=5)), "credits.refill.every"),
        (_credits(5, amount=5, every=Duration(seconds=-60)), "credits.refill.every"),
        (_credits(5, amount=5, every=Duration(seconds=2**62)), "credits.refill.every"),
        (_credits(5, amount=5, calendar=pb.CreditRefill.DAILY, cap=10), "credits.refill.cap"),  # cap with REPLACE
        (_credits(5, amount=5, calendar=pb.CreditRefill.DAILY, mode=pb.CreditRefill.ADD, cap=4), "credits.refill.cap"),
        (_credits(5, amount=5, calendar=pb.CreditRefill.DAILY, mode=7), "credits.refill.mode"),
    ],
)
def test_bad_credits_are_invalid_argument_naming_the_field(server, account, credits, field):
    error = rpc_error(lambda: create_key(server.stub, account, credits=credits))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert (error.details() or "").startswith(field), error.details()
    name = create_key(server.stub, account).api_key.name
    error = rpc_error(
        lambda: server.stub.UpdateApiKey(
            pb.UpdateApiKeyRequest(api_key=pb.ApiKey(name=name, credits=credits), update_mask=FieldMask(paths=["credits"]))
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and (error.details() or "").startswith(field)


def test_parts_of_credits_need_credits_and_not_both_forms(server, account):
    name = create_key(server.stub, account).api_key.name
    error = rpc_error(
        lambda: server.stub.UpdateApiKey(
            pb.UpdateApiKeyRequest(api_key=pb.ApiKey(name=name, credits=_credits(3)), update_mask=FieldMask(paths=["credits.remaining"]))
        )
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "set `credits`" in (error.details() or "")
    error = rpc_error(
        lambda: server.stub.UpdateApiKey(
            pb.UpdateApiKeyRequest(
                api_key=pb.ApiKey(name=name, credits=_credits(3)), update_mask=FieldMask(paths=["credits", "credits.remaining"])
            )
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "update_mask" in (error.details() or "")


def test_a_refill_change_keeps_the_balance_that_spends_left(server, account):
    created = create_key(server.stub, account, credits=_credits(10))
    authorize(server.stub, created.secret, cost=4)
    updated = server.stub.UpdateApiKey(
        pb.UpdateApiKeyRequest(
            api_key=pb.ApiKey(name=created.api_key.name, credits=_credits(0, amount=50, calendar=pb.CreditRefill.MONTHLY)),
            update_mask=FieldMask(paths=["credits.refill"]),
        )
    )
    assert updated.credits.remaining == 6 and updated.credits.refill.amount == 50
    assert updated.credits.HasField("next_refill_time")


def test_a_key_cannot_set_credits_on_itself_without_allow_self(server, account):
    created = create_key(server.stub, account, ("apikeys:write", "apikeys:read"))
    own = server.stub_for(created.secret)
    error = rpc_error(
        lambda: own.UpdateApiKey(
            pb.UpdateApiKeyRequest(api_key=pb.ApiKey(name=created.api_key.name, credits=_credits(1)), update_mask=FieldMask(paths=["credits"]))
        )
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "allow_self" in (error.details() or "")


def test_a_batch_of_spends_is_decided_in_order_in_one_write(server, account):
    """What authorizer/credits.py sends when spends of one key arrive while its previous write is in flight."""
    from apikeyd.store.credits import Spent, spend

    created = create_key(server.stub, account, credits=_credits(8))
    now = datetime.now(UTC)
    spent = spend(server.app.repository, created.api_key.key_id, [5, 4, 3, 1], now)
    assert spent == [Spent(True, 3), Spent(False, 3), Spent(True, 0), Spent(False, 0)]
    assert _remaining(server.stub, created.api_key.name) == 0
    assert spend(server.app.repository, "00000000-0000-0000-0000-000000000000", [1, 1], now) == [Spent(False, None)] * 2


def test_concurrent_checks_of_one_key_share_writes_and_spend_exactly(server, account):
    created = create_key(server.stub, account, credits=_credits(100))
    codes: list[int] = []
    lock = threading.Lock()

    def check() -> None:
        for _ in range(15):
            code = authorize(server.stub, created.secret).code
            with lock:
                codes.append(code)

    threads = [threading.Thread(target=check) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert codes.count(R.OK) == 100 and codes.count(R.CREDITS_EXHAUSTED) == 20
    assert _remaining(server.stub, created.api_key.name) == 0


def test_while_the_database_is_away_a_key_with_credits_is_unavailable_and_nothing_is_lost(postgres, account):
    """A key without credits is still answered from what this process verified (stale-if-error); a key with
    credits cannot spend anywhere else than in the database, so its checks get UNAVAILABLE, and its balance
    is exactly what it was when the database comes back."""
    settings = Settings.load(
        environ={}, database_url=postgres.url, stale_if_error=30.0, health_check_interval=0.2, metrics_listen="127.0.0.1:0"
    )
    server = RunningServer(settings)
    try:
        plain = create_key(server.stub, account)
        metered = create_key(server.stub, account, credits=_credits(5))
        assert authorize(server.stub, plain.secret).code == R.OK
        assert authorize(server.stub, metered.secret).credits_remaining == 4
        postgres.stop()
        error = rpc_error(lambda: authorize(server.stub, metered.secret))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        wait_for(lambda: server.app.feed.lost, "the feed notices the database is gone")
        assert authorize(server.stub, plain.secret).code == R.OK  # stale, and said so
        assert rpc_error(lambda: authorize(server.stub, metered.secret)).code() == grpc.StatusCode.UNAVAILABLE
        postgres.start()
        answer = wait_for(lambda: _answered(server, metered.secret), "the database is back", timeout=30)
        assert answer.code == R.OK and answer.credits_remaining == 3
    finally:
        server.stop()


def _answered(server, secret: str) -> pb.AuthorizeResponse | None:
    try:
        return authorize(server.stub, secret)
    except grpc.RpcError:
        return None


def test_setting_the_balance_is_not_undone_by_a_refill_that_was_already_due(server, account):
    created = create_key(server.stub, account, credits=_credits(5, amount=100, every=Duration(seconds=1)))
    due = created.api_key.credits.next_refill_time.ToDatetime(tzinfo=UTC)
    wait_for(lambda: datetime.now(UTC) > due, "the refill to come due")  # no check has applied it yet
    cut = server.stub.UpdateApiKey(
        pb.UpdateApiKeyRequest(
            api_key=pb.ApiKey(name=created.api_key.name, credits=_credits(0)), update_mask=FieldMask(paths=["credits.remaining"])
        )
    )
    assert cut.credits.remaining == 0 and cut.credits.next_refill_time.ToDatetime(tzinfo=UTC) > due
    assert authorize(server.stub, created.secret).code == R.CREDITS_EXHAUSTED


def test_changing_the_refill_keeps_a_refill_that_was_already_due(server, account):
    created = create_key(server.stub, account, credits=_credits(0, amount=50, every=Duration(seconds=1)))
    due = created.api_key.credits.next_refill_time.ToDatetime(tzinfo=UTC)
    wait_for(lambda: datetime.now(UTC) > due, "the refill to come due")
    changed = server.stub.UpdateApiKey(
        pb.UpdateApiKeyRequest(
            api_key=pb.ApiKey(name=created.api_key.name, credits=_credits(0, amount=7, calendar=pb.CreditRefill.MONTHLY)),
            update_mask=FieldMask(paths=["credits.refill"]),
        )
    )
    assert changed.credits.remaining == 50 and changed.credits.refill.amount == 7


def test_an_update_with_an_empty_mask_never_gives_back_spent_credits(server, account):
    created = create_key(server.stub, account, credits=_credits(10))
    read = server.stub.GetApiKey(pb.GetApiKeyRequest(name=created.api_key.name))
    for _ in range(5):
        assert authorize(server.stub, created.secret).code == R.OK
    read.display_name = "renamed"  # read-modify-write (AIP-134), the etag still good: spends keep it
    updated = server.stub.UpdateApiKey(pb.UpdateApiKeyRequest(api_key=read))
    assert updated.display_name == "renamed" and updated.credits.remaining == 5


@pytest.mark.parametrize("shared", [False, True], ids=["in-process", "redis"])
def test_the_rate_limit_message_names_the_period_that_was_exceeded(make_server, account, shared, request):
    settings = {"rate_limit_url": "redis://127.0.0.1:6379/0", "rate_limit_prefix": request.getfixturevalue("redis_prefix")} if shared else {}
    server = make_server(**settings)
    secret = create_key(server.stub, account, rate_limits=_limits((100, 3600), (1, 60))).secret
    assert authorize(server.stub, secret).code == R.OK
    denied = authorize(server.stub, secret)
    assert denied.code == R.RATE_LIMITED and denied.message.startswith("rate limit of 1 per minute exceeded; retry after")
