"""Who may do what. A calling key acts within its own account, and a project key within its own project;
keys of the operator account act on every account. Rights are scopes: `apikeys:read`, `apikeys:write`,
`apikeys:authorize`. A caller can hand out only scopes it holds itself, and cannot lock its own key out
(revoke, delete, rotate, disable, or update it to do less) without saying so with `allow_self`."""

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from apikeyd.domain.echo import quote
from apikeyd.domain.errors import FailedPrecondition, PermissionDenied
from apikeyd.domain.model import ApiKey, KeyState, RateLimit, VerifiedKey
from apikeyd.domain.scopes import ScopeSet

READ = ("apikeys", "read")
WRITE = ("apikeys", "write")
AUTHORIZE = ("apikeys", "authorize")

# Which rule refused a call, so refusals can be grouped (the audit log's DENIED throttle) without parsing
# their messages, which name accounts and scopes.
RULE_RIGHT = "right"  # the calling key lacks apikeys:read / apikeys:write
RULE_ACCOUNT = "account"  # another account
RULE_PROJECT = "project"  # a project key creating outside its project
RULE_GRANT = "grant"  # handing out a scope the caller does not hold
RULE_MANAGE = "manage"  # changing or rotating a key that holds a scope the caller does not


class Refused(PermissionDenied):
    """PERMISSION_DENIED from one of the rules here; `rule` says which (RULE_*)."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(message)
        self.rule = rule


def _rate_limit_implied(new: RateLimit, old: tuple[RateLimit, ...]) -> bool:
    """Whether `new` refuses nothing that `old` admits: some old limit has a burst and a rate no larger (a
    GCRA limit of L per P is a token bucket of size L refilled at L/P, and a stream within a smaller bucket
    and rate is within the larger one)."""
    return any(
        o.limit <= new.limit and o.limit * new.period_seconds <= new.limit * o.period_seconds for o in old
    )


def update_losses(current: ApiKey, values: Mapping[str, Any]) -> list[str]:
    """What the validated update `values` would take away from `current`, as phrases that follow "to":
    disabling it, narrowing its scopes, setting or bringing forward its expire_time, tightening its rate
    limits. Empty when the update takes nothing away (display_name, description, labels, a wider grant,
    a later or no expire_time, looser or no rate limits)."""
    losses = []
    if values.get("state") is KeyState.DISABLED:
        losses.append("disable it")
    if "scopes" in values:
        granted = ScopeSet(tuple(values["scopes"]))
        if not all(granted.covers(scope) for scope in current.scopes):
            losses.append("narrow its scopes")
    if "expire_time" in values and values["expire_time"] is not None:
        new_expiry: datetime = values["expire_time"]
        if current.expire_time is None:
            losses.append("give it an expire_time")
        elif new_expiry < current.expire_time:
            losses.append("bring its expire_time forward")
    if "rate_limits" in values:
        if not all(_rate_limit_implied(new, current.rate_limits) for new in values["rate_limits"]):
            losses.append("tighten its rate limits")
    if values.get("credits") is not None or "credits.remaining" in values or "credits.refill" in values:
        losses.append("set its credits")
    if values.get("allowed_ip_ranges"):
        losses.append("restrict it to IP ranges")
    return losses


@dataclass(frozen=True)
class Actor:
    """Who made a change, as the audit log records it."""

    key_id: str = ""
    name: str = ""
    display_name: str = ""
    peer: str = ""
    method: str = ""


@dataclass(frozen=True, slots=True)
class Reach:
    """Whose keys a caller sees: its account's (a project key: its project's), or every account's for the
    operator's keys; outside, a key is as if missing. The change stream sends only the changes in its
    watcher's reach, so a client-side cache keeps only answers for keys in it."""

    everything: bool
    account_id: str
    project_id: str

    def sees(self, account_id: str, project_id: str) -> bool:
        if self.everything:
            return True
        return account_id == self.account_id and (not self.project_id or project_id == self.project_id)


@dataclass(frozen=True)
class Caller:
    """An authenticated management caller; `key` is None for `apikeyd admin-key`, which acts as the operator."""

    key: VerifiedKey | None
    scopes: ScopeSet | None
    operator: bool
    peer: str = ""
    method: str = ""

    @property
    def actor(self) -> Actor:
        if self.key is None:
            return Actor(peer=self.peer, method=self.method)
        return Actor(self.key.key_id, self.key.name, self.key.display_name, self.peer, self.method)

    @property
    def account_id(self) -> str:
        return self.key.account_id if self.key is not None else ""

    @property
    def project_id(self) -> str:
        """The project the caller is confined to; empty for an account-wide or operator key."""
        return "" if self.operator or self.key is None else self.key.project_id

    def may(self, right: tuple[str, str]) -> bool:
        return self.scopes is None or self.scopes.grants(right, "")

    def require(self, right: tuple[str, str]) -> None:
        if not self.may(right):
            raise Refused(RULE_RIGHT, f"the calling key lacks the scope {right[0]}:{right[1]}")

    def check_account(self, account_id: str) -> None:
        """Raised before any read, so the answer is the same whether or not the target exists."""
        if not self.operator and account_id != self.account_id:
            raise Refused(RULE_ACCOUNT, f"the calling key cannot act on {quote(f'accounts/{account_id}')}")

    @functools.cached_property
    def reach(self) -> Reach:
        return Reach(self.operator, self.account_id, self.project_id)

    def reaches(self, key: ApiKey | VerifiedKey) -> bool:
        """Whether the key is within the caller's account and project; outside, it is as if missing."""
        return self.reach.sees(key.account_id, key.project_id)

    def project_for_new_key(self, requested: str) -> str:
        """A project key creates keys in its own project only; it names it, or leaves it to be filled in."""
        if not self.project_id:
            return requested
        if requested and requested != self.project_id:
            raise Refused(
                RULE_PROJECT,
                f"a project key creates keys in its own project {quote(self.project_id)} only, not in {quote(requested)}"
            )
        return self.project_id

    def check_grant(self, scopes: tuple[str, ...]) -> None:
        if self.scopes is None:
            return
        for scope in scopes:
            if not self.scopes.covers(scope):
                raise Refused(RULE_GRANT, f"the calling key cannot grant the scope {quote(scope)}, which it does not hold")

    def check_manage(self, key: ApiKey) -> None:
        """Changing or rotating a key needs every scope it has: rotating hands out its new secret."""
        if self.scopes is None:
            return
        for scope in key.scopes:
            if not self.scopes.covers(scope):
                raise Refused(
                    RULE_MANAGE,
                    f"the key holds the scope {quote(scope)}, which the calling key does not; "
                    "it can be revoked or deleted but not changed or rotated by this caller"
                )

    def is_self(self, key: ApiKey) -> bool:
        return self.key is not None and key.key_id == self.key.key_id

    def check_self(self, key: ApiKey, allow_self: bool, action: str) -> None:
        """Revoking, deleting, rotating or disabling the calling key needs allow_self."""
        if self.is_self(key) and not allow_self:
            _refuse_self(f"{action} it")

    def check_self_update(self, current: ApiKey, values: Mapping[str, Any], allow_self: bool) -> None:
        """An update of the calling key that takes anything away from it (update_losses) needs allow_self:
        a leaked key or a script bug must not lock its owner out by accident."""
        if not self.is_self(current) or allow_self:
            return
        losses = update_losses(current, values)
        if losses:
            _refuse_self(" and ".join(losses))


def _refuse_self(action: str) -> None:
    raise FailedPrecondition(
        f"this is the key the call is made with; to {action}, send the request again with allow_self: true"
    )
