"""What the client commands print: tables and fields for people, proto3 JSON for programs."""

from collections.abc import Callable, Iterable, Sequence
from datetime import UTC
from typing import Any

import click
from google.protobuf import json_format
from google.protobuf.message import Message

from apikeyd.cli.connection import Client
from apikeyd.cli.options import format_rate_limit, format_refill, format_seconds
from apikeyd.v1 import api_keys_pb2 as pb


def printable(text: str) -> str:
    """Names and labels come from other people: never let them drive the terminal."""
    return "".join(c if c.isprintable() else "?" for c in text)


def render_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    cells = [[printable(c) or "-" for c in row] for row in rows]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]
    lines = [headers, *cells]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def render_fields(fields: Iterable[tuple[str, str]]) -> str:
    fields = list(fields)
    width = max(len(label) for label, _ in fields) + 1
    return "\n".join(f"{(label + ':').ljust(width)} {printable(value) or '-'}" for label, value in fields)


def print_json(message: Message) -> None:
    click.echo(
        json_format.MessageToJson(
            message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True, indent=2
        )
    )


def format_time(message: Message, field: str, unset: str = "-") -> str:
    if not message.HasField(field):
        return unset
    return getattr(message, field).ToDatetime(tzinfo=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")  # JSON has the rest


def _state(key: pb.ApiKey) -> str:
    return pb.ApiKey.State.Name(key.state)


def _key_fields(key: pb.ApiKey) -> list[tuple[str, str]]:
    fields = [
        ("name", key.name),
        ("key id", key.key_id),
        ("display name", key.display_name),
        ("description", key.description),
        ("state", _state(key)),
        ("masked key", key.masked_key),
        ("project", key.project_id or "- (account-wide)"),
        ("scopes", ", ".join(key.scopes)),
        ("labels", ", ".join(f"{k}={v}" for k, v in sorted(key.labels.items()))),
        ("rate limits", ", ".join(format_rate_limit(r.limit, r.period.seconds) for r in key.rate_limits)),
        ("expires", format_time(key, "expire_time", "never")),
        ("created", format_time(key, "create_time")),
        ("updated", format_time(key, "update_time")),
        ("last used", format_time(key, "last_used_time", "never")),
    ]
    if key.HasField("revoke_time"):
        reason = f" ({key.revoke_reason})" if key.revoke_reason else ""
        fields.append(("revoked", format_time(key, "revoke_time") + reason))
    if key.HasField("credits"):
        credits = str(key.credits.remaining)
        if key.credits.HasField("refill"):
            credits += f" (refill {format_refill(key.credits.refill)}, next {format_time(key.credits, 'next_refill_time')})"
        fields.append(("credits", credits))
    if key.allowed_ip_ranges:
        fields.append(("allowed IPs", ", ".join(key.allowed_ip_ranges)))
    if key.HasField("previous_secret_expire_time"):
        fields.append(("previous secret until", format_time(key, "previous_secret_expire_time")))
        fields.append(("previous secret used", format_time(key, "previous_secret_last_used_time", "never")))
        if key.HasField("end_grace_after_unused"):
            fields.append(("grace ends early", f"after {format_seconds(key.end_grace_after_unused.seconds)} unused"))
    fields.append(("etag", key.etag))
    return fields


KEY_COLUMNS = ("KEY ID", "DISPLAY NAME", "STATE", "MASKED KEY", "PROJECT", "SCOPES", "CREATED", "LAST USED")


def key_row(key: pb.ApiKey) -> list[str]:
    return [
        key.key_id,
        key.display_name,
        _state(key),
        key.masked_key,
        key.project_id,
        ",".join(key.scopes),
        format_time(key, "create_time"),
        format_time(key, "last_used_time", "never"),
    ]


def show_key(key: pb.ApiKey, as_json: bool) -> None:
    if as_json:
        print_json(key)
    else:
        click.echo(render_fields(_key_fields(key)))


def show_issued(response: Any, what: str, request_id: str, as_json: bool) -> None:
    """create and rotate: the secret alone on stdout (or in the JSON), everything else on stderr."""
    if as_json:
        print_json(response)
    else:
        click.echo(render_fields(_key_fields(response.api_key)), err=True)
    if response.secret_already_delivered:
        click.echo(
            f"note: request id {request_id} was already answered: the key was {what} by that first call and its "
            "secret went out with that answer. apikeyd keeps only a hash, so the secret cannot be shown again; "
            "rotate the key for a new one.",
            err=True,
        )
        return
    if not as_json:
        click.echo(response.secret)
    where = 'the "secret" field above' if as_json else "the key above"
    click.echo(f"note: {where} is shown only now; store it. apikeyd keeps only a hash of it.", err=True)


def show_list(
    client: Client,
    method: str,
    request: Any,
    all_pages: bool,
    as_json: bool,
    field: str,
    columns: Sequence[str],
    row: Callable[[Any], Sequence[str]],
    noun: str,
) -> None:
    """A List call's pages as one response (`field` holds the resources): proto3 JSON, or a table on stdout
    and on stderr how many were shown and whether more follow. No total: counting every match would cost
    as much as reading them all."""
    result = getattr(pb, f"{method}Response")()
    items = getattr(result, field)
    for page in _pages(client, method, request, all_pages):
        items.extend(getattr(page, field))
        result.next_page_token = page.next_page_token
    if as_json:
        print_json(result)
        return
    if items:
        click.echo(render_table(columns, [row(item) for item in items]))
    summary = f"{len(items)} {noun if len(items) == 1 else noun + 's'} shown from {request.parent}"
    if result.next_page_token:
        summary += f"; more follow, next page: --page-token {result.next_page_token} (or --all)"
        if not items:  # terms checked row by row read a bounded number a page (AIP-158)
            summary += f"; none matched among the {noun}s this page read, which is not the end"
    else:
        summary += "; no more pages"
    click.echo(summary, err=True)


def _pages(client: Client, method: str, request: Any, all_pages: bool) -> Iterable[Any]:
    """The first page, and with `all_pages` every next one: it follows next_page_token until there is none,
    whatever the pages hold, since a page may be short or empty while more follow (AIP-158)."""
    seen = set()
    while True:
        page = client.call(method, request)
        yield page
        if not all_pages or not page.next_page_token or page.next_page_token in seen:
            return
        seen.add(page.next_page_token)
        request.page_token = page.next_page_token


