"""Who may call what: bearer credentials, the apikeys:read / apikeys:write scopes, accounts and projects,
operator keys, no escalation, self-protection, tenant isolation, rights lost mid-session, and Authorize
with authorize_requires_key. Real channels and a real database; callers are keys made by the operator."""

import uuid
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.timestamp_pb2 import Timestamp

from apikeyd.domain import keys
from apikeyd.domain.access import Actor
from apikeyd.domain.model import EventKind
from apikeyd.store.repository import Change
from apikeyd.v1 import api_keys_pb2 as pb
from tests.conftest import authorize, count_keys, create_key, held_hasher, rpc_error

C = grpc.StatusCode
R = pb.AuthorizeResponse
WRITER = ("apikeys:write", "apikeys:read", "messages:send:all")
MISSING_ID = "00000000-0000-4000-8000-000000000000"


def _get(stub, name):
    return stub.GetApiKey(pb.GetApiKeyRequest(name=name))


def _update(stub, name, allow_self=False, **fields):
    return stub.UpdateApiKey(
        pb.UpdateApiKeyRequest(
            api_key=pb.ApiKey(name=name, **fields), update_mask=FieldMask(paths=list(fields)), allow_self=allow_self
        )
    )


def _list(stub, account, **fields):
    return stub.ListApiKeys(pb.ListApiKeysRequest(parent=f"accounts/{account}", **fields))


def _refusal(call, *args, **kwargs):
    """The grpc.RpcError that call(*args, **kwargs) raises."""
    return rpc_error(lambda: call(*args, **kwargs))


def _key_calls(name):
    """Every management call that names one key, each a function of a stub."""
    return {
        "GetApiKey": lambda s: s.GetApiKey(pb.GetApiKeyRequest(name=name)),
        "UpdateApiKey": lambda s: s.UpdateApiKey(
            pb.UpdateApiKeyRequest(api_key=pb.ApiKey(name=name, display_name="taken"), update_mask=FieldMask(paths=["display_name"]))
        ),
        "RevokeApiKey": lambda s: s.RevokeApiKey(pb.RevokeApiKeyRequest(name=name, reason="taken")),
        "DeleteApiKey": lambda s: s.DeleteApiKey(pb.DeleteApiKeyRequest(name=name)),
        "RotateApiKey": lambda s: s.RotateApiKey(pb.RotateApiKeyRequest(name=name)),
    }


def _account_calls(account):
    """Every management call that names an account."""
    parent = f"accounts/{account}"
    return {
        "CreateApiKey": lambda s: s.CreateApiKey(
            pb.CreateApiKeyRequest(parent=parent, api_key=pb.ApiKey(display_name="planted", scopes=["messages:send:all"]))
        ),
        "ListApiKeys": lambda s: s.ListApiKeys(pb.ListApiKeysRequest(parent=parent)),
        "ListAuditEvents": lambda s: s.ListAuditEvents(pb.ListAuditEventsRequest(parent=parent)),
        "ListApiKeyUsage": lambda s: s.ListApiKeyUsage(
            pb.ListApiKeyUsageRequest(parent=f"{parent}/apiKeys/-", granularity=pb.DAY, start_time=Timestamp(seconds=0))
        ),
    }


def _all_calls(account, name):
    return {**_key_calls(name), **_account_calls(account)}


def _missing_message(account, key_id):
    """What NOT_FOUND says for a key that truly does not exist."""
    return f"api key accounts/{account}/apiKeys/{key_id} does not exist"


def _expire_now(server, account, key_id):
    """Give a key an expire_time in the past, which the API refuses to set: through the repository."""
    past = datetime.now(UTC) - timedelta(seconds=1)
    server.app.repository.modify(
        account,
        key_id,
        "",
        lambda current, _: Change(EventKind.UPDATED, {"expire_time": past}, ("expire_time",)),
        datetime.now(UTC),
        Actor(),
    )


# --- 1. credentials -------------------------------------------------------------------------------


def test_every_management_call_without_a_credential_is_unauthenticated(server, stub, account):
    target = create_key(stub, account).api_key
    anonymous = server.stub_for(None)
    for method, call in _all_calls(account, target.name).items():
        error = _refusal(call, anonymous)
        assert error.code() == C.UNAUTHENTICATED, method
        assert "no credential" in error.details() and "Bearer" in error.details(), method
    assert _get(stub, target.name) == target
    assert [k.key_id for k in _list(stub, account).api_keys] == [target.key_id]


def test_an_authorization_header_that_is_not_bearer_is_unauthenticated(server, stub, account):
    anonymous = server.stub_for(None)
    for header in ("Basic dXNlcjpwYXNz", "Token abc", "Bearer", "Bearer    ", server.operator_key):
        error = _refusal(
            anonymous.ListApiKeys, pb.ListApiKeysRequest(parent=f"accounts/{account}"), metadata=[("authorization", header)]
        )
        assert error.code() == C.UNAUTHENTICATED and "Bearer" in error.details(), header[:8]


def test_a_lowercase_bearer_scheme_is_accepted(server, stub, account):
    anonymous = server.stub_for(None)
    listed = anonymous.ListApiKeys(
        pb.ListApiKeysRequest(parent=f"accounts/{account}"), metadata=[("authorization", f"bearer {server.operator_key}")]
    )
    assert not listed.api_keys and not listed.next_page_token


def test_unusable_bearer_keys_are_unauthenticated_saying_why(server, stub, account):
    def fresh(**fields):
        return create_key(stub, account, scopes=WRITER, **fields)

    revoked, disabled, expired, rotated_out = fresh(), fresh(), fresh(), fresh()
    stub.RevokeApiKey(pb.RevokeApiKeyRequest(name=revoked.api_key.name))
    _update(stub, disabled.api_key.name, state=pb.ApiKey.DISABLED)
    _expire_now(server, account, expired.api_key.key_id)
    stub.RotateApiKey(pb.RotateApiKeyRequest(name=rotated_out.api_key.name))  # no grace: the old secret stops
    live = fresh()
    parsed = keys.parse(live.secret)
    wrong_secret = keys.generate(parsed.prefix, parsed.lookup_id)[0]
    cases = {
        "not-a-key": "well-formed",
        live.secret[:-1] + ("A" if live.secret[-1] != "A" else "B"): "well-formed",  # checksum broken
        keys.generate("AK_", keys.new_lookup_id())[0]: "no key matches",
        wrong_secret: "no key matches",
        revoked.secret: "revoked",
        disabled.secret: "disabled",
        expired.secret: "expired",
        rotated_out.secret: "rotated out",
    }
    before = count_keys(stub, account)
    for token, why in cases.items():
        caller = server.stub_for(token)
        for method, call in _account_calls(account).items():
            error = _refusal(call, caller)
            assert error.code() == C.UNAUTHENTICATED, (why, method)
            assert why in error.details(), (why, method, error.details())
            assert token not in error.details()
    assert count_keys(stub, account) == before  # the refused creates made nothing
    assert count_keys(server.stub_for(live.secret), account) == before  # the live one works


def test_a_usable_key_without_the_scope_is_permission_denied_naming_the_scope(server, stub, account):
    target = create_key(stub, account).api_key
    caller = server.stub_for(create_key(stub, account, scopes=("messages:send:all",)).secret)
    for method, call in _all_calls(account, target.name).items():
        error = _refusal(call, caller)
        assert error.code() == C.PERMISSION_DENIED, method
        needed = "apikeys:read" if method in ("GetApiKey", "ListApiKeys", "ListAuditEvents", "ListApiKeyUsage") else "apikeys:write"
        assert needed in error.details(), (method, error.details())
    assert _get(stub, target.name) == target


# --- 2. read and write, accounts and projects -------------------------------------------------------


def test_a_read_only_key_reads_but_cannot_write(server, stub, account):
    target = create_key(stub, account).api_key
    reader = server.stub_for(create_key(stub, account, scopes=("apikeys:read",)).secret)
    assert _get(reader, target.name) == target
    assert count_keys(reader, account) == 2
    assert reader.ListAuditEvents(pb.ListAuditEventsRequest(parent=f"accounts/{account}")).audit_events
    for method, call in {**_key_calls(target.name), "CreateApiKey": _account_calls(account)["CreateApiKey"]}.items():
        if method == "GetApiKey":
            continue
        error = _refusal(call, reader)
        assert error.code() == C.PERMISSION_DENIED and "apikeys:write" in error.details(), method
    assert _get(stub, target.name) == target
    assert count_keys(stub, account) == 2


def test_a_write_key_manages_its_own_accounts_keys(server, stub, account):
    writer = server.stub_for(create_key(stub, account, scopes=WRITER).secret)
    made = writer.CreateApiKey(
        pb.CreateApiKeyRequest(parent=f"accounts/{account}", api_key=pb.ApiKey(display_name="svc", scopes=["messages:send:{a.com}"]))
    )
    assert made.api_key.account_id == account and authorize(stub, made.secret, "messages:send", resource="a.com").allowed
    assert _update(writer, made.api_key.name, display_name="svc2").display_name == "svc2"
    rotated = writer.RotateApiKey(pb.RotateApiKeyRequest(name=made.api_key.name))
    assert authorize(stub, rotated.secret, "messages:send", resource="a.com").allowed
    assert writer.RevokeApiKey(pb.RevokeApiKeyRequest(name=made.api_key.name)).state == pb.ApiKey.REVOKED
    writer.DeleteApiKey(pb.DeleteApiKeyRequest(name=made.api_key.name))
    assert rpc_error(lambda: _get(stub, made.api_key.name)).code() == C.NOT_FOUND


def test_a_project_key_sees_other_projects_and_account_wide_keys_as_missing(server, stub, account):
    other_project = create_key(stub, account, project_id="p2").api_key
    account_wide = create_key(stub, account).api_key
    own = create_key(stub, account, project_id="p1").api_key
    caller = server.stub_for(create_key(stub, account, scopes=WRITER, project_id="p1").secret)
    assert _get(caller, own.name) == own
    for target in (other_project, account_wide):
        for method, call in _key_calls(target.name).items():
            error = _refusal(call, caller)
            assert error.code() == C.NOT_FOUND, method
            assert error.details() == _missing_message(account, target.key_id), method
        assert _get(stub, target.name) == target  # untouched
    # a key id that exists nowhere gets the same answer, in the same words
    missing = rpc_error(lambda: _get(caller, f"accounts/{account}/apiKeys/{MISSING_ID}"))
    assert missing.code() == C.NOT_FOUND and missing.details() == _missing_message(account, MISSING_ID)


def test_a_project_key_lists_only_its_projects_keys(server, stub, account):
    create_key(stub, account, project_id="p2")
    create_key(stub, account)
    own = [create_key(stub, account, project_id="p1").api_key for _ in range(2)]
    caller_key = create_key(stub, account, scopes=WRITER, project_id="p1")
    caller = server.stub_for(caller_key.secret)
    listed = _list(caller, account)
    assert [k.key_id for k in listed.api_keys] == [k.key_id for k in own] + [caller_key.api_key.key_id]
    assert not listed.next_page_token
    first = _list(caller, account, page_size=2)
    assert len(first.api_keys) == 2 and first.next_page_token
    rest = _list(caller, account, page_size=2, page_token=first.next_page_token)
    assert [k.key_id for k in rest.api_keys] == [caller_key.api_key.key_id] and not rest.next_page_token
    for text in ('project_id = "p2"', 'project_id = ""'):
        other = _list(caller, account, filter=text)
        assert not other.api_keys and not other.next_page_token, text
    assert count_keys(caller, account, filter='project_id = "p1"') == 3
    assert count_keys(stub, account) == 5  # the operator sees all


def test_a_project_key_creates_keys_in_its_own_project_only(server, stub, account):
    caller = server.stub_for(create_key(stub, account, scopes=WRITER, project_id="p1").secret)

    def create(project_id):
        return caller.CreateApiKey(
            pb.CreateApiKeyRequest(
                parent=f"accounts/{account}",
                api_key=pb.ApiKey(display_name="k", scopes=["messages:send:all"], project_id=project_id),
            )
        )

    filled_in = create("")
    assert filled_in.api_key.project_id == "p1" and filled_in.secret.startswith("AKP_")
    assert authorize(stub, filled_in.secret, "messages:send", project_id="p1").allowed
    assert create("p1").api_key.project_id == "p1"
    error = rpc_error(lambda: create("p2"))
    assert error.code() == C.PERMISSION_DENIED and "'p2'" in error.details()
    assert count_keys(stub, account, filter='project_id = "p2"') == 0
    assert count_keys(stub, account) == 3


# --- 3. operator keys -----------------------------------------------------------------------------


def test_operator_keys_act_on_every_account(server, stub):
    accounts = [f"acct-{uuid.uuid4().hex[:10]}" for _ in range(2)]
    for account in accounts:
        key = create_key(stub, account, project_id="p9").api_key
        assert _get(stub, key.name) == key
        assert count_keys(stub, account) == 1
        assert _update(stub, key.name, description="by the operator").description == "by the operator"
        assert stub.ListAuditEvents(pb.ListAuditEventsRequest(parent=f"accounts/{account}")).audit_events
        assert stub.RevokeApiKey(pb.RevokeApiKeyRequest(name=key.name)).state == pb.ApiKey.REVOKED
    # a read-only key of the operator account reads everywhere and writes nowhere
    reader = server.stub_for(create_key(stub, "system", scopes=("apikeys:read",)).secret)
    assert count_keys(reader, accounts[0]) == 1
    error = rpc_error(lambda: _account_calls(accounts[1])["CreateApiKey"](reader))
    assert error.code() == C.PERMISSION_DENIED and "apikeys:write" in error.details()


# --- 4. no escalation, and no accidental self-harm --------------------------------------------------


def test_a_caller_grants_only_scopes_it_holds(server, stub, account):
    narrow = server.stub_for(create_key(stub, account, scopes=("apikeys:write", "messages:send:{a.com}")).secret)

    def create(caller, *scopes):
        return caller.CreateApiKey(
            pb.CreateApiKeyRequest(parent=f"accounts/{account}", api_key=pb.ApiKey(display_name="k", scopes=list(scopes)))
        )

    granted = create(narrow, "messages:send:{a.com}")
    for scope in ("messages:send:all", "messages:send", "messages:send:{b.com}", "*", "apikeys:read"):
        error = _refusal(create, narrow, "messages:send:{a.com}", scope)
        assert error.code() == C.PERMISSION_DENIED and repr(scope) in error.details(), scope
        # nor by update: neither the key it made nor itself
        error = _refusal(_update, narrow, granted.api_key.name, scopes=["messages:send:{a.com}", scope])
        assert error.code() == C.PERMISSION_DENIED and repr(scope) in error.details(), scope
    assert count_keys(stub, account) == 2
    assert _get(stub, granted.api_key.name) == granted.api_key

    broad = server.stub_for(create_key(stub, account, scopes=("apikeys:write", "messages:send:all")).secret)
    for scopes in (["messages:send:{x}"], ["messages:send"], ["messages:send:all", "messages:send:{b.com}"]):
        assert list(create(broad, *scopes).api_key.scopes) == scopes
    error = rpc_error(lambda: create(broad, "messages:read"))
    assert error.code() == C.PERMISSION_DENIED and "'messages:read'" in error.details()


def test_a_caller_cannot_change_or_rotate_a_key_with_a_scope_it_lacks_but_can_revoke_or_delete_it(server, stub, account):
    caller = server.stub_for(create_key(stub, account, scopes=WRITER).secret)
    stronger = create_key(stub, account, scopes=("messages:send:all", "billing:admin")).api_key
    for call in (
        lambda: _update(caller, stronger.name, display_name="mine now"),
        lambda: _update(caller, stronger.name, scopes=["messages:send:all"]),  # narrowing needs the scope too
        lambda: _update(caller, stronger.name, state=pb.ApiKey.DISABLED),
        lambda: caller.RotateApiKey(pb.RotateApiKeyRequest(name=stronger.name)),
    ):
        error = rpc_error(call)
        assert error.code() == C.PERMISSION_DENIED and "'billing:admin'" in error.details()
    assert _get(stub, stronger.name) == stronger
    assert caller.RevokeApiKey(pb.RevokeApiKeyRequest(name=stronger.name, reason="r")).state == pb.ApiKey.REVOKED
    another = create_key(stub, account, scopes=("*",)).api_key
    caller.DeleteApiKey(pb.DeleteApiKeyRequest(name=another.name))
    assert rpc_error(lambda: _get(stub, another.name)).code() == C.NOT_FOUND


def test_non_operators_cannot_touch_operator_keys(server, stub, account):
    operator_key = authorize(stub, server.operator_key)
    assert operator_key.account_id == "system"
    everything = server.stub_for(create_key(stub, account, scopes=("*",)).secret)  # all scopes, but not an operator
    for method, call in _all_calls("system", operator_key.name).items():
        error = _refusal(call, everything)
        assert error.code() == C.PERMISSION_DENIED, method
        assert "accounts/system" in error.details(), method
    assert authorize(stub, server.operator_key).allowed
    assert count_keys(stub, account) == 1  # and the operator key still works


SELF_ACTIONS = {
    "revoke": lambda s, name, allow: s.RevokeApiKey(pb.RevokeApiKeyRequest(name=name, allow_self=allow)),
    "delete": lambda s, name, allow: s.DeleteApiKey(pb.DeleteApiKeyRequest(name=name, allow_self=allow)),
    "rotate": lambda s, name, allow: s.RotateApiKey(pb.RotateApiKeyRequest(name=name, allow_self=allow)),
    "disable": lambda s, name, allow: _update(s, name, allow_self=allow, state=pb.ApiKey.DISABLED),
}


@pytest.mark.parametrize("action", SELF_ACTIONS)
def test_a_caller_harms_its_own_key_only_with_allow_self(server, stub, account, action):
    me = create_key(stub, account, scopes=WRITER)
    caller = server.stub_for(me.secret)
    error = rpc_error(lambda: SELF_ACTIONS[action](caller, me.api_key.name, False))
    assert error.code() == C.FAILED_PRECONDITION
    assert "allow_self" in error.details() and action in error.details()
    assert _get(stub, me.api_key.name) == me.api_key
    assert count_keys(caller, account) == 1  # still works

    done = SELF_ACTIONS[action](caller, me.api_key.name, True)
    after = rpc_error(lambda: _list(caller, account))
    assert after.code() == C.UNAUTHENTICATED
    expected = {"revoke": "revoked", "delete": "no key matches", "rotate": "rotated out", "disable": "disabled"}[action]
    assert expected in after.details()
    if action == "rotate":  # the new secret is the caller's key now
        assert count_keys(server.stub_for(done.secret), account) == 1


def test_other_updates_of_the_callers_own_key_need_no_allow_self(server, stub, account):
    me = create_key(stub, account, scopes=WRITER)
    caller = server.stub_for(me.secret)
    assert _update(caller, me.api_key.name, display_name="renamed").display_name == "renamed"
    assert _update(caller, me.api_key.name, state=pb.ApiKey.ACTIVE).state == pb.ApiKey.ACTIVE  # not a disable
    assert count_keys(caller, account) == 1


def _ts(moment):
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def _limit(limit, seconds):
    return pb.RateLimit(limit=limit, period=Duration(seconds=seconds))


IN_A_DAY = datetime.now(UTC).replace(microsecond=0) + timedelta(days=1)

# Updates of the caller's own key (made with WRITER, IN_A_DAY and 100 per 60 s) that take something away:
# (fields to send, the phrase the error must hold, how the key reads after the update with allow_self).
SELF_LOSSES = {
    "narrower scopes": (
        {"scopes": ["apikeys:write", "apikeys:read", "messages:send:{a.com}"]},
        "narrow its scopes",
        lambda k: list(k.scopes) == ["apikeys:write", "apikeys:read", "messages:send:{a.com}"],
    ),
    "a scope removed": (
        {"scopes": ["apikeys:write", "messages:send:all"]},
        "narrow its scopes",
        lambda k: list(k.scopes) == ["apikeys:write", "messages:send:all"],
    ),
    "an earlier expire_time": (
        {"expire_time": _ts(IN_A_DAY - timedelta(hours=12))},
        "bring its expire_time forward",
        lambda k: k.expire_time.ToDatetime(tzinfo=UTC) == IN_A_DAY - timedelta(hours=12),
    ),
    "a lower rate limit": (
        {"rate_limits": [_limit(10, 60)]},
        "tighten its rate limits",
        lambda k: [(r.limit, r.period.seconds) for r in k.rate_limits] == [(10, 60)],
    ),
    "a new rate limit beside the old": (
        {"rate_limits": [_limit(100, 60), _limit(5, 1)]},
        "tighten its rate limits",
        lambda k: len(k.rate_limits) == 2,
    ),
    "the same number over a longer period": (
        {"rate_limits": [_limit(100, 3600)]},
        "tighten its rate limits",
        lambda k: [(r.limit, r.period.seconds) for r in k.rate_limits] == [(100, 3600)],
    ),
}


def _limited_self(server, stub, account, **fields):
    fields.setdefault("expire_time", _ts(IN_A_DAY))
    fields.setdefault("rate_limits", [_limit(100, 60)])
    me = create_key(stub, account, scopes=WRITER, **fields)
    return me, server.stub_for(me.secret)


@pytest.mark.parametrize("loss", SELF_LOSSES)
def test_an_update_that_takes_from_the_callers_own_key_needs_allow_self(server, stub, account, loss):
    fields, phrase, applied = SELF_LOSSES[loss]
    me, caller = _limited_self(server, stub, account)
    error = rpc_error(lambda: _update(caller, me.api_key.name, **fields))
    assert error.code() == C.FAILED_PRECONDITION
    assert "allow_self: true" in error.details() and phrase in error.details()
    assert _get(stub, me.api_key.name) == me.api_key  # nothing changed
    assert [e.kind for e in _key_events(stub, account, me.api_key.key_id)] == [pb.AuditEvent.CREATED]

    updated = _update(caller, me.api_key.name, allow_self=True, **fields)
    assert applied(updated), updated
    assert _get(stub, me.api_key.name) == updated


def test_the_same_update_of_another_key_needs_no_allow_self(server, stub, account):
    _, caller = _limited_self(server, stub, account)
    for loss, (fields, _, applied) in SELF_LOSSES.items():
        other = _limited_self(server, stub, account)[0].api_key
        assert applied(_update(caller, other.name, **fields)), loss


def test_a_self_update_with_several_losses_names_each(server, stub, account):
    me, caller = _limited_self(server, stub, account, rate_limits=[])
    error = rpc_error(
        lambda: _update(
            caller, me.api_key.name, scopes=["apikeys:write"], expire_time=_ts(IN_A_DAY - timedelta(hours=1)),
            rate_limits=[_limit(1000, 1)], state=pb.ApiKey.DISABLED,
        )
    )
    assert error.code() == C.FAILED_PRECONDITION
    for phrase in ("disable it", "narrow its scopes", "bring its expire_time forward", "tighten its rate limits"):
        assert phrase in error.details()
    assert _get(stub, me.api_key.name) == me.api_key


def test_a_key_without_an_expire_time_needs_allow_self_to_get_one(server, stub, account):
    me = create_key(stub, account, scopes=WRITER)
    caller = server.stub_for(me.secret)
    later = _ts(IN_A_DAY + timedelta(days=365))
    error = rpc_error(lambda: _update(caller, me.api_key.name, expire_time=later))
    assert error.code() == C.FAILED_PRECONDITION and "give it an expire_time" in error.details()
    assert not _get(stub, me.api_key.name).HasField("expire_time")
    assert _update(caller, me.api_key.name, allow_self=True, expire_time=later).expire_time == later


def test_updates_that_take_nothing_from_the_callers_own_key_need_no_allow_self(server, stub, account):
    me, caller = _limited_self(server, stub, account)
    name = me.api_key.name
    assert _update(caller, name, description="mine").description == "mine"
    assert _update(caller, name, labels={"team": "ops"}).labels == {"team": "ops"}
    # the same rights, said differently: every scope it held is still covered
    same = ["messages:send:{a.com}", "messages:send:all", "apikeys:read", "apikeys:write"]
    assert list(_update(caller, name, scopes=same).scopes) == same
    later = _ts(IN_A_DAY + timedelta(days=1))
    assert _update(caller, name, expire_time=later).expire_time == later
    looser = [_limit(200, 60)]  # a larger burst and a faster rate
    assert [r.limit for r in _update(caller, name, rate_limits=looser).rate_limits] == [200]
    assert [r.limit for r in _update(caller, name, rate_limits=[_limit(300, 60), _limit(300, 30)]).rate_limits] == [300, 300]
    cleared = caller.UpdateApiKey(
        pb.UpdateApiKeyRequest(api_key=pb.ApiKey(name=name), update_mask=FieldMask(paths=["expire_time", "rate_limits"]))
    )
    assert not cleared.HasField("expire_time") and not cleared.rate_limits
    assert count_keys(caller, account) == 1  # still works, and nothing asked for allow_self


def test_a_key_cannot_change_its_project(server, stub, account):
    me = create_key(stub, account, scopes=WRITER, project_id="p1")
    caller = server.stub_for(me.secret)
    for allow in (False, True):
        error = rpc_error(lambda allow=allow: _update(caller, me.api_key.name, allow_self=allow, project_id="p2"))
        assert error.code() == C.INVALID_ARGUMENT and "project_id" in error.details()
    assert _get(stub, me.api_key.name).project_id == "p1"


def _key_events(stub, account, key_id):
    return list(
        stub.ListAuditEvents(
            pb.ListAuditEventsRequest(parent=f"accounts/{account}", filter=f'key_id = "{key_id}"')
        ).audit_events
    )


def test_rotate_rechecks_the_keys_scopes_in_its_write(server, stub, account):
    caller = server.stub_for(create_key(stub, account, scopes=WRITER).secret)
    target = create_key(stub, account, scopes=("messages:send:all",)).api_key
    with held_hasher(server, "hash") as (reached, release):
        rotation = caller.RotateApiKey.future(pb.RotateApiKeyRequest(name=target.name))
        assert reached.wait(10)  # the caller's rights were checked; its new secret is being hashed
        _update(stub, target.name, scopes=["messages:send:all", "billing:admin"])
        release.set()
        outcome = rotation.exception(timeout=30)
    escalated = outcome is None and authorize(stub, rotation.result().secret, "billing:admin").allowed
    assert not escalated, "a caller without billing:admin rotated a billing:admin key and got its secret"
    assert outcome is not None and outcome.code() in (C.PERMISSION_DENIED, C.ABORTED)  # refused, or told to retry


# --- 5. tenant isolation --------------------------------------------------------------------------


def test_a_key_of_one_account_cannot_tell_another_accounts_keys_from_missing_ones(server, stub, account):
    other = f"acct-{uuid.uuid4().hex[:10]}"
    victim = create_key(stub, other)
    intruder = server.stub_for(create_key(stub, account, scopes=("*",)).secret)
    existing = _key_calls(victim.api_key.name)
    missing = _key_calls(f"accounts/{other}/apiKeys/{MISSING_ID}")
    for method in existing:
        hit, miss = _refusal(existing[method], intruder), _refusal(missing[method], intruder)
        assert hit.code() == miss.code() == C.PERMISSION_DENIED, method
        assert hit.details() == miss.details(), method
        assert f"accounts/{other}" in hit.details(), method
    for method, call in _account_calls(other).items():
        error = _refusal(call, intruder)
        assert error.code() == C.PERMISSION_DENIED and f"accounts/{other}" in error.details(), method
    assert _get(stub, victim.api_key.name) == victim.api_key
    assert count_keys(stub, other) == 1
    assert authorize(stub, victim.secret, "messages:send").allowed
    events = stub.ListAuditEvents(pb.ListAuditEventsRequest(parent=f"accounts/{other}")).audit_events
    assert [e.kind for e in events] == [pb.AuditEvent.CREATED]


def test_a_project_key_cannot_reach_its_accounts_neighbours_either(server, stub, account):
    other = f"acct-{uuid.uuid4().hex[:10]}"
    victim = create_key(stub, other, project_id="p1").api_key
    intruder = server.stub_for(create_key(stub, account, scopes=WRITER, project_id="p1").secret)
    for method, call in _all_calls(other, victim.name).items():
        error = _refusal(call, intruder)
        assert error.code() == C.PERMISSION_DENIED and f"accounts/{other}" in error.details(), method
    assert _get(stub, victim.name) == victim


# --- 6. rights end with the key ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda stub, name: stub.RevokeApiKey(pb.RevokeApiKeyRequest(name=name)), "revoked"),
        (lambda stub, name: _update(stub, name, state=pb.ApiKey.DISABLED), "disabled"),
        (lambda stub, name: stub.DeleteApiKey(pb.DeleteApiKeyRequest(name=name)), "no key matches"),
        (lambda stub, name: stub.RotateApiKey(pb.RotateApiKeyRequest(name=name)), "rotated out"),
    ],
    ids=["revoked", "disabled", "deleted", "rotated"],
)
def test_a_caller_key_loses_its_rights_on_its_very_next_call(server, stub, account, change, why):
    created = create_key(stub, account, scopes=WRITER)
    caller = server.stub_for(created.secret)
    assert count_keys(caller, account) == 1  # works, and is now cached
    assert count_keys(caller, account) == 1
    change(stub, created.api_key.name)
    for method, call in _all_calls(account, created.api_key.name).items():
        error = _refusal(call, caller)
        assert error.code() == C.UNAUTHENTICATED and why in error.details(), method


def test_a_re_enabled_caller_key_works_again_at_once(server, stub, account):
    created = create_key(stub, account, scopes=WRITER)
    caller = server.stub_for(created.secret)
    assert count_keys(caller, account) == 1
    _update(stub, created.api_key.name, state=pb.ApiKey.DISABLED)
    assert rpc_error(lambda: _list(caller, account)).code() == C.UNAUTHENTICATED
    _update(stub, created.api_key.name, state=pb.ApiKey.ACTIVE)
    assert count_keys(caller, account) == 1


def test_narrowing_a_caller_keys_scopes_takes_effect_at_once(server, stub, account):
    created = create_key(stub, account, scopes=WRITER)
    caller = server.stub_for(created.secret)
    assert count_keys(caller, account) == 1
    _update(stub, created.api_key.name, scopes=["apikeys:read"])
    error = rpc_error(lambda: _account_calls(account)["CreateApiKey"](caller))
    assert error.code() == C.PERMISSION_DENIED and "apikeys:write" in error.details()
    assert count_keys(caller, account) == 1


# --- 7. Authorize ---------------------------------------------------------------------------------


def test_authorize_needs_no_credential_by_default(server, stub, account):
    secret = create_key(stub, account).secret
    anonymous = server.stub_for(None)
    assert authorize(anonymous, secret, "messages:send").allowed
    # and a caller key without apikeys:authorize is not refused either
    assert authorize(server.stub_for(create_key(stub, account).secret), secret, "messages:send").allowed


@pytest.fixture
def strict_server(make_server):
    return make_server(authorize_requires_key=True)


def test_authorize_with_a_required_key_checks_the_caller(strict_server, account):
    server, stub = strict_server, strict_server.stub
    secret = create_key(stub, account).secret
    error = rpc_error(lambda: authorize(server.stub_for(None), secret, "messages:send"))
    assert error.code() == C.UNAUTHENTICATED and "no credential" in error.details()
    error = rpc_error(lambda: authorize(server.stub_for("garbage"), secret, "messages:send"))
    assert error.code() == C.UNAUTHENTICATED
    no_right = server.stub_for(create_key(stub, account, scopes=WRITER).secret)
    error = rpc_error(lambda: authorize(no_right, secret, "messages:send"))
    assert error.code() == C.PERMISSION_DENIED and "apikeys:authorize" in error.details()
    checker = server.stub_for(create_key(stub, account, scopes=("apikeys:authorize",)).secret)
    answer = authorize(checker, secret, "messages:send")
    assert answer.allowed and answer.account_id == account
    denied = authorize(checker, secret, "domains:read")  # denials are still answers
    assert denied.code == R.INSUFFICIENT_SCOPE and denied.account_id == account


def test_authorize_with_a_required_key_hides_other_accounts_keys(strict_server, account):
    server, stub = strict_server, strict_server.stub
    other = f"acct-{uuid.uuid4().hex[:10]}"
    foreign = create_key(stub, other, scopes=("messages:send:all",), labels={"tier": "gold"}).secret
    unknown = keys.generate("AK_", keys.new_lookup_id())[0]
    checker = server.stub_for(create_key(stub, account, scopes=("apikeys:authorize",)).secret)
    hidden, missing = authorize(checker, foreign, "messages:send"), authorize(checker, unknown, "messages:send")
    assert hidden.code == missing.code == R.NOT_FOUND and not hidden.allowed
    assert hidden == missing  # no key_id, name, account, scopes, labels: nothing tells them apart
    # the operator may check any account's key
    seen = authorize(stub, foreign, "messages:send")
    assert seen.allowed and seen.account_id == other and dict(seen.labels) == {"tier": "gold"}
    # and a project key only its own project's
    in_account = create_key(stub, account).secret
    project_checker = server.stub_for(create_key(stub, account, scopes=("apikeys:authorize",), project_id="p1").secret)
    assert authorize(project_checker, in_account) == missing
    assert authorize(checker, in_account).allowed


def test_authorize_with_a_required_key_hides_other_accounts_unusable_keys_too(strict_server, account):
    """Reach is checked before the key's state: revoked, disabled or expired, a key the caller does not reach
    is answered exactly like an unknown one."""
    server, stub = strict_server, strict_server.stub
    other = f"acct-{uuid.uuid4().hex[:10]}"
    revoked, disabled, expired = create_key(stub, other), create_key(stub, other), create_key(stub, other)
    stub.RevokeApiKey(pb.RevokeApiKeyRequest(name=revoked.api_key.name))
    _update(stub, disabled.api_key.name, state=pb.ApiKey.DISABLED)
    _expire_now(server, other, expired.api_key.key_id)
    checker = server.stub_for(create_key(stub, account, scopes=("apikeys:authorize",)).secret)
    missing = authorize(checker, keys.generate("AK_", keys.new_lookup_id())[0])
    for secret in (revoked.secret, disabled.secret, expired.secret):
        answer = authorize(checker, secret)
        assert answer == missing, f"{R.Code.Name(answer.code)} with key_id {answer.key_id!r}, account {answer.account_id!r}"
    # the operator still sees why each one is refused
    assert [authorize(stub, s.secret).code for s in (revoked, disabled, expired)] == [R.REVOKED, R.DISABLED, R.EXPIRED]


def test_rotate_grace_lets_the_old_secret_keep_managing(server, stub, account):
    created = create_key(stub, account, scopes=WRITER)
    rotated = stub.RotateApiKey(pb.RotateApiKeyRequest(name=created.api_key.name, grace_period=Duration(seconds=3600)))
    assert count_keys(server.stub_for(created.secret), account) == 1
    assert count_keys(server.stub_for(rotated.secret), account) == 1
