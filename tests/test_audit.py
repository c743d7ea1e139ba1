"""ListAuditEvents: who did what to which key, when, from where and through which RPC; refusals; filters;
keyset paging; what a project key and a read-only key may see. Never a secret or a hash."""

import logging
import time
import uuid
from datetime import UTC, datetime, timedelta, timezone

import grpc
import pytest
from google.protobuf import text_format
from google.protobuf.duration_pb2 import Duration
from google.protobuf.field_mask_pb2 import FieldMask

from apikeyd.denials import DENIAL_WINDOW_SECONDS, DenialThrottle
from apikeyd.domain import keys
from apikeyd.domain.echo import quote
from apikeyd.v1 import api_keys_pb2 as pb
from tests.conftest import authorize, create_key, rpc_error

C = grpc.StatusCode
E = pb.AuditEvent
WRITER = ("apikeys:write", "apikeys:read", "messages:send:all")


def _events(stub, account, filter="", page_size=1000):
    response = stub.ListAuditEvents(
        pb.ListAuditEventsRequest(parent=f"accounts/{account}", filter=filter, page_size=page_size)
    )
    assert not response.next_page_token
    return list(response.audit_events)


def _update(stub, name, paths, **fields):
    return stub.UpdateApiKey(pb.UpdateApiKeyRequest(api_key=pb.ApiKey(name=name, **fields), update_mask=FieldMask(paths=paths)))


def _refusal(call, *args, **kwargs):
    """The grpc.RpcError that call(*args, **kwargs) raises."""
    return rpc_error(lambda: call(*args, **kwargs))


def _no_secret_in(event, secrets):
    for wire in (event.SerializeToString(), text_format.MessageToString(event).encode()):
        assert b"argon2" not in wire
        for secret in secrets:
            assert secret.encode() not in wire
            assert keys.parse(secret).secret.encode() not in wire


# --- who, what, which key, when, where ------------------------------------------------------------


def test_a_tenant_keys_whole_lifecycle_is_audited_and_outlives_the_key(server, stub, account):
    operator = authorize(stub, server.operator_key)
    writer = create_key(stub, account, scopes=WRITER, display_name="ci deployer")
    tenant = server.stub_for(writer.secret)
    started = datetime.now(UTC)
    made = tenant.CreateApiKey(
        pb.CreateApiKeyRequest(
            parent=f"accounts/{account}", api_key=pb.ApiKey(display_name="svc", scopes=["messages:send:{a.com}"])
        )
    )
    name, key_id = made.api_key.name, made.api_key.key_id
    _update(tenant, name, ["description", "labels"], description="sends mail", labels={"env": "prod"})
    _update(tenant, name, ["state"], state=pb.ApiKey.DISABLED)
    _update(tenant, name, ["state"], state=pb.ApiKey.ACTIVE)
    rotated = tenant.RotateApiKey(pb.RotateApiKeyRequest(name=name, grace_period=Duration(seconds=60)))
    tenant.RevokeApiKey(pb.RevokeApiKeyRequest(name=name, reason="compromised"))
    tenant.DeleteApiKey(pb.DeleteApiKeyRequest(name=name))
    finished = datetime.now(UTC)
    assert rpc_error(lambda: tenant.GetApiKey(pb.GetApiKeyRequest(name=name))).code() == C.NOT_FOUND

    events = _events(tenant, account, f'key_id = "{key_id}"')
    assert [(e.kind, e.method) for e in events] == [
        (E.DELETED, "DeleteApiKey"),
        (E.REVOKED, "RevokeApiKey"),
        (E.ROTATED, "RotateApiKey"),
        (E.ENABLED, "UpdateApiKey"),
        (E.DISABLED, "UpdateApiKey"),
        (E.UPDATED, "UpdateApiKey"),
        (E.CREATED, "CreateApiKey"),
    ]
    by_kind = {e.kind: e for e in events}
    assert list(by_kind[E.UPDATED].changed_fields) == ["description", "labels"]
    assert list(by_kind[E.DISABLED].changed_fields) == ["state"]
    assert list(by_kind[E.ENABLED].changed_fields) == ["state"]
    assert "state" in by_kind[E.REVOKED].changed_fields
    assert by_kind[E.REVOKED].reason == "compromised"
    assert float(by_kind[E.ROTATED].details["grace_seconds"]) == 60
    assert [e.event_id for e in events] == sorted((e.event_id for e in events), reverse=True)
    assert len({e.event_id for e in events}) == 7
    times = [e.event_time.ToDatetime(tzinfo=UTC) for e in events]
    assert times == sorted(times, reverse=True)
    for event in events:
        assert event.name == f"accounts/{account}/auditEvents/{event.event_id}"
        assert (event.api_key, event.key_id, event.account_id, event.project_id) == (name, key_id, account, "")
        assert (event.actor, event.actor_key_id, event.actor_display_name) == (
            writer.api_key.name,
            writer.api_key.key_id,
            "ci deployer",
        )
        assert event.peer.startswith(("ipv4:", "ipv6:")) and len(event.peer) > len("ipv4:")
        assert started - timedelta(seconds=5) <= event.event_time.ToDatetime(tzinfo=UTC) <= finished + timedelta(seconds=5)
        _no_secret_in(event, (made.secret, rotated.secret, writer.secret, server.operator_key))

    # the whole log: the writer's own creation, by the operator, comes first in time
    everything = _events(stub, account)
    assert everything[:7] == events
    first = everything[-1]
    assert (first.kind, first.key_id) == (E.CREATED, writer.api_key.key_id)
    assert (first.actor, first.actor_key_id, first.actor_display_name) == (operator.name, operator.key_id, "tests")
    for event in everything:
        _no_secret_in(event, (made.secret, rotated.secret, writer.secret, server.operator_key))


def test_denied_attempts_appear_in_the_callers_own_log(server, stub, account):
    other = f"acct-{uuid.uuid4().hex[:10]}"
    victim = create_key(stub, other).api_key
    reader = create_key(stub, account, scopes=("apikeys:read",), display_name="reader")
    writer = create_key(stub, account, scopes=WRITER, display_name="writer")
    as_reader, as_writer = server.stub_for(reader.secret), server.stub_for(writer.secret)
    refusals = [
        rpc_error(lambda: create_key(as_reader, account)),
        rpc_error(lambda: as_writer.GetApiKey(pb.GetApiKeyRequest(name=victim.name))),
        rpc_error(lambda: create_key(as_writer, account, scopes=("billing:admin",))),
    ]
    assert all(error.code() == C.PERMISSION_DENIED for error in refusals)

    denied = _events(stub, account, "kind = DENIED")
    assert [(e.method, e.actor_key_id) for e in denied] == [
        ("CreateApiKey", writer.api_key.key_id),
        ("GetApiKey", writer.api_key.key_id),
        ("CreateApiKey", reader.api_key.key_id),
    ]
    assert [e.reason for e in denied] == [error.details() for error in reversed(refusals)]
    assert "apikeys:write" in denied[2].reason and f"accounts/{other}" in denied[1].reason
    assert "'billing:admin'" in denied[0].reason
    assert denied[1].key_id == victim.key_id  # the target
    for event in denied:
        assert event.kind == E.DENIED and event.account_id == account
        assert event.actor in (reader.api_key.name, writer.api_key.name)
        assert event.actor_display_name in ("reader", "writer")
        assert event.peer.startswith(("ipv4:", "ipv6:"))
    # the tenant reads its own refusals; the other account's log shows no trace of the attempt
    assert _events(as_reader, account, "kind = DENIED") == denied
    assert [e.kind for e in _events(stub, other)] == [E.CREATED]
    # refused calls changed nothing
    assert [e.kind for e in _events(stub, account)].count(E.CREATED) == 2


def test_a_denied_events_api_key_names_the_target(server, stub, account):
    other = f"acct-{uuid.uuid4().hex[:10]}"
    victim = create_key(stub, other).api_key
    intruder = server.stub_for(create_key(stub, account, scopes=WRITER).secret)
    rpc_error(lambda: intruder.RevokeApiKey(pb.RevokeApiKeyRequest(name=victim.name)))
    [denied] = _events(stub, account, "kind = DENIED")
    assert denied.key_id == victim.key_id
    assert denied.api_key == victim.name


# --- a flood of refusals ---------------------------------------------------------------------------


class FakeClock:
    """Monotonic seconds that move only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_throttle_records_the_first_refusal_then_one_per_window_with_the_count() -> None:
    clock = FakeClock()
    throttle = DenialThrottle(window=10, clock=clock)
    flood = ("k1", "CreateApiKey", "right")
    assert throttle.admit(flood) == 0  # the first, at once
    assert [throttle.admit(flood) for _ in range(49)] == [None] * 49
    clock.now += 9.999
    assert throttle.admit(flood) is None
    clock.now += 0.001
    assert throttle.admit(flood) == 50  # the window is over: recorded, with the 50 left out
    assert throttle.admit(flood) is None
    clock.now += 60
    assert throttle.admit(flood) == 1
    clock.now += 60
    assert throttle.admit(flood) == 0  # nothing left out since the last one
    assert throttle.suppressed_total == 51
    # another key, method or rule has a window of its own
    for other in (("k2", "CreateApiKey", "right"), ("k1", "ListApiKeys", "right"), ("k1", "CreateApiKey", "grant")):
        assert throttle.admit(other) == 0, other
        assert throttle.admit(other) is None, other


def test_a_denied_event_that_could_not_be_written_hands_its_count_to_the_next() -> None:
    clock = FakeClock()
    throttle = DenialThrottle(window=10, clock=clock)
    flood = ("k1", "GetApiKey", "account")
    throttle.admit(flood)
    for _ in range(3):
        throttle.admit(flood)
    clock.now += 10
    assert throttle.admit(flood) == 3
    throttle.unrecorded(flood, 3)  # the database did not answer
    assert throttle.admit(flood) is None  # no second try within the window
    clock.now += 10
    assert throttle.admit(flood) == 5  # the 3, the one not written, and the one just left out
    throttle.unrecorded(("k9", "GetApiKey", "account"), 0)  # a window dropped meanwhile
    assert throttle.admit(("k9", "GetApiKey", "account")) is None
    clock.now += 10
    assert throttle.admit(("k9", "GetApiKey", "account")) == 2


def test_the_throttle_keeps_a_bounded_number_of_windows_and_logs_a_dropped_count(caplog) -> None:
    clock = FakeClock()
    throttle = DenialThrottle(window=10, capacity=3, clock=clock)
    for n in range(3):
        throttle.admit((f"k{n}", "GetApiKey", "right"))
    throttle.admit(("k0", "GetApiKey", "right"))  # k0 counted, and now the most recently refused
    throttle.admit(("k1", "GetApiKey", "right"))
    throttle.admit(("k1", "GetApiKey", "right"))
    with caplog.at_level(logging.WARNING, logger="apikeyd.lifecycle"):
        throttle.admit(("k3", "GetApiKey", "right"))  # drops k2 (nothing pending)
        assert len(throttle) == 3 and not caplog.records
        throttle.admit(("k4", "GetApiKey", "right"))  # drops k0, with 1 pending
    assert len(throttle) == 3
    [line] = caplog.records
    assert "1 refusals" in line.getMessage() and "k0" in line.getMessage()
    assert throttle.admit(("k0", "GetApiKey", "right")) == 0  # dropped, so recorded again at once
    assert len(throttle) == 3


def _throttle_with_a_fake_clock(server) -> FakeClock:
    clock = FakeClock()
    server.app.manager.denials = DenialThrottle(clock=clock)
    return clock


def test_a_flood_of_refusals_writes_one_denied_event_per_window_with_the_count(server, stub, account):
    clock = _throttle_with_a_fake_clock(server)
    reader = create_key(stub, account, scopes=("apikeys:read",), display_name="reader")
    as_reader = server.stub_for(reader.secret)

    assert rpc_error(lambda: create_key(as_reader, account)).code() == C.PERMISSION_DENIED
    [first] = _events(stub, account, "kind = DENIED")  # recorded at once
    assert (first.method, first.actor_key_id) == ("CreateApiKey", reader.api_key.key_id)
    assert "apikeys:write" in first.reason and "suppressed" not in first.details
    for _ in range(49):
        assert rpc_error(lambda: create_key(as_reader, account)).code() == C.PERMISSION_DENIED
    assert _events(stub, account, "kind = DENIED") == [first]  # 49 refusals, no row

    clock.now += DENIAL_WINDOW_SECONDS
    assert rpc_error(lambda: create_key(as_reader, account)).code() == C.PERMISSION_DENIED
    latest, earlier = _events(stub, account, "kind = DENIED")
    assert earlier == first
    assert (latest.method, latest.actor_key_id, latest.reason) == ("CreateApiKey", reader.api_key.key_id, first.reason)
    assert latest.details["suppressed"] == "49"
    assert server.app.manager.denials.suppressed_total == 49

    # the same key through another method, and another key through the same one: recorded at once
    other = create_key(stub, account, scopes=("apikeys:read",), display_name="other reader")
    as_other = server.stub_for(other.secret)
    target = create_key(stub, account).api_key
    assert rpc_error(lambda: as_reader.RevokeApiKey(pb.RevokeApiKeyRequest(name=target.name))).code() == C.PERMISSION_DENIED
    assert rpc_error(lambda: create_key(as_other, account)).code() == C.PERMISSION_DENIED
    denied = _events(stub, account, "kind = DENIED")
    assert [(e.method, e.actor_key_id) for e in denied[:2]] == [
        ("CreateApiKey", other.api_key.key_id),
        ("RevokeApiKey", reader.api_key.key_id),
    ]
    assert all("suppressed" not in e.details for e in denied[:2])
    assert len(denied) == 4
    assert [e.kind for e in _events(stub, account)].count(E.CREATED) == 3  # the refused calls made nothing


def test_refusals_of_one_rule_are_grouped_whatever_their_targets(server, stub, account):
    _throttle_with_a_fake_clock(server)
    writer = create_key(stub, account, scopes=WRITER)
    as_writer = server.stub_for(writer.secret)
    for n in range(20):  # another account each time: the same rule, so one row
        victim = f"accounts/acct-probe-{n}/apiKeys/00000000-0000-4000-8000-000000000000"
        assert rpc_error(lambda v=victim: as_writer.GetApiKey(pb.GetApiKeyRequest(name=v))).code() == C.PERMISSION_DENIED
    # the same method refused by another rule is recorded on its own
    assert rpc_error(lambda: create_key(as_writer, account, scopes=("billing:admin",))).code() == C.PERMISSION_DENIED
    assert rpc_error(lambda: create_key(as_writer, f"acct-{uuid.uuid4().hex[:10]}")).code() == C.PERMISSION_DENIED
    denied = _events(stub, account, "kind = DENIED")
    assert [e.method for e in denied] == ["CreateApiKey", "CreateApiKey", "GetApiKey"]
    assert "accounts/acct-" in denied[0].reason and "'billing:admin'" in denied[1].reason
    assert denied[2].reason.endswith(quote("accounts/acct-probe-0"))


def test_with_the_real_clock_a_burst_of_refusals_writes_at_most_one_row_per_window(server, stub, account):
    reader = server.stub_for(create_key(stub, account, scopes=("apikeys:read",)).secret)
    started = time.monotonic()
    for _ in range(50):
        assert rpc_error(lambda: create_key(reader, account)).code() == C.PERMISSION_DENIED
    elapsed = time.monotonic() - started
    rows = len(_events(stub, account, "kind = DENIED"))
    assert 1 <= rows <= 1 + int(elapsed // DENIAL_WINDOW_SECONDS)
    assert rows <= 5, f"{rows} rows for 50 refusals in {elapsed:.1f} s"


# --- filters --------------------------------------------------------------------------------------


@pytest.fixture
def history(server, stub, account):
    """Six events in `account`: two keys made, one changed, both revoked, by the operator and a writer."""
    writer = create_key(stub, account, scopes=WRITER)
    tenant = server.stub_for(writer.secret)
    first = create_key(stub, account).api_key
    second = create_key(tenant, account).api_key
    _update(tenant, first.name, ["description"], description="changed")
    tenant.RevokeApiKey(pb.RevokeApiKeyRequest(name=first.name))
    stub.RevokeApiKey(pb.RevokeApiKeyRequest(name=second.name))
    events = _events(stub, account)
    assert len(events) == 6
    return writer.api_key, first, second, events


def test_filters_by_key_kind_and_actor(stub, account, history):
    writer, first, second, _ = history

    def ids(text):
        return [(e.kind, e.key_id) for e in _events(stub, account, text)]

    assert ids(f'key_id = "{first.key_id}"') == [(E.REVOKED, first.key_id), (E.UPDATED, first.key_id), (E.CREATED, first.key_id)]
    assert ids("kind = REVOKED") == [(E.REVOKED, second.key_id), (E.REVOKED, first.key_id)]
    assert ids("kind = CREATED") == [(E.CREATED, second.key_id), (E.CREATED, first.key_id), (E.CREATED, writer.key_id)]
    assert ids(f'actor_key_id = "{writer.key_id}"') == [
        (E.REVOKED, first.key_id),
        (E.UPDATED, first.key_id),
        (E.CREATED, second.key_id),
    ]
    assert ids(f'kind = REVOKED AND actor_key_id = "{writer.key_id}"') == [(E.REVOKED, first.key_id)]
    assert ids(f'key_id = "{second.key_id}" AND kind = UPDATED') == []
    assert ids('key_id = "00000000-0000-4000-8000-000000000000"') == []
    # another account's events never match, whatever the filter
    other = f"acct-{uuid.uuid4().hex[:10]}"
    assert _events(stub, other, f'key_id = "{first.key_id}"') == []


def test_filters_by_event_time(stub, account, history):
    *_, events = history
    middle = events[2]
    instant = middle.event_time.ToDatetime(tzinfo=UTC)
    utc = middle.event_time.ToJsonString()
    plus_two = instant.astimezone(timezone(timedelta(hours=2))).isoformat()
    assert utc.endswith("Z") and plus_two.endswith("+02:00")

    def ids(text):
        return [e.event_id for e in _events(stub, account, text)]

    everything = [e.event_id for e in events]
    for stamp in (utc, plus_two):  # the same instant, written in two zones
        assert ids(f'event_time >= "{stamp}"') == everything[:3]
        assert ids(f'event_time < "{stamp}"') == everything[3:]
        assert ids(f'event_time > "{stamp}"') == everything[:2]
        assert ids(f'event_time <= "{stamp}"') == everything[2:]
    lower = events[4].event_time.ToJsonString()
    assert ids(f'event_time >= "{lower}" AND event_time < "{utc}"') == everything[3:5]
    assert ids('event_time >= "2999-01-01T00:00:00Z"') == []
    assert ids('event_time < "2000-01-01T00:00:00Z"') == []


BAD_FILTERS = [
    "color = red",
    "kind = EXPLODED",
    "kind > REVOKED",
    'key_id != "x"',
    'key_id >= "x"',
    'actor_key_id < "x"',
    'event_time >= "yesterday"',
    'event_time >= "2026-01-01T00:00:00"',  # no zone
    "kind = REVOKED AND",
    "kind = REVOKED OR kind = CREATED",
    "kind = REVOKED AND kind = CREATED",
    "state = ACTIVE",
]


def test_bad_filters_are_invalid_argument(stub, account):
    for text in BAD_FILTERS:
        error = _refusal(stub.ListAuditEvents, pb.ListAuditEventsRequest(parent=f"accounts/{account}", filter=text))
        assert error.code() == C.INVALID_ARGUMENT and "filter" in error.details(), text


# --- paging ---------------------------------------------------------------------------------------


def test_paging_walks_every_event_once_newest_first(stub, account, history):
    *_, events = history
    parent = f"accounts/{account}"
    seen, token, pages = [], "", 0
    while True:
        page = stub.ListAuditEvents(pb.ListAuditEventsRequest(parent=parent, page_size=2, page_token=token))
        assert len(page.audit_events) <= 2
        seen += list(page.audit_events)
        pages += 1
        if pages == 1:
            create_key(stub, account)  # a newer event mid-walk is neither repeated nor slipped in
        token = page.next_page_token
        if not token:
            break
    assert seen == events and pages == 3
    assert len({e.event_id for e in seen}) == len(seen)

    created = [e for e in events if e.kind == E.CREATED]
    walked, token = [], ""
    while True:
        page = stub.ListAuditEvents(pb.ListAuditEventsRequest(parent=parent, filter="kind = CREATED", page_size=1, page_token=token))
        walked += list(page.audit_events)
        token = page.next_page_token
        if not token:
            break
    assert walked == [e for e in _events(stub, account, "kind = CREATED")]
    assert walked[1:] == created


def test_a_page_token_is_bound_to_its_request(stub, account, history):
    parent = f"accounts/{account}"
    token = stub.ListAuditEvents(pb.ListAuditEventsRequest(parent=parent, page_size=2)).next_page_token
    assert token
    other = f"accounts/acct-{uuid.uuid4().hex[:10]}"
    for request in (
        pb.ListAuditEventsRequest(parent=parent, page_size=2, page_token=token, filter="kind = REVOKED"),
        pb.ListAuditEventsRequest(parent=other, page_size=2, page_token=token),
        pb.ListAuditEventsRequest(parent=parent, page_token="not-a-token"),
        pb.ListAuditEventsRequest(parent=parent, page_size=-1),
    ):
        error = _refusal(stub.ListAuditEvents, request)
        assert error.code() == C.INVALID_ARGUMENT
        assert "page_token" in error.details() or "page_size" in error.details()
    # the token still works with its own request
    rest = stub.ListAuditEvents(pb.ListAuditEventsRequest(parent=parent, page_size=2, page_token=token))
    assert len(rest.audit_events) == 2


# --- who may read the log -------------------------------------------------------------------------


def test_a_project_key_sees_only_its_projects_events(server, stub, account):
    create_key(stub, account)
    create_key(stub, account, project_id="p2")
    own = create_key(stub, account, project_id="p1").api_key
    stub.RevokeApiKey(pb.RevokeApiKeyRequest(name=own.name, reason="old"))
    reader = create_key(stub, account, scopes=("apikeys:read",), project_id="p1")
    as_reader = server.stub_for(reader.secret)
    assert rpc_error(lambda: create_key(as_reader, account)).code() == C.PERMISSION_DENIED

    seen = _events(as_reader, account)
    assert [(e.kind, e.key_id) for e in seen] == [
        (E.DENIED, ""),
        (E.CREATED, reader.api_key.key_id),
        (E.REVOKED, own.key_id),
        (E.CREATED, own.key_id),
    ]
    assert {e.project_id for e in seen} == {"p1"}
    assert len(_events(stub, account)) == 6  # the operator sees every project's and the account's
    assert _events(as_reader, account, 'kind = CREATED AND key_id = "' + own.key_id + '"') == [seen[3]]


def test_a_read_only_key_may_list_events_and_a_key_without_rights_may_not(server, stub, account):
    create_key(stub, account)
    reader = server.stub_for(create_key(stub, account, scopes=("apikeys:read",)).secret)
    assert len(_events(reader, account)) == 2
    for scopes in (("messages:send:all",), ("apikeys:authorize",), ("apikeys:read:{x}",)):
        outsider = server.stub_for(create_key(stub, account, scopes=scopes).secret)
        error = _refusal(_events, outsider, account)
        assert error.code() == C.PERMISSION_DENIED and "apikeys:read" in error.details(), scopes
