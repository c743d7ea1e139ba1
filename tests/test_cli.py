"""The apikeyd command line (`apikeyd keys|authorize|audit|health`) against a real server: every command, its
tables and JSON, the parsing of durations and rate limits, confirmation, error lines and exit codes."""

import json
import socket
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from grpc_health.v1 import health_pb2

from apikeyd.cli import main, options
from apikeyd.domain import keys
from apikeyd.v1 import api_keys_pb2 as pb
from tests.conftest import ISSUED_SECRETS, RunningServer, count_keys, create_key, free_port, leaked_secrets


def cli(
    server: RunningServer | None, *args: str, token: str | None = None, input: str | None = None
) -> Result:
    """`apikeyd ARGS` in-process, pointed at `server` through APIKEYD_ADDRESS and APIKEYD_TOKEN."""
    env = {"APIKEYD_ADDRESS": None, "APIKEYD_TOKEN": None, "APIKEYD_TIMEOUT": None}
    if server is not None:
        env.update(
            APIKEYD_ADDRESS=server.address, APIKEYD_TOKEN=server.operator_key if token is None else token
        )
    result = CliRunner().invoke(main, list(args), env=env, input=input, prog_name="apikeyd")
    assert "Traceback" not in result.output, result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def ok(result: Result) -> Result:
    assert result.exit_code == 0, (result.exit_code, result.stdout, result.stderr)
    return result


def as_json(result: Result) -> dict[str, Any]:
    return json.loads(ok(result).stdout)


def error_line(result: Result, code: str, exit_code: int = 1) -> str:
    """The one-line error on stderr, checked for its code and the exit status."""
    assert result.exit_code == exit_code, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {code}: "), result.stderr
    return lines[0]


def new_key(server: RunningServer, account: str, *args: str) -> dict[str, Any]:
    created = as_json(cli(server, "keys", "create", "--account", account, "--json", *args))
    ISSUED_SECRETS.add(created["secret"])
    return created


def assert_no_secret(text: str, *secrets: str) -> None:
    assert not leaked_secrets(text, set(secrets)), text


# ---------------------------------------------------------------------------------------------------------
# Parsing, no server needed: a bad value is a usage error (exit 2) that says what is wrong.

NOW = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90d", timedelta(days=90)),
        ("12h", timedelta(hours=12)),
        ("30m", timedelta(minutes=30)),
        ("2w", timedelta(weeks=2)),
        ("45s", timedelta(seconds=45)),
        ("1h30m", timedelta(minutes=90)),
        ("0", timedelta(0)),
        ("24 hours", timedelta(days=1)),
    ],
)
def test_durations(text, expected):
    assert options.parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "90", "d", "1.5h", "-1h", "3y", "1h 30", "soon"])
def test_bad_durations(text):
    with pytest.raises(ValueError):
        options.parse_duration(text)


def test_expires_takes_a_duration_from_now_a_time_or_never():
    assert options.parse_expires("90d", NOW) == NOW + timedelta(days=90)
    assert options.parse_expires("2030-01-01T00:00:00Z") == datetime(2030, 1, 1, tzinfo=UTC)
    assert options.parse_expires("2030-01-01T02:00:00+02:00") == datetime(2030, 1, 1, tzinfo=UTC)
    assert options.parse_expires("never") == options.NEVER
    # whole seconds, so that the time printed for a safe retry is exactly the one sent
    assert options.parse_expires("1h").microsecond == 0
    for bad in ("0s", "2030-01-01T00:00:00", "2030-01-01", "tomorrow", "99999999999d"):
        with pytest.raises(ValueError):
            options.parse_expires(bad, NOW)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("50/min", (50, 60)),
        ("50/minute", (50, 60)),
        ("2/s", (2, 1)),
        ("2/sec", (2, 1)),
        ("2/second", (2, 1)),
        ("1000/h", (1000, 3600)),
        ("1000/hour", (1000, 3600)),
        ("10000/d", (10000, 86400)),
        ("10000/day", (10000, 86400)),
        ("100/10s", (100, 10)),
        ("5/2min", (5, 120)),
        (" 7 / 30 sec ", (7, 30)),
    ],
)
def test_rate_limits(text, expected):
    assert options.parse_rate_limit(text) == expected
    limit, period = expected
    assert options.parse_rate_limit(options.format_rate_limit(limit, period)) == expected


@pytest.mark.parametrize(
    "text", ["50", "50/", "/min", "0/min", "50/0s", "50/2d", "50/fortnight", "-1/s", "x/min"]
)
def test_bad_rate_limits(text):
    with pytest.raises(ValueError):
        options.parse_rate_limit(text)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--expires", "3y"], "Invalid value for '--expires'"),
        (["--expires", "2030-01-01T00:00:00"], "no time zone"),
        (["--rate-limit", "50/fortnight"], "unknown unit 'fortnight'"),
        (["--rate-limit", "50/2d"], "from 1 second to 1 day"),
        (["--label", "env"], "KEY=VALUE"),
        (["--label", "env=a", "--label", "env=b"], "given twice"),
        (["--request-id", "not-a-uuid"], "is not a UUID"),
        (["--account", "a/b"], "give an account id"),
    ],
)
def test_a_bad_option_is_a_usage_error_before_any_call(args, message):
    base = {"--account": "acme", "--display-name": "k", "--scope": "messages:send"}
    for option in args[::2]:
        base.pop(option, None)
    argv = [x for pair in base.items() for x in pair] + args
    result = cli(None, "keys", "create", "--address", "127.0.0.1:1", *argv)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "UNAVAILABLE" not in result.stderr  # refused before connecting


# Every usage mistake of every client command: exit 2 and a message naming the option, before any call. The
# address is a real server, so a mistake that slipped through would reach it and exit 0 or 1 instead.
USAGE_MISTAKES = [
    (["keys", "list"], "--account"),
    (["keys", "list", "--account", ""], "--account"),
    (["keys", "list", "--account", "a", "--page-size", "0"], "--page-size"),
    (["audit"], "--account"),
    (["audit", "--account", "a/b"], "--account"),
    (["audit", "--account", "a", "--page-size", "1001"], "--page-size"),
    (["keys", "create", "--display-name", "x", "--scope", "a:b"], "--account"),
    (["keys", "create", "--account", "a", "--scope", "a:b"], "--display-name"),
    (["keys", "create", "--account", "a", "--display-name", "x"], "--scope"),
    (["keys", "get"], "KEY"),
    (["keys", "get", "k1"], "--account"),
    (["keys", "get", "--account", "a", ""], "KEY"),
    (["keys", "update", "--account", "a", "k1"], "--display-name"),
    (["keys", "update", "--account", "a", "k1", "--expires", "soon"], "--expires"),
    (["keys", "disable"], "KEY"),
    (["keys", "enable", "k1"], "--account"),
    (["keys", "revoke", "accounts/a/keys/k1"], "KEY"),
    (["keys", "delete", "--yes"], "KEY"),
    (["keys", "rotate", "--account", "a", "k1", "--grace", "soon"], "--grace"),
    (["keys", "rotate", "--account", "a", "k1", "--grace", "8d"], "--grace"),
    (["keys", "rotate", "--account", "a", "k1", "--request-id", "x"], "--request-id"),
    (["authorize"], "KEY"),
    (["health", "--timeout", "0"], "--timeout"),
    (["health", "--timeout", "nan"], "--timeout"),
    (["health", "--timeout", "inf"], "--timeout"),
    (["health", "--timeout", "soon"], "--timeout"),
    (["health", "--address", ""], "--address"),
    (["keys", "list", "--account", "a", "--address", " "], "--address"),
]


@pytest.mark.parametrize(("args", "option"), USAGE_MISTAKES, ids=[" ".join(a) for a, _ in USAGE_MISTAKES])
def test_every_usage_mistake_exits_2_naming_the_option(server, args, option):
    env = {"APIKEYD_ADDRESS": server.address, "APIKEYD_TOKEN": server.operator_key, "APIKEYD_TIMEOUT": None}
    result = CliRunner().invoke(main, args, env=env, prog_name="apikeyd")
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert option in result.stderr and "Usage: apikeyd" in result.stderr, result.stderr
    assert "Traceback" not in result.output and "error:" not in result.stderr  # no call was made


@pytest.mark.parametrize(
    "args",
    [
        ["keys", "get", "{key}"],
        ["keys", "get", "--account", "{key}", "k1"],
        ["keys", "create", "--account", "a", "--display-name", "x", "--scope", "a:b", "--expires", "{key}"],
        ["keys", "create", "--account", "a", "--display-name", "x", "--scope", "a:b", "--rate-limit", "{key}"],
        ["keys", "create", "--account", "a", "--display-name", "x", "--scope", "a:b", "--label", "{key}"],
        ["keys", "rotate", "--account", "a", "k1", "--request-id", "{key}"],
    ],
    ids=lambda args: " ".join(a for a in args if a != "{key}"),
)
def test_a_key_pasted_into_the_wrong_argument_is_never_echoed(server, args):
    """An error names the argument, not the key string a user pasted there by mistake (a usage error, or the
    server's refusal of an account id that holds a key)."""
    key = create_key(server.stub, f"acct-{uuid.uuid4().hex[:10]}").secret
    env = {"APIKEYD_ADDRESS": server.address, "APIKEYD_TOKEN": server.operator_key, "APIKEYD_TIMEOUT": None}
    result = CliRunner().invoke(main, [a.replace("{key}", key) for a in args], env=env, prog_name="apikeyd")
    assert result.exit_code in (1, 2), (result.exit_code, result.output)
    secret = keys.parse(key).secret  # type: ignore[union-attr]
    assert key not in result.output and secret[:10] not in result.output, result.output


def test_keys_are_named_in_full_or_by_account_and_id():
    assert options.key_name("accounts/acme/apiKeys/k1", None) == "accounts/acme/apiKeys/k1"
    assert options.key_name("accounts/acme/apiKeys/k1", "acme") == "accounts/acme/apiKeys/k1"
    assert options.key_name("k1", "acme") == "accounts/acme/apiKeys/k1"
    assert options.key_name("k1", "accounts/acme") == "accounts/acme/apiKeys/k1"
    for key, account in [
        ("k1", None),
        ("accounts/acme/apiKeys/k1", "other"),
        ("accounts/acme/keys/k1", None),
    ]:
        result = cli(None, "keys", "get", *(["--account", account] if account else []), key)
        assert result.exit_code == 2, result.output
    assert "--account" in cli(None, "keys", "get", "k1").stderr


# ---------------------------------------------------------------------------------------------------------
# Against a server.


def test_create_prints_the_secret_alone_and_once(server, account):
    result = ok(
        cli(
            server,
            "keys", "create", "--account", account, "--display-name", "Newsletter sender",
            "--scope", "messages:send:{example.com}", "--scope", "domains:read",
            "--label", "env=prod", "--label", "team=mail", "--description", "weekly digest",
            "--expires", "90d", "--rate-limit", "2/s", "--rate-limit", "50/min",
        )
    )  # fmt: skip
    secret = result.stdout.strip()
    ISSUED_SECRETS.add(secret)
    assert secret.startswith("AK_") and result.stdout == secret + "\n"  # KEY=$(apikeyd keys create ...) works
    assert "shown only now" in result.stderr and "Newsletter sender" in result.stderr
    assert_no_secret(result.stderr, secret)
    # the key is as asked, and the secret printed is the key string
    listed = server.stub.ListApiKeys(pb.ListApiKeysRequest(parent=f"accounts/{account}")).api_keys
    assert len(listed) == 1
    key = listed[0]
    assert list(key.scopes) == ["messages:send:{example.com}", "domains:read"]
    assert dict(key.labels) == {"env": "prod", "team": "mail"} and key.description == "weekly digest"
    assert [(r.limit, r.period.seconds) for r in key.rate_limits] == [(2, 1), (50, 60)]
    expires = key.expire_time.ToDatetime(tzinfo=UTC) - datetime.now(UTC)
    assert timedelta(days=89, hours=23) < expires <= timedelta(days=90)
    assert ok(cli(server, "authorize", secret, "--scope", "messages:send", "--resource", "example.com"))


def test_create_json_and_a_retry_with_the_same_request_id(server, account):
    request_id = str(uuid.uuid4())
    args = [
        "--display-name",
        "retry",
        "--scope",
        "messages:send",
        "--project",
        "p1",
        "--request-id",
        request_id,
    ]
    first = ok(cli(server, "keys", "create", "--account", account, "--json", *args))
    created = json.loads(first.stdout)
    ISSUED_SECRETS.add(created["secret"])
    assert created["secret"].startswith("AKP_") and created["secret_already_delivered"] is False
    assert created["api_key"]["project_id"] == "p1" and created["api_key"]["state"] == "ACTIVE"
    assert "shown only now" in first.stderr
    again = cli(server, "keys", "create", "--account", account, *args)  # the retry: same key, no secret
    assert ok(again).stdout == ""
    assert "already answered" in again.stderr and "cannot be shown again" in again.stderr
    changed = cli(server, "keys", "create", "--account", account, *args, "--expires", "30d")
    assert "duration counts from now" in error_line(changed, "INVALID_ARGUMENT")  # same id, another request
    again_json = as_json(cli(server, "keys", "create", "--account", account, "--json", *args))
    assert again_json["secret_already_delivered"] is True and again_json["secret"] == ""
    assert again_json["api_key"]["name"] == created["api_key"]["name"]
    assert count_keys(server.stub, account) == 1


def test_list_shows_a_table_pages_and_json(server, account):
    names = [
        new_key(server, account, "--display-name", f"key {i}", "--scope", "messages:send")["api_key"]
        for i in range(3)
    ]
    server.stub.UpdateApiKey(
        pb.UpdateApiKeyRequest(
            api_key=pb.ApiKey(name=names[1]["name"], state=pb.ApiKey.DISABLED),
            update_mask={"paths": ["state"]},
        )
    )
    table = ok(cli(server, "keys", "list", "--account", account))
    lines = table.stdout.splitlines()
    assert lines[0].split() == [
        "KEY",
        "ID",
        "DISPLAY",
        "NAME",
        "STATE",
        "MASKED",
        "KEY",
        "PROJECT",
        "SCOPES",
        "CREATED",
        "LAST",
        "USED",
    ]
    assert len(lines) == 4
    for line, key, state in zip(lines[1:], names, ["ACTIVE", "DISABLED", "ACTIVE"]):
        assert line.startswith(key["key_id"]) and key["display_name"] in line and key["masked_key"] in line
        assert f" {state} " in line and "messages:send" in line and "never" in line
    assert f"3 keys shown from accounts/{account}; no more pages" in table.stderr

    first = ok(cli(server, "keys", "list", "--account", account, "--page-size", "2"))
    assert len(first.stdout.splitlines()) == 3
    assert f"2 keys shown from accounts/{account}; more follow, next page: --page-token " in first.stderr
    token = first.stderr.split("--page-token ")[1].split()[0]
    rest = ok(cli(server, "keys", "list", "--account", account, "--page-size", "2", "--page-token", token))
    assert len(rest.stdout.splitlines()) == 2 and rest.stdout.splitlines()[1].startswith(names[2]["key_id"])
    assert f"1 key shown from accounts/{account}; no more pages" in rest.stderr
    everything = as_json(
        cli(server, "keys", "list", "--account", account, "--page-size", "1", "--all", "--json")
    )
    assert [k["key_id"] for k in everything["api_keys"]] == [k["key_id"] for k in names]
    assert everything["next_page_token"] == ""
    active = as_json(
        cli(
            server,
            "keys",
            "list",
            "--account",
            f"accounts/{account}",
            "--filter",
            "state = DISABLED",
            "--json",
        )
    )
    assert [k["name"] for k in active["api_keys"]] == [names[1]["name"]]
    assert f"0 keys shown from accounts/{account}x; no more pages" in ok(cli(server, "keys", "list", "--account", account + "x")).stderr


def test_get_update_disable_enable_revoke(server, account):
    created = new_key(
        server, account, "--display-name", "orig", "--scope", "messages:send:all", "--description", "keep me",
        "--label", "env=prod", "--rate-limit", "5/s", "--expires", "2031-01-01T00:00:00Z",
    )  # fmt: skip
    key, secret = created["api_key"], created["secret"]
    name, key_id = key["name"], key["key_id"]

    shown = ok(cli(server, "keys", "get", name))
    for text in (
        name,
        "orig",
        "keep me",
        "ACTIVE",
        key["masked_key"],
        "env=prod",
        "5/s",
        "2031-01-01T00:00:00Z",
    ):
        assert text in shown.stdout
    by_id = as_json(cli(server, "keys", "get", "--account", account, key_id, "--json"))
    assert by_id["name"] == name and by_id["etag"] == key["etag"]

    # update sends a mask of exactly the fields given: the description and the rate limits stay
    updated = as_json(
        cli(
            server,
            "keys",
            "update",
            name,
            "--display-name",
            "renamed",
            "--label",
            "env=dev",
            "--expires",
            "never",
            "--json",
        )
    )
    assert (
        updated["display_name"] == "renamed"
        and updated["labels"] == {"env": "dev"}
        and "expire_time" not in updated
    )
    assert updated["description"] == "keep me" and updated["rate_limits"] == [{"limit": "5", "period": "1s"}]
    events = server.stub.ListAuditEvents(pb.ListAuditEventsRequest(parent=f"accounts/{account}")).audit_events
    assert sorted(events[0].changed_fields) == ["display_name", "expire_time", "labels"]
    cleared = as_json(
        cli(
            server,
            "keys",
            "update",
            name,
            "--clear-rate-limits",
            "--clear-labels",
            "--scope",
            "messages:send",
            "--json",
        )
    )
    assert cleared["rate_limits"] == [] and cleared["labels"] == {} and cleared["scopes"] == ["messages:send"]
    assert cli(server, "keys", "update", name).exit_code == 2  # nothing to update
    assert cli(server, "keys", "update", name, "--label", "a=b", "--clear-labels").exit_code == 2

    stale = error_line(
        cli(server, "keys", "update", name, "--description", "x", "--etag", key["etag"]), "ABORTED"
    )
    assert "etag" in stale

    assert "DISABLED" in ok(cli(server, "keys", "disable", "--account", account, key_id)).stdout
    denied = cli(server, "authorize", secret, "--scope", "messages:send")
    assert denied.exit_code == 1 and "denied:" in denied.stdout and "DISABLED" in denied.stdout
    assert as_json(cli(server, "keys", "enable", name, "--json"))["state"] == "ACTIVE"
    ok(cli(server, "authorize", secret, "--scope", "messages:send"))

    revoked = as_json(cli(server, "keys", "revoke", name, "--reason", "leaked", "--json"))
    assert revoked["state"] == "REVOKED" and revoked["revoke_reason"] == "leaked"
    assert "leaked" in ok(cli(server, "keys", "get", name)).stdout
    again = error_line(cli(server, "keys", "revoke", name), "FAILED_PRECONDITION")
    assert "revoked" in again
    assert cli(server, "authorize", secret, "--scope", "messages:send").exit_code == 1


def test_rotate_prints_the_new_secret_once(server, account):
    created = new_key(server, account, "--display-name", "rotating", "--scope", "messages:send")
    old, name = created["secret"], created["api_key"]["name"]
    result = ok(cli(server, "keys", "rotate", name, "--grace", "1h"))
    new = result.stdout.strip()
    ISSUED_SECRETS.add(new)
    assert new != old and new.startswith("AK_") and result.stdout == new + "\n"
    assert "shown only now" in result.stderr and "previous secret until" in result.stderr
    assert_no_secret(result.stderr, old, new)
    ok(cli(server, "authorize", old, "--scope", "messages:send"))  # within its grace
    ok(cli(server, "authorize", new, "--scope", "messages:send"))

    request_id = str(uuid.uuid4())
    rotated = as_json(
        cli(server, "keys", "rotate", name, "--grace", "0", "--request-id", request_id, "--json")
    )
    ISSUED_SECRETS.add(rotated["secret"])
    assert rotated["secret"] and rotated["api_key"]["name"] == name
    again = cli(server, "keys", "rotate", name, "--grace", "0", "--request-id", request_id)
    assert ok(again).stdout == "" and "already answered" in again.stderr
    assert cli(server, "authorize", new, "--scope", "messages:send").exit_code == 1  # grace 0: gone at once
    ok(cli(server, "authorize", rotated["secret"], "--scope", "messages:send"))
    too_long = cli(server, "keys", "rotate", name, "--grace", "8d")  # a usage error, before any call
    assert too_long.exit_code == 2 and "--grace" in too_long.stderr and "7 days" in too_long.stderr
    assert cli(server, "keys", "rotate", name, "--grace", "soon").exit_code == 2


def test_delete_asks_first(server, account):
    created = new_key(server, account, "--display-name", "doomed", "--scope", "messages:send")
    name, key_id = created["api_key"]["name"], created["api_key"]["key_id"]

    no_input = cli(server, "keys", "delete", name)
    assert no_input.exit_code == 1 and "nothing deleted" in no_input.stderr and "doomed" in no_input.stderr
    declined = cli(server, "keys", "delete", name, input="n\n")
    assert declined.exit_code == 1 and "nothing deleted" in declined.stderr
    assert server.stub.GetApiKey(pb.GetApiKeyRequest(name=name)).name == name  # still there

    confirmed = ok(cli(server, "keys", "delete", "--account", account, key_id, input="y\n"))
    assert f"deleted {name}" in confirmed.stdout
    error_line(cli(server, "keys", "get", name), "NOT_FOUND")

    other = new_key(server, account, "--display-name", "quick", "--scope", "messages:send")["api_key"]["name"]
    assert as_json(cli(server, "keys", "delete", other, "--yes", "--json")) == {}
    error_line(cli(server, "keys", "delete", other, "--yes"), "NOT_FOUND")
    error_line(cli(server, "keys", "delete", other), "NOT_FOUND")  # before asking


def test_authorize_exit_codes_and_output(server, account):
    created = new_key(
        server,
        account,
        "--display-name",
        "sender",
        "--scope",
        "messages:send:{example.com}",
        "--rate-limit",
        "100/min",
    )
    secret = created["secret"]
    allowed = ok(cli(server, "authorize", secret, "--scope", "messages:send", "--resource", "example.com"))
    assert (
        allowed.stdout.startswith("allowed:")
        and "OK" in allowed.stdout
        and created["api_key"]["name"] in allowed.stdout
    )
    assert "99 of 100 left" in allowed.stdout
    assert_no_secret(allowed.stdout + allowed.stderr, secret)

    scope = cli(server, "authorize", secret, "--scope", "messages:send", "--resource", "other.com")
    assert scope.exit_code == 1 and "denied:" in scope.stdout and "INSUFFICIENT_SCOPE" in scope.stdout
    assert "missing scopes" in scope.stdout
    denied = json.loads(cli(server, "authorize", "--json", secret, "--scope", "messages:send").stdout)
    assert denied["allowed"] is False and denied["code"] == "INSUFFICIENT_SCOPE" and denied["missing_scopes"]
    malformed = cli(server, "authorize", "AK_nope", "--scope", "messages:send")
    assert malformed.exit_code == 1 and "MALFORMED" in malformed.stdout
    from_stdin = cli(
        server, "authorize", "-", "--scope", "messages:send", "--resource", "example.com", input=secret + "\n"
    )
    ok(from_stdin)
    # the check could not be made: 3, not 1, so that "denied" and "down" differ
    unreachable = cli(None, "authorize", secret, "--address", free_address(), "--scope", "messages:send")
    error_line(unreachable, "UNAVAILABLE", exit_code=3)
    bad_scope = cli(server, "authorize", secret, "--scope", "NOT A SCOPE")
    error_line(bad_scope, "INVALID_ARGUMENT", exit_code=3)


def test_audit_lists_events_with_filter_and_paging(server, account):
    created = new_key(server, account, "--display-name", "audited", "--scope", "messages:send")
    name, key_id = created["api_key"]["name"], created["api_key"]["key_id"]
    ok(cli(server, "keys", "update", name, "--description", "d"))
    ok(cli(server, "keys", "revoke", name, "--reason", "leaked"))

    table = ok(cli(server, "audit", "--account", account))
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["TIME", "KIND", "KEY"] and len(lines) == 4
    assert [line.split()[1] for line in lines[1:]] == ["REVOKED", "UPDATED", "CREATED"]  # newest first
    assert "reason: leaked" in lines[1] and "changed description" in lines[2] and "tests" in lines[1]
    assert all(key_id in line for line in lines[1:])

    revoked = as_json(cli(server, "audit", "--account", account, "--filter", "kind = REVOKED", "--json"))
    assert [e["kind"] for e in revoked["audit_events"]] == ["REVOKED"] and revoked["audit_events"][0][
        "reason"
    ] == "leaked"
    paged = ok(cli(server, "audit", "--account", account, "--page-size", "1"))
    assert len(paged.stdout.splitlines()) == 2 and "--page-token" in paged.stderr
    everything = as_json(cli(server, "audit", "--account", account, "--page-size", "1", "--all", "--json"))
    assert [e["kind"] for e in everything["audit_events"]] == ["REVOKED", "UPDATED", "CREATED"]
    error_line(cli(server, "audit", "--account", account, "--filter", "kind ~ nonsense"), "INVALID_ARGUMENT")
    everything_text = (
        table.stdout + json.dumps(everything) + ok(cli(server, "keys", "list", "--account", account)).stdout
    )
    assert_no_secret(everything_text, created["secret"])


def test_errors_are_one_line_with_the_grpc_code(server, account):
    missing = f"accounts/{account}/apiKeys/{uuid.uuid4()}"
    assert "NOT_FOUND" in error_line(cli(server, "keys", "get", missing), "NOT_FOUND")
    error_line(cli(server, "keys", "list", "--account", account, "--token", "AK_wrong"), "UNAUTHENTICATED")
    wrong = error_line(cli(server, "keys", "list", "--account", account, token="AK_wrong"), "UNAUTHENTICATED")
    assert "AK_wrong" not in wrong
    unset = error_line(cli(server, "keys", "list", "--account", account, token=""), "UNAUTHENTICATED")
    assert "APIKEYD_TOKEN" in unset
    error_line(
        cli(server, "keys", "list", "--account", account, "--filter", "color = red"), "INVALID_ARGUMENT"
    )
    reader = create_key(server.stub, account, ("apikeys:read",), display_name="reader").secret
    ISSUED_SECRETS.add(reader)
    ok(cli(server, "keys", "list", "--account", account, token=reader))
    error_line(
        cli(
            server,
            "keys",
            "create",
            "--account",
            account,
            "--display-name",
            "x",
            "--scope",
            "apikeys:read",
            token=reader,
        ),
        "PERMISSION_DENIED",
    )
    # the operator's own key: refused without --allow-self
    own = as_json(cli(server, "keys", "list", "--account", "system", "--all", "--json"))["api_keys"]
    mine = next(k["name"] for k in own if server.operator_key.startswith(k["masked_key"].split("...")[0]))
    assert "allow_self" in error_line(cli(server, "keys", "disable", mine), "FAILED_PRECONDITION").replace(
        "-", "_"
    )
    # a key narrowing itself: refused without --allow-self, done with it
    writer = create_key(server.stub, account, ("apikeys:read", "apikeys:write"), display_name="writer")
    narrowed = error_line(
        cli(server, "keys", "update", writer.api_key.name, "--expires", "90d", token=writer.secret),
        "FAILED_PRECONDITION",
    )
    assert "allow_self" in narrowed
    done = cli(server, "keys", "update", writer.api_key.name, "--expires", "90d", "--allow-self", "--json",
               token=writer.secret)
    assert done.exit_code == 0 and as_json(done)["expire_time"], done.output
    # an invalid token never reaches the wire, and is never echoed
    control = cli(server, "keys", "list", "--account", account, token="AK_bad\nvalue")
    assert control.exit_code == 2 and "AK_bad" not in control.output


def free_address() -> str:
    return f"127.0.0.1:{free_port()}"  # nothing listens there


def test_unreachable_server_is_one_line_and_fast():
    address = free_address()
    started = time.monotonic()
    result = cli(None, "keys", "list", "--account", "acme", "--address", address, "--token", "AK_x")
    line = error_line(result, "UNAVAILABLE")
    assert address in line and time.monotonic() - started < 5
    created = cli(
        None,
        "keys",
        "create",
        "--account",
        "acme",
        "--display-name",
        "x",
        "--scope",
        "a:b",
        "--expires",
        "1d",
        "--address",
        address,
    )
    line = error_line(created, "UNAVAILABLE")
    assert "--request-id" in line and "--expires 20" in line  # how to retry safely, with the absolute expiry
    with socket.socket() as silent:  # accepts connections (in the kernel) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        result = cli(None, "keys", "get", "accounts/a/apiKeys/k", "--address", address, "--timeout", "0.5")
        assert "within 0.5 s" in error_line(result, "DEADLINE_EXCEEDED") and time.monotonic() - started < 3


def test_health(make_server, account):
    server = make_server()
    assert ok(cli(server, "health")).stdout == "SERVING\n"
    assert as_json(cli(server, "health", "--json", "--service", "apikeyd.v1.ApiKeyService")) == {
        "status": "SERVING"
    }
    error_line(cli(server, "health", "--service", "no.such.Service"), "NOT_FOUND")
    server.run(server.server.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING))
    not_serving = cli(server, "health")
    assert not_serving.exit_code == 1 and not_serving.stdout == "NOT_SERVING\n"

    started = time.monotonic()
    error_line(cli(None, "health", "--address", free_address(), "--timeout", "2"), "UNAVAILABLE")
    assert time.monotonic() - started < 3


def test_the_console_script_runs(server, account):
    """The real `apikeyd` executable, as a shell user runs it."""
    key = create_key(server.stub, account, display_name="script")
    ISSUED_SECRETS.add(key.secret)
    executable = Path(sys.executable).parent / "apikeyd"
    env = {"APIKEYD_ADDRESS": server.address, "APIKEYD_TOKEN": server.operator_key, "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [str(executable), "keys", "list", "--account", account, "--json"],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert [k["name"] for k in json.loads(result.stdout)["api_keys"]] == [key.api_key.name]


def test_the_client_commands_import_none_of_the_server_side(server):
    """`apikeyd health` is a container's HEALTHCHECK: it must not pay for SQLAlchemy, alembic or argon2."""
    program = (
        "import sys\n"
        "from apikeyd.cli import main\n"
        "try:\n"
        "    main.main(sys.argv[1:], prog_name='apikeyd', standalone_mode=False)\n"
        "finally:\n"
        "    heavy = ('sqlalchemy', 'alembic', 'argon2', 'psycopg', 'redis', 'prometheus_client')\n"
        "    print(sorted(m for m in sys.modules if m.split('.')[0] in heavy or m.startswith(\n"
        "        ('apikeyd.server', 'apikeyd.store', 'apikeyd.lifecycle', 'apikeyd.authorizer'))))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program, "health", "--address", server.address],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0 and result.stdout == "SERVING\n[]\n", (result.stdout, result.stderr)
