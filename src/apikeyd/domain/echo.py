"""How an error message may repeat what a caller sent.

Messages help the caller fix a request, but they also travel: into logs, traces and the screens of whoever
reads them. A caller who pastes a key into the wrong field must not see it come back, nor make it land in a
log line. So a message never repeats a value whole: `quote` gives at most a short prefix, replaces any
long run of base62 characters (where a secret would sit) with its first few, and names a value that holds
a key string only as such.
"""

import re

from apikeyd.domain import keys
from apikeyd.domain.errors import InvalidArgument

ECHO_LIMIT = 32  # characters of a caller's value a message may repeat
# A secret and its checksum are one run of 39 base62 characters; a lookup id is 16. Anything longer than a
# lookup id is cut to this many characters, so no message carries enough of a secret to matter.
_LONG_RUN = re.compile(r"[0-9A-Za-z]{17,}")
_RUN_KEPT = 4
_LONGEST_KEY = keys.MAX_PREFIX_LENGTH + keys.LOOKUP_ID_LENGTH + 1 + keys.SECRET_LENGTH + keys.CHECKSUM_LENGTH


def quote(value: str) -> str:
    """The caller's value as a message may show it: quoted, short, and never a key or a secret."""
    # Only the head can be shown, so only the head is examined: quoting costs the same for any length.
    head = value[: ECHO_LIMIT + _LONGEST_KEY]
    if keys.find(head):
        return "<a key string>"
    shown = _LONG_RUN.sub(lambda run: run.group()[:_RUN_KEPT] + "…", head)[:ECHO_LIMIT]
    if len(value) > ECHO_LIMIT:
        return f"{shown!r}… ({len(value)} characters)"
    return repr(shown)


def refuse_key(field: str, value: str) -> str:
    """`value` unchanged, or InvalidArgument when it holds a key string: a key pasted into an id, a name or
    a free-text field would be stored, listed and logged as plain text. Cheap for anything shorter than a
    key, as ids and names mostly are."""
    if keys.find(value):
        raise InvalidArgument(
            field, "holds an API key string; a key goes only where a credential is asked for, never in "
            f"{field} (if it was shared by mistake, rotate it)"
        )
    return value
