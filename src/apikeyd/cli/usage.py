"""`apikeyd keys usage`: how keys were used, Authorize outcomes per key and time bucket (ListApiKeyUsage)."""

import re
from datetime import UTC, datetime

import click

from apikeyd.cli.connection import Client, connection_options
from apikeyd.cli.options import account_parent, json_option, key_name, parse_duration, parse_time, timestamp
from apikeyd.cli.output import format_time, show_list
from apikeyd.v1 import api_keys_pb2 as pb

_GRANULARITIES = {"minute": pb.MINUTE, "hour": pb.HOUR, "day": pb.DAY}
# Without --since: the last hour of minutes, the last day of hours, the last 30 days of days.
_DEFAULT_SINCE = {"minute": "1h", "hour": "24h", "day": "30d"}
USAGE_COLUMNS = ("KEY ID", "START", "TOTAL", "OK", "DENIED")


def parse_when(text: str, now: datetime | None = None) -> datetime:
    """A duration back from now (`7d`, `12h`) or an RFC 3339 time. Raises ValueError."""
    value = text.strip().lower()
    if value[:1].isdigit() and not re.match(r"\d{4}-", value):
        return (now or datetime.now(UTC)) - parse_duration(value)
    return parse_time(text)


class _When(click.ParamType):
    name = "duration|time"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            return parse_when(str(value))
        except (ValueError, OverflowError) as error:
            self.fail(str(error), param, ctx)


def _row(usage: pb.ApiKeyUsage) -> list[str]:
    denied = sorted((pb.AuthorizeResponse.Code.Value(code), code, n) for code, n in usage.counts.items() if code != "OK")
    return [
        usage.key_id,
        format_time(usage, "start_time"),
        str(usage.total),
        str(usage.counts.get("OK", 0)),
        " ".join(f"{code}={n}" for _, code, n in denied),
    ]


@click.command("usage")
@click.argument("key", metavar="KEY")
@click.option("--account", default=None, help="the account, e.g. acme (with KEY a key id or -)")
@click.option("--key-id", "key_ids", multiple=True, help="with KEY -: only this key; repeatable, up to 1000")
@click.option("--granularity", type=click.Choice(tuple(_GRANULARITIES)), default="hour", show_default=True)
@click.option("--since", type=_When(), help="7d, 12h (back from now) or an RFC 3339 time; default 1h of minutes, 24h of hours, 30d of days")
@click.option("--until", type=_When(), help="like --since; default now")
@click.option("--page-size", type=click.IntRange(1, 10000), help="buckets per page (server default 1000)")
@click.option("--page-token", default="", help="continue from an earlier page")
@click.option("--all", "all_pages", is_flag=True, help="fetch every page")
@json_option
@connection_options
def keys_usage(
    client: Client,
    key: str,
    account: str | None,
    key_ids: tuple[str, ...],
    granularity: str,
    since: datetime | None,
    until: datetime | None,
    page_size: int | None,
    page_token: str,
    all_pages: bool,
    as_json: bool,
) -> None:
    """Show how a key was used: its Authorize outcomes per minute, hour or day, oldest first.

    KEY is a key (its full name, or its id with --account), or - with --account for every key of the
    account (a project key sees its project's); --key-id narrows - to some keys. The newest bucket may
    trail by the server's flush interval (APIKEYD_LAST_USED_FLUSH_INTERVAL).
    """
    if key.strip() == "-":
        if account is None:
            raise click.UsageError("KEY - means every key of an account: pass --account ACCOUNT")
        parent = f"{account_parent(account)}/apiKeys/-"
    else:
        if key_ids:
            raise click.UsageError("--key-id is for KEY - (every key of --account); this KEY names one key")
        parent = key_name(key, account)
    request = pb.ListApiKeyUsageRequest(
        parent=parent,
        granularity=_GRANULARITIES[granularity],
        start_time=timestamp(since or parse_when(_DEFAULT_SINCE[granularity])),
        key_ids=list(key_ids),
        page_size=page_size or 0,
        page_token=page_token,
    )
    if until is not None:
        request.end_time.CopyFrom(timestamp(until))
    show_list(client, "ListApiKeyUsage", request, all_pages, as_json, "usage", USAGE_COLUMNS, _row, "bucket")
