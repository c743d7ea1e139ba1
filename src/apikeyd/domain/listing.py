"""List filters for keys and audit events, page sizes, and page tokens bound to their request."""

import base64
import hashlib
import hmac
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from apikeyd.domain.echo import quote
from apikeyd.domain.errors import InvalidArgument
from apikeyd.domain.limits import MAX_FILTER_LENGTH, MAX_FILTER_TERMS, MAX_FILTER_VALUE_LENGTH, check_length
from apikeyd.domain.model import EventKind, KeyState, validate_no_control, validate_project_id

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000

# The most rows one page may examine: ROWS_EXAMINED_PER_RESULT per result asked for, and never fewer than
# MIN_ROWS_EXAMINED. A term no index serves (`labels.` for keys; kind, actor_key_id and event_time for
# audit events) is checked row by row as the page walks the account in listing order, so without a bound
# a rare or absent value would walk the whole account for one page (448 ms at 1M keys on PostgreSQL) and a
# page's cost would grow with the account. With it, a page that reaches the bound before it is full ends
# there, with what matched so far (possibly nothing) and a next_page_token after the last row examined, as
# AIP-158 allows (page_size is a maximum). Ten per result keeps the pages of any value matching one row in
# ten full; the floor keeps small pages from turning a sparse match into a long chain of near-empty calls.
ROWS_EXAMINED_PER_RESULT = 10
MIN_ROWS_EXAMINED = 1000


def max_rows_examined(page_size: int) -> int:
    """The most rows a page of `page_size` results examines (see ROWS_EXAMINED_PER_RESULT)."""
    return max(ROWS_EXAMINED_PER_RESULT * page_size, MIN_ROWS_EXAMINED)

_TERM = re.compile(
    r'\s*([a-z_]+(?:\.[a-z][a-z0-9_-]{0,62})?)\s*(>=|<=|=|<|>)\s*(?:"((?:[^"\\]|\\.)*)"|([A-Za-z0-9._:+-]+))\s*'
)
_AND = re.compile(r"AND\b")
_HINT = '`state = ACTIVE`, `project_id = "p1"` or `labels.env = "prod"`'
_EVENT_HINT = '`key_id = "..."`, `kind = REVOKED`, `actor_key_id = "..."` or `event_time >= "2026-01-01T00:00:00Z"`'


def _terms(text: str, hint: str) -> Iterator[tuple[str, str, str]]:
    """(field, operator, value) for each term of `term AND term ...`; a field and operator given twice is
    refused rather than silently overwritten. The limits (domain/limits.py) bound the database work the
    filter asks for, and are checked before any of it is parsed further."""
    check_length("filter", text, MAX_FILTER_LENGTH)
    seen: set[tuple[str, str]] = set()
    position = 0
    while text.strip():
        match = _TERM.match(text, position)
        if match is None:
            raise InvalidArgument("filter", f"cannot read {quote(text[position:].strip())}; use terms such as {hint} joined by AND")
        field, operator, quoted, bare = match.groups()
        if (field, operator) in seen:
            raise InvalidArgument("filter", f"{quote(field)} {operator} appears twice; name each field once")
        seen.add((field, operator))
        if len(seen) > MAX_FILTER_TERMS:
            raise InvalidArgument("filter", f"at most {MAX_FILTER_TERMS} terms")
        value = bare if bare is not None else re.sub(r"\\(.)", r"\1", quoted)
        if len(value) > MAX_FILTER_VALUE_LENGTH:
            raise InvalidArgument("filter", f"the value of {field} is {len(value)} characters; at most {MAX_FILTER_VALUE_LENGTH}")
        yield field, operator, validate_no_control("filter", value)
        position = match.end()
        if position == len(text):
            return
        joiner = _AND.match(text, position)
        if joiner is None:
            raise InvalidArgument("filter", f"expected AND at {quote(text[position:].strip())}")
        position = joiner.end()
        if not text[position:].strip():
            raise InvalidArgument("filter", "a term must follow AND")


def _equality(field: str, operator: str) -> None:
    if operator != "=":
        raise InvalidArgument("filter", f"{field} takes only `=`, not `{operator}`")


@dataclass(frozen=True, slots=True)
class Filter:
    state: KeyState | None = None
    project_id: str | None = None
    labels: tuple[tuple[str, str], ...] = ()


def parse_filter(text: str) -> Filter:
    state: KeyState | None = None
    project_id: str | None = None
    labels: dict[str, str] = {}
    for field, operator, value in _terms(text, _HINT):
        if field == "state":
            _equality(field, operator)
            try:
                state = KeyState(value)
            except ValueError:
                raise InvalidArgument("filter", f"state must be ACTIVE, DISABLED or REVOKED, got {quote(value)}") from None
        elif field == "project_id":
            _equality(field, operator)
            project_id = validate_project_id(value, "filter")
        elif field.startswith("labels.") and len(field) > len("labels."):
            _equality(field, operator)
            labels[field[len("labels.") :]] = value
        else:
            raise InvalidArgument("filter", f"cannot filter on {quote(field)}; use terms such as {_HINT}")
    return Filter(state, project_id, tuple(sorted(labels.items())))


@dataclass(frozen=True, slots=True)
class EventFilter:
    key_id: str | None = None
    kind: EventKind | None = None
    actor_key_id: str | None = None
    # (operator, time) pairs, all of which must hold: `>=`, `>`, `<`, `<=` or `=`
    times: tuple[tuple[str, datetime], ...] = ()


def parse_event_filter(text: str) -> EventFilter:
    values: dict[str, Any] = {}
    times: list[tuple[str, datetime]] = []
    for field, operator, value in _terms(text, _EVENT_HINT):
        if field in ("key_id", "actor_key_id"):
            _equality(field, operator)
            values[field] = value
        elif field == "kind":
            _equality(field, operator)
            try:
                values["kind"] = EventKind(value.lower())
            except ValueError:
                kinds = ", ".join(kind.name for kind in EventKind)
                raise InvalidArgument("filter", f"kind must be one of {kinds}, got {quote(value)}") from None
        elif field == "event_time":
            try:
                when = datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                when = None
            if when is None or when.tzinfo is None:
                raise InvalidArgument("filter", f"event_time needs an RFC 3339 time with a zone, got {quote(value)}")
            try:  # in UTC now, as the store compares it: near year 1 or 9999 an offset leaves the calendar
                when = when.astimezone(UTC)
            except OverflowError:
                raise InvalidArgument("filter", f"event_time {quote(value)} is outside years 1 to 9999 in UTC") from None
            times.append((operator, when))
        else:
            raise InvalidArgument("filter", f"cannot filter audit events on {quote(field)}; use terms such as {_EVENT_HINT}")
    return EventFilter(times=tuple(times), **values)


def validate_page_size(size: int, default: int = DEFAULT_PAGE_SIZE, maximum: int = MAX_PAGE_SIZE) -> int:
    """AIP-158: 0 is the default, and a size past the maximum is the maximum."""
    if size < 0:
        raise InvalidArgument("page_size", f"must not be negative, got {size}")
    if size == 0:
        return default
    return min(size, maximum)


# Page tokens carry their position in the clear and an HMAC-SHA256 (cut to 128 bits) of the position and the
# request (kind, account, filter) under a key every replica shares: the database's page-token key, made by
# migration 0005 and read once at start-up. A token is then only ever a position this service handed out for
# this very request: a forged, edited or foreign one is refused before it reaches a query.
_MAC_BYTES = 16
_NOT_ISSUED = "is not one this server issued for this request; send the same parent and filter, or start again without it"
_MAX_EVENT_ID = 2**63 - 1  # BIGINT


def _mac(key: bytes, kind: str, account_id: str, filter_text: str, position: bytes) -> bytes:
    message = b"\n".join((kind.encode(), account_id.encode(), filter_text.encode("utf-8", "surrogatepass"), position))
    return hmac.new(key, message, hashlib.sha256).digest()[:_MAC_BYTES]


def _encode(key: bytes, kind: str, account_id: str, filter_text: str, position: list[Any]) -> str:
    """An opaque token for the page after `position`, bound to the request it came from (AIP-158)."""
    body = json.dumps(position, separators=(",", ":")).encode()
    raw = _mac(key, kind, account_id, filter_text, body) + body
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode(key: bytes, kind: str, token: str, account_id: str, filter_text: str) -> list[Any]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except ValueError:
        raise InvalidArgument("page_token", _NOT_ISSUED) from None
    mac, body = raw[:_MAC_BYTES], raw[_MAC_BYTES:]
    if not hmac.compare_digest(mac, _mac(key, kind, account_id, filter_text, body)):
        raise InvalidArgument("page_token", _NOT_ISSUED)
    try:  # only this server's own JSON gets here
        position = json.loads(body)
    except (ValueError, RecursionError):
        raise InvalidArgument("page_token", _NOT_ISSUED) from None
    if not isinstance(position, list):
        raise InvalidArgument("page_token", _NOT_ISSUED)
    return position


def encode_page_token(key: bytes, account_id: str, filter_text: str, after: tuple[datetime, str]) -> str:
    """The token of the ListApiKeys page after the key at `after` (create_time, key_id): the last key the page
    examined, which is its last key unless a `labels.` term stopped the walk at max_rows_examined first. The
    position is readable by whoever holds the token; it is always a key the caller may list (see
    Repository.list_keys), so it says nothing the caller could not read."""
    return _encode(key, "keys", account_id, filter_text, [after[0].isoformat(), after[1]])


def decode_page_token(key: bytes, token: str, account_id: str, filter_text: str) -> tuple[datetime, str]:
    position = _decode(key, "keys", token, account_id, filter_text)
    try:
        after = (datetime.fromisoformat(position[0]), str(position[1]))
    except (ValueError, TypeError, IndexError):
        raise InvalidArgument("page_token", _NOT_ISSUED) from None
    if after[0].tzinfo is None:
        raise InvalidArgument("page_token", _NOT_ISSUED)
    return after


def encode_event_page_token(key: bytes, account_id: str, filter_text: str, before_id: int) -> str:
    """The token of the ListAuditEvents page below the event `before_id`: the last event the page examined,
    its last event unless a term checked row by row stopped the walk at max_rows_examined first."""
    return _encode(key, "events", account_id, filter_text, [before_id])


def decode_event_page_token(key: bytes, token: str, account_id: str, filter_text: str) -> int:
    position = _decode(key, "events", token, account_id, filter_text)
    if len(position) != 1 or not isinstance(position[0], int) or isinstance(position[0], bool):
        raise InvalidArgument("page_token", _NOT_ISSUED)
    if not 0 < position[0] <= _MAX_EVENT_ID:
        raise InvalidArgument("page_token", _NOT_ISSUED)
    return position[0]


def encode_usage_page_token(key: bytes, account_id: str, bound: str, after: tuple[str, datetime], end: datetime) -> str:
    """The token of the ListApiKeyUsage page after the bucket `after` (key_id, bucket start), the last one the
    caller was shown, bound to the request's other fields (UsageQuery.bound_to). It carries the range's end,
    fixed by the first page, so that an unset end_time ("now") means the same range on every page."""
    return _encode(key, "usage", account_id, bound, [after[0], after[1].isoformat(), end.isoformat()])


def decode_usage_page_token(key: bytes, token: str, account_id: str, bound: str) -> tuple[tuple[str, datetime], datetime]:
    position = _decode(key, "usage", token, account_id, bound)
    try:
        key_id, bucket, end = str(position[0]), datetime.fromisoformat(position[1]), datetime.fromisoformat(position[2])
    except (ValueError, TypeError, IndexError):
        raise InvalidArgument("page_token", _NOT_ISSUED) from None
    if len(position) != 3 or bucket.tzinfo is None or end.tzinfo is None:
        raise InvalidArgument("page_token", _NOT_ISSUED)
    return (key_id, bucket), end
