"""Retries and races: request_id on CreateApiKey and RotateApiKey (AIP-155), concurrent identical requests,
concurrent updates under one etag, and the per-account limit of live keys, alone and under concurrency."""

import uuid

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.field_mask_pb2 import FieldMask

from apikeyd.v1 import api_keys_pb2 as pb
from tests.conftest import authorize, count_keys, create_key, rpc_error

C = grpc.StatusCode
R = pb.AuthorizeResponse
E = pb.AuditEvent
WRITER = ("apikeys:write", "apikeys:read", "messages:send:all")
CONCURRENT = 8


def _create_request(account, request_id, display_name="svc", **fields):
    return pb.CreateApiKeyRequest(
        parent=f"accounts/{account}",
        api_key=pb.ApiKey(display_name=display_name, scopes=["messages:send:all"], **fields),
        request_id=request_id,
    )


def _refusal(call, *args):
    """The grpc.RpcError that call(*args) raises."""
    return rpc_error(lambda: call(*args))


def _total(stub, account):
    return count_keys(stub, account)


def _kinds(stub, account, key_id=""):
    text = f'key_id = "{key_id}"' if key_id else ""
    response = stub.ListAuditEvents(pb.ListAuditEventsRequest(parent=f"accounts/{account}", filter=text, page_size=1000))
    return [e.kind for e in response.audit_events]


def _outcomes(futures):
    """Each future's response, or its RpcError."""
    results = []
    for future in futures:
        error = future.exception(timeout=60)
        results.append(error if error is not None else future.result())
    return results


# --- 9. request_id --------------------------------------------------------------------------------


def test_a_retried_create_answers_with_the_same_key_and_no_secret(stub, account):
    request = _create_request(account, str(uuid.uuid4()), labels={"env": "prod"})
    first = stub.CreateApiKey(request)
    assert first.secret and not first.secret_already_delivered
    for _ in range(2):
        retry = stub.CreateApiKey(request)
        assert retry.api_key == first.api_key
        assert retry.secret == "" and retry.secret_already_delivered
    assert _total(stub, account) == 1
    assert _kinds(stub, account) == [E.CREATED]
    assert authorize(stub, first.secret, "messages:send").allowed


def test_a_retried_rotation_rotates_once(stub, account):
    created = create_key(stub, account)
    request = pb.RotateApiKeyRequest(name=created.api_key.name, grace_period=Duration(seconds=60), request_id=str(uuid.uuid4()))
    first = stub.RotateApiKey(request)
    assert first.secret and not first.secret_already_delivered and first.secret != created.secret
    for _ in range(2):
        retry = stub.RotateApiKey(request)
        assert retry.api_key.key_id == created.api_key.key_id
        assert retry.api_key == first.api_key
        assert retry.secret == "" and retry.secret_already_delivered
    assert _kinds(stub, account, created.api_key.key_id) == [E.ROTATED, E.CREATED]
    assert authorize(stub, first.secret, "messages:send").allowed
    assert authorize(stub, created.secret, "messages:send").allowed  # still in its grace period


def test_a_request_id_reused_for_another_request_is_invalid(stub, account):
    create_id, rotate_id = str(uuid.uuid4()), str(uuid.uuid4())
    made = stub.CreateApiKey(_create_request(account, create_id, display_name="a"))
    other = create_key(stub, account).api_key
    rotated = stub.RotateApiKey(pb.RotateApiKeyRequest(name=made.api_key.name, request_id=rotate_id))
    elsewhere = f"acct-{uuid.uuid4().hex[:10]}"
    for call in (
        lambda: stub.CreateApiKey(_create_request(account, create_id, display_name="b")),
        lambda: stub.CreateApiKey(_create_request(account, create_id, display_name="a", description="more")),
        lambda: stub.CreateApiKey(_create_request(elsewhere, create_id, display_name="a")),
        lambda: stub.CreateApiKey(_create_request(account, rotate_id)),
        lambda: stub.RotateApiKey(pb.RotateApiKeyRequest(name=made.api_key.name, request_id=create_id)),
        lambda: stub.RotateApiKey(pb.RotateApiKeyRequest(name=other.name, request_id=rotate_id)),
        lambda: stub.RotateApiKey(
            pb.RotateApiKeyRequest(name=made.api_key.name, request_id=rotate_id, grace_period=Duration(seconds=5))
        ),
    ):
        error = rpc_error(call)
        assert error.code() == C.INVALID_ARGUMENT and "request_id" in error.details()
    assert _total(stub, account) == 2 and _total(stub, elsewhere) == 0
    assert _kinds(stub, account, made.api_key.key_id) == [E.ROTATED, E.CREATED]
    assert _kinds(stub, account, other.key_id) == [E.CREATED]
    assert authorize(stub, rotated.secret, "messages:send").allowed


def test_a_request_id_that_is_not_a_uuid_is_invalid(stub, account):
    created = create_key(stub, account)
    for request_id in ("not-a-uuid", "1234", str(uuid.uuid4()) + "0", "{" + str(uuid.uuid4()) + "}"):
        for method, request in (
            (stub.CreateApiKey, _create_request(account, request_id)),
            (stub.RotateApiKey, pb.RotateApiKeyRequest(name=created.api_key.name, request_id=request_id)),
        ):
            error = _refusal(method, request)
            assert error.code() == C.INVALID_ARGUMENT and "request_id" in error.details(), request_id
    assert _total(stub, account) == 1
    assert _kinds(stub, account) == [E.CREATED]
    assert authorize(stub, created.secret).allowed


def test_a_replayed_create_never_answers_with_a_key_the_caller_cannot_reach(server, stub, account):
    first_caller = server.stub_for(create_key(stub, account, scopes=WRITER, project_id="p1").secret)
    second_caller = server.stub_for(create_key(stub, account, scopes=WRITER, project_id="p2").secret)
    request = _create_request(account, str(uuid.uuid4()))
    first = first_caller.CreateApiKey(request)
    assert first.api_key.project_id == "p1"
    assert rpc_error(lambda: second_caller.GetApiKey(pb.GetApiKeyRequest(name=first.api_key.name))).code() == C.NOT_FOUND
    first_key_id = first.api_key.key_id
    try:
        answer = second_caller.CreateApiKey(request).api_key
    except grpc.RpcError:
        return  # refusing the reused request_id is a fine answer
    handed_back = answer.key_id == first_key_id
    assert not handed_back, "a p2 key was answered with p1's key"
    assert answer.project_id == "p2"


def test_concurrent_identical_creates_make_exactly_one_key(stub, account):
    request = _create_request(account, str(uuid.uuid4()))
    responses = _outcomes([stub.CreateApiKey.future(request) for _ in range(CONCURRENT)])
    assert all(isinstance(r, pb.CreateApiKeyResponse) for r in responses), responses
    assert len({r.api_key.key_id for r in responses}) == 1
    assert all(r.api_key == responses[0].api_key for r in responses)
    secrets = [r.secret for r in responses if r.secret]
    assert len(secrets) == 1
    assert [r.secret_already_delivered for r in responses].count(False) == 1
    assert all(r.secret_already_delivered == (r.secret == "") for r in responses)
    assert _total(stub, account) == 1
    assert _kinds(stub, account) == [E.CREATED]
    assert authorize(stub, secrets[0], "messages:send").allowed


def test_concurrent_identical_rotations_rotate_exactly_once(stub, account):
    created = create_key(stub, account)
    request = pb.RotateApiKeyRequest(name=created.api_key.name, request_id=str(uuid.uuid4()))
    responses = _outcomes([stub.RotateApiKey.future(request) for _ in range(CONCURRENT)])
    assert all(isinstance(r, pb.RotateApiKeyResponse) for r in responses), responses
    secrets = [r.secret for r in responses if r.secret]
    assert len(secrets) == 1
    assert all(r.secret_already_delivered == (r.secret == "") for r in responses)
    assert all(r.api_key == responses[0].api_key for r in responses)
    assert responses[0].api_key.masked_key.endswith(secrets[0][-4:])
    assert _kinds(stub, account, created.api_key.key_id) == [E.ROTATED, E.CREATED]
    assert authorize(stub, secrets[0], "messages:send").allowed
    assert authorize(stub, created.secret).code == R.EXPIRED  # no grace: the old secret stopped


# --- 10. etag races -------------------------------------------------------------------------------


def test_concurrent_updates_under_one_etag_let_exactly_one_win(stub, account):
    key = create_key(stub, account).api_key
    futures = [
        stub.UpdateApiKey.future(
            pb.UpdateApiKeyRequest(
                api_key=pb.ApiKey(name=key.name, display_name=f"writer {i}", etag=key.etag),
                update_mask=FieldMask(paths=["display_name"]),
            )
        )
        for i in range(CONCURRENT)
    ]
    outcomes = _outcomes(futures)
    winners = [o for o in outcomes if isinstance(o, pb.ApiKey)]
    losers = [o for o in outcomes if not isinstance(o, pb.ApiKey)]
    assert len(winners) == 1, outcomes
    assert all(error.code() == C.ABORTED and "etag" in error.details() for error in losers)
    stored = stub.GetApiKey(pb.GetApiKeyRequest(name=key.name))
    assert stored == winners[0] and stored.etag != key.etag
    assert _kinds(stub, account, key.key_id) == [E.UPDATED, E.CREATED]


def test_concurrent_revokes_under_one_etag_let_exactly_one_win(stub, account):
    key = create_key(stub, account).api_key
    futures = [
        stub.RevokeApiKey.future(pb.RevokeApiKeyRequest(name=key.name, etag=key.etag, reason=f"r{i}"))
        for i in range(CONCURRENT)
    ]
    outcomes = _outcomes(futures)
    winners = [o for o in outcomes if isinstance(o, pb.ApiKey)]
    assert len(winners) == 1, outcomes
    assert all(o.code() == C.ABORTED for o in outcomes if not isinstance(o, pb.ApiKey))
    assert stub.GetApiKey(pb.GetApiKeyRequest(name=key.name)) == winners[0]
    assert _kinds(stub, account, key.key_id) == [E.REVOKED, E.CREATED]


# --- 11. the per-account limit --------------------------------------------------------------------


@pytest.fixture
def limited(make_server):
    """A server allowing 3 live keys per account. Its operator account is a fresh one: the shared test
    database's `system` account holds every other test server's operator key, and they count too."""
    return make_server(max_keys_per_account=3, operator_account=f"ops-{uuid.uuid4().hex[:10]}")


def test_the_limit_counts_live_keys_per_account(limited, account):
    stub = limited.stub
    made = [create_key(stub, account).api_key for _ in range(3)]

    def refused():
        error = rpc_error(lambda: create_key(stub, account))
        assert error.code() == C.RESOURCE_EXHAUSTED
        assert "3" in error.details() and f"accounts/{account}" in error.details()

    refused()
    error = rpc_error(lambda: stub.CreateApiKey(_create_request(account, str(uuid.uuid4()))))
    assert error.code() == C.RESOURCE_EXHAUSTED  # a request_id is no way around it
    stub.UpdateApiKey(
        pb.UpdateApiKeyRequest(api_key=pb.ApiKey(name=made[0].name, state=pb.ApiKey.DISABLED), update_mask=FieldMask(paths=["state"]))
    )
    refused()  # a disabled key is still live
    other = f"acct-{uuid.uuid4().hex[:10]}"
    for _ in range(3):
        create_key(stub, other)  # other accounts are unaffected
    stub.RevokeApiKey(pb.RevokeApiKeyRequest(name=made[1].name))
    create_key(stub, account)  # a revoked key frees its slot
    refused()
    stub.DeleteApiKey(pb.DeleteApiKeyRequest(name=made[2].name))
    create_key(stub, account)  # so does a deleted one
    refused()
    assert _total(stub, account) == 4  # three live, one revoked
    assert _kinds(stub, account).count(E.CREATED) == 5


def test_the_limit_binds_tenant_keys_too(limited, account):
    stub = limited.stub
    writer = limited.stub_for(create_key(stub, account, scopes=WRITER).secret)
    create_key(writer, account)
    create_key(writer, account)
    error = rpc_error(lambda: create_key(writer, account))
    assert error.code() == C.RESOURCE_EXHAUSTED and "3" in error.details()


def test_concurrent_creates_at_the_limit_make_exactly_the_limit(limited, account):
    stub = limited.stub
    futures = [stub.CreateApiKey.future(_create_request(account, "", display_name=f"k{i}")) for i in range(6)]
    outcomes = _outcomes(futures)
    made = [o for o in outcomes if isinstance(o, pb.CreateApiKeyResponse)]
    refused = [o for o in outcomes if not isinstance(o, pb.CreateApiKeyResponse)]
    assert len(made) == 3, outcomes
    assert all(error.code() == C.RESOURCE_EXHAUSTED for error in refused)
    assert _total(stub, account) == 3
    assert {k.key_id for k in stub.ListApiKeys(pb.ListApiKeysRequest(parent=f"accounts/{account}")).api_keys} == {
        m.api_key.key_id for m in made
    }


def test_concurrent_retries_of_one_create_at_the_limit_all_get_the_key(limited, account, request):
    stub = limited.stub
    refused_rounds = []
    for round_ in range(5):  # a race: on PostgreSQL nearly every round shows it; five make a miss unlikely
        fresh = f"{account}-{round_}"
        create_key(stub, fresh)
        create_key(stub, fresh)  # one slot left
        create = _create_request(fresh, str(uuid.uuid4()))
        outcomes = _outcomes([stub.CreateApiKey.future(create) for _ in range(CONCURRENT)])
        codes = [o.code().name for o in outcomes if not isinstance(o, pb.CreateApiKeyResponse)]
        if codes:
            refused_rounds.append((round_, codes))
            continue
        assert len({o.api_key.key_id for o in outcomes}) == 1
        assert sum(1 for o in outcomes if o.secret) == 1
        assert _total(stub, fresh) == 3
    assert refused_rounds == []
