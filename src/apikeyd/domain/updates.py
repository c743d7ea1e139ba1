"""UpdateApiKey's rules: which fields an update mask may name, how each new value is checked, and what an
update changes (with the audit details of limits and ranges). Pure: lifecycle.py applies them to the row
the write locks."""

from collections.abc import Callable
from datetime import datetime
from typing import Any, cast

from apikeyd.domain.credits import Credits, Refill, set_at, validate_credits
from apikeyd.domain.echo import quote
from apikeyd.domain.errors import FailedPrecondition, InvalidArgument
from apikeyd.domain.ip_ranges import validate_ranges
from apikeyd.domain.model import (
    ApiKey,
    KeyState,
    validate_description,
    validate_display_name,
    validate_expire_time,
    validate_labels,
    validate_rate_limits,
)
from apikeyd.domain.scopes import validate_scopes

UPDATABLE = (
    "display_name", "description", "scopes", "labels", "expire_time", "rate_limits", "state", "credits",
    "allowed_ip_ranges",
)
# What an empty update mask (AIP-134: every updatable field that is set) never implies: a key read with Get
# and sent back carries the balance as it was then, and spends do not change the etag, so an implied
# `credits` would hand back every credit spent since the read.
IMPLIED = tuple(path for path in UPDATABLE if path != "credits")
# Paths an update mask may also name: parts of `credits`, changed without the rest.
_SUBFIELDS = ("credits.remaining", "credits.refill")


def _current_value(current: ApiKey, path: str) -> Any:
    """What a key holds at an update-mask path; a part of credits the key does not have is a precondition."""
    if path == "credits":  # its next_refill is the store's: not part of what a caller sets
        return None if current.credits is None else Credits(current.credits.remaining, current.credits.refill)
    if path not in _SUBFIELDS:
        return getattr(current, path)
    if current.credits is None:
        raise FailedPrecondition(f"the key has no credits, so {path} cannot be changed; set `credits` instead")
    return getattr(current.credits, path.partition(".")[2])


def _audit_value(path: str, value: Any) -> str:
    """A changed limit or range as the audit log's details show it."""
    if value is None:
        return "none"
    if path == "rate_limits":
        return " ".join(f"{r.limit}/{r.period_seconds}s" for r in value) or "none"
    if path == "allowed_ip_ranges":
        return " ".join(value) or "none"
    if isinstance(value, Credits):
        return f"remaining={value.remaining}" + (f" refill={_audit_value('credits.refill', value.refill)}" if value.refill else "")
    if isinstance(value, Refill):
        interval = value.calendar.value if value.calendar else f"every {value.every.total_seconds():g}s" if value.every else ""
        return f"{value.amount} {interval} {value.mode.value}" + (f" cap {value.cap}" if value.cap else "")
    return str(value)


_AUDITED = ("rate_limits", "credits", "credits.remaining", "credits.refill", "allowed_ip_ranges")


def changes(current: ApiKey, values: dict[str, Any], now: datetime) -> tuple[dict[str, Any], tuple[str, ...], dict[str, str]]:
    """What validated `values` change on `current`: the values to store, the changed paths, and the audit
    details of changed limits and ranges (the new and the previous value, so the log shows what a key was
    allowed before). Credits are stored whole (_new_credits)."""
    changed = {name: v for name, v in values.items() if _current_value(current, name) != v}
    details = {}
    for path in _AUDITED:
        if path in changed:
            details[path] = _audit_value(path, changed[path])
            details[f"previous.{path}"] = _audit_value(path, _current_value(current, path))
    stored = {name: v for name, v in changed.items() if name not in ("credits", *_SUBFIELDS)}
    if len(stored) < len(changed):
        stored["credits"] = _new_credits(current.credits, changed, now)
    return stored, tuple(changed), details


def _new_credits(current: Credits | None, changed: dict[str, Any], now: datetime) -> Credits | None:
    """The credits an update leaves. Decided on the row the write locks, so the balance read here is the one
    spends left, none lost; refills that came due before the change are applied first, under the refill they
    were due by, so a balance set now is not undone by a refill that was already due, nor one lost."""
    if "credits" in changed:
        return set_at(changed["credits"], now)
    assert current is not None, "_current_value refuses parts of credits a key does not have"
    base = current.refilled(now)
    remaining = changed.get("credits.remaining", base.remaining)
    if "credits.refill" not in changed:
        return Credits(remaining, base.refill, base.next_refill)
    refill: Refill | None = changed["credits.refill"]
    return Credits(remaining, refill, None if refill is None else refill.first_due(now))


def validate(values: dict[str, Any], now: datetime) -> dict[str, Any]:
    """The update's values, each checked by its field's rule; a mask naming what cannot change is refused."""
    checks: dict[str, Callable[[Any], Any]] = {
        "display_name": validate_display_name,
        "description": validate_description,
        "scopes": validate_scopes,
        "labels": validate_labels,
        "expire_time": lambda v: validate_expire_time(v, now),
        "rate_limits": validate_rate_limits,
        "state": lambda v: v,
        "credits": validate_credits,
        "credits.remaining": lambda v: cast(Credits, validate_credits(Credits(v))).remaining,
        "credits.refill": lambda v: cast(Credits, validate_credits(Credits(0, v))).refill,
        "allowed_ip_ranges": validate_ranges,
    }
    unknown = sorted(set(values) - set(checks))
    if unknown:
        raise InvalidArgument(
            "update_mask",
            f"cannot update {', '.join(map(quote, unknown))}; updatable fields: {', '.join(UPDATABLE + _SUBFIELDS)}",
        )
    if "credits" in values and any(path in values for path in _SUBFIELDS):
        raise InvalidArgument("update_mask", "name either `credits` or its parts (credits.remaining, credits.refill), not both")
    if "state" in values and values["state"] not in (KeyState.ACTIVE, KeyState.DISABLED):
        raise InvalidArgument("state", "can only be set to ACTIVE or DISABLED; use RevokeApiKey to revoke")
    return {name: checks[name](value) for name, value in values.items()}
