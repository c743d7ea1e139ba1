"""`apikeyd keys ...`: create, list, get, update, disable, enable, revoke, delete, rotate."""

import uuid
from datetime import datetime, timedelta
from typing import Any

import click
from google.protobuf.field_mask_pb2 import FieldMask

from apikeyd.cli.connection import EXIT_ERROR, Client, CommandError, connection_options
from apikeyd.cli.options import (
    DURATION,
    EXPIRES,
    GRACE,
    LABEL,
    RATE_LIMIT,
    REFILL,
    REQUEST_ID,
    account_option,
    account_parent,
    allow_self_option,
    etag_option,
    json_option,
    key_argument,
    key_name,
    label_map,
    paging_options,
    rate_limit_messages,
    rfc3339,
    timestamp,
)
from apikeyd.cli.output import KEY_COLUMNS, key_row, print_json, printable, show_issued, show_key, show_list
from apikeyd.v1 import api_keys_pb2 as pb


@click.group("keys")
def keys() -> None:
    """Create, list, change and remove API keys (apikeyd.v1.ApiKeyService).

    A key is named by its full name (accounts/acme/apiKeys/<key id>) or by --account acme and its key id.
    The server and the credential come from --address and --token, or APIKEYD_ADDRESS and APIKEYD_TOKEN.
    """


_REFILL_MODES = {"replace": pb.CreditRefill.REPLACE, "add": pb.CreditRefill.ADD}


def credit_options(function: Any) -> Any:
    """--credits, --refill, --refill-mode, --refill-cap and --allowed-ip, for create and update."""
    for option in reversed(
        (
            click.option("--credits", type=click.IntRange(0), help="uses the key may make; each allowed check spends its cost"),
            click.option("--refill", type=REFILL, help="credits given back: 1000/day, 50000/month or 500/12h"),
            click.option(
                "--refill-mode", type=click.Choice(tuple(_REFILL_MODES)),
                help="replace: the balance becomes the amount [default]; add: the amount is added, up to --refill-cap",
            ),
            click.option("--refill-cap", type=click.IntRange(1), help="with --refill-mode add: the most the balance grows to"),
            click.option(
                "--allowed-ip", "allowed_ips", multiple=True,
                help="a CIDR range (203.0.113.0/24, 2001:db8::/32) or address the key may be used from; repeatable",
            ),
        )
    ):
        function = option(function)
    return function


def _refill(refill: pb.CreditRefill | None, mode: str | None, cap: int | None) -> pb.CreditRefill | None:
    if refill is None:
        if mode is not None or cap is not None:
            raise click.UsageError("--refill-mode and --refill-cap need --refill")
        return None
    if mode is not None:
        refill.mode = _REFILL_MODES[mode]
    if cap is not None:
        refill.cap = cap
    return refill


@keys.command("create")
@account_option(required=True)
@click.option("--display-name", required=True, help="what the key is for, 1 to 255 characters")
@click.option(
    "--scope",
    "scopes",
    multiple=True,
    required=True,
    help="a scope to grant, e.g. messages:send:{example.com}; repeatable",
)
@click.option("--project", default="", help="make a project key, usable only for this project")
@click.option("--description", default="", help="up to 1024 characters")
@click.option("--label", "labels", multiple=True, type=LABEL, help="KEY=VALUE; repeatable")
@click.option(
    "--expires", type=EXPIRES, help="90d, 12h, 30m, 2w (from now) or an RFC 3339 time; default never"
)
@click.option(
    "--rate-limit",
    "rate_limits",
    multiple=True,
    type=RATE_LIMIT,
    help="e.g. 50/min, 2/s, 100/10s; repeatable, all must hold",
)
@credit_options
@click.option("--request-id", type=REQUEST_ID, help="a UUID making a retry safe; default a fresh one")
@json_option
@connection_options
def keys_create(
    client: Client,
    account: str,
    display_name: str,
    scopes: tuple[str, ...],
    project: str,
    description: str,
    labels: tuple[tuple[str, str], ...],
    expires: datetime | str | None,
    rate_limits: tuple[tuple[int, int], ...],
    credits: int | None,
    refill: pb.CreditRefill | None,
    refill_mode: str | None,
    refill_cap: int | None,
    allowed_ips: tuple[str, ...],
    request_id: str | None,
    as_json: bool,
) -> None:
    """Create a key and print its secret, the key string, once.

    The secret goes alone to stdout (KEY=$(apikeyd keys create ...) works); the key's details and notes go
    to stderr. With --json, one JSON document with the key and its "secret".
    """
    api_key = pb.ApiKey(
        display_name=display_name,
        scopes=list(scopes),
        project_id=project,
        description=description,
        labels=label_map(labels),
        rate_limits=rate_limit_messages(rate_limits),
        allowed_ip_ranges=list(allowed_ips),
    )
    refill = _refill(refill, refill_mode, refill_cap)
    if credits is None and refill is not None:
        raise click.UsageError("--refill needs --credits, the balance to start with")
    if credits is not None:
        api_key.credits.remaining = credits
        if refill is not None:
            api_key.credits.refill.CopyFrom(refill)
    if isinstance(expires, datetime):
        api_key.expire_time.CopyFrom(timestamp(expires))
    request_id = request_id or str(uuid.uuid4())
    hint = f"--request-id {request_id}" + (
        f" --expires {rfc3339(expires)}" if isinstance(expires, datetime) else ""
    )
    request = pb.CreateApiKeyRequest(parent=account_parent(account), api_key=api_key, request_id=request_id)
    try:
        response = client.call("CreateApiKey", request, retry_hint=hint)
    except CommandError as error:
        code, _, message = error.message.partition(": ")
        if isinstance(expires, datetime) and code == "INVALID_ARGUMENT" and message.startswith("request_id"):
            message += (
                "; note that --expires given as a duration counts from now, so it differs on a retry: "
                "retry with the RFC 3339 time printed when the first call failed"
            )
            raise CommandError(code, message, error.exit_code) from None
        raise
    show_issued(response, "created", request_id, as_json)


@keys.command("list")
@account_option(required=True)
@paging_options("keys", 'state = ACTIVE AND labels.env = "prod"')
@json_option
@connection_options
def keys_list(
    client: Client,
    account: str,
    filter_: str,
    page_size: int | None,
    page_token: str,
    all_pages: bool,
    as_json: bool,
) -> None:
    """List an account's keys, oldest first."""
    request = pb.ListApiKeysRequest(
        parent=account_parent(account), filter=filter_, page_size=page_size or 0, page_token=page_token
    )
    show_list(client, "ListApiKeys", request, all_pages, as_json, "api_keys", KEY_COLUMNS, key_row, "key")


@keys.command("get")
@key_argument
@json_option
@connection_options
def keys_get(client: Client, key: str, account: str | None, as_json: bool) -> None:
    """Show a key (never its secret)."""
    show_key(client.call("GetApiKey", pb.GetApiKeyRequest(name=key_name(key, account))), as_json)


@keys.command("update")
@key_argument
@click.option("--display-name", help="a new display name")
@click.option("--description", help="a new description ('' to clear)")
@click.option("--scope", "scopes", multiple=True, help="the new scopes, replacing all; repeatable")
@click.option(
    "--label", "labels", multiple=True, type=LABEL, help="KEY=VALUE, replacing all labels; repeatable"
)
@click.option("--clear-labels", is_flag=True, help="remove every label")
@click.option("--expires", type=EXPIRES, help="90d, 12h, 30m, 2w (from now), an RFC 3339 time, or never")
@click.option("--rate-limit", "rate_limits", multiple=True, type=RATE_LIMIT, help="replacing all; repeatable")
@click.option("--clear-rate-limits", is_flag=True, help="remove every rate limit")
@credit_options
@click.option("--clear-credits", is_flag=True, help="remove the credits: unlimited uses")
@click.option("--clear-refill", is_flag=True, help="keep the balance, stop refilling it")
@click.option("--clear-allowed-ips", is_flag=True, help="allow every address")
@etag_option
@allow_self_option("narrow the scopes, expiry, rate limits, credits or addresses of")
@json_option
@connection_options
def keys_update(
    client: Client,
    key: str,
    account: str | None,
    display_name: str | None,
    description: str | None,
    scopes: tuple[str, ...],
    labels: tuple[tuple[str, str], ...],
    clear_labels: bool,
    expires: datetime | str | None,
    rate_limits: tuple[tuple[int, int], ...],
    clear_rate_limits: bool,
    credits: int | None,
    refill: pb.CreditRefill | None,
    refill_mode: str | None,
    refill_cap: int | None,
    allowed_ips: tuple[str, ...],
    clear_credits: bool,
    clear_refill: bool,
    clear_allowed_ips: bool,
    etag: str,
    allow_self: bool,
    as_json: bool,
) -> None:
    """Change the fields given, and only those (the update_mask names exactly them).

    --credits sets the balance (the refill stays); --refill changes the refill (the balance stays); both
    together replace the credits as a whole, as they do on a key that has none yet."""
    if labels and clear_labels:
        raise click.UsageError("--label and --clear-labels exclude each other")
    if rate_limits and clear_rate_limits:
        raise click.UsageError("--rate-limit and --clear-rate-limits exclude each other")
    api_key = pb.ApiKey(name=key_name(key, account), etag=etag)
    paths = []
    if display_name is not None:
        api_key.display_name = display_name
        paths.append("display_name")
    if description is not None:
        api_key.description = description
        paths.append("description")
    if scopes:
        api_key.scopes.extend(scopes)
        paths.append("scopes")
    if labels or clear_labels:
        api_key.labels.update(label_map(labels))
        paths.append("labels")
    if expires is not None:
        if isinstance(expires, datetime):
            api_key.expire_time.CopyFrom(timestamp(expires))
        paths.append("expire_time")
    if rate_limits or clear_rate_limits:
        api_key.rate_limits.extend(rate_limit_messages(rate_limits))
        paths.append("rate_limits")
    if allowed_ips and clear_allowed_ips:
        raise click.UsageError("--allowed-ip and --clear-allowed-ips exclude each other")
    if allowed_ips or clear_allowed_ips:
        api_key.allowed_ip_ranges.extend(allowed_ips)
        paths.append("allowed_ip_ranges")
    paths += _credit_paths(client, api_key, credits, _refill(refill, refill_mode, refill_cap), clear_credits, clear_refill)
    if not paths:
        raise click.UsageError(
            "nothing to update: give --display-name, --description, --scope, --label, --clear-labels, "
            "--expires, --rate-limit, --clear-rate-limits, --credits, --refill, --clear-credits, --clear-refill, "
            "--allowed-ip or --clear-allowed-ips"
        )
    request = pb.UpdateApiKeyRequest(api_key=api_key, update_mask=FieldMask(paths=paths), allow_self=allow_self)
    show_key(client.call("UpdateApiKey", request), as_json)


def _credit_paths(
    client: Client,
    api_key: pb.ApiKey,
    credits: int | None,
    refill: pb.CreditRefill | None,
    clear_credits: bool,
    clear_refill: bool,
) -> list[str]:
    """The update mask's credit paths, with their values set on `api_key`."""
    if clear_credits and (credits is not None or refill is not None or clear_refill):
        raise click.UsageError("--clear-credits excludes --credits, --refill and --clear-refill")
    if clear_refill and refill is not None:
        raise click.UsageError("--refill and --clear-refill exclude each other")
    if clear_credits:
        return ["credits"]
    if credits is None and refill is None and not clear_refill:
        return []
    if credits is not None:
        api_key.credits.remaining = credits
    if refill is not None:
        api_key.credits.refill.CopyFrom(refill)
    if credits is not None and (refill is not None or clear_refill):
        return ["credits"]
    has_credits = client.call("GetApiKey", pb.GetApiKeyRequest(name=api_key.name)).HasField("credits")
    if credits is not None:
        return ["credits.remaining" if has_credits else "credits"]
    if not has_credits:
        raise click.UsageError("the key has no credits: give --credits too, the balance to start with")
    return ["credits.refill"]


def _set_state(client: Client, name: str, state: Any, etag: str, allow_self: bool, as_json: bool) -> None:
    request = pb.UpdateApiKeyRequest(
        api_key=pb.ApiKey(name=name, state=state, etag=etag),
        update_mask=FieldMask(paths=["state"]),
        allow_self=allow_self,
    )
    show_key(client.call("UpdateApiKey", request), as_json)


@keys.command("disable")
@key_argument
@etag_option
@allow_self_option("disable")
@json_option
@connection_options
def keys_disable(
    client: Client, key: str, account: str | None, etag: str, allow_self: bool, as_json: bool
) -> None:
    """Switch a key off (enable switches it on again)."""
    _set_state(client, key_name(key, account), pb.ApiKey.DISABLED, etag, allow_self, as_json)


@keys.command("enable")
@key_argument
@etag_option
@json_option
@connection_options
def keys_enable(client: Client, key: str, account: str | None, etag: str, as_json: bool) -> None:
    """Switch a disabled key on again."""
    _set_state(client, key_name(key, account), pb.ApiKey.ACTIVE, etag, False, as_json)


@keys.command("revoke")
@key_argument
@click.option("--reason", default="", help="kept with the key for audit, e.g. leaked")
@etag_option
@allow_self_option("revoke")
@json_option
@connection_options
def keys_revoke(
    client: Client, key: str, account: str | None, reason: str, etag: str, allow_self: bool, as_json: bool
) -> None:
    """Revoke a key for good; it stays listed, for audit."""
    request = pb.RevokeApiKeyRequest(
        name=key_name(key, account), reason=reason, etag=etag, allow_self=allow_self
    )
    show_key(client.call("RevokeApiKey", request), as_json)


@keys.command("delete")
@key_argument
@click.option("--yes", "-y", is_flag=True, help="do not ask for confirmation")
@etag_option
@allow_self_option("delete")
@json_option
@connection_options
def keys_delete(
    client: Client, key: str, account: str | None, yes: bool, etag: str, allow_self: bool, as_json: bool
) -> None:
    """Delete a key: it stops working at once and cannot be recovered. Asks first, unless --yes."""
    name = key_name(key, account)
    if not yes:
        current = client.call("GetApiKey", pb.GetApiKeyRequest(name=name))
        prompt = (
            f"Delete {name} ({printable(current.display_name)}, {current.masked_key})? "
            "It stops working at once and cannot be recovered"
        )
        try:
            confirmed = click.confirm(prompt, default=False, err=True)
        except click.Abort:
            confirmed = False
            click.echo("", err=True)
        if not confirmed:
            click.echo("aborted: nothing deleted (answer y, or pass --yes)", err=True)
            raise click.exceptions.Exit(EXIT_ERROR)
    deleted = client.call("DeleteApiKey", pb.DeleteApiKeyRequest(name=name, etag=etag, allow_self=allow_self))
    if as_json:
        print_json(deleted)
    else:
        click.echo(f"deleted {name}")


@keys.command("rotate")
@key_argument
@click.option(
    "--grace", type=GRACE, help="how long the old secret keeps working: 0 to 7d, e.g. 24h [default 0]"
)
@click.option(
    "--end-grace-after-unused", "end_after", type=DURATION,
    help="end the grace early once the old secret has gone unused this long (5m up to --grace), e.g. 1h",
)
@etag_option
@click.option("--request-id", type=REQUEST_ID, help="a UUID making a retry safe; default a fresh one")
@allow_self_option("rotate")
@json_option
@connection_options
def keys_rotate(
    client: Client,
    key: str,
    account: str | None,
    grace: timedelta | None,
    end_after: timedelta | None,
    etag: str,
    request_id: str | None,
    allow_self: bool,
    as_json: bool,
) -> None:
    """Give a key a new secret and print it once, like create; the old one works for --grace."""
    request = pb.RotateApiKeyRequest(
        name=key_name(key, account),
        etag=etag,
        request_id=request_id or str(uuid.uuid4()),
        allow_self=allow_self,
    )
    if grace is not None:
        request.grace_period.FromTimedelta(grace)
    if end_after is not None:
        request.end_grace_after_unused.FromTimedelta(end_after)
    hint = f"--request-id {request.request_id}"
    show_issued(
        client.call("RotateApiKey", request, retry_hint=hint), "rotated", request.request_id, as_json
    )


