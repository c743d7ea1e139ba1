"""Parsing of what a user types: durations, times, rate limits, labels, key names, and the click options and
parameter types built on them, so that a bad value is a usage error (exit 2) naming the option."""

import re
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import click
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from apikeyd.domain.echo import quote
from apikeyd.v1 import api_keys_pb2 as pb

_UNITS = {
    **dict.fromkeys(("s", "sec", "secs", "second", "seconds"), 1),
    **dict.fromkeys(("m", "min", "mins", "minute", "minutes"), 60),
    **dict.fromkeys(("h", "hr", "hrs", "hour", "hours"), 3600),
    **dict.fromkeys(("d", "day", "days"), 86400),
    **dict.fromkeys(("w", "week", "weeks"), 7 * 86400),
}
_DURATION = re.compile(r"(?:\d+\s*[a-z]+\s*)+")
_DURATION_PART = re.compile(r"(\d+)\s*([a-z]+)")
_RATE_LIMIT = re.compile(r"(\d+)\s*/\s*(\d*)\s*([a-z]+)")
_MAX_INT64 = 2**63 - 1
NEVER = "never"  # --expires never: no expiry (on update: clear it)
MAX_TIMEOUT = 86400


def parse_duration(text: str) -> timedelta:
    """`90d`, `12h`, `30m`, `2w`, `45s`, `1h30m`; a bare `0` is zero. Raises ValueError."""
    value = text.strip().lower()
    if value == "0":
        return timedelta(0)
    if not _DURATION.fullmatch(value):
        raise ValueError(
            f"{quote(text)} is not a duration: use a number and a unit, like 90d, 12h, 30m, 2w or 45s"
        )
    seconds = 0
    for number, unit in _DURATION_PART.findall(value):
        if unit not in _UNITS:
            raise ValueError(f"{quote(text)}: unknown unit {quote(unit)}; use s, m, h, d or w")
        seconds += int(number) * _UNITS[unit]
    try:
        return timedelta(seconds=seconds)
    except OverflowError:
        raise ValueError(f"{quote(text)} is too long") from None


def parse_time(text: str) -> datetime:
    """An RFC 3339 time with a zone, e.g. `2030-01-01T00:00:00Z`. Raises ValueError."""
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{quote(text)} is not an RFC 3339 time like 2030-01-01T00:00:00Z") from None
    if value.tzinfo is None:
        raise ValueError(f"{quote(text)} has no time zone: add Z (UTC) or an offset like +02:00")
    return value.astimezone(UTC)


def parse_expires(text: str, now: datetime | None = None) -> datetime | str:
    """`never`, a duration from now (`90d`; whole seconds), or an RFC 3339 time. Raises ValueError."""
    value = text.strip().lower()
    if value in ("never", "none"):
        return NEVER
    if value[:1].isdigit() and _DURATION.fullmatch(value):
        delta = parse_duration(value)
        if not delta:
            raise ValueError(f"{quote(text)}: an expiry must be in the future")
        try:
            return ((now or datetime.now(UTC)) + delta).replace(microsecond=0)
        except OverflowError:
            raise ValueError(f"{quote(text)} is too far in the future") from None
    if re.match(r"\d{4}-", value):
        return parse_time(text)
    raise ValueError(
        f"{quote(text)} is neither a duration (90d, 12h, 30m, 2w) nor an RFC 3339 time (2030-01-01T00:00:00Z)"
    )


def parse_rate_limit(text: str) -> tuple[int, int]:
    """`50/min`, `2/s`, `1000/hour`, `10000/day`, `100/10s`: (limit, period in seconds). Raises ValueError."""
    match = _RATE_LIMIT.fullmatch(text.strip().lower())
    if match is None:
        raise ValueError(
            f"{quote(text)} is not a rate limit: use LIMIT/PERIOD, like 50/min, 2/s, 1000/hour or 100/10s"
        )
    limit, count, unit = int(match[1]), int(match[2] or 1), match[3]
    if unit not in _UNITS:
        raise ValueError(f"{quote(text)}: unknown unit {quote(unit)}; use s/sec/second, min/minute, h/hour or d/day")
    period = count * _UNITS[unit]
    if not 1 <= limit <= _MAX_INT64:
        raise ValueError(f"{quote(text)}: the limit must be at least 1")
    if not 1 <= period <= 86400:
        raise ValueError(f"{quote(text)}: the period must be from 1 second to 1 day")
    return limit, period


def format_rate_limit(limit: int, period_seconds: int) -> str:
    for unit, size in (("day", 86400), ("h", 3600), ("min", 60)):
        if period_seconds % size == 0:
            count = period_seconds // size
            return f"{limit}/{unit}" if count == 1 else f"{limit}/{count}{unit}"
    return f"{limit}/s" if period_seconds == 1 else f"{limit}/{period_seconds}s"


def format_seconds(seconds: float) -> str:
    if seconds and seconds % 86400 == 0:
        return f"{seconds // 86400:g}d"
    if seconds and seconds % 3600 == 0:
        return f"{seconds // 3600:g}h"
    if seconds and seconds % 60 == 0:
        return f"{seconds // 60:g}m"
    return f"{seconds:g}s"


def rfc3339(value: datetime) -> str:
    value = value.astimezone(UTC)
    text = value.strftime("%Y-%m-%dT%H:%M:%S")
    if value.microsecond:
        text += f".{value.microsecond:06d}".rstrip("0")
    return text + "Z"


def account_parent(account: str) -> str:
    """`acme` or `accounts/acme` -> `accounts/acme`."""
    account = account.strip()
    account = account.removeprefix("accounts/")
    if not account or "/" in account:
        raise click.BadParameter(
            f"{quote(account)}: give an account id like acme (or accounts/acme)", param_hint="--account"
        )
    return f"accounts/{account}"


def key_name(key: str, account: str | None) -> str:
    """A key given by its full name `accounts/A/apiKeys/ID`, or by its id with `--account A`."""
    key = key.strip()
    if key.startswith("accounts/"):
        parts = key.split("/")
        if len(parts) != 4 or parts[2] != "apiKeys" or not parts[1] or not parts[3]:
            raise click.BadParameter(
                f"{quote(key)} is not a key name like accounts/acme/apiKeys/<key id>", param_hint="KEY"
            )
        if account is not None and account_parent(account) != f"accounts/{parts[1]}":
            raise click.UsageError(f"{quote(key)} is not in --account {quote(account)}")
        return key
    if account is None:
        raise click.UsageError(
            "name the key by its full name (accounts/ACCOUNT/apiKeys/ID) or pass --account ACCOUNT"
        )
    if not key or "/" in key:
        raise click.BadParameter(f"{quote(key)} is not a key id", param_hint="KEY")
    return f"{account_parent(account)}/apiKeys/{key}"

# ---------------------------------------------------------------------------------------------------------
# click parameter types: a bad value is a usage error (exit 2) naming the option.


class _Parsed(click.ParamType):
    def __init__(self, name: str, parse: Callable[[str], Any]) -> None:
        self.name = name
        self._parse = parse

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return self._parse(value)
        except ValueError as error:
            self.fail(str(error), param, ctx)


def _parse_label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"{quote(text)} is not a label: use KEY=VALUE, like env=prod")
    return key.strip(), value.strip()


def _parse_request_id(text: str) -> str:
    try:
        return str(uuid.UUID(text.strip()))
    except ValueError:
        raise ValueError(f"{quote(text)} is not a UUID") from None


def parse_timeout(text: str) -> float:
    """Seconds to wait for an answer: more than 0, at most a day (a number grpc takes as a deadline)."""
    try:
        seconds = float(text)
    except ValueError:
        raise ValueError(f"{quote(text)} is not a number of seconds") from None
    if not 0 < seconds <= MAX_TIMEOUT:  # NaN fails this too
        raise ValueError(f"{quote(text)}: give more than 0 and at most {MAX_TIMEOUT} seconds")
    return seconds


def parse_refill(text: str) -> pb.CreditRefill:
    """`AMOUNT/day` (at 00:00 UTC), `AMOUNT/month` (on the 1st) or `AMOUNT/DURATION` (e.g. 500/12h)."""
    amount, sep, interval = text.strip().lower().partition("/")
    if not sep or not amount.strip().isdigit():
        raise ValueError(f"{quote(text)} is not a refill: use AMOUNT/INTERVAL, like 1000/day, 50000/month or 500/12h")
    refill = pb.CreditRefill(amount=int(amount))
    interval = interval.strip()
    if interval in ("day", "daily"):
        refill.calendar = pb.CreditRefill.DAILY
    elif interval in ("month", "monthly"):
        refill.calendar = pb.CreditRefill.MONTHLY
    else:
        refill.every.FromTimedelta(parse_duration(interval))
    return refill


def format_refill(refill: pb.CreditRefill) -> str:
    if refill.HasField("calendar"):
        interval = "day" if refill.calendar == pb.CreditRefill.DAILY else "month"
    else:
        interval = format_seconds(refill.every.seconds)
    mode = "add" if refill.mode == pb.CreditRefill.ADD else "replace"
    return f"{refill.amount}/{interval} {mode}" + (f" up to {refill.cap}" if refill.cap else "")


MAX_GRACE = timedelta(days=7)  # the server's bound (domain/model.py), known here so a typo is a usage error


def parse_grace(text: str) -> timedelta:
    grace = parse_duration(text)
    if grace > MAX_GRACE:
        raise ValueError(f"{quote(text)} is longer than 7 days, the longest grace a rotation may have")
    return grace


DURATION = _Parsed("duration", parse_duration)
GRACE = _Parsed("duration", parse_grace)
REFILL = _Parsed("amount/interval", parse_refill)
EXPIRES = _Parsed("duration|time", parse_expires)
RATE_LIMIT = _Parsed("limit/period", parse_rate_limit)
LABEL = _Parsed("key=value", _parse_label)
REQUEST_ID = _Parsed("uuid", _parse_request_id)
TIMEOUT = _Parsed("seconds", parse_timeout)


def label_map(pairs: Sequence[tuple[str, str]]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for key, value in pairs:
        if key in labels:
            raise click.BadParameter(f"label {quote(key)} is given twice", param_hint="--label")
        labels[key] = value
    return labels


def rate_limit_messages(values: Sequence[tuple[int, int]]) -> list[pb.RateLimit]:
    return [pb.RateLimit(limit=limit, period=Duration(seconds=period)) for limit, period in values]


def timestamp(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp

def json_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="print one proto3 JSON document on stdout")(
        function
    )


def account_option(required: bool) -> Callable[..., Any]:
    # No `default=None` when required: click (8.2 on) takes an explicit default, None included, as given, so
    # a missing --account reached the code as None instead of being a usage error.
    if required:
        return click.option("--account", required=True, help="the account, e.g. acme")
    return click.option("--account", default=None, help="the account, e.g. acme (with KEY a key id, not a full name)")


def key_argument(function: Callable[..., Any]) -> Callable[..., Any]:
    function = click.argument("key", metavar="KEY")(function)
    return account_option(required=False)(function)


def etag_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--etag", default="", help="only if the key's etag is still this one; a stale one gets ABORTED"
    )(function)


def allow_self_option(action: str) -> Callable[..., Any]:
    return click.option(
        "--allow-self", is_flag=True, help=f"allow the call to {action} the key it is made with (--token)"
    )

def paging_options(noun: str, example: str) -> Callable[[Any], Any]:
    """--filter, --page-size, --page-token and --all, as every List method takes them."""

    def apply(command: Any) -> Any:
        for option in reversed(
            (
                click.option("--filter", "filter_", default="", help=f"e.g. {example}"),
                click.option("--page-size", type=click.IntRange(1, 1000), help=f"{noun} per page (server default 50)"),
                click.option("--page-token", default="", help="continue from an earlier page"),
                click.option("--all", "all_pages", is_flag=True, help="fetch every page"),
            )
        ):
            command = option(command)
        return command

    return apply


