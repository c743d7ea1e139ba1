"""TLS for the gRPC listener: a certificate and its key serve TLS; a client CA also requires client
certificates signed by it (mTLS). With none of the three set the listener stays plaintext.

The files are read and checked once, at start, so that a wrong path, a file that is not PEM or a key that
does not belong to its certificate stops the server with a message naming the setting, instead of every
handshake failing later."""

import ssl

import grpc

from apikeyd.client.settings import read_pem
from apikeyd.config import Settings


class TlsSettingsError(ValueError):
    """The TLS settings or their files cannot work; the message names the setting."""


def _named(name: str) -> str:
    return f"{Settings.env_name(name)} (--{name.replace('_', '-')})"


def _read(name: str, path: str) -> bytes:
    try:
        return read_pem(path)
    except ValueError as error:
        raise TlsSettingsError(f"{_named(name)}: {error}") from None


def _no_password() -> bytes:
    raise TlsSettingsError(f"{_named('tls_key')}: the key is encrypted; give it unencrypted")


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """The listener's credentials, or None for plaintext."""
    if not settings.tls_cert and not settings.tls_key:
        if settings.tls_client_ca:
            raise TlsSettingsError(
                f"{_named('tls_client_ca')} needs {_named('tls_cert')} and {_named('tls_key')}: "
                "client certificates are checked only over TLS"
            )
        return None
    if not settings.tls_cert or not settings.tls_key:
        given, missing = ("tls_cert", "tls_key") if settings.tls_cert else ("tls_key", "tls_cert")
        raise TlsSettingsError(
            f"{_named(given)} is set but {_named(missing)} is not: TLS needs both the certificate and its key"
        )
    certificate = _read("tls_cert", settings.tls_cert)
    key = _read("tls_key", settings.tls_key)
    client_ca = _read("tls_client_ca", settings.tls_client_ca) if settings.tls_client_ca else None
    # grpc takes any bytes here and would fail only at each handshake: let OpenSSL check them now.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key, password=_no_password)
    except ssl.SSLError as error:
        why = (
            "the key is not the certificate's"
            if error.reason == "KEY_VALUES_MISMATCH"
            else error.reason or error
        )
        raise TlsSettingsError(
            f"{_named('tls_cert')} {settings.tls_cert} and {_named('tls_key')} {settings.tls_key} "
            f"are not a usable certificate and matching key: {why}"
        ) from None
    if client_ca is not None:
        try:
            context.load_verify_locations(cadata=client_ca.decode("ascii", "replace"))
        except ssl.SSLError as error:
            raise TlsSettingsError(
                f"{_named('tls_client_ca')}: {settings.tls_client_ca} holds no usable CA certificate: "
                f"{error.reason or error}"
            ) from None
    return grpc.ssl_server_credentials(
        [(key, certificate)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def describe(settings: Settings) -> str:
    """How the listener speaks, for the start-up log line."""
    if not settings.tls_cert:
        return "plaintext"
    return "TLS, client certificates required" if settings.tls_client_ca else "TLS"
