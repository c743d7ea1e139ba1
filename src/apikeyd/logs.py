"""Log lines: one JSON object per line (`APIKEYD_LOG_FORMAT=json`, the default) or plain text.

A JSON line has `time` (UTC, ISO 8601), `level`, `logger` and `message`, then the fields the call site
gave with `extra=fields(...)` (`event`, `key`, `account`, `actor`, ...), and, for a line logged while a gRPC
call is served, that call's `method`, `peer` and `request_id`. The request id is the call's `x-request-id`
metadata when it has a usable one (a short, plain token that holds no key string), else one made up for
the call; it is worked out only when the call logs something, so a call that logs nothing (a cached
Authorize) pays one small tuple and a context variable.

What goes into a line is chosen by its call site: never a presented key, a secret or a hash. A traceback
tells a database error without the values it quotes (apikeyd.exception_text).
"""

import contextvars
import itertools
import json
import logging
import re
import secrets
import time
from datetime import UTC, datetime
from typing import Any, TextIO

from apikeyd.domain import keys
from apikeyd.exception_text import format_exception

FORMATS = ("json", "text")
# What APIKEYD_LOG_FORMAT takes: a format, or auto: text for a person at a terminal, JSON for a log collector.
SETTINGS = ("auto", *FORMATS)
REQUEST_ID_METADATA = "x-request-id"
_USABLE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
_FIELDS = "fields"  # the LogRecord attribute that `fields()` sets


def fields(**values: Any) -> dict[str, Any]:
    """`log.info("...", extra=fields(event="key.created", key=name))`: structured fields of one line."""
    return {_FIELDS: values}


# The call a task is serving: (grpc context, method, sequence number), set by grpc_errors at the start of each
# call. grpc.aio serves each call in a task of its own, so the value is scoped to that call. A tuple, not an
# object, because every call pays for making it.
Call = tuple[Any, str, int]
CURRENT_CALL: contextvars.ContextVar[Call | None] = contextvars.ContextVar("apikeyd_call", default=None)
_sequence = itertools.count(1)
next_call_number = _sequence.__next__
# Made-up request ids look like UUIDs: 74 random bits for this process, then the call's sequence number.
_PROCESS_PART = f"{secrets.randbits(32):08x}-{secrets.randbits(16):04x}-4{secrets.randbits(12):03x}-" + (
    f"{8 | secrets.randbits(2):x}{secrets.randbits(12):03x}-"
)


def bind_call(context: Any, method: str) -> None:
    """At the start of a call: the lines it logs carry its method, peer and request id."""
    CURRENT_CALL.set((context, method, next_call_number()))


def request_id(call: Call) -> str:
    """The call's usable `x-request-id` metadata, else its made-up id (the same for every line)."""
    context, _, number = call
    for name, value in context.invocation_metadata() or ():
        if name == REQUEST_ID_METADATA:
            text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
            # A client's id goes into every line of its call: only a short, plain token is taken, and never a
            # key a client put there by mistake (its call goes on, logged under a made-up id).
            if _USABLE_REQUEST_ID.fullmatch(text) and not keys.find(text):
                return text
            break
    return f"{_PROCESS_PART}{number & 0xFFFFFFFFFFFF:012x}"


def _peer(call: Call) -> str:
    return str(call[0].peer() or "")


def current_request_id() -> str:
    """The request id of the call being served, or "" outside one."""
    call = CURRENT_CALL.get()
    return "" if call is None else request_id(call)


def _call_fields() -> dict[str, str]:
    call = CURRENT_CALL.get()
    if call is None:
        return {}
    return {"method": call[1], "peer": _peer(call), "request_id": request_id(call)}


class _Formatter(logging.Formatter):
    """Tracebacks as apikeyd.exception_text writes them: a database error without the values it quotes."""

    def formatException(self, ei: Any) -> str:
        return format_exception(ei[1]) if ei[1] is not None else super().formatException(ei)


class JsonFormatter(_Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")[:-6] + "Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in _call_fields().items():
            entry.setdefault(name, value)
        for name, value in (getattr(record, _FIELDS, None) or {}).items():
            if name not in ("time", "level", "logger", "message"):
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)


class TextFormatter(_Formatter):
    """The message as a person reads it, with the request id of the call it belongs to."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        # Not the traceback another handler may have cached on the record, which may quote a row.
        cached, record.exc_text = record.exc_text, None
        try:
            text = super().format(record)
        finally:
            record.exc_text = cached
        call = CURRENT_CALL.get()
        return text if call is None else f"{text} [request_id={request_id(call)}]"


def formatter(log_format: str) -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter()
    if log_format == "text":
        return TextFormatter()
    raise ValueError(f"APIKEYD_LOG_FORMAT={log_format!r} must be one of {', '.join(SETTINGS)}")


def stream_handler(log_format: str, stream: TextIO) -> logging.Handler:
    if log_format == "auto":
        log_format = "text" if stream.isatty() else "json"
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter(log_format))
    return handler


class Throttle:
    """At most one WARNING line per `every` seconds from a source a caller can trigger at will (garbled
    requests, a misconfigured route), so that nobody can fill the log; the next line says how many were
    left out."""

    def __init__(self, logger: logging.Logger, every: float) -> None:
        self._logger = logger
        self.every = every
        self._last = -float("inf")
        self._left_out = 0

    def warning(self, message: str, *args: Any, event: str, **values: Any) -> None:
        now = time.monotonic()
        if now - self._last < self.every:
            self._left_out += 1
            return
        left_out, self._last, self._left_out = self._left_out, now, 0
        if left_out:
            message, args = message + "; %d more since the last such warning", (*args, left_out)
        self._logger.warning(message, *args, extra=fields(event=event, left_out=left_out, **values))
