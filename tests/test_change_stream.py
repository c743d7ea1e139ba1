"""WatchApiKeyChanges over a real channel: what it sends, to whom, from where it resumes, and how it ends."""

import queue
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from apikeyd.domain.model import EventKind, KeyChange
from apikeyd.v1 import api_keys_pb2 as pb
from apikeyd.v1 import api_keys_pb2_grpc as pb_grpc
from tests.conftest import BearerCredentials, RunningServer, create_key, rpc_error, wait_for

Kind = pb.AuditEvent.Kind


class Watch:
    """One stream, read on a thread into a queue, so a test can wait for what it expects."""

    def __init__(self, stub: pb_grpc.ApiKeyServiceStub, resume_after: int = 0) -> None:
        self.call = stub.WatchApiKeyChanges(pb.WatchApiKeyChangesRequest(resume_after=resume_after), timeout=60)
        self.responses: queue.Queue[Any] = queue.Queue()
        self.position = 0
        self.error: grpc.RpcError | None = None
        self.ended = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for response in self.call:
                self.responses.put(response)
        except grpc.RpcError as error:
            self.error = error
        finally:
            self.ended.set()
            self.responses.put(None)

    def until(self, wanted: Any, timeout: float = 10.0) -> list[pb.WatchApiKeyChangesResponse]:
        """Responses up to the first one for which wanted(response) is true."""
        seen = []
        while True:
            response = self.responses.get(timeout=timeout)
            assert response is not None, f"the stream ended first: {self.error}"
            seen.append(response)
            self.position = max(self.position, response.position)
            if wanted(response):
                return seen

    def changes_until(self, key_id: str, kind: int) -> list[tuple[str, int]]:
        """Every change received up to the one of `kind` to `key_id`."""
        responses = self.until(lambda r: any(c.key_id == key_id and c.kind == kind for c in r.changes))
        return [(c.key_id, c.kind) for r in responses for c in r.changes]

    def close(self) -> None:
        self.call.cancel()


@pytest.fixture
def watches() -> Iterator[list[Watch]]:
    opened: list[Watch] = []
    yield opened
    for watch in opened:
        watch.close()


def watcher_stub(server: RunningServer, account: str, scopes: tuple[str, ...] = ("apikeys:authorize",), **fields: Any) -> pb_grpc.ApiKeyServiceStub:
    return server.stub_for(create_key(server.stub, account, scopes, **fields).secret)


def test_a_stream_carries_every_kind_of_change_in_order_then_heartbeats(server, account, watches):
    watch = Watch(watcher_stub(server, account))
    watches.append(watch)
    first = watch.until(lambda r: True)[0]
    assert not first.changes and not first.heartbeat
    key = create_key(server.stub, account)
    name, key_id = key.api_key.name, key.api_key.key_id
    stub = server.stub
    stub.UpdateApiKey(pb.UpdateApiKeyRequest(api_key=pb.ApiKey(name=name, scopes=["x:y"]), update_mask={"paths": ["scopes"]}))
    stub.UpdateApiKey(pb.UpdateApiKeyRequest(api_key=pb.ApiKey(name=name, state=pb.ApiKey.DISABLED), update_mask={"paths": ["state"]}))
    stub.UpdateApiKey(pb.UpdateApiKeyRequest(api_key=pb.ApiKey(name=name, state=pb.ApiKey.ACTIVE), update_mask={"paths": ["state"]}))
    stub.RotateApiKey(pb.RotateApiKeyRequest(name=name))
    stub.RevokeApiKey(pb.RevokeApiKeyRequest(name=name))
    stub.DeleteApiKey(pb.DeleteApiKeyRequest(name=name))
    changes = [kind for changed, kind in watch.changes_until(key_id, Kind.DELETED) if changed == key_id]
    assert changes == [Kind.CREATED, Kind.UPDATED, Kind.DISABLED, Kind.ENABLED, Kind.ROTATED, Kind.REVOKED, Kind.DELETED]
    beat = watch.until(lambda r: r.heartbeat)[-1]
    assert beat.position >= watch.position and beat.sync_age.ToTimedelta().total_seconds() < 1.0


def test_a_stream_sees_only_its_own_account_and_an_operator_sees_all(server, account, watches):
    other = f"{account}-other"
    ours = Watch(watcher_stub(server, account))
    theirs_watch = Watch(watcher_stub(server, other))
    operator = Watch(server.stub)
    watches.extend([ours, theirs_watch, operator])
    for watch in watches:
        watch.until(lambda r: True)
    theirs = create_key(server.stub, other).api_key.key_id
    mine = create_key(server.stub, account).api_key.key_id
    # The other account's change was committed first, so it would have come no later than ours.
    assert theirs not in {key_id for key_id, _ in ours.changes_until(mine, Kind.CREATED)}
    assert mine not in {key_id for key_id, _ in theirs_watch.changes_until(theirs, Kind.CREATED)}
    seen = {key_id for key_id, _ in operator.changes_until(mine, Kind.CREATED)}
    assert {theirs, mine} <= seen


def test_a_project_key_sees_only_its_project(server, account, watches):
    watch = Watch(watcher_stub(server, account, project_id="p1"))
    watches.append(watch)
    watch.until(lambda r: True)
    elsewhere = create_key(server.stub, account, project_id="p2").api_key.key_id
    here = create_key(server.stub, account, project_id="p1").api_key.key_id
    assert elsewhere not in {key_id for key_id, _ in watch.changes_until(here, Kind.CREATED)}


def test_a_resumed_stream_replays_what_happened_while_it_was_away(server, account, watches):
    stub = watcher_stub(server, account)
    first = Watch(stub)
    watches.append(first)
    key = create_key(server.stub, account)
    first.changes_until(key.api_key.key_id, Kind.CREATED)
    position = first.until(lambda r: r.heartbeat)[-1].position
    first.close()
    missed = [create_key(server.stub, account).api_key.key_id for _ in range(3)]
    server.stub.RevokeApiKey(pb.RevokeApiKeyRequest(name=key.api_key.name))
    resumed = Watch(stub, resume_after=position)
    watches.append(resumed)
    replay = resumed.until(lambda r: True)[0]
    assert [(c.key_id, c.kind) for c in replay.changes] == [
        *((key_id, Kind.CREATED) for key_id in missed), (key.api_key.key_id, Kind.REVOKED)
    ]
    # Never behind where it resumed; not necessarily past what it replayed, which the feed may not have read
    # yet (an id below it could still commit, on PostgreSQL): those come again, which only drops twice.
    assert replay.position >= position


@pytest.mark.parametrize(
    ("resume_after", "code"),
    [(-1, grpc.StatusCode.INVALID_ARGUMENT), (2**62, grpc.StatusCode.OUT_OF_RANGE)],
)
def test_a_bad_resume_position_is_refused_saying_what_to_do(server, account, resume_after, code):
    stub = watcher_stub(server, account)
    error = rpc_error(lambda: next(iter(stub.WatchApiKeyChanges(pb.WatchApiKeyChangesRequest(resume_after=resume_after), timeout=10))))
    assert error.code() == code
    assert "resume_after" in error.details()


def test_a_position_too_far_behind_is_out_of_range(server, account, monkeypatch, watches):
    from apikeyd import change_stream

    monkeypatch.setattr(change_stream, "REPLAY_LIMIT", 2)
    stub = watcher_stub(server, account)
    watch = Watch(stub)
    watches.append(watch)
    position = watch.until(lambda r: r.heartbeat and r.position > 0)[-1].position  # 0 would mean afresh
    for _ in range(3):
        create_key(server.stub, account)
    error = rpc_error(lambda: next(iter(stub.WatchApiKeyChanges(pb.WatchApiKeyChangesRequest(resume_after=position), timeout=10))))
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE and "start afresh" in error.details()


@pytest.mark.parametrize(
    ("credential", "code"),
    [
        (None, grpc.StatusCode.UNAUTHENTICATED),
        ("AK_notakey", grpc.StatusCode.UNAUTHENTICATED),
        ("read-only", grpc.StatusCode.PERMISSION_DENIED),
    ],
)
def test_a_stream_needs_a_key_with_apikeys_authorize(server, account, credential, code):
    if credential == "read-only":
        credential = create_key(server.stub, account, ("apikeys:read",)).secret
    stub = server.stub_for(credential)
    error = rpc_error(lambda: next(iter(stub.WatchApiKeyChanges(pb.WatchApiKeyChangesRequest(), timeout=10))))
    assert error.code() == code
    if credential:
        assert credential not in error.details()


def test_a_stream_ends_once_its_own_key_is_revoked(server, account, watches):
    created = create_key(server.stub, account, ("apikeys:authorize",))
    watch = Watch(server.stub_for(created.secret))
    watches.append(watch)
    watch.until(lambda r: True)
    server.stub.RevokeApiKey(pb.RevokeApiKeyRequest(name=created.api_key.name))
    assert watch.ended.wait(10)
    assert watch.error is not None and watch.error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "revoked" in watch.error.details()


def test_drain_ends_every_stream_cleanly(make_server, account):
    server = make_server()
    token = create_key(server.stub, account, ("apikeys:authorize",)).secret
    with grpc.insecure_channel(server.address) as channel:  # not one of the server's, which stop() closes
        stub = pb_grpc.ApiKeyServiceStub(grpc.intercept_channel(channel, BearerCredentials(token)))
        watches = [Watch(stub) for _ in range(3)]
        for watch in watches:
            watch.until(lambda r: r.heartbeat)
        server.stop(grace=5.0)
        for watch in watches:
            assert watch.ended.wait(10)
            assert watch.error is None  # status OK: the client resumes elsewhere
    assert len(server.app.streams) == 0


def test_a_client_that_goes_away_leaves_no_subscription(server, account):
    stub = watcher_stub(server, account)
    watches = [Watch(stub) for _ in range(20)]
    for watch in watches:
        watch.until(lambda r: True)
    assert len(server.app.streams) == 20
    for watch in watches:
        watch.close()
    wait_for(lambda: len(server.app.streams) == 0, "the cancelled streams' subscriptions dropped")


def test_a_stream_that_falls_too_far_behind_is_ended_and_can_resume(server, account, monkeypatch):
    from apikeyd import change_stream

    monkeypatch.setattr(change_stream, "MAX_PENDING", 3)
    stub = watcher_stub(server, account)
    watch = Watch(stub)
    first = watch.until(lambda r: True)[0]
    # More than the bound at once, as a burst would pile up behind a client that does not read.
    subscription = next(iter(server.app.streams._subscriptions))
    flood = [KeyChange(first.position + i, f"k{i}", account, "", EventKind.UPDATED) for i in range(4)]
    server.call_soon(lambda: subscription.offer(flood, first.position, None, 0.0))
    assert watch.ended.wait(10)
    assert watch.error is not None and watch.error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "resume_after" in watch.error.details()


def test_a_refused_stream_is_in_the_audit_log(server, account):
    stub = watcher_stub(server, account, ("apikeys:read",))
    rpc_error(lambda: next(iter(stub.WatchApiKeyChanges(pb.WatchApiKeyChangesRequest(), timeout=10))))
    events = server.stub.ListAuditEvents(pb.ListAuditEventsRequest(parent=f"accounts/{account}", filter="kind = DENIED"))
    assert [e.method for e in events.audit_events] == ["WatchApiKeyChanges"]
    assert "apikeys:authorize" in events.audit_events[0].reason


def test_a_long_replay_comes_in_chunks_and_the_first_response_says_the_reach(server, account, monkeypatch, watches):
    from apikeyd.service import key_changes

    monkeypatch.setattr(key_changes, "_CHUNK", 2)
    stub = watcher_stub(server, account, project_id="p1")
    opening = Watch(stub)
    watches.append(opening)
    first = opening.until(lambda r: True)[0]
    assert (first.reach.all_accounts, first.reach.account_id, first.reach.project_id) == (False, account, "p1")
    position = opening.until(lambda r: r.heartbeat and r.position > 0)[-1].position
    opening.close()
    created = [create_key(server.stub, account, project_id="p1").api_key.key_id for _ in range(5)]
    watch = Watch(stub, resume_after=position)
    watches.append(watch)
    responses = watch.until(lambda r: r.changes and r.changes[-1].key_id == created[-1])
    assert [len(r.changes) for r in responses] == [2, 2, 1]
    assert [r.position for r in responses[:2]] == [position] * 2  # only the last may move on
    assert [c.key_id for r in responses for c in r.changes] == created
    assert responses[0].reach.account_id == account and not responses[1].HasField("reach")


def test_change_streams_have_a_bound_of_their_own_and_leave_other_calls_their_places(make_server, account, watches):
    server = make_server(max_concurrent_rpcs=100, max_change_streams=100)
    stub = watcher_stub(server, account)
    watches.extend(Watch(stub) for _ in range(100))
    for watch in watches:
        watch.until(lambda r: True)
    error = rpc_error(lambda: next(iter(stub.WatchApiKeyChanges(pb.WatchApiKeyChangesRequest(), timeout=10))))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "APIKEYD_MAX_CHANGE_STREAMS" in error.details()
    # 100 streams open, as many as max_concurrent_rpcs: Authorize and management calls still have theirs.
    key = create_key(server.stub, account).secret
    assert server.stub.Authorize(pb.AuthorizeRequest(key=key)).allowed


def test_a_client_that_stops_answering_gives_its_stream_back(make_server, account):
    """A client process SIGSTOPped (or a host gone) sends nothing, not even a FIN: the server's pings
    (APIKEYD_KEEPALIVE_INTERVAL) find it, and its stream's place and memory are freed."""
    import os
    import signal
    import subprocess
    import sys

    server = make_server(keepalive_interval=0.5)
    token = create_key(server.stub, account, ("apikeys:authorize",)).secret
    program = (
        "import sys, grpc\n"
        "from apikeyd.v1 import api_keys_pb2 as pb, api_keys_pb2_grpc as pb_grpc\n"
        "channel = grpc.insecure_channel(sys.argv[1])\n"
        "stream = pb_grpc.ApiKeyServiceStub(channel).WatchApiKeyChanges(\n"
        "    pb.WatchApiKeyChangesRequest(), metadata=[('authorization', 'Bearer ' + sys.argv[2])])\n"
        "next(stream)\n"
        "print('open', flush=True)\n"
        "for _ in stream:\n"
        "    pass\n"
    )
    client = subprocess.Popen([sys.executable, "-c", program, server.address, token], stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout is not None and client.stdout.readline() == "open\n"
        wait_for(lambda: len(server.app.streams) == 1, "the stream open")
        os.kill(client.pid, signal.SIGSTOP)
        wait_for(lambda: len(server.app.streams) == 0, "the stopped client's stream given back", timeout=30)
    finally:
        client.kill()
        client.wait(10)
