"""Protobuf <-> domain."""

from datetime import UTC, datetime, timedelta
from typing import Any, cast

from google.protobuf.duration_pb2 import Duration
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.timestamp_pb2 import Timestamp

from apikeyd.domain.credits import Calendar, Credits, Refill, RefillMode
from apikeyd.domain.decision import Decision
from apikeyd.domain.echo import quote
from apikeyd.domain.errors import InvalidArgument
from apikeyd.domain.model import ApiKey, AuditEvent, EventKind, KeyState, RateLimit, key_name
from apikeyd.domain.updates import IMPLIED, UPDATABLE
from apikeyd.lifecycle import NewKey
from apikeyd.v1 import api_keys_pb2 as pb

_STATE_TO_PB = {
    KeyState.ACTIVE: pb.ApiKey.ACTIVE,
    KeyState.DISABLED: pb.ApiKey.DISABLED,
    KeyState.REVOKED: pb.ApiKey.REVOKED,
}
_STATE_FROM_PB = {v: k for k, v in _STATE_TO_PB.items()}


def _timestamp(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def timestamp_value(message: Any, field: str) -> datetime | None:
    """The Timestamp `field` of `message` as an aware UTC datetime; None when unset."""
    if not message.HasField(field):
        return None
    try:
        return getattr(message, field).ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise InvalidArgument(field, "is not a valid timestamp") from None


def duration(message: Any, field: str, name: str = "") -> timedelta:
    """The whole-second Duration `field` of `message`; `name` is the field's path in errors."""
    value: Duration = getattr(message, field)
    name = name or field
    if value.nanos:
        raise InvalidArgument(name, "must be whole seconds")
    try:  # timedelta ends near ±8.6e13 s, well inside int64; the domain then checks the real range
        return timedelta(seconds=value.seconds)
    except OverflowError:
        raise InvalidArgument(name, f"{value.seconds} s is out of range") from None


def api_key_to_pb(key: ApiKey) -> pb.ApiKey:
    return pb.ApiKey(
        name=key.name,
        key_id=key.key_id,
        account_id=key.account_id,
        project_id=key.project_id,
        display_name=key.display_name,
        description=key.description,
        scopes=key.scopes,
        labels=key.labels,
        state=_STATE_TO_PB[key.state],
        masked_key=key.masked_key,
        expire_time=_timestamp(key.expire_time),
        rate_limits=[pb.RateLimit(limit=r.limit, period=Duration(seconds=r.period_seconds)) for r in key.rate_limits],
        create_time=_timestamp(key.create_time),
        update_time=_timestamp(key.update_time),
        last_used_time=_timestamp(key.last_used_time),
        revoke_time=_timestamp(key.revoke_time),
        revoke_reason=key.revoke_reason,
        previous_secret_expire_time=_timestamp(key.previous_secret_expire_time),
        etag=key.etag,
        credits=_credits_to_pb(key.credits),
        allowed_ip_ranges=key.allowed_ip_ranges,
        previous_secret_last_used_time=_timestamp(key.previous_secret_last_used_time),
        end_grace_after_unused=None if key.end_grace_after_unused is None else _duration(key.end_grace_after_unused),
    )


def _duration(value: timedelta) -> Duration:
    message = Duration()
    message.FromTimedelta(value)
    return message


_CALENDAR_TO_PB = {Calendar.DAILY: pb.CreditRefill.DAILY, Calendar.MONTHLY: pb.CreditRefill.MONTHLY}
_CALENDAR_FROM_PB = {v: k for k, v in _CALENDAR_TO_PB.items()}
_MODE_TO_PB = {RefillMode.REPLACE: pb.CreditRefill.REPLACE, RefillMode.ADD: pb.CreditRefill.ADD}
_MODE_FROM_PB = {**{v: k for k, v in _MODE_TO_PB.items()}, pb.CreditRefill.MODE_UNSPECIFIED: RefillMode.REPLACE}


def _credits_to_pb(credits: Credits | None) -> pb.Credits | None:
    if credits is None:
        return None
    message = pb.Credits(remaining=credits.remaining, next_refill_time=_timestamp(credits.next_refill))
    refill = credits.refill
    if refill is not None:
        message.refill.amount = refill.amount
        message.refill.mode = _MODE_TO_PB[refill.mode]
        message.refill.cap = refill.cap
        if refill.calendar is not None:
            message.refill.calendar = _CALENDAR_TO_PB[refill.calendar]
        if refill.every is not None:
            message.refill.every.FromTimedelta(refill.every)
    return message


def _refill(message: pb.Credits, field: str) -> Refill | None:
    if not message.HasField("refill"):
        return None
    refill = message.refill
    if refill.mode not in _MODE_FROM_PB:
        raise InvalidArgument(f"{field}.mode", "must be REPLACE or ADD")
    calendar = None
    if refill.HasField("calendar"):
        if refill.calendar not in _CALENDAR_FROM_PB:
            raise InvalidArgument(f"{field}.calendar", "must be DAILY or MONTHLY")
        calendar = _CALENDAR_FROM_PB[refill.calendar]
    every = duration(refill, "every", f"{field}.every") if refill.HasField("every") else None
    return Refill(refill.amount, _MODE_FROM_PB[refill.mode], calendar, every, refill.cap)


def _credits(message: pb.ApiKey) -> Credits | None:
    if not message.HasField("credits"):
        return None
    return Credits(message.credits.remaining, _refill(message.credits, "credits.refill"))


def _rate_limits(message: pb.ApiKey) -> tuple[RateLimit, ...]:
    limits = []
    for rate in message.rate_limits:
        if rate.period.nanos:
            raise InvalidArgument("rate_limits", "period must be whole seconds")
        limits.append(RateLimit(rate.limit, rate.period.seconds))
    return tuple(limits)


def new_key_from_pb(message: pb.ApiKey) -> NewKey:
    return NewKey(
        display_name=message.display_name,
        scopes=tuple(message.scopes),
        project_id=message.project_id,
        description=message.description,
        labels=dict(message.labels),
        expire_time=timestamp_value(message, "expire_time"),
        rate_limits=_rate_limits(message),
        credits=_credits(message),
        allowed_ip_ranges=tuple(message.allowed_ip_ranges),
    )


def update_from_pb(message: pb.ApiKey, mask: FieldMask) -> dict[str, Any]:
    """The new values the mask names; an empty mask means every updatable field that is set (AIP-134)."""
    if mask.paths:
        paths = list(dict.fromkeys(mask.paths))
    else:
        paths = [p for p in IMPLIED if _is_set(message, p)]
        if not paths:
            raise InvalidArgument("update_mask", f"name the fields to change: {', '.join(UPDATABLE)}")
    values: dict[str, Any] = {}
    for path in paths:
        if path == "scopes":
            values[path] = tuple(message.scopes)
        elif path == "labels":
            values[path] = dict(message.labels)
        elif path == "expire_time":
            values[path] = timestamp_value(message, "expire_time")
        elif path == "rate_limits":
            values[path] = _rate_limits(message)
        elif path == "credits":
            values[path] = _credits(message)
        elif path == "credits.remaining":
            values[path] = message.credits.remaining
        elif path == "credits.refill":
            values[path] = _refill(message.credits, "credits.refill")
        elif path == "allowed_ip_ranges":
            values[path] = tuple(message.allowed_ip_ranges)
        elif path == "state":
            if message.state not in _STATE_FROM_PB:
                raise InvalidArgument("state", "must be ACTIVE or DISABLED")
            values[path] = _STATE_FROM_PB[message.state]
        elif path in ("display_name", "description"):
            values[path] = getattr(message, path)
        else:
            raise InvalidArgument("update_mask", f"cannot update {quote(path)}; updatable fields: {', '.join(UPDATABLE)}")
    return values


def _is_set(message: pb.ApiKey, path: str) -> bool:
    if path == "expire_time":
        return message.HasField("expire_time")
    if path == "state":
        return message.state != pb.ApiKey.STATE_UNSPECIFIED
    return bool(getattr(message, path))


def _event_target(event: AuditEvent) -> str:
    """The key acted on; a refusal names what the caller asked for, which may be in another account."""
    if event.kind == EventKind.DENIED.value:
        target = str(event.details.get("target", ""))
        return target if "/apiKeys/" in target else ""
    return key_name(event.account_id, event.key_id) if event.key_id else ""


def audit_event_to_pb(event: AuditEvent) -> pb.AuditEvent:
    details = {name: str(value) for name, value in event.details.items() if name != "reason"}
    return pb.AuditEvent(
        name=f"accounts/{event.account_id}/auditEvents/{event.event_id}",
        event_id=event.event_id,
        kind=pb.AuditEvent.Kind.Value(event.kind.upper()),
        event_time=_timestamp(event.time),
        api_key=_event_target(event),
        key_id=event.key_id,
        account_id=event.account_id,
        project_id=event.project_id,
        actor=event.actor_name,
        actor_key_id=event.actor_key_id,
        actor_display_name=event.actor_display_name,
        peer=event.peer,
        method=event.method,
        changed_fields=event.changed_fields,
        reason=str(event.details.get("reason", "")),
        details=details,
    )


def decision_to_pb(decision: Decision) -> pb.AuthorizeResponse:
    response = pb.AuthorizeResponse(
        allowed=decision.allowed, code=cast(pb.AuthorizeResponse.Code, int(decision.code)), message=decision.message
    )
    key = decision.key
    if key is not None:
        response.key_id = key.key_id
        response.name = key.name
        response.account_id = key.account_id
        response.project_id = key.project_id
        response.scopes.extend(key.scopes)
        response.labels.update(key.labels)
        response.display_name = key.display_name
        response.has_limits = key.has_limits or (decision.secret_expire_at is not None and key.grace_ends_when_unused)
        if key.revoke_time is not None:
            response.revoke_time.FromDatetime(key.revoke_time)
    response.stale = decision.stale
    if decision.expire_at is not None:
        response.expire_time.FromDatetime(datetime.fromtimestamp(decision.expire_at, UTC))
    if decision.secret_expire_at is not None:
        response.secret_expire_time.FromDatetime(datetime.fromtimestamp(decision.secret_expire_at, UTC))
    rate = decision.rate
    if rate is not None:
        response.limit = rate.limit
        response.remaining = rate.remaining
        if rate.retry_after:
            response.retry_after.FromTimedelta(timedelta(seconds=rate.retry_after))
    if decision.credits_remaining is not None:
        response.credits_remaining = decision.credits_remaining
    if decision.missing_scopes:
        response.missing_scopes.extend(decision.missing_scopes)
    return response
