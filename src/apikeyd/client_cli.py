"""The client half of the `apikeyd` command: manage keys, check a key, read the audit log, ask for health.

It talks to a running server over gRPC, plaintext or TLS (the --tls* options, `_connection_options` below),
and imports none of the server's modules (only the generated stubs, grpc and grpc_health), so that it starts
fast. `register(main)` adds its commands to the `apikeyd` group.

Conventions: readable output by default, `--json` for one proto3 JSON document on stdout; errors are one line
`error: <GRPC_CODE>: <message>` on stderr with exit status 1 (2 for usage errors, as click does). A key's
secret is printed only by `keys create` and `keys rotate`, and never logged.
"""

import functools
import os
import re
import ssl
import sys
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

# grpc's core logs to stderr, INFO lines included (a failed TLS handshake is one), unless GRPC_VERBOSITY says
# otherwise, and reads it only when grpc is imported, which is here. A client command's stderr is its one
# error line, so these run with ERROR unless the variable is set. `serve` (and the rest) is left as it was.
if sys.argv[1:2] and sys.argv[1] in ("keys", "authorize", "audit", "health"):  # COMMANDS, below
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import click
import grpc
from google.protobuf import json_format
from google.protobuf.duration_pb2 import Duration
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc

from apikeyd.v1 import api_keys_pb2 as pb
from apikeyd.v1 import api_keys_pb2_grpc as pb_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"
EXIT_ERROR = 1  # a gRPC error (or a refused confirmation)
EXIT_DENIED = 1  # `authorize`: the key may not make the request
EXIT_AUTHORIZE_ERROR = 3  # `authorize`: the check itself could not be made, so "denied" and "down" differ

# Codes after which a create or rotate may or may not have happened: a retry with the same request id is safe.
_OUTCOME_UNKNOWN = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
}


# ---------------------------------------------------------------------------------------------------------
# Pure helpers: durations, times, rate limits, labels, names.

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


def parse_duration(text: str) -> timedelta:
    """`90d`, `12h`, `30m`, `2w`, `45s`, `1h30m`; a bare `0` is zero. Raises ValueError."""
    value = text.strip().lower()
    if value == "0":
        return timedelta(0)
    if not _DURATION.fullmatch(value):
        raise ValueError(
            f"{text!r} is not a duration: use a number and a unit, like 90d, 12h, 30m, 2w or 45s"
        )
    seconds = 0
    for number, unit in _DURATION_PART.findall(value):
        if unit not in _UNITS:
            raise ValueError(f"{text!r}: unknown unit {unit!r}; use s, m, h, d or w")
        seconds += int(number) * _UNITS[unit]
    try:
        return timedelta(seconds=seconds)
    except OverflowError:
        raise ValueError(f"{text!r} is too long") from None


def parse_time(text: str) -> datetime:
    """An RFC 3339 time with a zone, e.g. `2030-01-01T00:00:00Z`. Raises ValueError."""
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not an RFC 3339 time like 2030-01-01T00:00:00Z") from None
    if value.tzinfo is None:
        raise ValueError(f"{text!r} has no time zone: add Z (UTC) or an offset like +02:00")
    return value.astimezone(UTC)


def parse_expires(text: str, now: datetime | None = None) -> datetime | str:
    """`never`, a duration from now (`90d`; whole seconds), or an RFC 3339 time. Raises ValueError."""
    value = text.strip().lower()
    if value in ("never", "none"):
        return NEVER
    if value[:1].isdigit() and _DURATION.fullmatch(value):
        delta = parse_duration(value)
        if not delta:
            raise ValueError(f"{text!r}: an expiry must be in the future")
        try:
            return ((now or datetime.now(UTC)) + delta).replace(microsecond=0)
        except OverflowError:
            raise ValueError(f"{text!r} is too far in the future") from None
    if re.match(r"\d{4}-", value):
        return parse_time(text)
    raise ValueError(
        f"{text!r} is neither a duration (90d, 12h, 30m, 2w) nor an RFC 3339 time (2030-01-01T00:00:00Z)"
    )


def parse_rate_limit(text: str) -> tuple[int, int]:
    """`50/min`, `2/s`, `1000/hour`, `10000/day`, `100/10s`: (limit, period in seconds). Raises ValueError."""
    match = _RATE_LIMIT.fullmatch(text.strip().lower())
    if match is None:
        raise ValueError(
            f"{text!r} is not a rate limit: use LIMIT/PERIOD, like 50/min, 2/s, 1000/hour or 100/10s"
        )
    limit, count, unit = int(match[1]), int(match[2] or 1), match[3]
    if unit not in _UNITS:
        raise ValueError(f"{text!r}: unknown unit {unit!r}; use s/sec/second, min/minute, h/hour or d/day")
    period = count * _UNITS[unit]
    if not 1 <= limit <= _MAX_INT64:
        raise ValueError(f"{text!r}: the limit must be at least 1")
    if not 1 <= period <= 86400:
        raise ValueError(f"{text!r}: the period must be from 1 second to 1 day")
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
            f"{account!r}: give an account id like acme (or accounts/acme)", param_hint="--account"
        )
    return f"accounts/{account}"


def key_name(key: str, account: str | None) -> str:
    """A key given by its full name `accounts/A/apiKeys/ID`, or by its id with `--account A`."""
    key = key.strip()
    if key.startswith("accounts/"):
        parts = key.split("/")
        if len(parts) != 4 or parts[2] != "apiKeys" or not parts[1] or not parts[3]:
            raise click.BadParameter(
                f"{key!r} is not a key name like accounts/acme/apiKeys/<key id>", param_hint="KEY"
            )
        if account is not None and account_parent(account) != f"accounts/{parts[1]}":
            raise click.UsageError(f"{key} is not in --account {account}")
        return key
    if account is None:
        raise click.UsageError(
            f"name the key by its full name (accounts/ACCOUNT/apiKeys/{key or 'ID'}) or pass --account ACCOUNT"
        )
    if not key or "/" in key:
        raise click.BadParameter(f"{key!r} is not a key id", param_hint="KEY")
    return f"{account_parent(account)}/apiKeys/{key}"


def _printable(text: str) -> str:
    """Names and labels come from other people: never let them drive the terminal."""
    return "".join(c if c.isprintable() else "?" for c in text)


def render_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    cells = [[_printable(c) or "-" for c in row] for row in rows]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]
    lines = [headers, *cells]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def render_fields(fields: Iterable[tuple[str, str]]) -> str:
    fields = list(fields)
    width = max(len(label) for label, _ in fields) + 1
    return "\n".join(f"{(label + ':').ljust(width)} {_printable(value) or '-'}" for label, value in fields)


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
        raise ValueError(f"{text!r} is not a label: use KEY=VALUE, like env=prod")
    return key.strip(), value.strip()


def _parse_request_id(text: str) -> str:
    try:
        return str(uuid.UUID(text.strip()))
    except ValueError:
        raise ValueError(f"{text!r} is not a UUID") from None


DURATION = _Parsed("duration", parse_duration)
EXPIRES = _Parsed("duration|time", parse_expires)
RATE_LIMIT = _Parsed("limit/period", parse_rate_limit)
LABEL = _Parsed("key=value", _parse_label)
REQUEST_ID = _Parsed("uuid", _parse_request_id)


def _labels(pairs: Sequence[tuple[str, str]]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for key, value in pairs:
        if key in labels:
            raise click.BadParameter(f"label {key!r} is given twice", param_hint="--label")
        labels[key] = value
    return labels


def _rate_limits(values: Sequence[tuple[int, int]]) -> list[pb.RateLimit]:
    return [pb.RateLimit(limit=limit, period=Duration(seconds=period)) for limit, period in values]


def _timestamp(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


# ---------------------------------------------------------------------------------------------------------
# The connection, errors and output.


class CommandError(click.ClickException):
    """One line `error: <CODE>: <message>` on stderr, and a non-zero exit status."""

    def __init__(self, code: str, message: str, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(f"{code}: {' '.join(message.split())}")
        self.exit_code = exit_code  # type: ignore[misc]  # click declares it on the class

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.message}", err=True)


# The client's TLS options. Their variables are APIKEYD_CLIENT_TLS_*, not the server's APIKEYD_TLS_*: a container
# that sets the server's variables must not silently change how its own `apikeyd health` connects.
_TLS_OPTIONS = {
    "tls": ("--tls", "APIKEYD_CLIENT_TLS"),
    "tls_ca": ("--tls-ca", "APIKEYD_CLIENT_TLS_CA"),
    "tls_cert": ("--tls-cert", "APIKEYD_CLIENT_TLS_CERT"),
    "tls_key": ("--tls-key", "APIKEYD_CLIENT_TLS_KEY"),
    "tls_server_name": ("--tls-server-name", "APIKEYD_CLIENT_TLS_SERVER_NAME"),
}


def _tls_option(name: str) -> str:
    flag, variable = _TLS_OPTIONS[name]
    return f"{flag} ({variable})"


@dataclass(frozen=True)
class ClientTls:
    """What a TLS channel needs, read and checked before any connection. The key never shows in a repr."""

    root_certificates: bytes | None  # None: grpc's own bundled roots
    certificate_chain: bytes | None = field(default=None, repr=False)
    private_key: bytes | None = field(default=None, repr=False)
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.private_key,
            certificate_chain=self.certificate_chain,
        )

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def _read_pem(name: str, path: str) -> bytes:
    """A PEM file named by option `name`; a usage error naming the option and the file otherwise."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as error:
        raise click.BadParameter(
            f"cannot read {path}: {error.strerror or error}", param_hint=_tls_option(name)
        ) from None
    if b"-----BEGIN " not in data:
        raise click.BadParameter(f"{path} is not a PEM file", param_hint=_tls_option(name))
    return data


def _system_roots() -> bytes | None:
    """The system's CA bundle, as OpenSSL finds it (SSL_CERT_FILE overrides); None if there is no such file,
    and grpc then uses the roots it ships with."""
    paths = ssl.get_default_verify_paths()
    for path in (paths.cafile, paths.openssl_cafile):
        if path and os.path.isfile(path):
            try:
                with open(path, "rb") as file:
                    return file.read()
            except OSError:
                continue
    return None


def _encrypted_key() -> bytes:
    raise click.BadParameter("the key is encrypted; give it unencrypted", param_hint=_tls_option("tls_key"))


def client_tls(
    tls: bool,
    tls_ca: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    tls_server_name: str | None,
) -> ClientTls | None:
    """The TLS options, checked now (files readable, PEM, a CA that holds certificates, a key that is the
    certificate's), so that a mistake is a usage error naming the option, not a failed handshake later.
    None: plaintext. Any option but --tls implies --tls."""
    server_name = (tls_server_name or "").strip() or None
    if not (tls or tls_ca or tls_cert or tls_key or server_name):
        return None
    if bool(tls_cert) != bool(tls_key):
        given, missing = ("tls_cert", "tls_key") if tls_cert else ("tls_key", "tls_cert")
        raise click.UsageError(
            f"{_tls_option(given)} is given but {_tls_option(missing)} is not: "
            "a client certificate needs both the certificate and its key"
        )
    check = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # grpc takes any bytes and would fail at the handshake
    roots: bytes | None
    if tls_ca:
        roots = _read_pem("tls_ca", tls_ca)
        try:
            check.load_verify_locations(cadata=roots.decode("ascii", "replace"))
        except ssl.SSLError as error:
            raise click.BadParameter(
                f"{tls_ca} holds no usable CA certificate: {error.reason or error}", param_hint=_tls_option("tls_ca")
            ) from None
    else:
        roots = _system_roots()
    certificate = key = None
    if tls_cert and tls_key:
        certificate = _read_pem("tls_cert", tls_cert)
        key = _read_pem("tls_key", tls_key)
        try:
            check.load_cert_chain(tls_cert, tls_key, password=_encrypted_key)
        except ssl.SSLError as error:
            why = "the key is not the certificate's" if error.reason == "KEY_VALUES_MISMATCH" else error.reason
            raise click.UsageError(
                f"{_tls_option('tls_cert')} {tls_cert} and {_tls_option('tls_key')} {tls_key} are not a usable "
                f"certificate and matching key: {why or error}"
            ) from None
    return ClientTls(roots, certificate, key, server_name)


class Client:
    def __init__(self, address: str, token: str | None, timeout: float, tls: ClientTls | None = None) -> None:
        self.address = address.strip()
        self.token = (token or "").strip()
        self.timeout = timeout
        self.tls = tls
        self.error_exit_code = EXIT_ERROR
        if self.token and not all(33 <= ord(c) <= 126 for c in self.token):
            # Never echo it: it is a credential.
            raise click.UsageError("the token (--token or APIKEYD_TOKEN) holds characters no apikeyd key has")
        self._channel: grpc.Channel | None = None

    @property
    def channel(self) -> grpc.Channel:
        if self._channel is None:
            if self.tls is None:
                self._channel = grpc.insecure_channel(self.address)
            else:
                self._channel = grpc.secure_channel(
                    self.address, self.tls.credentials(), options=self.tls.channel_options()
                )
        return self._channel

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()

    def call(self, method: str, request: Message, retry_hint: str = "") -> Any:
        """One ApiKeyService call with the bearer token and the deadline; a failure becomes CommandError."""
        metadata = [("authorization", f"Bearer {self.token}")] if self.token else []
        rpc = getattr(pb_grpc.ApiKeyServiceStub(self.channel), method)
        try:
            return rpc(request, timeout=self.timeout, metadata=metadata)
        except grpc.RpcError as error:
            raise self.failure(error, retry_hint) from None

    def health(self, service: str) -> health_pb2.HealthCheckResponse:
        stub = health_pb2_grpc.HealthStub(self.channel)
        try:
            return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout)
        except grpc.RpcError as error:
            raise self.failure(error) from None

    def failure(self, error: grpc.RpcError, retry_hint: str = "") -> CommandError:
        code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
        details = " ".join(((error.details() if isinstance(error, grpc.Call) else str(error)) or "").split())
        if code is grpc.StatusCode.UNAVAILABLE:
            message = f"apikeyd at {self.address} is unavailable: {details or 'no details'}{self._tls_hint(details)}"
        elif code is grpc.StatusCode.DEADLINE_EXCEEDED:
            message = f"no answer from apikeyd at {self.address} within {self.timeout:g} s (--timeout)"
        elif code is grpc.StatusCode.UNAUTHENTICATED and not self.token:
            message = f"{details} (no token given: pass --token or set APIKEYD_TOKEN)"
        else:
            message = details or "no details"
        if retry_hint and code in _OUTCOME_UNKNOWN:
            message += f" (the outcome is unknown; retrying with {retry_hint} is safe)"
        return CommandError(code.name, message, self.error_exit_code)

    def _tls_hint(self, details: str) -> str:
        """What to check when the connection, not the server, failed: grpc's words for it are obscure (a
        plaintext client at a TLS server, or a server that wants a client certificate, get `Socket closed`)."""
        if self.tls is None:
            if "Socket closed" in details:
                return " (this client spoke plaintext: if the server uses TLS, pass --tls-ca FILE or --tls)"
            return ""
        if "Socket closed" in details or "andshake" in details or "erification" in details:
            return (
                " (over TLS: check --tls-ca, --tls-server-name if the certificate does not name the address's "
                "host, --tls-cert and --tls-key if the server requires client certificates, and that it serves TLS)"
            )
        return ""


def _connection_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """--address, --token, --timeout and the --tls* options (also APIKEYD_*), turned into the first argument,
    a Client; any failure below becomes one error line, never a traceback."""

    @functools.wraps(function)
    def wrapper(
        *args: Any,
        address: str,
        token: str | None,
        timeout: float,
        tls: bool,
        tls_ca: str | None,
        tls_cert: str | None,
        tls_key: str | None,
        tls_server_name: str | None,
        **kwargs: Any,
    ) -> Any:
        client = Client(address, token, timeout, client_tls(tls, tls_ca, tls_cert, tls_key, tls_server_name))
        try:
            return function(client, *args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except grpc.RpcError as error:
            raise client.failure(error) from None
        except Exception as error:
            raise CommandError(type(error).__name__, str(error), client.error_exit_code) from None
        finally:
            client.close()

    for name, help_text in reversed(
        [
            ("tls", "connect with TLS, trusting the system's CA certificates (implied by every --tls-* option)"),
            ("tls_ca", "connect with TLS, trusting the CA certificates in this PEM file instead"),
            ("tls_cert", "a PEM client certificate, for a server that requires one (mTLS); with --tls-key"),
            ("tls_key", "the unencrypted PEM private key of --tls-cert"),
            ("tls_server_name", "the name the server's certificate must show, when not the --address host"),
        ]
    ):
        flag, variable = _TLS_OPTIONS[name]
        metavar = {"tls": None, "tls_server_name": "NAME"}.get(name, "FILE")
        wrapper = click.option(
            flag,
            name,
            envvar=variable,
            default=False if name == "tls" else None,
            is_flag=name == "tls",
            metavar=metavar,
            help=f"{help_text} [{variable}]",
        )(wrapper)
    wrapper = click.option(
        "--timeout",
        type=click.FloatRange(min=0, min_open=True),
        default=10.0,
        show_default=True,
        envvar="APIKEYD_TIMEOUT",
        help="seconds to wait for each answer [APIKEYD_TIMEOUT]",
    )(wrapper)
    wrapper = click.option(
        "--token",
        envvar="APIKEYD_TOKEN",
        default=None,
        help="an apikeyd key to call with, sent as `authorization: Bearer` [APIKEYD_TOKEN; prefer the variable]",
    )(wrapper)
    wrapper = click.option(
        "--address",
        envvar="APIKEYD_ADDRESS",
        default=DEFAULT_ADDRESS,
        show_default=True,
        help="host:port of the apikeyd server [APIKEYD_ADDRESS]",
    )(wrapper)
    return wrapper


def _json_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="print one proto3 JSON document on stdout")(
        function
    )


def _account_option(required: bool) -> Callable[..., Any]:
    return click.option(
        "--account",
        required=required,
        default=None,
        help="the account, e.g. acme" + ("" if required else " (with KEY a key id rather than a full name)"),
    )


def _key_argument(function: Callable[..., Any]) -> Callable[..., Any]:
    function = click.argument("key", metavar="KEY")(function)
    return _account_option(required=False)(function)


def _etag_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--etag", default="", help="only if the key's etag is still this one; a stale one gets ABORTED"
    )(function)


def _allow_self_option(action: str) -> Callable[..., Any]:
    return click.option(
        "--allow-self", is_flag=True, help=f"allow the call to {action} the key it is made with (--token)"
    )


def _print_json(message: Message) -> None:
    click.echo(
        json_format.MessageToJson(
            message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True, indent=2
        )
    )


def _time(message: Message, field: str, unset: str = "-") -> str:
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
        ("expires", _time(key, "expire_time", "never")),
        ("created", _time(key, "create_time")),
        ("updated", _time(key, "update_time")),
        ("last used", _time(key, "last_used_time", "never")),
    ]
    if key.HasField("revoke_time"):
        reason = f" ({key.revoke_reason})" if key.revoke_reason else ""
        fields.append(("revoked", _time(key, "revoke_time") + reason))
    if key.HasField("previous_secret_expire_time"):
        fields.append(("previous secret until", _time(key, "previous_secret_expire_time")))
    fields.append(("etag", key.etag))
    return fields


KEY_COLUMNS = ("KEY ID", "DISPLAY NAME", "STATE", "MASKED KEY", "PROJECT", "SCOPES", "CREATED", "LAST USED")


def _key_row(key: pb.ApiKey) -> list[str]:
    return [
        key.key_id,
        key.display_name,
        _state(key),
        key.masked_key,
        key.project_id,
        ",".join(key.scopes),
        _time(key, "create_time"),
        _time(key, "last_used_time", "never"),
    ]


def _show_key(key: pb.ApiKey, as_json: bool) -> None:
    if as_json:
        _print_json(key)
    else:
        click.echo(render_fields(_key_fields(key)))


def _show_issued(response: Any, what: str, request_id: str, as_json: bool) -> None:
    """create and rotate: the secret alone on stdout (or in the JSON), everything else on stderr."""
    if as_json:
        _print_json(response)
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


# ---------------------------------------------------------------------------------------------------------
# apikeyd keys ...


@click.group("keys")
def keys() -> None:
    """Create, list, change and remove API keys (apikeyd.v1.ApiKeyService).

    A key is named by its full name (accounts/acme/apiKeys/<key id>) or by --account acme and its key id.
    The server and the credential come from --address and --token, or APIKEYD_ADDRESS and APIKEYD_TOKEN.
    """


@keys.command("create")
@_account_option(required=True)
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
@click.option("--request-id", type=REQUEST_ID, help="a UUID making a retry safe; default a fresh one")
@_json_option
@_connection_options
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
        labels=_labels(labels),
        rate_limits=_rate_limits(rate_limits),
    )
    if isinstance(expires, datetime):
        api_key.expire_time.CopyFrom(_timestamp(expires))
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
    _show_issued(response, "created", request_id, as_json)


def _paging_options(noun: str, example: str) -> Callable[[Any], Any]:
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


@keys.command("list")
@_account_option(required=True)
@_paging_options("keys", 'state = ACTIVE AND labels.env = "prod"')
@_json_option
@_connection_options
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
    _list(client, "ListApiKeys", request, all_pages, as_json, "api_keys", KEY_COLUMNS, _key_row, "key")


def _list(
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
        _print_json(result)
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


@keys.command("get")
@_key_argument
@_json_option
@_connection_options
def keys_get(client: Client, key: str, account: str | None, as_json: bool) -> None:
    """Show a key (never its secret)."""
    _show_key(client.call("GetApiKey", pb.GetApiKeyRequest(name=key_name(key, account))), as_json)


@keys.command("update")
@_key_argument
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
@_etag_option
@_allow_self_option("narrow the scopes, expiry or rate limits of")
@_json_option
@_connection_options
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
    etag: str,
    allow_self: bool,
    as_json: bool,
) -> None:
    """Change the fields given, and only those (the update_mask names exactly them)."""
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
        api_key.labels.update(_labels(labels))
        paths.append("labels")
    if expires is not None:
        if isinstance(expires, datetime):
            api_key.expire_time.CopyFrom(_timestamp(expires))
        paths.append("expire_time")
    if rate_limits or clear_rate_limits:
        api_key.rate_limits.extend(_rate_limits(rate_limits))
        paths.append("rate_limits")
    if not paths:
        raise click.UsageError(
            "nothing to update: give --display-name, --description, --scope, --label, --clear-labels, "
            "--expires, --rate-limit or --clear-rate-limits"
        )
    request = pb.UpdateApiKeyRequest(api_key=api_key, update_mask=FieldMask(paths=paths), allow_self=allow_self)
    _show_key(client.call("UpdateApiKey", request), as_json)


def _set_state(client: Client, name: str, state: Any, etag: str, allow_self: bool, as_json: bool) -> None:
    request = pb.UpdateApiKeyRequest(
        api_key=pb.ApiKey(name=name, state=state, etag=etag),
        update_mask=FieldMask(paths=["state"]),
        allow_self=allow_self,
    )
    _show_key(client.call("UpdateApiKey", request), as_json)


@keys.command("disable")
@_key_argument
@_etag_option
@_allow_self_option("disable")
@_json_option
@_connection_options
def keys_disable(
    client: Client, key: str, account: str | None, etag: str, allow_self: bool, as_json: bool
) -> None:
    """Switch a key off (enable switches it on again)."""
    _set_state(client, key_name(key, account), pb.ApiKey.DISABLED, etag, allow_self, as_json)


@keys.command("enable")
@_key_argument
@_etag_option
@_json_option
@_connection_options
def keys_enable(client: Client, key: str, account: str | None, etag: str, as_json: bool) -> None:
    """Switch a disabled key on again."""
    _set_state(client, key_name(key, account), pb.ApiKey.ACTIVE, etag, False, as_json)


@keys.command("revoke")
@_key_argument
@click.option("--reason", default="", help="kept with the key for audit, e.g. leaked")
@_etag_option
@_allow_self_option("revoke")
@_json_option
@_connection_options
def keys_revoke(
    client: Client, key: str, account: str | None, reason: str, etag: str, allow_self: bool, as_json: bool
) -> None:
    """Revoke a key for good; it stays listed, for audit."""
    request = pb.RevokeApiKeyRequest(
        name=key_name(key, account), reason=reason, etag=etag, allow_self=allow_self
    )
    _show_key(client.call("RevokeApiKey", request), as_json)


@keys.command("delete")
@_key_argument
@click.option("--yes", "-y", is_flag=True, help="do not ask for confirmation")
@_etag_option
@_allow_self_option("delete")
@_json_option
@_connection_options
def keys_delete(
    client: Client, key: str, account: str | None, yes: bool, etag: str, allow_self: bool, as_json: bool
) -> None:
    """Delete a key: it stops working at once and cannot be recovered. Asks first, unless --yes."""
    name = key_name(key, account)
    if not yes:
        current = client.call("GetApiKey", pb.GetApiKeyRequest(name=name))
        prompt = (
            f"Delete {name} ({_printable(current.display_name)}, {current.masked_key})? "
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
        _print_json(deleted)
    else:
        click.echo(f"deleted {name}")


@keys.command("rotate")
@_key_argument
@click.option(
    "--grace", type=DURATION, help="how long the old secret keeps working: 0 to 7d, e.g. 24h [default 0]"
)
@_etag_option
@click.option("--request-id", type=REQUEST_ID, help="a UUID making a retry safe; default a fresh one")
@_allow_self_option("rotate")
@_json_option
@_connection_options
def keys_rotate(
    client: Client,
    key: str,
    account: str | None,
    grace: timedelta | None,
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
    hint = f"--request-id {request.request_id}"
    _show_issued(
        client.call("RotateApiKey", request, retry_hint=hint), "rotated", request.request_id, as_json
    )


# ---------------------------------------------------------------------------------------------------------
# apikeyd authorize | audit | health


@click.command("authorize")
@click.argument("key", metavar="KEY")
@click.option("--scope", "scopes", multiple=True, help="a required scope, resource:action; repeatable")
@click.option("--resource", default="", help="the value a {value} scope must name, e.g. example.com")
@click.option("--project", default="", help="the project the request is for")
@_json_option
@_connection_options
def authorize(
    client: Client, key: str, scopes: tuple[str, ...], resource: str, project: str, as_json: bool
) -> None:
    """Ask whether KEY may make a request: exit 0 when allowed, 1 when denied, 3 when the check failed.

    KEY is the key string, or - to read it from stdin (keeps it out of the process list and shell history).
    """
    client.error_exit_code = EXIT_AUTHORIZE_ERROR
    if key == "-":
        key = sys.stdin.read().strip()
    request = pb.AuthorizeRequest(
        key=key, required_scopes=list(scopes), resource=resource, project_id=project
    )
    answer = client.call("Authorize", request)
    code = pb.AuthorizeResponse.Code.Name(answer.code)
    if as_json:
        _print_json(answer)
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
        _time(event, "event_time"),
        pb.AuditEvent.Kind.Name(event.kind),
        event.key_id,
        event.actor_display_name or event.actor_key_id or ("admin-key" if not event.actor else event.actor),
        event.method,
        "; ".join(details),
    ]


@click.command("audit")
@_account_option(required=True)
@_paging_options("events", 'kind = REVOKED AND key_id = "..."')
@_json_option
@_connection_options
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
    _list(client, "ListAuditEvents", request, all_pages, as_json, "audit_events", AUDIT_COLUMNS, _audit_row, "event")


@click.command("health")
@click.option("--service", default="", help="a service name; default the whole server")
@_json_option
@_connection_options
def health(client: Client, service: str, as_json: bool) -> None:
    """Ask grpc.health.v1.Health/Check: exit 0 when SERVING, 1 otherwise (also when unreachable)."""
    answer = client.health(service)
    if as_json:
        _print_json(answer)
    else:
        click.echo(health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status))
    if answer.status != health_pb2.HealthCheckResponse.SERVING:
        raise click.exceptions.Exit(EXIT_ERROR)


COMMANDS = (keys, authorize, audit, health)


def register(group: click.Group) -> None:
    """Add the client commands to the `apikeyd` group."""
    for command in COMMANDS:
        group.add_command(command)


if __name__ == "__main__":  # python -m apikeyd.client_cli: the client alone, without the server's imports
    cli = click.Group("apikeyd", help="The apikeyd client: keys, authorize, audit, health.")
    register(cli)
    cli.main(prog_name="apikeyd")
