"""Key records, their states and the rules for the values a caller may set."""

import enum
import functools
import hashlib
import json
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from apikeyd.domain.credits import Credits
from apikeyd.domain.echo import quote, refuse_key
from apikeyd.domain.errors import InvalidArgument
from apikeyd.domain.ip_ranges import Ranges, compile_ranges


class KeyState(enum.Enum):
    ACTIVE = "ACTIVE"
    DISABLED = "DISABLED"
    REVOKED = "REVOKED"


class EventKind(enum.Enum):
    """What an event row records; the audit log and the change feed read these."""

    CREATED = "created"
    UPDATED = "updated"
    DISABLED = "disabled"
    ENABLED = "enabled"
    REVOKED = "revoked"
    ROTATED = "rotated"
    DELETED = "deleted"
    DENIED = "denied"


@dataclass(frozen=True, slots=True)
class RateLimit:
    limit: int
    period_seconds: int


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A key as stored, without its secret or hash."""

    key_id: str
    account_id: str
    project_id: str
    display_name: str
    description: str
    scopes: tuple[str, ...]
    labels: dict[str, str]
    state: KeyState
    prefix: str
    lookup_id: str
    masked_key: str
    expire_time: datetime | None
    rate_limits: tuple[RateLimit, ...]
    create_time: datetime
    update_time: datetime
    revision: int
    last_used_time: datetime | None = None
    revoke_time: datetime | None = None
    revoke_reason: str = ""
    previous_secret_expire_time: datetime | None = None
    credits: Credits | None = None
    allowed_ip_ranges: tuple[str, ...] = ()
    previous_secret_last_used_time: datetime | None = None
    end_grace_after_unused: timedelta | None = None

    @property
    def name(self) -> str:
        return key_name(self.account_id, self.key_id)

    @property
    def etag(self) -> str:
        return f"r{self.revision}"

    def verified(self) -> "VerifiedKey":
        """What the verified-key cache keeps of this key."""
        scopes = tuple(map(sys.intern, self.scopes))
        labels = tuple((sys.intern(label), sys.intern(value)) for label, value in self.labels.items())
        return VerifiedKey(
            key_id=self.key_id,
            account_id=sys.intern(self.account_id),
            project_id=sys.intern(self.project_id),
            display_name=self.display_name,
            scopes=_shared_scopes(scopes) if len(scopes) <= _SHARED_ITEMS else scopes,
            labels=_shared_labels(labels) if len(labels) <= _SHARED_ITEMS else dict(labels),
            state=self.state,
            rate_limits=self.rate_limits,
            revoke_time=self.revoke_time,
            has_credits=self.credits is not None,
            grace_ends_when_unused=self.end_grace_after_unused is not None,
            ip_ranges=_compiled_ranges(self.allowed_ip_ranges) if self.allowed_ip_ranges else (),
        )


@dataclass(frozen=True, slots=True)
class VerifiedKey:
    """A key as a check of its secret sees it: what the checks read and what an answer names (Authorize's
    response, ext_authz's headers, a management caller's audit records). The verified-key cache keeps this
    rather than the ApiKey, whose description, masked key and times no check reads, and what many keys
    repeat (account, project, scopes, labels) is held once: strings interned, small scope tuples and label
    sets shared through the memos below (issue 10: memory per cached key). Expiry times are the cache
    entry's."""

    key_id: str
    account_id: str
    project_id: str
    display_name: str
    scopes: tuple[str, ...]
    labels: Mapping[str, str]  # shared with other keys: never changed
    state: KeyState
    rate_limits: tuple[RateLimit, ...]
    revoke_time: datetime | None
    has_credits: bool = False  # its balance is in the database: every allowed check spends there
    ip_ranges: Ranges = ()  # allowed_ip_ranges, compiled (domain/ip_ranges.py); () allows any address
    # Its rotation's grace ends once the previous secret goes unused (graces.py): every use of that secret
    # must reach the server, so a client-side cache keeps no answer for it.
    grace_ends_when_unused: bool = False

    @property
    def name(self) -> str:
        return key_name(self.account_id, self.key_id)

    @property
    def has_limits(self) -> bool:
        """Every check counts (rate limits, credits) or depends on the client (IP ranges): a client-side
        cache must ask the server each time."""
        return bool(self.rate_limits) or self.has_credits or bool(self.ip_ranges)


# An account's keys tend to repeat their scopes and labels. These memos hand back the first of equal values
# they have seen, as sys.intern does for strings, so that cached keys share one tuple or dict. Only small
# values go in, which bounds a memo's bytes: 1024 values of at most _SHARED_ITEMS scopes (of at most 320
# characters, limits.MAX_SCOPE_LENGTH) or labels (63 for a key or a value) come to under 4 MB.
_SHARED_ITEMS = 8


@functools.lru_cache(maxsize=1024)
def _shared_scopes(scopes: tuple[str, ...]) -> tuple[str, ...]:
    return scopes


@functools.lru_cache(maxsize=1024)
def _compiled_ranges(ranges: tuple[str, ...]) -> Ranges:
    """Keys of one customer tend to share their ranges: compiled once (at most 100 ranges of 3 ints each)."""
    return compile_ranges(ranges)


@functools.lru_cache(maxsize=1024)
def _shared_labels(labels: tuple[tuple[str, str], ...]) -> Mapping[str, str]:
    return dict(labels)


@dataclass(frozen=True, slots=True)
class KeyChange:
    """An event as the change feed and the change stream see it: which key changed, and how."""

    event_id: int
    key_id: str
    account_id: str
    project_id: str
    kind: EventKind


@dataclass(frozen=True, slots=True)
class AuditEvent:
    event_id: int
    kind: str  # an EventKind value, or "denied"
    time: datetime
    key_id: str
    account_id: str
    project_id: str
    actor_key_id: str
    actor_name: str
    actor_display_name: str
    peer: str
    method: str
    changed_fields: tuple[str, ...]
    details: dict[str, Any]


@dataclass(frozen=True, slots=True)
class IdempotentRequest:
    """A request_id (AIP-155) with what the request asked, so a reused id with another request is refused."""

    request_id: str
    method: str
    fingerprint: str

    @classmethod
    def of(cls, request_id: str, method: str, *parts: Any) -> "IdempotentRequest | None":
        """The request behind a request_id and what the request asked (`parts`), none without an id."""
        if not request_id:
            return None
        fingerprint = hashlib.sha256(json.dumps([method, *parts], default=str, sort_keys=True).encode()).hexdigest()
        return cls(validate_request_id(request_id), method, fingerprint)


REQUEST_ID_LIFETIME = timedelta(hours=24)
_REQUEST_ID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def request_id_reused() -> InvalidArgument:
    return InvalidArgument(
        "request_id", "was already used for a different request; send a new request_id with a new request"
    )


def validate_request_id(value: str) -> str:
    if _REQUEST_ID.fullmatch(value) is None:
        raise InvalidArgument("request_id", f"{quote(value)} is not a UUID")
    return value.lower()


@dataclass(frozen=True, slots=True)
class Credentials:
    """The argon2id hashes behind a key: the current secret's and, after a rotation, the previous one's."""

    secret_hash: str
    previous_secret_hash: str | None = field(default=None, repr=False)


# --- resource names -------------------------------------------------------------------------------

_ID = r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}"
_ID_RE = re.compile(_ID)
_UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_PARENT_RE = re.compile(rf"accounts/({_ID})")
_NAME_RE = re.compile(rf"accounts/({_ID})/apiKeys/({_UUID})")
KEY_ID_RE = re.compile(_UUID)  # a key id alone: the server-chosen lower-case UUID
ID_RULE = "1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"


def key_name(account_id: str, key_id: str) -> str:
    return f"accounts/{account_id}/apiKeys/{key_id}"


def parse_parent(parent: str, field: str = "parent") -> str:
    match = _PARENT_RE.fullmatch(parent)
    if match is None:
        raise InvalidArgument(field, f"{quote(parent)} is not `accounts/{{account_id}}` (account_id: {ID_RULE})")
    return refuse_key(field, match.group(1))


def parse_key_name(name: str, field: str = "name") -> tuple[str, str]:
    match = _NAME_RE.fullmatch(name)
    if match is None:
        raise InvalidArgument(
            field, f"{quote(name)} is not `accounts/{{account_id}}/apiKeys/{{key_id}}` with a lower-case UUID key_id"
        )
    return refuse_key(field, match.group(1)), match.group(2)


def validate_project_id(project_id: str, field: str = "project_id") -> str:
    if project_id and _ID_RE.fullmatch(project_id) is None:
        raise InvalidArgument(field, f"{quote(project_id)} is not a project id ({ID_RULE})")
    return refuse_key(field, project_id)


# --- field rules ----------------------------------------------------------------------------------

MAX_LABELS = 64
_LABEL_KEY = re.compile(r"[a-z][a-z0-9_-]{0,62}")
MAX_LABEL_VALUE = 63
_LABEL_VALUE = re.compile(r"[a-z0-9_-]{0,63}")
MIN_PERIOD = 1
MAX_PERIOD = 86_400
MAX_RATE_LIMITS = 8
# Shared limits live in Redis, whose Lua numbers are doubles: a limit's state there is exact while
# period (in us) x (limit + 1) stays below 2^53 (authorizer/redis_ratelimits.py). Refusing limit x period
# above 9e9 request-seconds keeps every accepted limit exact on either limiter (104 166 a day, 9e9 a second);
# beyond it Redis rounded (10^15 a day never counted down, 2^63-1 came back as -2^63).
MAX_LIMIT_TIMES_PERIOD = 9_000_000_000
MAX_GRACE = timedelta(days=7)
# The shortest wait for an unused previous secret: last uses are written in batches (every 30 s by default),
# so a shorter one could end a grace whose secret was used a moment ago on another replica.
MIN_END_GRACE_AFTER_UNUSED = timedelta(minutes=5)


# C0 control characters and DEL: PostgreSQL refuses NUL in text (SQLite would store it, so the backends would
# disagree), and the others only garble the logs and terminals that show these values. Free text keeps tab
# and line breaks.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL_IN_TEXT = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def validate_no_control(field: str, value: str, multiline: bool = False) -> str:
    """`value` unless it holds a control character (tab and line breaks allowed when `multiline`)."""
    found = (_CONTROL_IN_TEXT if multiline else _CONTROL).search(value)
    if found is not None:
        raise InvalidArgument(
            field, f"must not contain control characters, found U+{ord(found.group()):04X} at {found.start()}"
        )
    return value


def validate_display_name(value: str) -> str:
    if not 1 <= len(value) <= 255:
        raise InvalidArgument("display_name", f"must be 1 to 255 characters, got {len(value)}")
    return refuse_key("display_name", validate_no_control("display_name", value))


def validate_description(value: str) -> str:
    if len(value) > 1024:
        raise InvalidArgument("description", f"must be at most 1024 characters, got {len(value)}")
    return refuse_key("description", validate_no_control("description", value, multiline=True))


def validate_labels(labels: dict[str, str]) -> dict[str, str]:
    if len(labels) > MAX_LABELS:
        raise InvalidArgument("labels", f"at most {MAX_LABELS} labels, got {len(labels)}")
    for key, value in labels.items():
        if _LABEL_KEY.fullmatch(key) is None:
            raise InvalidArgument(
                "labels", f"key {quote(key)} must be 1-63 lower-case letters, digits, '_' or '-', starting with a letter"
            )
        if _LABEL_VALUE.fullmatch(value) is None:
            raise InvalidArgument(
                "labels", f"value of {quote(key)} must be at most 63 lower-case letters, digits, '_' or '-'"
            )
    return dict(sorted(labels.items()))


def validate_rate_limits(limits: list[RateLimit]) -> tuple[RateLimit, ...]:
    if len(limits) > MAX_RATE_LIMITS:
        raise InvalidArgument("rate_limits", f"at most {MAX_RATE_LIMITS} rate limits, got {len(limits)}")
    for limit in limits:
        if limit.limit < 1:
            raise InvalidArgument("rate_limits", f"limit must be at least 1, got {limit.limit}")
        if not MIN_PERIOD <= limit.period_seconds <= MAX_PERIOD:
            raise InvalidArgument(
                "rate_limits", f"period must be whole seconds from {MIN_PERIOD} s to 1 day, got {limit.period_seconds} s"
            )
        if limit.limit * limit.period_seconds > MAX_LIMIT_TIMES_PERIOD:
            raise InvalidArgument(
                "rate_limits",
                f"limit x period must be at most {MAX_LIMIT_TIMES_PERIOD:.0e} request-seconds (at most "
                f"{MAX_LIMIT_TIMES_PERIOD // limit.period_seconds} per {limit.period_seconds} s), got {limit.limit}",
            )
    return tuple(sorted(set(limits), key=lambda r: (r.period_seconds, r.limit)))


def validate_expire_time(value: datetime | None, now: datetime) -> datetime | None:
    if value is not None and value <= now:
        raise InvalidArgument("expire_time", f"must be in the future, got {value.isoformat()}")
    return value


def validate_grace(grace: timedelta) -> timedelta:
    if not timedelta(0) <= grace <= MAX_GRACE:
        raise InvalidArgument("grace_period", f"must be from 0 to 7 days, got {grace.total_seconds():g} s")
    return grace


def validate_end_grace_after_unused(value: timedelta | None, grace: timedelta) -> timedelta | None:
    if value is None:
        return None
    if not MIN_END_GRACE_AFTER_UNUSED <= value <= max(grace, MIN_END_GRACE_AFTER_UNUSED):
        raise InvalidArgument(
            "end_grace_after_unused",
            f"must be from 5 minutes to the grace_period ({grace.total_seconds():g} s), got {value.total_seconds():g} s",
        )
    if value > grace:
        raise InvalidArgument("end_grace_after_unused", "needs a grace_period of at least 5 minutes")
    return value


def validate_reason(reason: str) -> str:
    if len(reason) > 1024:
        raise InvalidArgument("reason", f"must be at most 1024 characters, got {len(reason)}")
    return refuse_key("reason", validate_no_control("reason", reason, multiline=True))
