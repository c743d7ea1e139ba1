"""The key string: `<prefix><lookup id>_<secret><checksum>`.

The lookup id finds the row with one indexed read; the secret is only ever stored as an argon2id hash; the
checksum (CRC32, as GitHub's tokens carry) lets a mistyped or made-up string be refused without touching
the database or argon2. All parts but the prefix use base62, so a double-click selects the whole key.
"""

import re
import secrets
import zlib
from dataclasses import dataclass

BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
LOOKUP_ID_LENGTH = 16  # ~95 random bits: collisions are not a practical concern
SECRET_LENGTH = 33  # 33 * log2(62) = 196.5 bits, above the 192 we promise
CHECKSUM_LENGTH = 6  # 62**6 > 2**32, so any CRC32 fits
PREFIX_PATTERN = r"[A-Za-z][A-Za-z0-9_]{0,23}_"
MAX_PREFIX_LENGTH = 25  # what PREFIX_PATTERN allows

_KEY = re.compile(
    rf"({PREFIX_PATTERN})([0-9A-Za-z]{{{LOOKUP_ID_LENGTH}}})_"
    rf"([0-9A-Za-z]{{{SECRET_LENGTH}}})([0-9A-Za-z]{{{CHECKSUM_LENGTH}}})"
)
_PREFIX = re.compile(PREFIX_PATTERN)
# What follows a prefix's final `_`. It starts with a literal, which the regex engine finds at C speed, so
# `find` looks only where a key could end its prefix instead of trying a prefix at every position.
_AFTER_PREFIX = re.compile(rf"_[0-9A-Za-z]{{{LOOKUP_ID_LENGTH}}}_[0-9A-Za-z]{{{SECRET_LENGTH + CHECKSUM_LENGTH}}}")
_AFTER_PREFIX_LENGTH = LOOKUP_ID_LENGTH + 1 + SECRET_LENGTH + CHECKSUM_LENGTH


@dataclass(frozen=True, slots=True)
class ParsedKey:
    prefix: str
    lookup_id: str
    secret: str

    def __repr__(self) -> str:  # never let a secret reach a log through repr()
        return f"ParsedKey(prefix={self.prefix!r}, lookup_id={self.lookup_id!r}, secret=<redacted>)"


def is_valid_prefix(prefix: str) -> bool:
    return _PREFIX.fullmatch(prefix) is not None


def _checksum(body: str) -> str:
    value = zlib.crc32(body.encode("ascii"))
    digits = []
    for _ in range(CHECKSUM_LENGTH):
        value, rest = divmod(value, 62)
        digits.append(BASE62[rest])
    return "".join(reversed(digits))


def _random_base62(length: int) -> str:
    return "".join(secrets.choice(BASE62) for _ in range(length))


def new_lookup_id() -> str:
    return _random_base62(LOOKUP_ID_LENGTH)


def generate(prefix: str, lookup_id: str) -> tuple[str, ParsedKey]:
    """A fresh key string for this prefix and lookup id, and its parts."""
    if not is_valid_prefix(prefix):
        raise ValueError(f"key prefix {prefix!r} must match {PREFIX_PATTERN}")
    if len(lookup_id) != LOOKUP_ID_LENGTH or any(c not in BASE62 for c in lookup_id):
        raise ValueError(f"a lookup id is {LOOKUP_ID_LENGTH} base62 characters")
    secret = _random_base62(SECRET_LENGTH)
    body = f"{prefix}{lookup_id}_{secret}"
    return body + _checksum(body), ParsedKey(prefix, lookup_id, secret)


def parse(key: str) -> ParsedKey | None:
    """The parts of a well-formed key string, or None when its shape or checksum is wrong."""
    match = _KEY.fullmatch(key)
    if match is None:
        return None
    prefix, lookup_id, secret, checksum = match.groups()
    body = key[: -CHECKSUM_LENGTH]
    if not secrets.compare_digest(_checksum(body), checksum):
        return None
    return ParsedKey(prefix, lookup_id, secret)


def find(text: str) -> bool:
    """Whether a well-formed key string (checksum included) appears anywhere in `text`, with any of the
    prefixes that end where it starts. Linear in the length: 4 MB without a key takes milliseconds."""
    position = 0
    while (tail := _AFTER_PREFIX.search(text, position)) is not None:
        end = tail.start() + 1  # just after the prefix's final `_`
        for start in range(max(0, end - MAX_PREFIX_LENGTH), end - 1):
            if _PREFIX.fullmatch(text, start, end) and parse(text[start : end + _AFTER_PREFIX_LENGTH]) is not None:
                return True
        position = tail.start() + 1
    return False


def mask(key: str) -> str:
    """Prefix, the start of the lookup id and the last four characters: recognisable, never usable."""
    parsed = _KEY.fullmatch(key)
    if parsed is None:
        raise ValueError("not a key string")
    prefix, lookup_id = parsed.group(1), parsed.group(2)
    return f"{prefix}{lookup_id[:8]}...{key[-4:]}"
