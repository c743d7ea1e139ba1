"""Usage analytics: Authorize outcomes per key and time bucket, and the rules of a ListApiKeyUsage request.

Buckets are UTC minutes, hours and days, each named by its start. A request names a range by its first
bucket (the one holding start_time) and the buckets that start before end_time. Its size is not capped:
paging bounds the work of each call (at most MAX_PAGE_SIZE buckets), and retention bounds what exists per
key (APIKEYD_USAGE_RETENTION_*), so a year of minutes simply reads as the minutes still kept.
"""

import enum
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from apikeyd.domain import listing
from apikeyd.domain.decision import AuthCode
from apikeyd.domain.echo import quote
from apikeyd.domain.errors import InvalidArgument
from apikeyd.domain.model import KEY_ID_RE, parse_key_name, parse_parent

# The codes a key's usage is counted under; the others (MALFORMED, NOT_FOUND) name no key.
COUNTED = (
    AuthCode.OK,
    AuthCode.RATE_LIMITED,
    AuthCode.CREDITS_EXHAUSTED,
    AuthCode.INSUFFICIENT_SCOPE,
    AuthCode.PROJECT_MISMATCH,
    AuthCode.EXPIRED,
    AuthCode.DISABLED,
    AuthCode.REVOKED,
    AuthCode.IP_NOT_ALLOWED,
)
_SLOTS = max(AuthCode) + 1

DEFAULT_PAGE_SIZE = 1000
MAX_PAGE_SIZE = 10_000
ALL_KEYS = "-"  # the parent `accounts/{a}/apiKeys/-` (AIP-159)


class Granularity(enum.Enum):
    MINUTE = "minute"
    HOUR = "hour"
    DAY = "day"

    @property
    def length(self) -> timedelta:
        return _LENGTHS[self]

    def start_of(self, when: datetime) -> datetime:
        """The start of the bucket holding `when`, in UTC."""
        when = when.astimezone(UTC).replace(second=0, microsecond=0)
        if self is Granularity.MINUTE:
            return when
        when = when.replace(minute=0)
        return when if self is Granularity.HOUR else when.replace(hour=0)


_LENGTHS = {Granularity.MINUTE: timedelta(minutes=1), Granularity.HOUR: timedelta(hours=1), Granularity.DAY: timedelta(days=1)}


@dataclass(slots=True)
class KeyCounts:
    """One key's outcomes in one minute as the hot path counts them: a list indexed by AuthCode."""

    account_id: str
    project_id: str
    counts: list[int] = field(default_factory=lambda: [0] * _SLOTS)


@dataclass(frozen=True, slots=True)
class Usage:
    """One key's outcomes in one bucket; `counts` leaves zeros out."""

    key_id: str
    account_id: str
    project_id: str
    granularity: Granularity
    start: datetime
    counts: dict[AuthCode, int]

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass(frozen=True, slots=True)
class UsageQuery:
    """A validated ListApiKeyUsage request. `key_ids` is empty for every key the caller reaches."""

    account_id: str
    key_ids: tuple[str, ...]
    single_key: bool
    granularity: Granularity
    start: datetime  # the first bucket's start
    end: datetime | None  # None: now, fixed by the first page
    page_size: int

    def bound_to(self) -> str:
        """What a page token is bound to besides the account: every field but the token and page_size."""
        end = "" if self.end is None else self.end.isoformat()
        return "\n".join((self.granularity.value, self.start.isoformat(), end, str(self.single_key), ",".join(self.key_ids)))


def parse_usage_parent(parent: str) -> tuple[str, str | None]:
    """`accounts/{a}/apiKeys/{key_id}` -> (a, key_id); `accounts/{a}/apiKeys/-` -> (a, None)."""
    account, _, key = parent.rpartition("/apiKeys/")
    try:
        return (parse_parent(account), None) if key == ALL_KEYS else parse_key_name(parent, "parent")
    except InvalidArgument:
        raise InvalidArgument(
            "parent",
            f"{quote(parent)} is not `accounts/{{account_id}}/apiKeys/{{key_id}}` (a lower-case UUID key_id) "
            f"or `accounts/{{account_id}}/apiKeys/{ALL_KEYS}`",
        ) from None


def validate_key_ids(key_ids: list[str], single_key: bool) -> tuple[str, ...]:
    """Sorted and without repeats, so that the same set is the same request to a page token. Their number
    is bounded before any work (limits.MAX_USAGE_KEY_IDS)."""
    if not key_ids:
        return ()
    if single_key:
        raise InvalidArgument("key_ids", "is only for the parent `accounts/{account_id}/apiKeys/-`; this parent names one key")
    for index, key_id in enumerate(key_ids):
        if KEY_ID_RE.fullmatch(key_id) is None:
            raise InvalidArgument("key_ids", f"entry {index} ({quote(key_id)}) is not a key id (a lower-case UUID)")
    return tuple(sorted(set(key_ids)))


def validate_range(granularity: Granularity, start: datetime | None, end: datetime | None) -> datetime:
    """The first bucket's start; end_time, when given, must come after start_time."""
    if start is None:
        raise InvalidArgument("start_time", "is required: the first bucket is the one holding it")
    if end is not None and end <= start:
        raise InvalidArgument("end_time", "must be later than start_time")
    return granularity.start_of(start)


def validate_page_size(size: int) -> int:
    return listing.validate_page_size(size, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
