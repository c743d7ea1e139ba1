"""`apikeyd authorize`, `apikeyd audit` and `apikeyd health`, and `register`, which adds them and `keys` to
the `apikeyd` group."""

import sys

import click
from grpc_health.v1 import health_pb2

from apikeyd.cli.connection import EXIT_AUTHORIZE_ERROR, EXIT_DENIED, EXIT_ERROR, Client, connection_options
from apikeyd.cli.keys import keys
from apikeyd.cli.options import account_option, account_parent, json_option, paging_options
from apikeyd.cli.output import format_time, print_json, render_fields, show_list
from apikeyd.cli.usage import keys_usage
from apikeyd.v1 import api_keys_pb2 as pb


@click.command("authorize")
@click.argument("key", metavar="KEY")
@click.option("--scope", "scopes", multiple=True, help="a required scope, resource:action; repeatable")
@click.option("--resource", default="", help="the value a {value} scope must name, e.g. example.com")
@click.option("--project", default="", help="the project the request is for")
@click.option("--client-ip", default="", help="the client's address, for a key with allowed IP ranges")
@click.option("--cost", type=click.IntRange(0), help="credits an allowed check spends from a key with credits [default 1]")
@json_option
@connection_options
def authorize(
    client: Client,
    key: str,
    scopes: tuple[str, ...],
    resource: str,
    project: str,
    client_ip: str,
    cost: int | None,
    as_json: bool,
) -> None:
    """Ask whether KEY may make a request: exit 0 when allowed, 1 when denied, 3 when the check failed.

    KEY is the key string, or - to read it from stdin (keeps it out of the process list and shell history).
    """
    client.error_exit_code = EXIT_AUTHORIZE_ERROR
    if key == "-":
        key = sys.stdin.read().strip()
    request = pb.AuthorizeRequest(
        key=key, required_scopes=list(scopes), resource=resource, project_id=project, client_ip=client_ip
    )
    if cost is not None:
        request.cost = cost
    answer = client.call("Authorize", request)
    code = pb.AuthorizeResponse.Code.Name(answer.code)
    if as_json:
        print_json(answer)
    else:
        fields = [
            (
                "allowed" if answer.allowed else "denied",
                f"{code}: {answer.message}" if answer.message else code,
            )
        ]
        if answer.missing_scopes:
            fields.append(("missing scopes", ", ".join(answer.missing_scopes)))
        if answer.name:
            fields.append(("key", answer.name))
            fields.append(("project", answer.project_id or "- (account-wide)"))
            fields.append(("scopes", ", ".join(answer.scopes)))
        if answer.limit:
            fields.append(("rate limit", f"{answer.remaining} of {answer.limit} left"))
        if answer.HasField("credits_remaining"):
            fields.append(("credits", f"{answer.credits_remaining} left"))
        if answer.HasField("retry_after"):
            fields.append(("retry after", f"{answer.retry_after.ToTimedelta().total_seconds():g} s"))
        click.echo(render_fields(fields))
    if not answer.allowed:
        raise click.exceptions.Exit(EXIT_DENIED)


AUDIT_COLUMNS = ("TIME", "KIND", "KEY ID", "ACTOR", "METHOD", "DETAILS")


def _audit_row(event: pb.AuditEvent) -> list[str]:
    details = []
    if event.changed_fields:
        details.append("changed " + ",".join(event.changed_fields))
    if event.reason:
        details.append(f"reason: {event.reason}")
    details.extend(f"{k}={v}" for k, v in sorted(event.details.items()))
    return [
        format_time(event, "event_time"),
        pb.AuditEvent.Kind.Name(event.kind),
        event.key_id,
        event.actor_display_name or event.actor_key_id or ("admin-key" if not event.actor else event.actor),
        event.method,
        "; ".join(details),
    ]


@click.command("audit")
@account_option(required=True)
@paging_options("events", 'kind = REVOKED AND key_id = "..."')
@json_option
@connection_options
def audit(
    client: Client,
    account: str,
    filter_: str,
    page_size: int | None,
    page_token: str,
    all_pages: bool,
    as_json: bool,
) -> None:
    """List an account's audit events, newest first (ListAuditEvents)."""
    request = pb.ListAuditEventsRequest(
        parent=account_parent(account), filter=filter_, page_size=page_size or 0, page_token=page_token
    )
    show_list(client, "ListAuditEvents", request, all_pages, as_json, "audit_events", AUDIT_COLUMNS, _audit_row, "event")


@click.command("health")
@click.option("--service", default="", help="a service name; default the whole server")
@json_option
@connection_options
def health(client: Client, service: str, as_json: bool) -> None:
    """Ask grpc.health.v1.Health/Check: exit 0 when SERVING, 1 otherwise (also when unreachable)."""
    answer = client.health(service)
    if as_json:
        print_json(answer)
    else:
        click.echo(health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status))
    if answer.status != health_pb2.HealthCheckResponse.SERVING:
        raise click.exceptions.Exit(EXIT_ERROR)


COMMANDS = (keys, authorize, audit, health)


def register(group: click.Group) -> None:
    """Add the client commands to the `apikeyd` group."""
    keys.add_command(keys_usage)  # in a module of its own: keys.py holds the commands that change keys
    for command in COMMANDS:
        group.add_command(command)

