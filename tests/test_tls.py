"""TLS and mTLS on the listener, with certificates made here: a CA, a server certificate for 127.0.0.1 and
localhost, a client certificate from that CA and one from another CA."""

import datetime
import ipaddress
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from apikeyd.config import Settings
from apikeyd.server import StartupError
from apikeyd.store import migrate
from apikeyd.store.repository import create_db_engine
from apikeyd.v1 import api_keys_pb2 as pb
from apikeyd.v1 import api_keys_pb2_grpc as pb_grpc
from tests.conftest import BearerCredentials, RunningServer, create_key

APIKEYD = str(Path(sys.executable).with_name("apikeyd"))
CALL_TIMEOUT = 10


@dataclass(frozen=True)
class Issued:
    cert: bytes
    key: bytes
    cert_path: Path
    key_path: Path


def _issue(
    directory: Path,
    name: str,
    subject: str,
    *,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
    ca: bool = False,
    sans: list[x509.GeneralName] | None = None,
    usage: x509.ObjectIdentifier | None = None,
) -> tuple[Issued, x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    subject_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_cert, issuer_key = issuer if issuer else (None, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject_name)
        .issuer_name(issuer_cert.subject if issuer_cert else subject_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer_cert is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_cert.public_key()), critical=False
        )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    cert = builder.sign(issuer_key, hashes.SHA256())
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert_pem)
    key_path.write_bytes(key_pem)
    return Issued(cert_pem, key_pem, cert_path, key_path), cert, key


@dataclass(frozen=True)
class Pki:
    ca: Issued
    server: Issued
    client: Issued
    other_ca: Issued
    stranger: Issued  # a client certificate from the other CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca, ca_cert, ca_key = _issue(directory, "ca", "apikeyd test CA", ca=True)
    server, _, _ = _issue(
        directory,
        "server",
        "apikeyd",
        issuer=(ca_cert, ca_key),
        sans=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
    )
    client, _, _ = _issue(
        directory,
        "client",
        "billing-service",
        issuer=(ca_cert, ca_key),
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
    )
    other_ca, other_cert, other_key = _issue(directory, "other-ca", "someone else's CA", ca=True)
    stranger, _, _ = _issue(
        directory,
        "stranger",
        "billing-service",
        issuer=(other_cert, other_key),
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
    )
    return Pki(ca, server, client, other_ca, stranger)


@pytest.fixture(scope="module")
def database_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    """TLS is the same on every database: one migrated SQLite file for this module."""
    url = f"sqlite:///{tmp_path_factory.mktemp('tls-db') / 'apikeyd.db'}"
    engine = create_db_engine(url)
    migrate.upgrade(engine)
    engine.dispose()
    return url


@pytest.fixture
def start(database_file: str) -> Iterator:
    """Start a server with TLS settings; its stub and channel are plaintext and unused here."""
    started: list[RunningServer] = []

    def start_server(**tls_settings: str) -> RunningServer:
        server = RunningServer(Settings.load(environ={}, database_url=database_file, **tls_settings))
        started.append(server)
        return server

    yield start_server
    for server in started:
        server.stop()


def _credentials(
    pki: Pki, client: Issued | None = None, root: Issued | None = None
) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=(root or pki.ca).cert,
        private_key=client.key if client else None,
        certificate_chain=client.cert if client else None,
    )


def _check(channel: grpc.Channel) -> int:
    health = health_pb2_grpc.HealthStub(channel)
    return health.Check(health_pb2.HealthCheckRequest(service=""), timeout=CALL_TIMEOUT).status


def _refused(channel: grpc.Channel) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        _check(channel)
    return caught.value


def _server_settings(pki: Pki, mtls: bool = False) -> dict[str, str]:
    settings = {"tls_cert": str(pki.server.cert_path), "tls_key": str(pki.server.key_path)}
    if mtls:
        settings["tls_client_ca"] = str(pki.ca.cert_path)
    return settings


SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_tls_serves_clients_that_trust_the_ca(start, pki, host):
    server = start(**_server_settings(pki))
    with grpc.secure_channel(f"{host}:{server.port}", _credentials(pki)) as channel:
        assert _check(channel) == SERVING
        # a management call with its bearer key, and Authorize, over TLS
        stub = pb_grpc.ApiKeyServiceStub(
            grpc.intercept_channel(channel, BearerCredentials(server.operator_key))
        )
        created = create_key(stub, "tls-acme")
        response = stub.Authorize(pb.AuthorizeRequest(key=created.secret, required_scopes=["messages:send"]))
        assert response.code == pb.AuthorizeResponse.OK


def test_tls_refuses_a_plaintext_client(start, pki):
    server = start(**_server_settings(pki))
    with grpc.insecure_channel(server.address) as channel:
        assert _refused(channel).code() == grpc.StatusCode.UNAVAILABLE


def test_a_client_that_does_not_trust_the_servers_ca_refuses_it(start, pki):
    server = start(**_server_settings(pki))
    with grpc.secure_channel(server.address, _credentials(pki, root=pki.other_ca)) as channel:
        assert _refused(channel).code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_serves_a_client_with_a_certificate_from_the_client_ca(start, pki):
    server = start(**_server_settings(pki, mtls=True))
    with grpc.secure_channel(server.address, _credentials(pki, client=pki.client)) as channel:
        assert _check(channel) == SERVING


@pytest.mark.parametrize(
    "client", ["none", "stranger"], ids=["no-certificate", "certificate-from-another-ca"]
)
def test_mtls_refuses_a_client_without_a_good_certificate(start, pki, client):
    server = start(**_server_settings(pki, mtls=True))
    presented = {"none": None, "stranger": pki.stranger}[client]
    with grpc.secure_channel(server.address, _credentials(pki, client=presented)) as channel:
        assert _refused(channel).code() == grpc.StatusCode.UNAVAILABLE
    # and the refusal costs the server nothing: a good client still gets in
    with grpc.secure_channel(server.address, _credentials(pki, client=pki.client)) as channel:
        assert _check(channel) == SERVING


def test_mtls_refuses_a_plaintext_client(start, pki):
    server = start(**_server_settings(pki, mtls=True))
    with grpc.insecure_channel(server.address) as channel:
        assert _refused(channel).code() == grpc.StatusCode.UNAVAILABLE


def test_without_tls_settings_the_listener_stays_plaintext(start):
    server = start()
    assert _check(server.channel) == SERVING


# Settings that cannot work stop the start with a message naming the setting.


def _bad_settings(pki: Pki, tmp_path: Path) -> dict[str, tuple[dict[str, str], str]]:
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello\n")
    encrypted_key = tmp_path / "encrypted.key"
    encrypted_key.write_bytes(
        serialization.load_pem_private_key(pki.server.key, None).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    return {
        "cert-without-key": (
            {"tls_cert": str(pki.server.cert_path)},
            "APIKEYD_TLS_CERT (--tls-cert) is set but APIKEYD_TLS_KEY (--tls-key) is not",
        ),
        "key-without-cert": (
            {"tls_key": str(pki.server.key_path)},
            "APIKEYD_TLS_KEY (--tls-key) is set but APIKEYD_TLS_CERT (--tls-cert) is not",
        ),
        "client-ca-without-tls": (
            {"tls_client_ca": str(pki.ca.cert_path)},
            "APIKEYD_TLS_CLIENT_CA (--tls-client-ca) needs APIKEYD_TLS_CERT (--tls-cert) and APIKEYD_TLS_KEY",
        ),
        "missing-cert-file": (
            {"tls_cert": str(tmp_path / "nope.crt"), "tls_key": str(pki.server.key_path)},
            f"APIKEYD_TLS_CERT (--tls-cert): cannot read {tmp_path / 'nope.crt'}: No such file or directory",
        ),
        "key-is-a-directory": (
            {"tls_cert": str(pki.server.cert_path), "tls_key": str(tmp_path)},
            f"APIKEYD_TLS_KEY (--tls-key): cannot read {tmp_path}: Is a directory",
        ),
        "missing-client-ca-file": (
            {**_server_settings(pki), "tls_client_ca": str(tmp_path / "nope-ca.crt")},
            "APIKEYD_TLS_CLIENT_CA (--tls-client-ca): cannot read",
        ),
        "key-not-pem": (
            {"tls_cert": str(pki.server.cert_path), "tls_key": str(not_pem)},
            f"APIKEYD_TLS_KEY (--tls-key): {not_pem} is not a PEM file",
        ),
        "key-of-another-certificate": (
            {"tls_cert": str(pki.server.cert_path), "tls_key": str(pki.client.key_path)},
            "are not a usable certificate and matching key: the key is not the certificate's",
        ),
        "encrypted-key": (
            {"tls_cert": str(pki.server.cert_path), "tls_key": str(encrypted_key)},
            "APIKEYD_TLS_KEY (--tls-key): the key is encrypted; give it unencrypted",
        ),
        "client-ca-is-a-key": (
            {**_server_settings(pki), "tls_client_ca": str(pki.ca.key_path)},
            "APIKEYD_TLS_CLIENT_CA (--tls-client-ca): "
            + str(pki.ca.key_path)
            + " holds no usable CA certificate",
        ),
    }


BAD = [
    "cert-without-key",
    "key-without-cert",
    "client-ca-without-tls",
    "missing-cert-file",
    "key-is-a-directory",
    "missing-client-ca-file",
    "key-not-pem",
    "key-of-another-certificate",
    "encrypted-key",
    "client-ca-is-a-key",
]


@pytest.mark.parametrize("case", BAD)
def test_tls_settings_that_cannot_work_stop_the_start(database_file, pki, tmp_path, case):
    settings, message = _bad_settings(pki, tmp_path)[case]
    with pytest.raises(StartupError) as caught:
        RunningServer(Settings.load(environ={}, database_url=database_file, **settings), operator=False)
    assert message in str(caught.value)


# The same through `apikeyd serve`: the flags and variables exist and behave.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [APIKEYD, "serve", "--database-url", f"sqlite:///{tmp_path}/apikeyd.db", *args],
        stderr=subprocess.PIPE,
        text=True,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("APIKEYD_")},
            "APIKEYD_METRICS_LISTEN": "127.0.0.1:0",  # never the fixed default port, which may be taken
            **(env or {}),
        },
    )


def _ready(channel: grpc.Channel) -> grpc.Channel:
    grpc.channel_ready_future(channel).result(timeout=30)
    return channel


def test_serve_flags_turn_on_mtls_and_sigterm_still_exits_0(tmp_path, pki):
    port = _free_port()
    process = _serve(
        tmp_path,
        "--listen", f"127.0.0.1:{port}",
        "--tls-cert", str(pki.server.cert_path),
        "--tls-key", str(pki.server.key_path),
        "--tls-client-ca", str(pki.ca.cert_path),
    )  # fmt: skip
    try:
        with _ready(
            grpc.secure_channel(f"localhost:{port}", _credentials(pki, client=pki.client))
        ) as channel:
            assert _check(channel) == SERVING
        with grpc.secure_channel(f"localhost:{port}", _credentials(pki, client=pki.stranger)) as channel:
            assert _refused(channel).code() == grpc.StatusCode.UNAVAILABLE
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert "TLS, client certificates required" in stderr


def test_serve_reads_the_tls_variables(tmp_path, pki):
    port = _free_port()
    process = _serve(
        tmp_path,
        env={
            "APIKEYD_LISTEN": f"127.0.0.1:{port}",
            "APIKEYD_TLS_CERT": str(pki.server.cert_path),
            "APIKEYD_TLS_KEY": str(pki.server.key_path),
        },
    )
    try:
        with _ready(grpc.secure_channel(f"127.0.0.1:{port}", _credentials(pki))) as channel:
            assert _check(channel) == SERVING
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr


@pytest.mark.parametrize(
    "case", ["cert-without-key", "client-ca-without-tls", "missing-cert-file", "key-of-another-certificate"]
)
def test_serve_exits_2_with_a_clear_message_for_tls_settings_that_cannot_work(tmp_path, pki, case):
    settings, message = _bad_settings(pki, tmp_path)[case]
    flags = [arg for name, value in settings.items() for arg in ("--" + name.replace("_", "-"), value)]
    process = _serve(tmp_path, "--listen", f"127.0.0.1:{_free_port()}", *flags)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 2, stderr
    [line] = [line for line in stderr.splitlines() if line.startswith("apikeyd: ")]
    assert message in line
    assert "Traceback" not in stderr
