"""The HTTP ext_authz endpoint itself, over raw sockets: what Envoy would send, and what an attacker who
reaches the port could. Envoy in front of it is tests/test_envoy.py."""

import json
import socket
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apikeyd.config import Settings
from apikeyd.domain import keys, limits
from apikeyd.server import StartupError
from apikeyd.service import ext_authz_http
from apikeyd.v1 import api_keys_pb2 as pb
from tests.conftest import APIKEYD, RunningServer, authorize, create_key, free_port, held_hasher

ANY = ("x-apikeyd-route", "any")


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, str]:
        assert self.headers["content-type"] == "application/json", self.headers
        return json.loads(self.body)


def request(*headers: tuple[str, str], path: str = "/v1/anything") -> bytes:
    lines = [f"GET {path} HTTP/1.1", "host: apikeyd", "content-length: 0", *(f"{n}: {v}" for n, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class Connection:
    """One raw connection to the endpoint, reading HTTP/1.1 answers off it."""

    def __init__(self, address: str | tuple[str, int]) -> None:
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(address)
        self._buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self._buffer += chunk
        return bool(chunk)

    def answer(self) -> Answer:
        while b"\r\n\r\n" not in self._buffer:
            assert self._fill(), f"the connection closed before an answer: {self._buffer!r}"
        head, self._buffer = self._buffer.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode().split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers["content-length"])
        while len(self._buffer) < length:
            assert self._fill(), "the connection closed inside a body"
        body, self._buffer = self._buffer[:length], self._buffer[length:]
        return Answer(int(status_line.split()[1]), headers, body)

    def closed_by_server(self) -> bool:
        """Whether the server closed the connection (after anything still buffered)."""
        try:
            while self._fill():
                pass
        except ConnectionResetError:
            pass
        return True

    def close(self) -> None:
        self.sock.close()


def http_address(server: RunningServer) -> tuple[str, int]:
    return ("127.0.0.1", server.server.http_checks.port)


def ask(server: RunningServer, *headers: tuple[str, str]) -> Answer:
    connection = Connection(http_address(server))
    try:
        connection.send(request(*headers))
        return connection.answer()
    finally:
        connection.close()


def assert_secret_free(answer: Answer, *secrets: str) -> None:
    text = json.dumps(answer.headers) + answer.body.decode()
    for secret in secrets:
        assert secret not in text


def test_the_same_decision_as_authorize(server, account):
    created = create_key(server.stub, account, ("messages:send:{example.com}",), project_id="p1")
    key = created.secret
    route = ("x-apikeyd-route", "required_scopes=messages:send; resource_header=x-sender-domain")
    for domain in ("example.com", "other.com"):
        expected = authorize(server.stub, key, "messages:send", resource=domain, project_id="p1")
        answer = ask(server, route, ("x-api-key", key), ("x-sender-domain", domain), ("x-project-id", "p1"),
                     ("x-apikey-admin", "yes"))  # fmt: skip
        assert_secret_free(answer, key)
        if expected.allowed:
            assert answer.status == 200, answer.body
            assert answer.headers["x-apikey-id"] == created.api_key.key_id
            assert answer.headers["x-apikey-name"] == created.api_key.name
            assert answer.headers["x-apikey-account"] == account
            assert answer.headers["x-apikey-project"] == "p1"
            removed = answer.headers["x-envoy-auth-headers-to-remove"].split(",")
            assert sorted(removed) == ["x-api-key", "x-apikey-admin"]
        else:
            assert (answer.status, answer.json()["code"]) == (403, pb.AuthorizeResponse.Code.Name(expected.code))
    assert server.app.metrics.ext_authz_http_answers == {200: 1, 403: 1}


@pytest.mark.parametrize(
    "route",
    [
        None,  # no x-apikeyd-route at all: a route nobody configured
        "required_scopes",  # not name=value
        "required_scope=messages:send",  # misspelt: must not let every usable key through
        "required_scopes=a:b; required_scopes=c:d",
        "resource=example.com; resource_header=x-sender-domain",
        "x" * (limits.MAX_CONTEXT_EXTENSION_VALUE_LENGTH * 5),
    ],
)
def test_a_misconfigured_route_answers_500_whatever_the_request(server, account, route):
    key = create_key(server.stub, account).secret
    headers = [("x-api-key", key)] + ([("x-apikeyd-route", route)] if route is not None else [])
    answer = ask(server, *headers)
    assert (answer.status, answer.json()["code"]) == (500, "MISCONFIGURED"), answer.body
    assert_secret_free(answer, key)


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\x01\x02 not http at all\r\n\r\n",
        b"GET / HTTP/1.1\r\nbad header line\r\n\r\n",
        b"GET / HTTP/1.1\r\ncontent-length: -5\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
    ],
)
def test_bytes_that_are_not_http_get_400_and_the_connection_closes(server, garbage):
    connection = Connection(http_address(server))
    try:
        connection.send(garbage)
        answer = connection.answer()
        assert (answer.status, answer.json()["code"]) == (400, "BAD_REQUEST")
        assert answer.headers["connection"] == "close"
        assert connection.closed_by_server()
    finally:
        connection.close()
    assert ask(server, ANY).status == 401, "the endpoint serves the next connection"


def test_a_head_over_the_size_limit_or_with_too_many_headers_gets_431(server):
    big = request(ANY, ("x-filler", "a" * ext_authz_http.MAX_REQUEST_BYTES))
    many = request(ANY, *((f"x-h{i}", "v") for i in range(limits.MAX_REQUEST_HEADERS + 1)))
    for data in (big, many):
        connection = Connection(http_address(server))
        try:
            connection.send(data)
            assert connection.answer().status == 431
            assert connection.closed_by_server()
        finally:
            connection.close()


def test_pipelined_requests_are_answered_in_order_behind_a_cold_check(server, account):
    cold, warm = create_key(server.stub, account), create_key(server.stub, account)
    assert ask(server, ANY, ("x-api-key", warm.secret)).status == 200  # warm is cached, cold is not
    connection = Connection(http_address(server))
    try:
        with held_hasher(server, "verify") as (reached, release):
            connection.send(request(ANY, ("x-api-key", cold.secret)) + request(ANY, ("x-api-key", warm.secret)))
            assert reached.wait(10)
            release.set()
        first, second = connection.answer(), connection.answer()
        assert first.headers["x-apikey-id"] == cold.api_key.key_id
        assert second.headers["x-apikey-id"] == warm.api_key.key_id
    finally:
        connection.close()


def test_more_pipelined_requests_than_may_wait_get_503_and_the_connection_closes(server, account):
    cold = create_key(server.stub, account).secret
    connection = Connection(http_address(server))
    try:
        with held_hasher(server, "verify"):
            # One write: the cold check holds the connection's turn while the rest are parsed. (Sent later,
            # they would not even be read: a connection waiting for an answer is not read from.)
            connection.send(request(ANY, ("x-api-key", cold)) + request(ANY) * (ext_authz_http.MAX_PIPELINED + 1))
            answer = connection.answer()
            assert (answer.status, answer.headers["connection"]) == (503, "close")
    finally:
        connection.close()


def test_a_head_that_arrives_too_slowly_gets_408(make_server, monkeypatch):
    monkeypatch.setattr(ext_authz_http, "HEAD_TIMEOUT", 0.3)
    monkeypatch.setattr(ext_authz_http, "_SWEEP_EVERY", 0.05)
    server = make_server()
    connection = Connection(http_address(server))
    try:
        connection.send(b"GET / HTTP/1.1\r\nx-api-key: AK_")  # and nothing more
        assert connection.answer().status == 408
        assert connection.closed_by_server()
    finally:
        connection.close()


def test_connections_beyond_the_bound_are_closed_at_once(make_server, monkeypatch):
    monkeypatch.setattr(ext_authz_http, "MAX_CONNECTIONS", 3)
    server = make_server()
    held = [Connection(http_address(server)) for _ in range(3)]
    try:
        for connection in held:  # each is accepted and served
            connection.send(request(ANY))
            assert connection.answer().status == 401
        extra = Connection(http_address(server))
        try:
            extra.send(request(ANY))
        except OSError:
            pass  # already reset
        assert extra.closed_by_server() and not extra._buffer
        extra.close()
    finally:
        for connection in held:
            connection.close()


def test_with_authorize_requires_key_the_proxy_needs_a_key_with_apikeys_authorize(make_server, account):
    server = make_server(authorize_requires_key=True)
    key = create_key(server.stub, account).secret
    plain = create_key(server.stub, account, ("messages:send",)).secret
    proxy_key = create_key(server.stub, account, ("apikeys:authorize",)).secret
    stranger = create_key(server.stub, f"{account}-other").secret
    for credential in (None, "Basic abc", f"Bearer {plain}", "Bearer AK_nonsense", f"Bearer {'x' * 400}"):
        headers = [ANY, ("x-api-key", key)] + ([("x-apikeyd-authorization", credential)] if credential else [])
        answer = ask(server, *headers)
        assert (answer.status, answer.json()["code"]) == (503, "PROXY_NOT_AUTHORIZED"), answer.body
        assert_secret_free(answer, key, plain)
    proxy = ("x-apikeyd-authorization", f"Bearer {proxy_key}")
    assert ask(server, ANY, proxy, ("x-api-key", key)).status == 200
    # A tenant's proxy key passes only its own account's keys.
    answer = ask(server, ANY, proxy, ("x-api-key", stranger))
    assert (answer.status, answer.json()["code"]) == (401, "NOT_FOUND")


def test_a_database_that_is_down_answers_503():
    server = RunningServer(
        Settings.load(environ={}, database_url="sqlite:////nonexistent-dir/apikeyd.db"), operator=False
    )
    try:
        unknown = keys.generate("AK_", keys.new_lookup_id())[0]  # checking it needs the database
        answer = ask(server, ANY, ("x-api-key", unknown))
        assert (answer.status, answer.json()["code"]) == (503, "UNAVAILABLE")
        assert_secret_free(answer, unknown)
    finally:
        server.stop()


def test_a_check_in_flight_is_answered_through_a_drain(server, account):
    cold = create_key(server.stub, account)
    idle = Connection(http_address(server))
    busy = Connection(http_address(server))
    try:
        with held_hasher(server, "verify") as (reached, release):
            busy.send(request(ANY, ("x-api-key", cold.secret)))
            assert reached.wait(10)
            stopping = threading.Thread(target=server.stop)
            stopping.start()
            assert idle.closed_by_server(), "an idle connection closes at once"
            release.set()
            answer = busy.answer()
            stopping.join(30)
        assert (answer.status, answer.headers["connection"]) == (200, "close")
        assert answer.headers["x-apikey-id"] == cold.api_key.key_id
        assert busy.closed_by_server()
    finally:
        idle.close()
        busy.close()


# --- unix sockets ------------------------------------------------------------------------------------


def _unix_server(make_server, path: Path) -> RunningServer:
    return make_server(ext_authz_listen=f"unix:{path}")


def test_a_unix_socket_serves_checks_and_is_removed_on_stop(make_server, account, tmp_path):
    path = tmp_path / "ext-authz.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))  # left behind by a process that was killed: nobody listens on it
    stale.close()
    server = _unix_server(make_server, path)
    key = create_key(server.stub, account).secret
    connection = Connection(str(path))
    try:
        connection.send(request(ANY, ("x-api-key", key)))
        assert connection.answer().status == 200
    finally:
        connection.close()
    server.stop()
    assert not path.exists()


def test_a_unix_socket_path_in_use_or_not_a_socket_is_a_startup_error(make_server, tmp_path):
    regular = tmp_path / "a-file"
    regular.write_text("keep me")
    with pytest.raises(StartupError, match="not a socket"):
        _unix_server(make_server, regular)
    assert regular.read_text() == "keep me"
    live = tmp_path / "live.sock"
    _unix_server(make_server, live)
    with pytest.raises(StartupError, match="another process is listening"):
        _unix_server(make_server, live)


def test_a_taken_port_is_a_startup_error(make_server):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(StartupError, match=f"cannot answer ext_authz on 127.0.0.1:{port}"):
            make_server(ext_authz_listen=f"127.0.0.1:{port}")


@pytest.mark.parametrize(
    ("listen", "reason"),
    [("unix:/tmp/apikeyd-workers.sock", "cannot share a unix socket"), ("127.0.0.1:0", "needs a fixed port")],
)
def test_workers_need_a_fixed_tcp_port(tmp_path, listen, reason):
    run = subprocess.run(
        [APIKEYD, "serve", "--workers", "2", "--listen", f"127.0.0.1:{free_port()}", "--ext-authz-listen", listen,
         "--database-url", f"sqlite:///{tmp_path / 'k.db'}"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert reason in run.stderr


_MUTATIONS = st.binary(max_size=2048) | st.builds(
    lambda head, cut, junk: head[:cut] + junk + head[cut:],
    st.just(request(ANY, ("x-api-key", "AK_x"), ("x-project-id", "p"))),
    st.integers(0, 120),
    st.binary(min_size=1, max_size=64),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=_MUTATIONS)
def test_any_bytes_get_an_http_answer_or_a_close_and_nothing_breaks(server, data):
    connection = Connection(http_address(server))
    try:
        connection.send(data)
        connection.sock.shutdown(socket.SHUT_WR)  # all there is: a server waiting for more must not hang
        while connection._fill():
            pass
        for line in connection._buffer.split(b"\r\n"):
            if line.startswith(b"HTTP/1.1 "):
                assert int(line.split()[1]) in (400, 401, 403, 408, 431, 500, 503), line
    except ConnectionResetError:
        pass
    finally:
        connection.close()
    assert ask(server, ANY).status == 401


def test_the_downstream_address_comes_in_the_header_the_http_service_adds(server, account):
    ranged = create_key(server.stub, account, allowed_ip_ranges=["192.0.2.0/24"]).secret
    plain = create_key(server.stub, account).secret
    cold = ask(server, ANY, (ext_authz_http.DOWNSTREAM_HEADER, "junk"), ("x-api-key", ranged))  # decided after an await
    assert (cold.status, cold.json()["code"]) == (400, "INVALID_ARGUMENT"), cold.body
    inside, outside = (ext_authz_http.DOWNSTREAM_HEADER, "192.0.2.7"), (ext_authz_http.DOWNSTREAM_HEADER, "198.51.100.1")
    assert ask(server, ANY, inside, ("x-api-key", ranged)).status == 200
    for headers in ((outside,), ()):  # without the header (a config from before it): no address, refused
        answer = ask(server, ANY, *headers, ("x-api-key", ranged))
        assert (answer.status, answer.json()["code"]) == (403, "IP_NOT_ALLOWED"), answer.body
    answer = ask(server, ANY, (ext_authz_http.DOWNSTREAM_HEADER, "junk"), ("x-api-key", ranged))
    assert (answer.status, answer.json()["code"]) == (400, "INVALID_ARGUMENT")
    assert answer.json()["message"].startswith("the downstream address:"), answer.body
    for headers in ((outside,), (), ((ext_authz_http.DOWNSTREAM_HEADER, "junk"),)):
        assert ask(server, ANY, *headers, ("x-api-key", plain)).status == 200, "keys without ranges never read it"
