"""Every management RPC over a real channel and database, with its error paths."""

import uuid
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.timestamp_pb2 import Timestamp

from apikeyd.domain import keys
from apikeyd.v1 import api_keys_pb2 as pb
from tests.conftest import create_key, rpc_error

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _timestamp(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def _key_events(server, key_id):
    """Every event of one key, oldest first, however many the session's database holds (events() pages)."""
    found, after = [], 0
    while batch := server.app.repository.events(after):
        found += [e for e in batch if e.key_id == key_id]
        after = batch[-1].event_id
    return found


def _events(server, key_id):
    return [(e.kind, list(e.changed_fields), e.details) for e in _key_events(server, key_id)]


# --- create ---------------------------------------------------------------------------------------


def test_create_returns_the_secret_once_and_a_complete_resource(server, stub, account):
    created = create_key(
        stub,
        account,
        scopes=("messages:send:{example.com}", "domains:read"),
        display_name="Production sender",
        description="sends the newsletters",
        labels={"env": "prod", "team": "growth"},
        rate_limits=[pb.RateLimit(limit=2, period=Duration(seconds=1)), pb.RateLimit(limit=50, period=Duration(seconds=60))],
    )
    key = created.api_key
    assert keys.parse(created.secret) is not None
    assert created.secret.startswith("AK_")
    assert key.name == f"accounts/{account}/apiKeys/{key.key_id}"
    assert key.account_id == account and key.project_id == ""
    assert key.state == pb.ApiKey.ACTIVE
    assert list(key.scopes) == ["messages:send:{example.com}", "domains:read"]
    assert dict(key.labels) == {"env": "prod", "team": "growth"}
    assert [(r.limit, r.period.seconds) for r in key.rate_limits] == [(2, 1), (50, 60)]
    assert key.create_time == key.update_time and key.create_time.seconds > 0
    assert not key.HasField("last_used_time") and not key.HasField("revoke_time")
    assert key.etag
    # masked: recognisable (prefix, start of lookup id, last characters), never usable
    assert key.masked_key.startswith(created.secret[:11]) and key.masked_key.endswith(created.secret[-4:])
    assert keys.parse(created.secret).secret not in key.masked_key
    assert keys.parse(key.masked_key) is None
    assert [kind for kind, _, _ in _events(server, key.key_id)] == ["created"]


def test_project_keys_get_their_own_prefix(stub, account):
    created = create_key(stub, account, project_id="p1")
    assert created.secret.startswith("AKP_") and created.api_key.project_id == "p1"


def test_get_and_list_never_return_the_secret_or_its_hash(stub, account):
    created = create_key(stub, account)
    secret_part = keys.parse(created.secret).secret
    got = stub.GetApiKey(pb.GetApiKeyRequest(name=created.api_key.name))
    listed = stub.ListApiKeys(pb.ListApiKeysRequest(parent=f"accounts/{account}"))
    for message in (got, listed):
        wire = message.SerializeToString()
        assert secret_part.encode() not in wire and b"$argon2" not in wire
    assert got == created.api_key
    assert list(listed.api_keys) == [created.api_key]


@pytest.mark.parametrize(
    ("fields", "parent", "message"),
    [
        ({"display_name": ""}, None, "display_name"),
        ({"display_name": "x" * 256}, None, "display_name"),
        ({"description": "x" * 1025}, None, "description"),
        ({"scopes": []}, None, "scopes"),
        ({"scopes": ["Messages:Send"]}, None, "'Messages:Send'"),
        ({"scopes": ["messages:send:some"]}, None, "'messages:send:some'"),
        ({"labels": {f"k{i}": "v" for i in range(65)}}, None, "labels"),
        ({"labels": {"Env": "prod"}}, None, "labels"),
        ({"project_id": "bad project"}, None, "project_id"),
        ({"rate_limits": [pb.RateLimit(limit=0, period=Duration(seconds=1))]}, None, "rate_limits"),
        ({"rate_limits": [pb.RateLimit(limit=5, period=Duration(seconds=0))]}, None, "rate_limits"),
        ({"expire_time": _timestamp(datetime.now(UTC) - timedelta(minutes=1))}, None, "expire_time"),
        ({}, "accounts/", "parent"),
        ({}, "projects/x", "parent"),
    ],
)
def test_create_refuses_bad_input_naming_the_field(stub, account, fields, parent, message):
    api_key = {"display_name": "k", "scopes": ["messages:send"], **fields}
    error = rpc_error(
        lambda: stub.CreateApiKey(
            pb.CreateApiKeyRequest(parent=parent or f"accounts/{account}", api_key=pb.ApiKey(**api_key))
        )
    )
    assert error.code() == INVALID
    assert message in error.details()


def test_create_without_a_key_says_so(stub, account):
    error = rpc_error(lambda: stub.CreateApiKey(pb.CreateApiKeyRequest(parent=f"accounts/{account}")))
    assert error.code() == INVALID and "api_key" in error.details()


# --- get ------------------------------------------------------------------------------------------


def test_get_unknown_or_other_accounts_key_is_not_found(stub, account):
    created = create_key(stub, account)
    other = f"accounts/someone-else/apiKeys/{created.api_key.key_id}"
    for name in (other, f"accounts/{account}/apiKeys/00000000-0000-4000-8000-000000000000"):
        assert rpc_error(lambda name=name: stub.GetApiKey(pb.GetApiKeyRequest(name=name))).code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("name", ["", "accounts/a", "accounts/a/apiKeys/not-a-uuid", "keys/1"])
def test_get_bad_name_is_invalid_argument(stub, name):
    error = rpc_error(lambda: stub.GetApiKey(pb.GetApiKeyRequest(name=name)))
    assert error.code() == INVALID and "name" in error.details()


# --- list -----------------------------------------------------------------------------------------


def test_list_pages_through_every_key_once_in_a_stable_order(stub, account):
    names = [create_key(stub, account, display_name=f"k{i}").api_key.name for i in range(7)]
    seen, token, pages = [], "", 0
    while True:
        page = stub.ListApiKeys(pb.ListApiKeysRequest(parent=f"accounts/{account}", page_size=3, page_token=token))
        assert len(page.api_keys) <= 3
        seen += [k.name for k in page.api_keys]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert seen == names and pages == 3


def test_list_filters_by_state_project_and_labels(stub, account):
    prod = create_key(stub, account, labels={"env": "prod"}).api_key
    create_key(stub, account, labels={"env": "dev"})
    project = create_key(stub, account, project_id="p1", labels={"env": "prod"}).api_key
    disabled = create_key(stub, account).api_key
    stub.UpdateApiKey(
        pb.UpdateApiKeyRequest(api_key=pb.ApiKey(name=disabled.name, state=pb.ApiKey.DISABLED), update_mask=FieldMask(paths=["state"]))
    )

    def names(text):
        response = stub.ListApiKeys(pb.ListApiKeysRequest(parent=f"accounts/{account}", filter=text))
        assert not response.next_page_token  # every match is on this one page
        return {k.name for k in response.api_keys}

    assert names('labels.env = "prod"') == {prod.name, project.name}
    assert names('project_id = "p1"') == {project.name}
    assert names('labels.env = "prod" AND project_id = ""') == {prod.name}
    assert names("state = DISABLED") == {disabled.name}
    assert len(names("state = ACTIVE")) == 3


def test_list_refuses_bad_filters_sizes_and_tokens(stub, account):
    for _ in range(3):
        create_key(stub, account)
    parent = f"accounts/{account}"
    for request, field in [
        (pb.ListApiKeysRequest(parent=parent, filter="color = red"), "filter"),
        (pb.ListApiKeysRequest(parent=parent, page_size=-1), "page_size"),
        (pb.ListApiKeysRequest(parent=parent, page_token="garbage!"), "page_token"),
        (pb.ListApiKeysRequest(parent="accounts/"), "parent"),
    ]:
        error = rpc_error(lambda request=request: stub.ListApiKeys(request))
        assert error.code() == INVALID and field in error.details()
    token = stub.ListApiKeys(pb.ListApiKeysRequest(parent=parent, page_size=1)).next_page_token
    error = rpc_error(lambda: stub.ListApiKeys(pb.ListApiKeysRequest(parent=parent, page_token=token, filter="state = ACTIVE")))
    assert error.code() == INVALID and "page_token" in error.details()


def test_list_page_size_defaults_to_50(stub, account):
    for i in range(51):
        create_key(stub, account, display_name=f"k{i}")
    first = stub.ListApiKeys(pb.ListApiKeysRequest(parent=f"accounts/{account}"))
    assert len(first.api_keys) == 50 and first.next_page_token
    rest = stub.ListApiKeys(pb.ListApiKeysRequest(parent=f"accounts/{account}", page_token=first.next_page_token))
    assert len(rest.api_keys) == 1 and not rest.next_page_token


# --- update ---------------------------------------------------------------------------------------


def test_update_changes_only_the_masked_fields_and_records_them(server, stub, account):
    key = create_key(stub, account, description="old", labels={"env": "dev"}).api_key
    updated = stub.UpdateApiKey(
        pb.UpdateApiKeyRequest(
            api_key=pb.ApiKey(name=key.name, display_name="renamed", description="ignored", scopes=["domains:read"]),
            update_mask=FieldMask(paths=["display_name", "scopes"]),
        )
    )
    assert updated.display_name == "renamed" and list(updated.scopes) == ["domains:read"]
    assert updated.description == "old" and dict(updated.labels) == {"env": "dev"}
    assert updated.etag != key.etag and updated.update_time.ToDatetime() > key.update_time.ToDatetime()
    assert _events(server, key.key_id)[-1] == ("updated", ["display_name", "scopes"], {})


def test_update_without_a_mask_updates_the_fields_that_are_set(stub, account):
    key = create_key(stub, account, description="old").api_key
    updated = stub.UpdateApiKey(pb.UpdateApiKeyRequest(api_key=pb.ApiKey(name=key.name, labels={"env": "prod"})))
    assert dict(updated.labels) == {"env": "prod"} and updated.description == "old"


def test_update_can_clear_expiry_and_rate_limits(stub, account):
    key = create_key(
        stub,
        account,
        expire_time=_timestamp(datetime.now(UTC) + timedelta(days=1)),
        rate_limits=[pb.RateLimit(limit=1, period=Duration(seconds=1))],
    ).api_key
    updated = stub.UpdateApiKey(
        pb.UpdateApiKeyRequest(api_key=pb.ApiKey(name=key.name), update_mask=FieldMask(paths=["expire_time", "rate_limits"]))
    )
    assert not updated.HasField("expire_time") and not updated.rate_limits


def test_disable_and_enable_are_state_updates_with_their_own_events(server, stub, account):
    key = create_key(stub, account).api_key
    mask = FieldMask(paths=["state"])
    disabled = stub.UpdateApiKey(pb.UpdateApiKeyRequest(api_key=pb.ApiKey(name=key.name, state=pb.ApiKey.DISABLED), update_mask=mask))
    enabled = stub.UpdateApiKey(pb.UpdateApiKeyRequest(api_key=pb.ApiKey(name=key.name, state=pb.ApiKey.ACTIVE), update_mask=mask))
    assert disabled.state == pb.ApiKey.DISABLED and enabled.state == pb.ApiKey.ACTIVE
    assert [kind for kind, _, _ in _events(server, key.key_id)] == ["created", "disabled", "enabled"]


@pytest.mark.parametrize(
    ("api_key", "paths", "field"),
    [
        ({"state": pb.ApiKey.REVOKED}, ["state"], "RevokeApiKey"),
        ({}, ["name"], "update_mask"),
        ({}, ["masked_key"], "update_mask"),
        ({"scopes": ["BAD"]}, ["scopes"], "'BAD'"),
        ({"display_name": ""}, ["display_name"], "display_name"),
        ({}, [], "update_mask"),
    ],
)
def test_update_refuses_bad_masks_and_values(stub, account, api_key, paths, field):
    key = create_key(stub, account).api_key
    request = pb.UpdateApiKeyRequest(api_key=pb.ApiKey(name=key.name, **api_key), update_mask=FieldMask(paths=paths))
    error = rpc_error(lambda: stub.UpdateApiKey(request))
    assert error.code() == INVALID and field in error.details()
    assert stub.GetApiKey(pb.GetApiKeyRequest(name=key.name)) == key  # nothing changed


def test_stale_etag_is_aborted_and_changes_nothing(stub, account):
    key = create_key(stub, account).api_key
    request = pb.UpdateApiKeyRequest(api_key=pb.ApiKey(name=key.name, display_name="first", etag=key.etag), update_mask=FieldMask(paths=["display_name"]))
    first = stub.UpdateApiKey(request)
    error = rpc_error(lambda: stub.UpdateApiKey(request))  # same etag again: now stale
    assert error.code() == grpc.StatusCode.ABORTED and "etag" in error.details()
    for call in (
        lambda: stub.RevokeApiKey(pb.RevokeApiKeyRequest(name=key.name, etag=key.etag)),
        lambda: stub.RotateApiKey(pb.RotateApiKeyRequest(name=key.name, etag=key.etag)),
        lambda: stub.DeleteApiKey(pb.DeleteApiKeyRequest(name=key.name, etag=key.etag)),
    ):
        assert rpc_error(call).code() == grpc.StatusCode.ABORTED
    assert stub.GetApiKey(pb.GetApiKeyRequest(name=key.name)) == first
    # the current etag works
    stub.RevokeApiKey(pb.RevokeApiKeyRequest(name=key.name, etag=first.etag))


# --- revoke, delete, rotate -----------------------------------------------------------------------


def test_revoke_is_terminal_and_kept_for_audit(server, stub, account):
    key = create_key(stub, account).api_key
    revoked = stub.RevokeApiKey(pb.RevokeApiKeyRequest(name=key.name, reason="leaked in a public repo"))
    assert revoked.state == pb.ApiKey.REVOKED and revoked.revoke_reason == "leaked in a public repo"
    assert revoked.HasField("revoke_time")
    assert stub.GetApiKey(pb.GetApiKeyRequest(name=key.name)) == revoked
    for call in (
        lambda: stub.RevokeApiKey(pb.RevokeApiKeyRequest(name=key.name)),
        lambda: stub.RotateApiKey(pb.RotateApiKeyRequest(name=key.name)),
        lambda: stub.UpdateApiKey(pb.UpdateApiKeyRequest(api_key=pb.ApiKey(name=key.name, state=pb.ApiKey.ACTIVE), update_mask=FieldMask(paths=["state"]))),
    ):
        assert rpc_error(call).code() == grpc.StatusCode.FAILED_PRECONDITION
    assert _events(server, key.key_id)[-1][0] == "revoked"
    assert _events(server, key.key_id)[-1][2] == {"reason": "leaked in a public repo"}


def test_delete_removes_the_key_and_leaves_its_events(server, stub, account):
    key = create_key(stub, account).api_key
    assert stub.DeleteApiKey(pb.DeleteApiKeyRequest(name=key.name)) == pb.google_dot_protobuf_dot_empty__pb2.Empty()
    assert rpc_error(lambda: stub.GetApiKey(pb.GetApiKeyRequest(name=key.name))).code() == grpc.StatusCode.NOT_FOUND
    assert rpc_error(lambda: stub.DeleteApiKey(pb.DeleteApiKeyRequest(name=key.name))).code() == grpc.StatusCode.NOT_FOUND
    assert [kind for kind, _, _ in _events(server, key.key_id)] == ["created", "deleted"]


def test_rotate_returns_a_new_secret_and_sets_the_grace_end(server, stub, account):
    created = create_key(stub, account)
    before = datetime.now(UTC)
    rotated = stub.RotateApiKey(pb.RotateApiKeyRequest(name=created.api_key.name, grace_period=Duration(seconds=3600)))
    assert rotated.secret != created.secret and keys.parse(rotated.secret) is not None
    assert rotated.api_key.key_id == created.api_key.key_id
    assert rotated.api_key.masked_key == rotated.secret[:11] + "..." + rotated.secret[-4:]
    grace_end = rotated.api_key.previous_secret_expire_time.ToDatetime(tzinfo=UTC)
    assert timedelta(seconds=3590) < grace_end - before < timedelta(seconds=3610)
    kind, _, details = _events(server, created.api_key.key_id)[-1]
    assert kind == "rotated" and details == {"grace_seconds": 3600.0}
    assert keys.parse(rotated.secret).secret not in str(details)


@pytest.mark.parametrize("seconds", [-1, 7 * 86400 + 1])
def test_rotate_refuses_a_grace_outside_0_to_7_days(stub, account, seconds):
    key = create_key(stub, account).api_key
    error = rpc_error(lambda: stub.RotateApiKey(pb.RotateApiKeyRequest(name=key.name, grace_period=Duration(seconds=seconds))))
    assert error.code() == INVALID and "grace_period" in error.details()


def test_every_mutation_writes_one_event_without_secrets(server, stub, account):
    created = create_key(stub, account)
    name = created.api_key.name
    stub.UpdateApiKey(pb.UpdateApiKeyRequest(api_key=pb.ApiKey(name=name, description="d"), update_mask=FieldMask(paths=["description"])))
    rotated = stub.RotateApiKey(pb.RotateApiKeyRequest(name=name))
    stub.RevokeApiKey(pb.RevokeApiKeyRequest(name=name, reason="done"))
    stub.DeleteApiKey(pb.DeleteApiKeyRequest(name=name))
    events = _key_events(server, created.api_key.key_id)
    assert [e.kind for e in events] == ["created", "updated", "rotated", "revoked", "deleted"]
    assert [e.event_id for e in events] == sorted(e.event_id for e in events)
    assert all(e.account_id == account for e in events)
    text = repr([(e.changed_fields, e.details) for e in events])
    for secret in (created.secret, rotated.secret):
        assert keys.parse(secret).secret not in text
    assert "argon2" not in text


def test_request_ids_past_their_day_are_forgotten(server, stub, account):
    request_id = str(uuid.uuid4())
    request = pb.CreateApiKeyRequest(
        parent=f"accounts/{account}", api_key=pb.ApiKey(display_name="k", scopes=["a:b"]), request_id=request_id
    )
    first = stub.CreateApiKey(request)
    repository = server.app.repository
    assert repository.forget_request_ids(datetime.now(UTC) - timedelta(hours=24)) == 0
    assert stub.CreateApiKey(request).secret_already_delivered
    assert repository.forget_request_ids(datetime.now(UTC) + timedelta(seconds=1)) >= 1
    again = stub.CreateApiKey(request)  # the id is free again: a new key
    assert again.secret and again.api_key.key_id != first.api_key.key_id
