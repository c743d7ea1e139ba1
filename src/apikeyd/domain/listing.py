"""List filters (`state = ACTIVE AND project_id = "p1" AND labels.env = "prod"`) and page sizes."""

import base64
import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime

from apikeyd.domain.errors import InvalidArgument
from apikeyd.domain.model import KeyState, validate_project_id

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000

_TERM = re.compile(r'\s*(state|project_id|labels\.([a-z][a-z0-9_-]{0,62}))\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([A-Za-z0-9._-]+))\s*')
_AND = re.compile(r"AND\b")


@dataclass(frozen=True, slots=True)
class Filter:
    state: KeyState | None = None
    project_id: str | None = None
    labels: tuple[tuple[str, str], ...] = ()


def parse_filter(text: str) -> Filter:
    state: KeyState | None = None
    project_id: str | None = None
    labels: dict[str, str] = {}
    seen: set[str] = set()
    position = 0
    while text.strip():
        match = _TERM.match(text, position)
        if match is None:
            raise InvalidArgument(
                "filter",
                f"cannot read {text[position:].strip()[:40]!r}; use terms such as `state = ACTIVE`, "
                '`project_id = "p1"` or `labels.env = "prod"` joined by AND',
            )
        field, label, quoted, bare = match.groups()
        if field in seen:
            raise InvalidArgument("filter", f"{field} appears twice; name each field once")
        seen.add(field)
        value = bare if bare is not None else re.sub(r"\\(.)", r"\1", quoted)
        if field == "state":
            try:
                state = KeyState(value)
            except ValueError:
                raise InvalidArgument("filter", f"state must be ACTIVE, DISABLED or REVOKED, got {value!r}") from None
        elif field == "project_id":
            project_id = validate_project_id(value, "filter")
        else:
            labels[label] = value
        position = match.end()
        if position == len(text):
            break
        joiner = _AND.match(text, position)
        if joiner is None:
            raise InvalidArgument("filter", f"expected AND at {text[position:].strip()[:40]!r}")
        position = joiner.end()
        if not text[position:].strip():
            raise InvalidArgument("filter", "a term must follow AND")
    return Filter(state, project_id, tuple(sorted(labels.items())))


def validate_page_size(size: int) -> int:
    if size < 0:
        raise InvalidArgument("page_size", f"must not be negative, got {size}")
    if size == 0:
        return DEFAULT_PAGE_SIZE
    return min(size, MAX_PAGE_SIZE)


def _request_fingerprint(account_id: str, filter_text: str) -> str:
    return hashlib.sha256(f"{account_id}\n{filter_text}".encode()).hexdigest()[:16]


def encode_page_token(account_id: str, filter_text: str, after: tuple[datetime, str]) -> str:
    """An opaque token for the page after `after`, bound to the request it came from (AIP-158)."""
    payload = {"t": after[0].isoformat(), "k": after[1], "r": _request_fingerprint(account_id, filter_text)}
    return base64.urlsafe_b64encode(json.dumps(payload, separators=(",", ":")).encode()).decode().rstrip("=")


def decode_page_token(token: str, account_id: str, filter_text: str) -> tuple[datetime, str]:
    try:
        payload = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        after = (datetime.fromisoformat(payload["t"]), str(payload["k"]))
        fingerprint = payload["r"]
    except (ValueError, KeyError, TypeError, RecursionError):
        raise InvalidArgument("page_token", "is not a token this service issued; start again without it") from None
    if after[0].tzinfo is None or fingerprint != _request_fingerprint(account_id, filter_text):
        raise InvalidArgument(
            "page_token", "belongs to a request with another parent or filter; send the same parent and filter"
        )
    return after
