"""A change that returned is in force for every check that arrives after it (issue 9, section 1).

The attack: start a cold check of a key, make a change (revoke, disable, delete, rotate with grace 0), wait
for it to return, then check again. The late check must not be answered from the verification that began
before the change and read the old row, on any path: Authorize, Envoy's Check, a management call made with
the key as its bearer, and on another process once its change feed has applied the change.

`forced` tests hold the first verification inside argon2 (after its database read) so the interleaving
happens every time; `unforced` ones repeat the plain sequence, as an attacker would, and count nothing
allowed.
"""

import time
from collections.abc import Callable

import grpc
import pytest
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.field_mask_pb2 import FieldMask

from apikeyd.v1 import api_keys_pb2 as pb
from tests.conftest import RunningServer, create_key, held_hasher
from tests.test_feed import _caught_up

SCOPES = ("apikeys:read", "messages:send:all")
CHANGES = ("revoke", "disable", "delete", "rotate")
ITERATIONS_FORCED = 3
ITERATIONS_UNFORCED = 25


def _change(server: RunningServer, kind: str, name: str) -> None:
    """Make the change through `server` and return once its RPC has returned."""
    stub = server.stub
    if kind == "revoke":
        stub.RevokeApiKey(pb.RevokeApiKeyRequest(name=name, reason="race test"))
    elif kind == "disable":
        stub.UpdateApiKey(
            pb.UpdateApiKeyRequest(api_key=pb.ApiKey(name=name, state=pb.ApiKey.DISABLED), update_mask=FieldMask(paths=["state"]))
        )
    elif kind == "delete":
        stub.DeleteApiKey(pb.DeleteApiKeyRequest(name=name))
    else:
        stub.RotateApiKey(pb.RotateApiKeyRequest(name=name, grace_period=Duration(seconds=0)))


# --- the paths a presented key takes: each returns a future of "was it allowed?" -------------------


def _via_authorize(server: RunningServer, secret: str, name: str) -> Callable[[], bool]:
    call = server.stub.Authorize.future(pb.AuthorizeRequest(key=secret))
    return lambda: call.result(timeout=30).code == pb.AuthorizeResponse.OK


def _via_envoy(server: RunningServer, secret: str, name: str) -> Callable[[], bool]:
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        method="GET", path="/", headers={"authorization": f"Bearer {secret}"}
    )
    request = external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(request=attribute_context_pb2.AttributeContext.Request(http=http))
    )
    call = external_auth_pb2_grpc.AuthorizationStub(server.channel).Check.future(request)
    return lambda: call.result(timeout=30).WhichOneof("http_response") == "ok_response"


def _via_bearer(server: RunningServer, secret: str, name: str) -> Callable[[], bool]:
    call = server.stub_for(secret).GetApiKey.future(pb.GetApiKeyRequest(name=name))

    def allowed() -> bool:
        try:
            call.result(timeout=30)
        except grpc.RpcError as error:
            # Any other refusal (NOT_FOUND once the key is deleted) came after the bearer key was accepted.
            return error.code() != grpc.StatusCode.UNAUTHENTICATED
        return True

    return allowed


PATHS = {"authorize": _via_authorize, "envoy": _via_envoy, "bearer": _via_bearer}


def _wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.0005)


def _forced_race(checked: RunningServer, changed_through: RunningServer, account: str, kind: str, path: str) -> bool:
    """One iteration: a cold check held inside argon2, the change made and returned (and, across processes,
    applied by `checked`'s feed), then a second check that has certainly reached `checked` before the first
    verification is let go. Whether the second check was allowed."""
    created = create_key(changed_through.stub, account, SCOPES)
    name, secret = created.api_key.name, created.secret
    if checked is not changed_through:
        _caught_up(checked)
    via = PATHS[path]
    with held_hasher(checked, "verify") as (reached, release):
        first = via(checked, secret, name)
        assert reached.wait(30), "the first check never reached argon2"
        applied = checked.app.feed.applied
        _change(changed_through, kind, name)
        if checked is not changed_through:
            _wait_for(lambda: checked.app.feed.applied > applied, "the change feed to apply the change")
        misses = checked.app.cache.stats.misses
        second = via(checked, secret, name)
        # The second check has looked in the cache and is joining or starting a verification; everything up
        # to that decision runs on the loop without yielding, before the first verification can finish.
        _wait_for(lambda: checked.app.cache.stats.misses > misses, "the second check to reach the server")
        release.set()
        first()  # began before the change: either answer is right
        return second()


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("kind", CHANGES)
def test_forced_a_check_after_a_returned_change_never_joins_the_older_verification(server, account, kind, path):
    allowed = [_forced_race(server, server, account, kind, path) for _ in range(ITERATIONS_FORCED)]
    assert not any(allowed), f"{sum(allowed)} of {len(allowed)} late checks were allowed after {kind}"


@pytest.mark.parametrize("kind", CHANGES)
def test_forced_a_check_after_the_feed_applied_another_process_change_never_joins_the_older_verification(
    make_server, account, kind
):
    a, b = make_server(), make_server()
    allowed = [_forced_race(b, a, account, kind, "authorize") for _ in range(ITERATIONS_FORCED)]
    assert not any(allowed), f"{sum(allowed)} of {len(allowed)} late checks on B were allowed after {kind} on A"


@pytest.mark.parametrize("kind", CHANGES)
def test_unforced_cold_check_change_check_again_is_never_allowed(server, account, kind):
    """The attacker's sequence, unforced, over every path in turn."""
    paths = sorted(PATHS)
    allowed = 0
    for i in range(ITERATIONS_UNFORCED):
        created = create_key(server.stub, account, SCOPES)
        name, secret = created.api_key.name, created.secret
        via = PATHS[paths[i % len(paths)]]
        first = via(server, secret, name)  # in flight, not waited for
        _change(server, kind, name)
        allowed += via(server, secret, name)()
        first()
    assert allowed == 0, f"{allowed} of {ITERATIONS_UNFORCED} checks after {kind} returned were allowed"
