"""The rights rules without a server: which scopes a caller may hand out (ScopeSet.covers) and every check of
Caller, against references written out from the contract rather than from the code."""

import dataclasses
import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from apikeyd.domain import ratelimit
from apikeyd.domain.access import (
    AUTHORIZE,
    READ,
    RULE_ACCOUNT,
    RULE_GRANT,
    RULE_MANAGE,
    RULE_PROJECT,
    RULE_RIGHT,
    WRITE,
    Actor,
    Caller,
    Refused,
    update_losses,
)
from apikeyd.domain.echo import quote
from apikeyd.domain.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from apikeyd.domain.model import ApiKey, KeyState, RateLimit
from apikeyd.domain.scopes import ScopeSet

NOW = datetime(2026, 1, 1, tzinfo=UTC)

# A small alphabet, so that granted and asked-for scopes often share resource, action and value.
_parts = st.sampled_from(["messages", "send", "keys", "a.b", "x-y_z"])
_values = st.sampled_from(["a.com", "b.com", "all", "ALL", "*", "x:y", "{", "v" * 255])


@st.composite
def scopes(draw: st.DrawFn) -> str:
    """Any scope text the grammar accepts: `*`, `r:a`, `r:a:all` or `r:a:{v}`."""
    kind = draw(st.sampled_from(["plain", "all", "value", "value", "wildcard"]))
    if kind == "wildcard":
        return "*"
    base = f"{draw(_parts)}:{draw(_parts)}"
    if kind == "plain":
        return base
    if kind == "all":
        return base + ":all"
    value = draw(_values.filter(lambda v: "{" not in v and v != "all"))
    return f"{base}:{{{value}}}"


def reference_covers(held: list[str], asked: str) -> bool:
    """The issue's rule: `*` covers everything; `r:a` and `r:a:all` cover `r:a`, `r:a:all` and every
    `r:a:{x}`; `r:a:{x}` covers only `r:a:{x}`; only `*` covers `*`."""
    if "*" in held:
        return True
    if asked == "*":
        return False
    resource, action, *rest = asked.split(":", 2)
    for scope in held:
        if scope == "*":
            continue
        h_resource, h_action, *h_rest = scope.split(":", 2)
        if (h_resource, h_action) != (resource, action):
            continue
        if not h_rest or h_rest == ["all"]:
            return True
        if rest and rest[0] not in ("all",) and rest == h_rest:
            return True
    return False


def _key(key_id: str = "k1", account_id: str = "acct", project_id: str = "", scopes: tuple[str, ...] = ("a:b",)) -> ApiKey:
    return ApiKey(
        key_id=key_id,
        account_id=account_id,
        project_id=project_id,
        display_name=f"key {key_id}",
        description="",
        scopes=scopes,
        labels={},
        state=KeyState.ACTIVE,
        prefix="AKP_" if project_id else "AK_",
        lookup_id="lookup" + key_id,
        masked_key="AK_...",
        expire_time=None,
        rate_limits=(),
        create_time=NOW,
        update_time=NOW,
        revision=1,
    )


def _caller(
    scopes: tuple[str, ...] = ("apikeys:write",),
    account_id: str = "acct",
    project_id: str = "",
    operator: bool = False,
    key_id: str = "caller",
) -> Caller:
    key = _key(key_id, account_id, project_id, scopes)
    return Caller(key.verified(), ScopeSet(scopes), operator, "ipv4:127.0.0.1:5000", "UpdateApiKey")


ADMIN = Caller(None, None, True, "", "admin-key")  # `apikeyd admin-key`: no key, no scope set


# --- ScopeSet.covers --------------------------------------------------------------------------------


@given(held=st.lists(scopes(), min_size=1, max_size=5), asked=scopes())
@example(held=["messages:send:{a.com}"], asked="messages:send:all")
@example(held=["messages:send:{a.com}"], asked="messages:send")
@example(held=["messages:send:{a.com}"], asked="messages:send:{b.com}")
@example(held=["messages:send:{a.com}"], asked="*")
@example(held=["messages:send:all"], asked="*")
@example(held=["messages:send:{all}"], asked="messages:send:all")
def test_covers_agrees_with_the_reference(held: list[str], asked: str) -> None:
    assert ScopeSet(tuple(held)).covers(asked) is reference_covers(held, asked)


@pytest.mark.parametrize(
    ("held", "asked", "covered"),
    [
        (("*",), "*", True),
        (("*",), "anything:at-all:{x}", True),
        (("messages:send",), "messages:send:all", True),
        (("messages:send",), "messages:send:{x}", True),
        (("messages:send:all",), "messages:send", True),
        (("messages:send:all",), "messages:send:{x}", True),
        (("messages:send:{a.com}",), "messages:send:{a.com}", True),
        (("messages:send:{a.com}",), "messages:send:{b.com}", False),
        (("messages:send:{a.com}",), "messages:send:all", False),
        (("messages:send:{a.com}",), "messages:send", False),
        (("messages:send:{a.com}",), "*", False),
        (("messages:send:all", "keys:read"), "*", False),
        (("messages:send:all",), "messages:read", False),
        (("messages:send:all",), "mail:send", False),
        # `{all}` is a value named "all", not the `all` qualifier
        (("messages:send:{all}",), "messages:send:all", False),
        (("messages:send:all",), "messages:send:{all}", True),
    ],
)
def test_covers_examples_from_the_issue(held: tuple[str, ...], asked: str, covered: bool) -> None:
    assert ScopeSet(held).covers(asked) is covered


def test_covers_refuses_a_scope_that_is_not_one() -> None:
    with pytest.raises(InvalidArgument, match="'Messages:Send'"):
        ScopeSet(("messages:send",)).covers("Messages:Send")


# --- require --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scopes", "right", "allowed"),
    [
        (("apikeys:read",), READ, True),
        (("apikeys:read",), WRITE, False),
        (("apikeys:write",), READ, False),  # the contract: Get, List, ListAuditEvents need apikeys:read
        (("apikeys:write",), WRITE, True),
        (("apikeys:write:all",), WRITE, True),
        (("apikeys:write:{acct}",), WRITE, False),  # a `{value}` never matches the empty resource
        (("*",), WRITE, True),
        (("*",), AUTHORIZE, True),
        (("apikeys:read", "apikeys:write"), AUTHORIZE, False),
        (("apikeys:authorize",), AUTHORIZE, True),
        (("messages:send:all",), READ, False),
    ],
)
def test_require_needs_the_right_and_names_it(scopes: tuple[str, ...], right: tuple[str, str], allowed: bool) -> None:
    caller = _caller(scopes)
    if allowed:
        caller.require(right)
        return
    with pytest.raises(PermissionDenied, match=f"{right[0]}:{right[1]}"):
        caller.require(right)


def test_require_holds_for_operator_keys_too_but_not_for_the_admin_command() -> None:
    with pytest.raises(PermissionDenied, match="apikeys:write"):
        _caller(("apikeys:read",), account_id="system", operator=True).require(WRITE)
    for right in (READ, WRITE, AUTHORIZE):
        ADMIN.require(right)


# --- check_account and reaches ----------------------------------------------------------------------


def test_check_account_confines_a_key_to_its_account_and_names_the_target() -> None:
    caller = _caller(account_id="a")
    caller.check_account("a")
    with pytest.raises(PermissionDenied, match="accounts/b"):
        caller.check_account("b")
    project = _caller(account_id="a", project_id="p1")
    project.check_account("a")
    with pytest.raises(PermissionDenied, match="accounts/system"):
        project.check_account("system")
    operator = _caller(account_id="system", operator=True)
    for account in ("a", "b", "system"):
        operator.check_account(account)
        ADMIN.check_account(account)


@given(
    caller_account=st.sampled_from(["a", "b"]),
    caller_project=st.sampled_from(["", "p1", "p2"]),
    key_account=st.sampled_from(["a", "b"]),
    key_project=st.sampled_from(["", "p1", "p2"]),
    operator=st.booleans(),
)
def test_reaches(caller_account: str, caller_project: str, key_account: str, key_project: str, operator: bool) -> None:
    caller = _caller(account_id=caller_account, project_id=caller_project, operator=operator)
    key = _key("target", key_account, key_project)
    expected = operator or (
        key_account == caller_account and (caller_project == "" or key_project == caller_project)
    )
    assert caller.reaches(key) is expected
    assert ADMIN.reaches(key)


def test_a_project_key_does_not_reach_account_wide_keys_but_an_account_key_reaches_project_keys() -> None:
    assert not _caller(project_id="p1").reaches(_key("t", project_id=""))
    assert _caller(project_id="").reaches(_key("t", project_id="p1"))
    # an operator's project key is not confined to its project
    operator = _caller(account_id="system", project_id="p1", operator=True)
    assert operator.project_id == ""
    assert operator.reaches(_key("t", account_id="other", project_id="p2"))


# --- project_for_new_key ----------------------------------------------------------------------------


def test_project_for_new_key() -> None:
    project = _caller(project_id="p1")
    assert project.project_for_new_key("") == "p1"
    assert project.project_for_new_key("p1") == "p1"
    with pytest.raises(PermissionDenied, match="p2"):
        project.project_for_new_key("p2")
    account = _caller(project_id="")
    assert account.project_for_new_key("") == ""
    assert account.project_for_new_key("p2") == "p2"
    assert _caller(account_id="system", project_id="p1", operator=True).project_for_new_key("p9") == "p9"
    assert ADMIN.project_for_new_key("p3") == "p3"


# --- check_grant and check_manage -------------------------------------------------------------------


@given(held=st.lists(scopes(), min_size=1, max_size=4), asked=st.lists(scopes(), min_size=1, max_size=4))
def test_check_grant_refuses_exactly_the_scopes_not_covered(held: list[str], asked: list[str]) -> None:
    caller = _caller(tuple(held))
    first_missing = next((scope for scope in asked if not reference_covers(held, scope)), None)
    if first_missing is None:
        caller.check_grant(tuple(asked))
    else:
        with pytest.raises(PermissionDenied) as denied:
            caller.check_grant(tuple(asked))
        assert quote(first_missing) in str(denied.value)
    ADMIN.check_grant(tuple(asked))


@given(held=st.lists(scopes(), min_size=1, max_size=4), target=st.lists(scopes(), min_size=1, max_size=4))
def test_check_manage_needs_every_scope_of_the_target(held: list[str], target: list[str]) -> None:
    caller = _caller(tuple(held))
    key = _key("target", scopes=tuple(target))
    first_missing = next((scope for scope in target if not reference_covers(held, scope)), None)
    if first_missing is None:
        caller.check_manage(key)
    else:
        with pytest.raises(PermissionDenied) as denied:
            caller.check_manage(key)
        assert quote(first_missing) in str(denied.value)
    ADMIN.check_manage(key)


def test_grant_examples_from_the_issue() -> None:
    narrow = _caller(("apikeys:write", "messages:send:{a.com}"))
    narrow.check_grant(("messages:send:{a.com}",))
    for scope in ("messages:send:all", "messages:send", "messages:send:{b.com}", "*"):
        with pytest.raises(PermissionDenied, match=f"'{scope}'" if scope != "*" else r"'\*'"):
            narrow.check_grant(("messages:send:{a.com}", scope))
    _caller(("apikeys:write", "messages:send:all")).check_grant(("messages:send:{x}", "messages:send"))
    # an operator key is bound by what it holds like any other key
    with pytest.raises(PermissionDenied):
        _caller(("apikeys:write",), account_id="system", operator=True).check_grant(("messages:send:all",))


# --- check_self and actor ---------------------------------------------------------------------------


@pytest.mark.parametrize("action", ["revoke", "delete", "rotate", "disable"])
def test_check_self_needs_allow_self_for_the_callers_own_key(action: str) -> None:
    caller = _caller(key_id="me")
    with pytest.raises(FailedPrecondition) as refused:
        caller.check_self(_key("me"), False, action)
    assert "allow_self" in str(refused.value) and action in str(refused.value)
    caller.check_self(_key("me"), True, action)
    caller.check_self(_key("someone-else"), False, action)
    ADMIN.check_self(_key("me"), False, action)


def test_actor_is_the_calling_key_or_empty_for_the_admin_command() -> None:
    caller = _caller(key_id="me", account_id="acct")
    assert caller.actor == Actor("me", "accounts/acct/apiKeys/me", "key me", "ipv4:127.0.0.1:5000", "UpdateApiKey")
    assert caller.account_id == "acct"
    assert ADMIN.actor == Actor(method="admin-key")
    assert ADMIN.account_id == "" and ADMIN.project_id == ""


# --- refusal rules ----------------------------------------------------------------------------------


def test_every_refusal_names_the_rule_that_refused() -> None:
    """The audit log's DENIED throttle groups refusals by rule; each check raises its own."""
    reader = _caller(("apikeys:read",))
    project = _caller(("apikeys:write",), project_id="p1")
    refusals = {
        RULE_RIGHT: lambda: reader.require(WRITE),
        RULE_ACCOUNT: lambda: reader.check_account("other"),
        RULE_PROJECT: lambda: project.project_for_new_key("p2"),
        RULE_GRANT: lambda: reader.check_grant(("billing:admin",)),
        RULE_MANAGE: lambda: reader.check_manage(_key("t", scopes=("billing:admin",))),
    }
    for rule, refuse in refusals.items():
        with pytest.raises(PermissionDenied) as denied:
            refuse()
        assert isinstance(denied.value, Refused) and denied.value.rule == rule


# --- check_self_update --------------------------------------------------------------------------------

DAY = timedelta(days=1)


def _me(scopes: tuple[str, ...] = ("apikeys:write", "messages:send:all"), expire: datetime | None = NOW + DAY,
        limits: tuple[RateLimit, ...] = (RateLimit(100, 60),)) -> ApiKey:
    return dataclasses.replace(_key("me", scopes=scopes), expire_time=expire, rate_limits=limits)


@pytest.mark.parametrize(
    ("values", "losses"),
    [
        ({"display_name": "x", "description": "y", "labels": {"a": "b"}}, []),
        ({"state": KeyState.ACTIVE}, []),
        ({"state": KeyState.DISABLED}, ["disable it"]),
        ({"scopes": ("apikeys:write", "messages:send:all")}, []),
        ({"scopes": ("messages:send:all", "apikeys:write:all", "x:y")}, []),  # wider, said differently
        ({"scopes": ("*",)}, []),
        ({"scopes": ("apikeys:write",)}, ["narrow its scopes"]),
        ({"scopes": ("apikeys:write", "messages:send:{a.com}")}, ["narrow its scopes"]),
        ({"expire_time": None}, []),
        ({"expire_time": NOW + 2 * DAY}, []),
        ({"expire_time": NOW + DAY}, []),
        ({"expire_time": NOW + DAY / 2}, ["bring its expire_time forward"]),
        ({"rate_limits": ()}, []),
        ({"rate_limits": (RateLimit(100, 60),)}, []),
        ({"rate_limits": (RateLimit(200, 60),)}, []),
        ({"rate_limits": (RateLimit(100, 30),)}, []),  # the same burst, a faster refill
        ({"rate_limits": (RateLimit(99, 60),)}, ["tighten its rate limits"]),
        ({"rate_limits": (RateLimit(100, 61),)}, ["tighten its rate limits"]),  # a slower refill
        ({"rate_limits": (RateLimit(10, 6),)}, ["tighten its rate limits"]),  # the same rate, a smaller burst
        ({"rate_limits": (RateLimit(100, 60), RateLimit(1000, 1))}, []),  # the new one is looser than the old
        ({"rate_limits": (RateLimit(100, 60), RateLimit(5, 1))}, ["tighten its rate limits"]),
        (
            {"state": KeyState.DISABLED, "scopes": ("x:y",), "expire_time": NOW, "rate_limits": (RateLimit(1, 1),)},
            ["disable it", "narrow its scopes", "bring its expire_time forward", "tighten its rate limits"],
        ),
    ],
)
def test_update_losses(values: dict[str, Any], losses: list[str]) -> None:
    assert update_losses(_me(), values) == losses
    caller = _caller(("*",), key_id="me")
    if losses:
        with pytest.raises(FailedPrecondition) as refused:
            caller.check_self_update(_me(), values, False)
        assert "allow_self: true" in str(refused.value)
        assert all(loss in str(refused.value) for loss in losses)
    else:
        caller.check_self_update(_me(), values, False)
    caller.check_self_update(_me(), values, True)
    _caller(("*",), key_id="someone-else").check_self_update(_me(), values, False)
    ADMIN.check_self_update(_me(), values, False)


def test_a_key_without_expire_time_or_rate_limits_loses_by_getting_them() -> None:
    bare = _me(expire=None, limits=())
    assert update_losses(bare, {"expire_time": NOW + 1000 * DAY}) == ["give it an expire_time"]
    assert update_losses(bare, {"rate_limits": (RateLimit(10**9, 1),)}) == ["tighten its rate limits"]
    assert update_losses(bare, {"expire_time": None, "rate_limits": ()}) == []


def _admitted(limits: tuple[RateLimit, ...], times_ms: list[int]) -> list[int]:
    """The request times (ms) that `limits` admit, by the service's own GCRA."""
    tats, admitted = [0] * len(limits), []
    for ms in times_ms:
        outcome, kept = ratelimit.check(limits, tats, ms * 1_000_000)
        if outcome.allowed:
            assert kept is not None
            tats = kept
            admitted.append(ms)
    return admitted


_rates = st.builds(RateLimit, st.integers(1, 6), st.integers(1, 8))


@given(old=st.lists(_rates, min_size=1, max_size=2), new=_rates, gaps=st.lists(st.integers(0, 1500), max_size=60))
def test_a_rate_limit_said_to_take_nothing_refuses_nothing_the_old_ones_admit(
    old: list[RateLimit], new: RateLimit, gaps: list[int]
) -> None:
    """The claim behind "tighten its rate limits", checked against the limiter: when update_losses finds no
    loss, every request stream the old limits admit, the new limit admits too."""
    assume(not update_losses(_me(limits=tuple(old)), {"rate_limits": (new,)}))
    times = list(itertools.accumulate(gaps))
    stream = _admitted(tuple(old), times)
    assert _admitted((new,), stream) == stream


def test_a_tighter_rate_limit_does_refuse_what_the_old_one_admits() -> None:
    """The other direction, for the shapes the rule calls a loss: a burst the old limit admits is cut."""
    old = (RateLimit(4, 4),)
    for new in (RateLimit(3, 4), RateLimit(4, 5), RateLimit(2, 2)):
        assert update_losses(_me(limits=old), {"rate_limits": (new,)}) == ["tighten its rate limits"]
        stream = _admitted(old, [0, 0, 0, 0, 1000, 2000, 3000, 4000, 5000])
        assert _admitted((new,), stream) != stream, new
