"""What a log line may say about an exception.

A database error carries the values of the statement that failed: SQLAlchemy appends the parameters (hidden
by `hide_parameters` on every engine, see store.repository), and PostgreSQL's own message lines quote row
values: `DETAIL: Failing row contains (...)` lists a whole row, secret hash included, and `Key (x)=(...)`
the value of a unique key. So a database error is told by its type, SQLSTATE, the names of the constraint,
table and column, and its SQL statement (whose values are bound, never inlined), never by the server's
message text. A client-side driver error (no SQLSTATE: a refused connection, a NUL character) keeps its
first line, which names hosts and limits, not rows. Every other exception reads as Python prints it.
"""

import sys
import traceback
from typing import Any

_CAUSE = "\nThe above exception was the direct cause of the following exception:\n\n"
_CONTEXT = "\nDuring handling of the above exception, another exception occurred:\n\n"
_REASON_LIMIT = 300  # characters of a one-line reason


def _kind(module: str, name: str) -> Any:
    """A database library's exception class, or a class nothing is an instance of when that library was never
    imported (then no error can be one of its): the client commands log through here and must not pay for
    importing SQLAlchemy and psycopg."""
    loaded = sys.modules.get(module)
    return getattr(loaded, name) if loaded is not None else ()


def _name(error: BaseException) -> str:
    kind = type(error)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def _driver_text(error: BaseException) -> str:
    if isinstance(error, _kind("psycopg", "Error")) and error.sqlstate:
        diag = error.diag
        names = [
            f"{what} {value}"
            for what, value in (
                ("table", diag.table_name), ("column", diag.column_name), ("constraint", diag.constraint_name)
            )
            if value
        ]
        return f"SQLSTATE {error.sqlstate}" + (f" on {', '.join(names)}" if names else "")
    text = str(error)
    return text.splitlines()[0] if text else ""


def _message(error: BaseException) -> str | None:
    """The message of a database error as a log may show it; None for any other exception."""
    if isinstance(error, _kind("sqlalchemy.exc", "StatementError")):
        orig = error.orig
        text = f"({_name(orig)}) {_driver_text(orig)}" if orig is not None else ""
        return text + (f"\n[SQL: {error.statement}]" if error.statement else "")
    if isinstance(error, _kind("psycopg", "Error")):
        return _driver_text(error)
    return None


def describe(error: BaseException) -> str:
    """`Type: message` on one line, short, for a log line's reason (feed lost, database unreachable)."""
    message = _message(error)
    if message is None:
        text = str(error)
        message = text.splitlines()[0] if text else ""
    else:
        message = message.splitlines()[0]
    return f"{type(error).__name__}: {message}"[:_REASON_LIMIT]


def _one(error: BaseException) -> str:
    lines = ["Traceback (most recent call last):\n", *traceback.format_tb(error.__traceback__)] if error.__traceback__ else []
    message = _message(error)
    if message is None:
        lines += traceback.format_exception_only(type(error), error)
    else:
        lines.append(f"{_name(error)}: {message}\n")
    return "".join(lines)


def format_exception(error: BaseException) -> str:
    """The traceback of `error` and the exceptions it was raised from, as Python prints it, with each
    database error's message replaced as above."""
    chain: list[tuple[BaseException, str]] = []  # newest first, each with how the next (older) one led to it
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if current.__cause__ is not None:
            older, link = current.__cause__, _CAUSE
        elif current.__context__ is not None and not current.__suppress_context__:
            older, link = current.__context__, _CONTEXT
        else:
            older, link = None, ""
        chain.append((current, link))
        current = older
    parts = []
    for index in range(len(chain) - 1, -1, -1):
        parts.append(_one(chain[index][0]))
        if index:
            parts.append(chain[index - 1][1])
    return "".join(parts).rstrip("\n")

