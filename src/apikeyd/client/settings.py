"""Where the client connects and how: the same settings as the `apikeyd` CLI's client commands, from the
same variables (APIKEYD_ADDRESS, APIKEYD_TOKEN, APIKEYD_TIMEOUT, APIKEYD_CLIENT_TLS*)."""

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field

import grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"
# What the CLI's boolean variables take (click's BOOL).
_TRUE = {"1", "true", "t", "yes", "y", "on"}
_FALSE = {"", "0", "false", "f", "no", "n", "off"}


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


def read_pem(path: str) -> bytes:
    """A PEM file's bytes; ValueError saying what is wrong with it otherwise."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror or error}") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"{path} is not a PEM file")
    return data


def system_roots() -> bytes | None:
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


@dataclass(frozen=True)
class Connection:
    """An apikeyd server to ask: its address, the bearer key to call with (`token`; needed for the change
    stream, with scope apikeys:authorize), TLS, and the deadline of each call."""

    address: str = DEFAULT_ADDRESS
    token: str = field(default="", repr=False)
    tls: ClientTls | None = None
    timeout: float = 2.0

    def __post_init__(self) -> None:
        if not self.address.strip():
            raise ValueError("address: give the server as host:port")
        if self.token and not all(33 <= ord(c) <= 126 for c in self.token):
            raise ValueError("token: it holds characters no apikeyd key has")  # never echoed: a credential
        if not self.timeout > 0:
            raise ValueError(f"timeout: must be more than 0 seconds, not {self.timeout}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "Connection":
        """From the CLI's variables; TLS when APIKEYD_CLIENT_TLS is true or any APIKEYD_CLIENT_TLS_* is set."""
        ca, cert, key = (environ.get(f"APIKEYD_CLIENT_TLS_{n}", "").strip() for n in ("CA", "CERT", "KEY"))
        server_name = environ.get("APIKEYD_CLIENT_TLS_SERVER_NAME", "").strip() or None
        tls = None
        flag = environ.get("APIKEYD_CLIENT_TLS", "").strip().lower()
        if flag not in _TRUE | _FALSE:
            raise ValueError(f"APIKEYD_CLIENT_TLS: {flag!r} is neither true nor false")
        if flag in _TRUE or ca or cert or key or server_name:
            if bool(cert) != bool(key):
                raise ValueError("APIKEYD_CLIENT_TLS_CERT and APIKEYD_CLIENT_TLS_KEY go together: give both or neither")
            tls = ClientTls(
                read_pem(ca) if ca else system_roots(),
                read_pem(cert) if cert else None,
                read_pem(key) if key else None,
                server_name,
            )
        timeout = environ.get("APIKEYD_TIMEOUT", "").strip()
        try:
            seconds = float(timeout) if timeout else cls.timeout
        except ValueError:
            raise ValueError(f"APIKEYD_TIMEOUT: {timeout!r} is not a number of seconds") from None
        return cls(
            environ.get("APIKEYD_ADDRESS", "").strip() or DEFAULT_ADDRESS,
            environ.get("APIKEYD_TOKEN", "").strip(),
            tls,
            seconds,
        )

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def channel(self) -> grpc.Channel:
        if self.tls is None:
            return grpc.insecure_channel(self.address)
        return grpc.secure_channel(self.address, self.tls.credentials(), options=self.tls.channel_options())

    def aio_channel(self) -> grpc.aio.Channel:
        if self.tls is None:
            return grpc.aio.insecure_channel(self.address)
        return grpc.aio.secure_channel(self.address, self.tls.credentials(), options=self.tls.channel_options())
