"""TLS and mTLS on the listener, with certificates made here: a CA, a server certificate for 127.0.0.1 and
localhost, a client certificate from that CA and one from another CA."""

import datetime
import ipaddress
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner, Result
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from apikeyd.cli import main
from apikeyd.config import Settings
from apikeyd.server import StartupError
from apikeyd.store import migrate
from apikeyd.store.engine import create_db_engine
from apikeyd.v1 import api_keys_pb2 as pb
from apikeyd.v1 import api_keys_pb2_grpc as pb_grpc
from tests.conftest import ISSUED_SECRETS, BearerCredentials, RunningServer, create_key, free_port
from tests.test_server import APIKEYD

CALL_TIMEOUT = 10
ELSEWHERE = "apikeyd.example.internal"


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
    elsewhere: Issued  # a server certificate from the CA for another name only, not 127.0.0.1 or localhost


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
    elsewhere, _, _ = _issue(
        directory,
        "elsewhere",
        "apikeyd",
        issuer=(ca_cert, ca_key),
        sans=[x509.DNSName(ELSEWHERE)],
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
    )
    return Pki(ca, server, client, other_ca, stranger, elsewhere)


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
    port = free_port()
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
    port = free_port()
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
    process = _serve(tmp_path, "--listen", f"127.0.0.1:{free_port()}", *flags)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 2, stderr
    [line] = [line for line in stderr.splitlines() if line.startswith("apikeyd: ")]
    assert message in line
    assert "Traceback" not in stderr

# The client commands (`apikeyd health|keys|authorize|audit`) over TLS and mTLS, with the --tls* flags or the
# APIKEYD_CLIENT_TLS_* variables, against the servers above.

CLIENT_VARIABLES = (
    "APIKEYD_ADDRESS",
    "APIKEYD_TOKEN",
    "APIKEYD_TIMEOUT",
    "APIKEYD_CLIENT_TLS",
    "APIKEYD_CLIENT_TLS_CA",
    "APIKEYD_CLIENT_TLS_CERT",
    "APIKEYD_CLIENT_TLS_KEY",
    "APIKEYD_CLIENT_TLS_SERVER_NAME",
)
TLS_OPTIONS = {
    "tls_ca": ("--tls-ca", "APIKEYD_CLIENT_TLS_CA"),
    "tls_cert": ("--tls-cert", "APIKEYD_CLIENT_TLS_CERT"),
    "tls_key": ("--tls-key", "APIKEYD_CLIENT_TLS_KEY"),
    "tls_server_name": ("--tls-server-name", "APIKEYD_CLIENT_TLS_SERVER_NAME"),
}
TLS_HINT = "(over TLS: check --tls-ca"
PLAINTEXT_HINT = "(this client spoke plaintext: if the server uses TLS, pass --tls-ca FILE or --tls)"


def apikeyd(*args: str, env: dict[str, str] | None = None) -> Result:
    """`apikeyd ARGS` in-process, with none of this process's client variables, only those in env."""
    environment: dict[str, str | None] = dict.fromkeys(CLIENT_VARIABLES)
    environment.update(env or {})
    result = CliRunner().invoke(main, list(args), env=environment, prog_name="apikeyd")
    assert "Traceback" not in result.output, result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def _tls_args(how: str, **options: str) -> tuple[list[str], dict[str, str]]:
    """The options as flags (how="flags") or as APIKEYD_CLIENT_TLS_* variables (how="env")."""
    if how == "flags":
        return [arg for name, value in options.items() for arg in (TLS_OPTIONS[name][0], value)], {}
    return [], {TLS_OPTIONS[name][1]: value for name, value in options.items()}


def _ok(result: Result) -> Result:
    assert result.exit_code == 0, (result.exit_code, result.stdout, result.stderr)
    return result


def _error_line(result: Result, code: str, exit_code: int = 1) -> str:
    """The one-line error on stderr, checked for its code and the exit status."""
    assert result.exit_code == exit_code, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {code}: "), result.stderr
    return lines[0]


def _usage_error(result: Result, *expected: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    assert "UNAVAILABLE" not in result.stderr  # refused before connecting
    for text in expected:
        assert text in result.stderr, result.stderr
    return result.stderr


def _no_key_material(pki: Pki, text: str) -> None:
    assert "PRIVATE KEY" not in text
    flat = text.replace("\n", "")
    for issued in (pki.ca, pki.server, pki.client, pki.stranger, pki.elsewhere):
        body = b"".join(issued.key.splitlines()[1:-1]).decode()
        assert body[:32] not in flat and body[-32:] not in flat


@pytest.mark.parametrize("how", ["flags", "env"])
@pytest.mark.parametrize("mtls", [False, True], ids=["tls", "mtls"])
def test_client_commands_over_tls(start, pki, how, mtls):
    server = start(**_server_settings(pki, mtls=mtls))
    options = {"tls_ca": str(pki.ca.cert_path)}
    if mtls:
        options |= {"tls_cert": str(pki.client.cert_path), "tls_key": str(pki.client.key_path)}
    args, env = _tls_args(how, **options)
    env |= {"APIKEYD_ADDRESS": server.address, "APIKEYD_TOKEN": server.operator_key}
    assert _ok(apikeyd("health", *args, env=env)).stdout == "SERVING\n"
    account = f"tls-{how}-{'mtls' if mtls else 'tls'}"
    created = json.loads(
        _ok(
            apikeyd(
                "keys", "create", "--account", account, "--display-name", "over tls",
                "--scope", "messages:send", "--json", *args, env=env,
            )
        ).stdout
    )  # fmt: skip
    ISSUED_SECRETS.add(created["secret"])
    listed = json.loads(_ok(apikeyd("keys", "list", "--account", account, "--json", *args, env=env)).stdout)
    assert [key["name"] for key in listed["api_keys"]] == [created["api_key"]["name"]]
    table = _ok(apikeyd("keys", "list", "--account", account, *args, env=env))
    assert "over tls" in table.stdout
    allowed = _ok(apikeyd("authorize", created["secret"], "--scope", "messages:send", *args, env=env))
    assert allowed.stdout.startswith("allowed:")
    assert "CREATED" in _ok(apikeyd("audit", "--account", account, *args, env=env)).stdout
    _no_key_material(pki, table.output + allowed.output)


@pytest.mark.parametrize("how", ["flags", "env"])
def test_client_tls_server_name_verifies_a_certificate_for_another_name(start, pki, how):
    """A container's own health check dials 127.0.0.1, and the certificate names the service."""
    server = start(tls_cert=str(pki.elsewhere.cert_path), tls_key=str(pki.elsewhere.key_path))
    args, env = _tls_args(how, tls_ca=str(pki.ca.cert_path), tls_server_name=ELSEWHERE)
    env["APIKEYD_ADDRESS"] = server.address
    assert _ok(apikeyd("health", *args, env=env)).stdout == "SERVING\n"
    # without it the certificate does not name 127.0.0.1, and a name it does not show is refused too
    unnamed = apikeyd("health", "--tls-ca", str(pki.ca.cert_path), env={"APIKEYD_ADDRESS": server.address})
    assert TLS_HINT in _error_line(unnamed, "UNAVAILABLE")
    wrong = apikeyd("health", "--tls-ca", str(pki.ca.cert_path), "--tls-server-name", "localhost", env=env)
    assert TLS_HINT in _error_line(wrong, "UNAVAILABLE")


def test_client_tls_with_the_system_roots(start, pki):
    """--tls (or APIKEYD_CLIENT_TLS) alone trusts the system's CA bundle, which SSL_CERT_FILE names here."""
    server = start(**_server_settings(pki))
    trusted = {"APIKEYD_ADDRESS": server.address, "SSL_CERT_FILE": str(pki.ca.cert_path)}
    assert _ok(apikeyd("health", "--tls", env=trusted)).stdout == "SERVING\n"
    for value in ("1", "true", "yes"):
        assert _ok(apikeyd("health", env={**trusted, "APIKEYD_CLIENT_TLS": value})).stdout == "SERVING\n"
    # any other TLS option implies --tls
    assert _ok(apikeyd("health", "--tls-server-name", "localhost", env=trusted)).stdout == "SERVING\n"
    # a system bundle without the server's CA: refused
    untrusted = {"APIKEYD_ADDRESS": server.address, "SSL_CERT_FILE": str(pki.other_ca.cert_path)}
    assert TLS_HINT in _error_line(apikeyd("health", "--tls", env=untrusted), "UNAVAILABLE")
    # APIKEYD_CLIENT_TLS=0 (or false, or empty) leaves the client plaintext, which the TLS server refuses
    for value in ("0", "false", ""):
        plaintext = apikeyd("health", env={**trusted, "APIKEYD_CLIENT_TLS": value})
        assert PLAINTEXT_HINT in _error_line(plaintext, "UNAVAILABLE")
    assert _usage_error(apikeyd("health", env={**trusted, "APIKEYD_CLIENT_TLS": "maybe"}), "maybe")


FAILURES = {
    "wrong-ca": (False, "other-ca", None, TLS_HINT),
    "no-client-certificate": (True, "ca", None, TLS_HINT),
    "certificate-from-another-ca": (True, "ca", "stranger", TLS_HINT),
    "tls-to-plaintext": (None, "ca", "client", TLS_HINT),
    "plaintext-to-tls": (False, None, None, PLAINTEXT_HINT),
    "plaintext-to-mtls": (True, None, None, PLAINTEXT_HINT),
}


@pytest.mark.parametrize("case", FAILURES)
def test_client_tls_failures_are_one_line_unavailable(start, pki, case):
    mtls, ca, client, hint = FAILURES[case]
    server = start(**({} if mtls is None else _server_settings(pki, mtls=mtls)))
    args = []
    if ca is not None:
        args += ["--tls-ca", str({"ca": pki.ca, "other-ca": pki.other_ca}[ca].cert_path)]
    if client is not None:
        issued = {"client": pki.client, "stranger": pki.stranger}[client]
        args += ["--tls-cert", str(issued.cert_path), "--tls-key", str(issued.key_path)]
    env = {"APIKEYD_ADDRESS": server.address, "APIKEYD_TOKEN": server.operator_key}
    started = time.monotonic()
    line = _error_line(apikeyd("health", *args, env=env), "UNAVAILABLE")
    assert f"apikeyd at {server.address} is unavailable" in line and hint in line
    _error_line(apikeyd("keys", "list", "--account", "acme", *args, env=env), "UNAVAILABLE")
    # authorize keeps "the check could not be made" (3) apart from "denied" (1)
    _error_line(apikeyd("authorize", "AK_x", *args, env=env), "UNAVAILABLE", exit_code=3)
    assert time.monotonic() - started < 10
    # the same options work against the server when they fit it
    if case == "wrong-ca":
        assert _ok(apikeyd("health", "--tls-ca", str(pki.ca.cert_path), env=env))


def _bad_client_options(pki: Pki, tmp_path: Path) -> dict[str, tuple[dict[str, str], list[str]]]:
    """Options that cannot work: the options, and what the usage error must say."""
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello\n")
    encrypted_key = tmp_path / "encrypted.key"
    encrypted_key.write_bytes(
        serialization.load_pem_private_key(pki.client.key, None).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    ca, cert, key = str(pki.ca.cert_path), str(pki.client.cert_path), str(pki.client.key_path)
    missing = str(tmp_path / "nope.pem")
    return {
        "missing-ca": ({"tls_ca": missing}, ["--tls-ca", "APIKEYD_CLIENT_TLS_CA", missing, "No such file"]),
        "ca-is-a-directory": ({"tls_ca": str(tmp_path)}, ["--tls-ca", str(tmp_path), "Is a directory"]),
        "ca-not-pem": ({"tls_ca": str(not_pem)}, ["--tls-ca", f"{not_pem} is not a PEM file"]),
        "ca-is-a-key": ({"tls_ca": key}, ["--tls-ca", f"{key} holds no usable CA certificate"]),
        "missing-cert": (
            {"tls_ca": ca, "tls_cert": missing, "tls_key": key},
            ["--tls-cert", "APIKEYD_CLIENT_TLS_CERT", missing, "No such file"],
        ),
        "missing-key": (
            {"tls_ca": ca, "tls_cert": cert, "tls_key": missing},
            ["--tls-key", "APIKEYD_CLIENT_TLS_KEY", missing, "No such file"],
        ),
        "cert-without-key": (
            {"tls_ca": ca, "tls_cert": cert},
            ["--tls-cert (APIKEYD_CLIENT_TLS_CERT) is given but --tls-key (APIKEYD_CLIENT_TLS_KEY) is not"],
        ),
        "key-without-cert": (
            {"tls_key": key},
            ["--tls-key (APIKEYD_CLIENT_TLS_KEY) is given but --tls-cert (APIKEYD_CLIENT_TLS_CERT) is not"],
        ),
        "key-of-another-certificate": (
            {"tls_cert": cert, "tls_key": str(pki.server.key_path)},
            [cert, str(pki.server.key_path), "the key is not the certificate's"],
        ),
        "encrypted-key": ({"tls_cert": cert, "tls_key": str(encrypted_key)}, ["--tls-key", "the key is encrypted"]),
    }


@pytest.mark.parametrize("how", ["flags", "env"])
@pytest.mark.parametrize(
    "case",
    [
        "missing-ca",
        "ca-is-a-directory",
        "ca-not-pem",
        "ca-is-a-key",
        "missing-cert",
        "missing-key",
        "cert-without-key",
        "key-without-cert",
        "key-of-another-certificate",
        "encrypted-key",
    ],
)
def test_client_tls_options_that_cannot_work_are_usage_errors(pki, tmp_path, case, how):
    options, expected = _bad_client_options(pki, tmp_path)[case]
    args, env = _tls_args(how, **options)
    env["APIKEYD_ADDRESS"] = "127.0.0.1:1"  # never dialled
    for command in (["health"], ["keys", "list", "--account", "acme"], ["authorize", "AK_x"]):
        stderr = _usage_error(apikeyd(*command, *args, env=env), *expected)
        _no_key_material(pki, stderr)


def test_client_tls_options_are_in_the_help():
    text = _ok(apikeyd("health", "--help")).stdout
    for flag, variable in [("--tls", "APIKEYD_CLIENT_TLS"), *TLS_OPTIONS.values()]:
        assert flag in text and f"[{variable}]" in text


def test_the_console_script_as_a_containers_health_check_over_mtls(start, pki):
    """The real `apikeyd health` with only variables, as a container's HEALTHCHECK runs it: the server's
    APIKEYD_TLS_* (which such a container also sets) do not change the client, and a failure is one line."""
    server = start(
        tls_cert=str(pki.elsewhere.cert_path), tls_key=str(pki.elsewhere.key_path), tls_client_ca=str(pki.ca.cert_path)
    )
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("APIKEYD_", "GRPC_VERBOSITY"))},
        "APIKEYD_ADDRESS": server.address,
        "APIKEYD_TLS_CERT": str(pki.elsewhere.cert_path),
        "APIKEYD_TLS_KEY": str(pki.elsewhere.key_path),
        "APIKEYD_TLS_CLIENT_CA": str(pki.ca.cert_path),
        "APIKEYD_CLIENT_TLS_CA": str(pki.ca.cert_path),
        "APIKEYD_CLIENT_TLS_SERVER_NAME": ELSEWHERE,
        "APIKEYD_CLIENT_TLS_CERT": str(pki.client.cert_path),
        "APIKEYD_CLIENT_TLS_KEY": str(pki.client.key_path),
    }

    def health(**changes: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [APIKEYD, "health"], env={**env, **changes}, capture_output=True, text=True, timeout=60, check=False
        )

    healthy = health()
    assert (healthy.returncode, healthy.stdout, healthy.stderr) == (0, "SERVING\n", "")
    # a CA that did not sign the server's certificate: grpc would log the failed handshake to stderr itself
    refused = health(APIKEYD_CLIENT_TLS_CA=str(pki.other_ca.cert_path))
    assert refused.returncode == 1 and refused.stdout == ""
    [line] = refused.stderr.splitlines()
    assert line.startswith("error: UNAVAILABLE: ") and TLS_HINT in line
    usage = health(APIKEYD_CLIENT_TLS_KEY="")
    assert usage.returncode == 2 and "--tls-cert (APIKEYD_CLIENT_TLS_CERT) is given but" in usage.stderr
    assert "Traceback" not in refused.stderr + usage.stderr


def test_the_client_library_reads_the_clis_tls_variables(start, pki):
    """apikeyd.client.Connection.from_env: the same APIKEYD_CLIENT_TLS_* as the command line, mTLS included."""
    from apikeyd.client import AuthCode, AuthorizeError, Client, Connection
    from apikeyd.domain import keys

    server = start(**_server_settings(pki, mtls=True))
    unknown, _ = keys.generate("AK_", keys.new_lookup_id())
    env = {
        "APIKEYD_ADDRESS": server.address,
        "APIKEYD_CLIENT_TLS_CA": str(pki.ca.cert_path),
        "APIKEYD_CLIENT_TLS_CERT": str(pki.client.cert_path),
        "APIKEYD_CLIENT_TLS_KEY": str(pki.client.key_path),
    }
    with Client(Connection.from_env(env), watch=False) as client:
        assert client.authorize(unknown).code is AuthCode.NOT_FOUND  # the server answered, over mTLS
    without_certificate = {k: v for k, v in env.items() if "CERT" not in k and "KEY" not in k}
    with Client(Connection.from_env(without_certificate), watch=False) as client:
        with pytest.raises(AuthorizeError) as refused:
            client.authorize(unknown)
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    for bad, message in [
        ({**env, "APIKEYD_CLIENT_TLS_CA": str(pki.ca.key_path.parent / "missing.pem")}, "cannot read"),
        ({"APIKEYD_CLIENT_TLS_CERT": str(pki.client.cert_path)}, "go together"),
        ({"APIKEYD_CLIENT_TLS": "maybe"}, "neither true nor false"),
    ]:
        with pytest.raises(ValueError, match=message):
            Connection.from_env(bad)
