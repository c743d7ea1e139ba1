"""Rotation you can see finish (issue 12): while a rotation's grace runs, the previous secret's last use is
recorded and shown; with end_grace_after_unused, the grace ends early once that secret has gone unused for
so long, as an audited change in force at once. The sweep's clock is the real one: the tests move the
recorded times back in the database instead of waiting minutes."""

from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from sqlalchemy import update

from apikeyd.graces import end_idle_graces
from apikeyd.store.models import ApiKeyRow
from apikeyd.v1 import api_keys_pb2 as pb
from tests.conftest import authorize, create_key, rpc_error, wait_for

R = pb.AuthorizeResponse
HOUR = Duration(seconds=3600)
TEN_MINUTES = Duration(seconds=600)


def _rotate(stub, name: str, grace: Duration = HOUR, end_after: Duration | None = None) -> pb.RotateApiKeyResponse:
    return stub.RotateApiKey(pb.RotateApiKeyRequest(name=name, grace_period=grace, end_grace_after_unused=end_after))


def _get(stub, name: str) -> pb.ApiKey:
    return stub.GetApiKey(pb.GetApiKeyRequest(name=name))


def test_the_previous_secrets_last_use_is_recorded_and_shown(server, account):
    created = create_key(server.stub, account)
    name, old = created.api_key.name, created.secret
    new = _rotate(server.stub, name).secret
    assert not _get(server.stub, name).HasField("previous_secret_last_used_time")
    assert authorize(server.stub, new).code == R.OK
    server.run(server.app.authorizer.flush_last_used())
    assert not _get(server.stub, name).HasField("previous_secret_last_used_time"), "the new secret is not the previous"
    before = datetime.now(UTC)
    assert authorize(server.stub, old).code == R.OK
    server.run(server.app.authorizer.flush_last_used())
    got = _get(server.stub, name)
    used = got.previous_secret_last_used_time.ToDatetime(tzinfo=UTC)
    assert before - timedelta(seconds=1) <= used <= datetime.now(UTC)
    listed = server.stub.ListApiKeys(pb.ListApiKeysRequest(parent=f"accounts/{account}")).api_keys
    assert [k.previous_secret_last_used_time for k in listed] == [got.previous_secret_last_used_time]
    # A second rotation has another previous secret: its uses start afresh.
    _rotate(server.stub, name)
    assert not _get(server.stub, name).HasField("previous_secret_last_used_time")


def test_an_unused_previous_secret_has_its_grace_ended_early(server, account):
    created = create_key(server.stub, account)
    name, key_id, old = created.api_key.name, created.api_key.key_id, created.secret
    rotated = _rotate(server.stub, name, end_after=TEN_MINUTES)
    assert rotated.api_key.end_grace_after_unused.seconds == 600
    assert authorize(server.stub, old).code == R.OK  # cached now, in its grace
    margin = timedelta(seconds=60)
    assert server.run(end_idle_graces(server.app.manager, server.app.repository, margin)) == 0, "just rotated"
    long_ago = datetime.now(UTC) - timedelta(minutes=12)
    with server.app.repository.session(write=True) as session:
        session.execute(update(ApiKeyRow).where(ApiKeyRow.key_id == key_id).values(update_time=long_ago))
    assert server.run(end_idle_graces(server.app.manager, server.app.repository, margin)) == 1
    denied = authorize(server.stub, old)
    assert denied.code == R.EXPIRED and "rotated out" in denied.message
    assert authorize(server.stub, rotated.secret).code == R.OK
    events = server.stub.ListAuditEvents(pb.ListAuditEventsRequest(parent=f"accounts/{account}", filter="kind = UPDATED"))
    (event,) = events.audit_events
    assert list(event.changed_fields) == ["previous_secret_expire_time"] and event.method == "EndIdleGrace"
    assert "went unused for" in event.reason
    assert server.run(end_idle_graces(server.app.manager, server.app.repository, margin)) == 0, "ended once"


def test_a_previous_secret_used_recently_keeps_its_grace(server, account):
    created = create_key(server.stub, account)
    name, key_id, old = created.api_key.name, created.api_key.key_id, created.secret
    _rotate(server.stub, name, end_after=TEN_MINUTES)
    long_ago = datetime.now(UTC) - timedelta(hours=2)
    with server.app.repository.session(write=True) as session:
        session.execute(update(ApiKeyRow).where(ApiKeyRow.key_id == key_id).values(update_time=long_ago))
    assert authorize(server.stub, old).code == R.OK
    server.run(server.app.authorizer.flush_last_used())
    assert server.run(end_idle_graces(server.app.manager, server.app.repository, timedelta(seconds=60))) == 0
    assert authorize(server.stub, old).code == R.OK


def test_the_servers_own_flush_loop_ends_a_due_grace(make_server, account):
    server = make_server(last_used_flush_interval=0.2)
    created = create_key(server.stub, account)
    key_id, old = created.api_key.key_id, created.secret
    _rotate(server.stub, created.api_key.name, end_after=TEN_MINUTES)
    with server.app.repository.session(write=True) as session:
        session.execute(
            update(ApiKeyRow).where(ApiKeyRow.key_id == key_id).values(update_time=datetime.now(UTC) - timedelta(minutes=11))
        )
    # Polled through GetApiKey: a check with the old secret would be a use, and keep its grace going.
    wait_for(
        lambda: _get(server.stub, created.api_key.name).previous_secret_expire_time.ToDatetime(tzinfo=UTC)
        <= datetime.now(UTC),
        "the grace ended by the flush loop",
    )
    assert authorize(server.stub, old).code == R.EXPIRED


def test_a_rotation_without_the_option_is_never_ended_early(server, account):
    created = create_key(server.stub, account)
    _rotate(server.stub, created.api_key.name)
    with server.app.repository.session(write=True) as session:
        session.execute(
            update(ApiKeyRow)
            .where(ApiKeyRow.key_id == created.api_key.key_id)
            .values(update_time=datetime.now(UTC) - timedelta(days=3))
        )
    assert server.run(end_idle_graces(server.app.manager, server.app.repository, timedelta(0))) == 0
    assert authorize(server.stub, created.secret).code == R.OK


@pytest.mark.parametrize(
    ("grace", "end_after"),
    [(HOUR, Duration(seconds=299)), (HOUR, Duration(seconds=3601)), (Duration(seconds=60), Duration(seconds=300)),
     (HOUR, Duration(seconds=600, nanos=1)), (HOUR, Duration(seconds=-600))],
)
def test_a_bad_end_grace_after_unused_is_invalid_argument_naming_it(server, account, grace, end_after):
    name = create_key(server.stub, account).api_key.name
    error = rpc_error(lambda: _rotate(server.stub, name, grace, end_after))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.details() or "").startswith("end_grace_after_unused"), error.details()


def test_two_sweeps_end_a_grace_once_even_a_second_apart(server, account, monkeypatch):
    import apikeyd.graces as graces

    created = create_key(server.stub, account)
    _rotate(server.stub, created.api_key.name, end_after=TEN_MINUTES)
    half_an_hour_ago = datetime.now(UTC) - timedelta(minutes=30)
    with server.app.repository.session(write=True) as session:
        session.execute(
            update(ApiKeyRow)
            .where(ApiKeyRow.key_id == created.api_key.key_id)
            .values(update_time=half_an_hour_ago, previous_secret_last_used_time=half_an_hour_ago)
        )
    margin = timedelta(seconds=60)
    assert server.run(end_idle_graces(server.app.manager, server.app.repository, margin)) == 1

    class Behind(datetime):  # a replica whose clock is 2 s behind, or whose sweep began 2 s earlier
        @classmethod
        def now(cls, tz=None):  # type: ignore[override]
            return datetime.now(tz) - timedelta(seconds=2)

    monkeypatch.setattr(graces, "datetime", Behind)
    assert server.run(end_idle_graces(server.app.manager, server.app.repository, margin)) == 0
    events = server.stub.ListAuditEvents(pb.ListAuditEventsRequest(parent=f"accounts/{account}", filter="kind = UPDATED"))
    assert len(events.audit_events) == 1


def test_the_sweep_reads_only_keys_whose_rotation_asked_for_it(server):
    if server.app.repository.engine.dialect.name != "sqlite":
        pytest.skip("the plan is read on SQLite; PostgreSQL's planner may scan a small table whatever the index")
    from sqlalchemy import text

    with server.app.repository.session(write=False) as session:
        plan = session.execute(
            text(
                "EXPLAIN QUERY PLAN SELECT key_id FROM api_keys WHERE end_grace_after_unused_seconds IS NOT NULL"
                " AND previous_secret_hash IS NOT NULL AND previous_secret_expire_time > '2026-01-01'"
            )
        ).all()
    assert "ix_api_keys_idle_graces" in " | ".join(str(row[-1]) for row in plan)


def test_answers_for_a_previous_secret_whose_grace_ends_when_unused_are_not_for_client_caches(server, account):
    created = create_key(server.stub, account)
    rotated = _rotate(server.stub, created.api_key.name, end_after=TEN_MINUTES)
    assert authorize(server.stub, created.secret).has_limits, "each use of the old secret must reach the server"
    assert not authorize(server.stub, rotated.secret).has_limits
