"""The rules after a presented secret has verified, in the contract's order: usable (REVOKED, DISABLED,
EXPIRED), then the client's address, the project, the scopes (and then, in the authorizer, the rate limits
and credits, which count). The server's Authorize (authorizer/) and the client library's
local cache (apikeyd.client) both decide with these, so a cached answer is the server's answer."""

from datetime import UTC, datetime
from typing import Protocol

from apikeyd.domain.decision import AuthCode, Decision
from apikeyd.domain.echo import quote
from apikeyd.domain.ip_ranges import contains, parse_address
from apikeyd.domain.model import KeyState, VerifiedKey
from apikeyd.domain.scopes import ScopeSet


class Verified(Protocol):
    """What a verification established about one presented string (a cache entry, on either side)."""

    @property
    def key(self) -> VerifiedKey: ...
    @property
    def scopes(self) -> ScopeSet: ...
    @property
    def expire_at(self) -> float | None: ...  # the key's expire_time, as a Unix time
    @property
    def secret_expire_at(self) -> float | None: ...  # set when the string is a rotated-out secret in its grace


def isoformat(timestamp: float) -> str:
    """The time a Unix timestamp was made from, to the microsecond: a float keeps times of this century to a
    quarter of one."""
    return datetime.fromtimestamp(timestamp, UTC).isoformat()


def allowed(key: VerifiedKey, expire_at: float | None, secret_expire_at: float | None) -> Decision:
    """The answer for every allowed check of a key without rate limits: made once per verified string."""
    return Decision(AuthCode.OK, "", key, expire_at=expire_at, secret_expire_at=secret_expire_at)


def _denial(entry: Verified, code: AuthCode, message: str, missing: tuple[str, ...] = ()) -> Decision:
    return Decision(
        code, message, entry.key, missing_scopes=missing,
        expire_at=entry.expire_at, secret_expire_at=entry.secret_expire_at,
    )


def unusable(entry: Verified, now: float) -> Decision | None:
    """The denial of a key that no longer works at Unix time `now`: revoked, disabled, expired."""
    key = entry.key
    if key.state is KeyState.REVOKED:
        when = key.revoke_time.isoformat() if key.revoke_time else "an unknown time"
        return _denial(entry, AuthCode.REVOKED, f"the key was revoked at {when}")
    if key.state is KeyState.DISABLED:
        return _denial(entry, AuthCode.DISABLED, "the key is disabled; enable it to use it again")
    if entry.expire_at is not None and now >= entry.expire_at:
        return _denial(entry, AuthCode.EXPIRED, f"the key expired at {isoformat(entry.expire_at)}")
    if entry.secret_expire_at is not None and now >= entry.secret_expire_at:
        when = isoformat(entry.secret_expire_at)
        return _denial(entry, AuthCode.EXPIRED, f"this secret was rotated out and stopped working at {when}")
    return None


def outside_ranges(entry: Verified, client_ip: str) -> Decision | None:
    """A key with allowed_ip_ranges presented from elsewhere, or with no address given. Only keys with ranges
    parse the address: every other check pays nothing for it."""
    ranges = entry.key.ip_ranges
    if not ranges:
        return None
    if not client_ip:
        return _denial(entry, AuthCode.IP_NOT_ALLOWED, "the key is restricted to IP ranges and no client_ip was given")
    if contains(ranges, parse_address(client_ip)):
        return None
    return _denial(entry, AuthCode.IP_NOT_ALLOWED, f"the client address {quote(client_ip)} is outside the key's allowed_ip_ranges")


def wrong_project(entry: Verified, project_id: str) -> Decision | None:
    """A project key presented for another project (or for none)."""
    key = entry.key
    if not key.project_id or key.project_id == project_id:
        return None
    asked = f"project {quote(project_id)}" if project_id else "no project"
    return _denial(
        entry,
        AuthCode.PROJECT_MISMATCH,
        f"the key belongs to project {quote(key.project_id)} and the request is for {asked}",
    )


def lacking_scopes(
    entry: Verified, required: tuple[tuple[str, tuple[str, str]], ...], resource: str
) -> Decision | None:
    """The required scopes (parsed, scopes.parse_required_scopes) the key does not grant for `resource`."""
    if not required:
        return None
    missing = entry.scopes.missing(required, resource)
    if not missing:
        return None
    return _denial(
        entry,
        AuthCode.INSUFFICIENT_SCOPE,
        f"the key lacks the scope{'s' if len(missing) > 1 else ''} {', '.join(map(quote, missing))}"
        + (f" for resource {quote(resource)}" if resource else ""),
        tuple(missing),
    )
