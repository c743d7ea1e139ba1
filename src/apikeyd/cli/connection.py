"""The client's connection to a server: the --address, --token, --timeout and --tls* options, the channel,
and the one-line errors a failed call becomes."""

import functools
import ssl
from collections.abc import Callable
from typing import Any

import click
import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from apikeyd.cli.options import TIMEOUT
from apikeyd.client.settings import DEFAULT_ADDRESS, ClientTls, read_pem, system_roots
from apikeyd.v1 import api_keys_pb2_grpc as pb_grpc

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
# Errors, TLS and the connection.


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


def _read_pem(name: str, path: str) -> bytes:
    """A PEM file named by option `name`; a usage error naming the option and the file otherwise."""
    try:
        return read_pem(path)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint=_tls_option(name)) from None


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
        roots = system_roots()
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
        if not self.address:  # grpc would fail later, with a status of its own and lines of C-core trace
            raise click.BadParameter("give the server as host:port", param_hint="--address (APIKEYD_ADDRESS)")
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


def connection_options(function: Callable[..., Any]) -> Callable[..., Any]:
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
        type=TIMEOUT,
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


