"""Scopes: `resource:action[:qualifier]` or `*`, and whether granted scopes satisfy required ones.

A qualifier is `all` or `{value}`. A granted scope satisfies a required `resource:action` when resource and
action match and it has no qualifier, `all`, or `{x}` where x is the request's resource.
"""

import re
from dataclasses import dataclass
from functools import lru_cache

from apikeyd.domain.echo import quote, refuse_key
from apikeyd.domain.errors import InvalidArgument
from apikeyd.domain.limits import (
    MAX_REQUIRED_SCOPE_LENGTH,
    MAX_REQUIRED_SCOPES,
    MAX_SCOPE_LENGTH,
    MAX_SCOPES,
    check_count,
    check_each_length,
)

WILDCARD = "*"
_PART = r"[a-z0-9._-]+"
_SCOPE = re.compile(rf"({_PART}):({_PART})(?::(all|\{{([^{{}}\s]{{1,255}})\}}))?")
_REQUIRED = re.compile(rf"({_PART}):({_PART})")
# The memo caches below are keyed by what callers send, so their bytes must be bounded. parse_required_scopes
# lets only lists within the size limits (domain/limits.py) reach them: a required scope is at most 256
# characters, so an entry of parse_required (the text and its two parts) holds under 1 KB and its 4096
# entries under 4 MB. Lists are memoised only when short (_MEMO_SCOPES, _MEMO_CHARACTERS): under 4 KB an
# entry, under 4 MB for its 1024. A longer list is parsed scope by scope through parse_required, which
# costs microseconds; callers that send the same list again and again send short ones.
_MEMO_SCOPES = 8
_MEMO_CHARACTERS = 512


@dataclass(frozen=True, slots=True)
class Scope:
    resource: str
    action: str
    # The value inside `{...}`; None for no qualifier or `all`, which both grant every resource.
    value: str | None


def parse_scope(text: str, field: str = "scopes") -> Scope | None:
    """The parsed scope, None for `*`; InvalidArgument naming the scope when it is not one."""
    if text == WILDCARD:
        return None
    match = _SCOPE.fullmatch(text) if len(text) <= MAX_SCOPE_LENGTH else None
    if match is None:
        raise InvalidArgument(
            field,
            f"{quote(text)} is not a scope; use `resource:action`, `resource:action:all`, "
            "`resource:action:{value}` (lower-case letters, digits, '-', '_', '.') or `*`",
        )
    resource, action, _qualifier, value = match.groups()
    return Scope(resource, action, value)


@lru_cache(maxsize=4096)
def parse_required(text: str) -> tuple[str, str]:
    """A required scope, `resource:action`; cached because callers send the same few on every check."""
    match = _REQUIRED.fullmatch(text)
    if match is None:
        raise InvalidArgument(
            "required_scopes",
            f"{quote(text)} is not a required scope; use `resource:action` and put the qualifier value in `resource`",
        )
    return match.group(1), match.group(2)


def parse_required_scopes(texts: tuple[str, ...]) -> tuple[tuple[str, tuple[str, str]], ...]:
    """Each required scope with its parts; short lists cached as a whole, since callers send the same few."""
    check_count("required_scopes", texts, MAX_REQUIRED_SCOPES)
    check_each_length("required_scopes", texts, MAX_REQUIRED_SCOPE_LENGTH)
    if len(texts) <= _MEMO_SCOPES and sum(map(len, texts)) <= _MEMO_CHARACTERS:
        return _parse_short_list(texts)
    return _parse_list(texts)


def _parse_list(texts: tuple[str, ...]) -> tuple[tuple[str, tuple[str, str]], ...]:
    return tuple((text, parse_required(text)) for text in texts)


_parse_short_list = lru_cache(maxsize=1024)(_parse_list)


def validate_scopes(scopes: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    if not scopes:
        raise InvalidArgument("scopes", "a key needs at least one scope")
    check_count("scopes", scopes, MAX_SCOPES)
    check_each_length("scopes", scopes, MAX_SCOPE_LENGTH)
    for scope in scopes:
        parse_scope(scope)
        refuse_key("scopes", scope)
    return tuple(dict.fromkeys(scopes))  # drop repeats, keep the caller's order


# Up to this many granted scopes are scanned; more are hashed. A scan of a handful of strings, most of which
# differ in length, is as fast as a hash look-up and costs no memory; a hundred must not be scanned per check.
_SCANNED = 8


class ScopeSet:
    """Granted scopes for the hot path. A scope has one way to be written (parse_scope's pattern), so
    `resource:action` is granted for a resource exactly when one of three texts is among the granted ones:
    `resource:action`, `resource:action:all` or `resource:action:{resource}`. The set holds nothing but the
    key's own scope strings (issue 10: memory per cached key)."""

    __slots__ = ("_everything", "_granted")

    def __init__(self, granted: tuple[str, ...]) -> None:
        self._everything = WILDCARD in granted
        self._granted: tuple[str, ...] | frozenset[str] = granted if len(granted) <= _SCANNED else frozenset(granted)

    def grants(self, required: tuple[str, str], resource: str) -> bool:
        return self._grants_text(f"{required[0]}:{required[1]}", resource)

    def _grants_text(self, required: str, resource: str) -> bool:
        """`required` is a required scope's text, `resource:action`."""
        granted = self._granted
        return (
            self._everything
            or required in granted
            or f"{required}:all" in granted
            or f"{required}:{{{resource}}}" in granted
        )

    def covers(self, text: str) -> bool:
        """Whether these scopes include all that `text` grants: a key may hand out only what it holds, and a
        `{value}` scope only with the same value."""
        if self._everything:
            return True
        scope = parse_scope(text)
        if scope is None:
            return False
        if self._grants_text(f"{scope.resource}:{scope.action}", ""):
            return True
        return scope.value is not None and text in self._granted

    def missing(self, required: tuple[tuple[str, tuple[str, str]], ...], resource: str) -> list[str]:
        """The required scopes (from parse_required_scopes) that are not granted, in order."""
        return [text for text, _ in required if not self._grants_text(text, resource)]
