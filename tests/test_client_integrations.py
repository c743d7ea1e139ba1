"""apikeyd.client's integrations, over real channels against a real apikeyd: the gRPC interceptors (grpc.server
and grpc.aio.server alike), the ASGI middleware under Starlette, and the examples that show them.

Every refusal is also checked for the presented key: it must not come back in details, trailers, headers or
a body (the session's log check covers the logs)."""

import asyncio
import functools
import importlib.util
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import grpc
import httpx
import pytest
import uvicorn
from google.protobuf.duration_pb2 import Duration
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient, WebSocketDenialResponse
from starlette.websockets import WebSocket

from apikeyd.client import AsyncClient, AuthorizeError, Client, Connection
from apikeyd.client.asgi import ApiKeyMiddleware, Requirement
from apikeyd.client.grpc_auth import ApiKeyInterceptor, AsyncApiKeyInterceptor, Rule, current_decision, current_key
from apikeyd.domain import keys
from apikeyd.v1 import api_keys_pb2 as pb
from tests.conftest import ISSUED_SECRETS, RunningServer, create_key, free_port, leaked_secrets

T = TypeVar("T")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SEND_SCOPE = "messages:send:{example.com}"


@dataclass(frozen=True)
class Issued:
    connection: Connection  # to the test's apikeyd, with a watcher token of the account
    key: str  # the tenant's key: messages:send for example.com
    key_id: str
    name: str
    account: str


def issue(server: RunningServer, account: str, **fields: Any) -> pb.CreateApiKeyResponse:
    return create_key(server.stub, account, (SEND_SCOPE,), display_name="sender", **fields)


@pytest.fixture
def issued(server: RunningServer, account: str) -> Issued:
    watcher = create_key(server.stub, account, ("apikeys:authorize",), display_name="watcher").secret
    made = issue(server, account)
    return Issued(Connection(server.address, token=watcher), made.secret, made.api_key.key_id, made.api_key.name, account)


def unknown_key() -> str:
    """Well formed, so that only apikeyd can say it does not exist."""
    key, _ = keys.generate("ak_", keys.new_lookup_id())
    ISSUED_SECRETS.add(key)  # under the session's log check too
    return key


def down() -> Connection:
    return Connection(f"127.0.0.1:{free_port()}", timeout=1.0)


def no_key_in(text: str, *presented: str) -> None:
    assert not leaked_secrets(text, set(presented)), text


def eventually(attempt: Callable[[], T | None], what: str, within: float = 15.0) -> T:
    """Polls: the client answers from its cache until the change stream reports a change, within its lease."""
    deadline = time.monotonic() + within
    while (result := attempt()) is None:
        assert time.monotonic() < deadline, f"still not {what} after {within} s"
    return result


# --- the gRPC service under test: bytes in and out, one method of each kind ------------------------------

PUBLIC = "/demo.Echo/Public"
METHODS = {
    "/demo.Echo/Send": Rule(["messages:send"], resource=lambda call: call.request.decode()),
    "/demo.Echo/Stream": Rule(["messages:send"], resource=lambda call: call.request.decode()),
    "/demo.Echo/Collect": Rule(["messages:send"], resource="example.com"),  # a streamed request: no request
    "/demo.Echo/Chat": Rule(["messages:send"], resource=lambda call: call.metadata.get("x-domain", "")),
}


def whois() -> bytes:
    """What the handler knows of its caller, read anew at each step of a stream."""
    try:
        key = current_key()
    except LookupError:
        return b"anonymous" if current_decision() is None else b"half"
    return f"{key.key_id} {key.account_id}".encode()


SYNC_HANDLERS = {
    "Send": grpc.unary_unary_rpc_method_handler(lambda request, context: whois()),
    "Stream": grpc.unary_stream_rpc_method_handler(lambda request, context: (whois() for _ in range(2))),
    "Collect": grpc.stream_unary_rpc_method_handler(lambda requests, context: b"%d " % len(list(requests)) + whois()),
    "Chat": grpc.stream_stream_rpc_method_handler(lambda requests, context: (whois() for _ in requests)),
}


async def aio_whois(request: bytes, context: Any) -> bytes:
    return whois()


async def aio_stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
    for _ in range(2):
        await asyncio.sleep(0)  # other tasks run between the steps; the identity stays this call's
        yield whois()


async def aio_collect(requests: AsyncIterator[bytes], context: Any) -> bytes:
    count = 0
    async for _ in requests:
        count += 1
    return b"%d " % count + whois()


async def aio_chat(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
    async for _ in requests:
        yield whois()


AIO_HANDLERS = {
    "Send": grpc.unary_unary_rpc_method_handler(aio_whois),
    "Stream": grpc.unary_stream_rpc_method_handler(aio_stream),
    "Collect": grpc.stream_unary_rpc_method_handler(aio_collect),
    "Chat": grpc.stream_stream_rpc_method_handler(aio_chat),
}
# Public and Unlisted: the same handler as Send, without a Rule.
SYNC_HANDLERS["Public"] = SYNC_HANDLERS["Unlisted"] = SYNC_HANDLERS["Send"]
AIO_HANDLERS["Public"] = AIO_HANDLERS["Unlisted"] = AIO_HANDLERS["Send"]


class Echo:
    channel: grpc.Channel

    def send(self, domain: str = "example.com", metadata: Any = (), method: str = "/demo.Echo/Send") -> bytes:
        return self.channel.unary_unary(method)(domain.encode(), metadata=metadata, timeout=10)  # type: ignore[no-any-return]

    def every_kind(self, metadata: Any, domain: str = "example.com") -> list[Callable[[], Any]]:
        """A call of each of the four kinds, each returning what the handler said."""
        c, m = self.channel, [*metadata, ("x-domain", domain)]
        return [
            lambda: [c.unary_unary("/demo.Echo/Send")(domain.encode(), metadata=m, timeout=10)],
            lambda: list(c.unary_stream("/demo.Echo/Stream")(domain.encode(), metadata=m, timeout=10)),
            lambda: [c.stream_unary("/demo.Echo/Collect")(iter([b"a", b"b"]), metadata=m, timeout=10)],
            lambda: list(c.stream_stream("/demo.Echo/Chat")(iter([b"a", b"b"]), metadata=m, timeout=10)),
        ]


class SyncEcho(Echo):
    def __init__(self, connection: Connection, **options: Any) -> None:
        self.client = Client(connection)
        interceptor = ApiKeyInterceptor(self.client, METHODS, public={PUBLIC}, **options)
        # One worker: every call runs on the same thread, so an identity left in its context would show.
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=1), interceptors=[interceptor])
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("demo.Echo", SYNC_HANDLERS),))
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")

    def stop(self) -> None:
        self.channel.close()
        self.server.stop(None)
        self.client.close()


class AioEcho(Echo):
    def __init__(self, connection: Connection, **options: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        port = self.run(self._start(connection, options))
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")

    async def _start(self, connection: Connection, options: dict[str, Any]) -> int:
        self.client = AsyncClient(connection)  # on the loop the server runs on
        interceptor = AsyncApiKeyInterceptor(self.client, METHODS, public={PUBLIC}, **options)
        self.server = grpc.aio.server(interceptors=[interceptor])
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("demo.Echo", AIO_HANDLERS),))
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return int(port)

    def run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=30)

    async def _stop(self) -> None:
        await self.server.stop(None)
        await self.client.close()

    def stop(self) -> None:
        self.channel.close()
        self.run(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(params=["sync", "aio"])
def start_echo(request: pytest.FixtureRequest) -> Iterator[Callable[..., Echo]]:
    started: list[SyncEcho | AioEcho] = []

    def start(connection: Connection, **options: Any) -> Echo:
        started.append(SyncEcho(connection, **options) if request.param == "sync" else AioEcho(connection, **options))
        return started[-1]

    yield start
    for echo in started:
        echo.stop()


def bearer(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


def refused(call: Callable[[], Any], *presented: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error = caught.value
    no_key_in(f"{error.details()} {error.trailing_metadata()} {error.initial_metadata()}", *presented)
    return error


def refusal(call: Callable[[], Any]) -> grpc.RpcError | None:
    try:
        call()
    except grpc.RpcError as error:
        return error
    return None


def test_grpc_allowed_calls_reach_the_handler_with_the_key(issued: Issued, start_echo: Callable[..., Echo]) -> None:
    echo = start_echo(issued.connection)
    me = f"{issued.key_id} {issued.account}".encode()
    send, stream, collect, chat = echo.every_kind(bearer(issued.key))
    assert send() == [me]
    assert stream() == [me, me]
    assert collect() == [b"2 " + me]
    assert chat() == [me, me]
    # Public: no check, and nothing of the calls before on the same thread (sync) or loop (aio).
    assert echo.send(method=PUBLIC) == b"anonymous"
    assert echo.send(metadata=bearer(issued.key), method=PUBLIC) == b"anonymous"


def test_grpc_no_usable_key_is_unauthenticated(issued: Issued, start_echo: Callable[..., Echo]) -> None:
    echo = start_echo(issued.connection)
    for call in echo.every_kind(()):  # every kind of method is guarded, streams too
        assert refused(call).code() is grpc.StatusCode.UNAUTHENTICATED
    unknown = unknown_key()
    for metadata, says in [
        ((), "no key: send it in `authorization: Bearer <key>`"),
        ([("authorization", "Basic dXNlcjpwYXNz")], "no key"),  # another scheme is not a key
        (bearer(issued.key) + bearer(issued.key), "more than once"),
        (bearer("not-a-key"), "not a well-formed apikeyd key"),
        (bearer(unknown), "no key matches"),
    ]:
        error = refused(functools.partial(echo.send, metadata=metadata), issued.key, unknown)
        assert error.code() is grpc.StatusCode.UNAUTHENTICATED, says
        assert says in (error.details() or ""), (says, error.details())


def test_grpc_revoked_key_is_refused_within_the_lease(
    server: RunningServer, issued: Issued, start_echo: Callable[..., Echo]
) -> None:
    echo = start_echo(issued.connection)
    assert echo.send(metadata=bearer(issued.key))
    server.stub.RevokeApiKey(pb.RevokeApiKeyRequest(name=issued.name, reason="leaked"))
    error = eventually(lambda: refusal(lambda: echo.send(metadata=bearer(issued.key))), "refused")
    no_key_in(f"{error.details()} {error.trailing_metadata()}", issued.key)
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "revoked" in (error.details() or "")


def test_grpc_key_without_the_scope_is_permission_denied(issued: Issued, start_echo: Callable[..., Echo]) -> None:
    echo = start_echo(issued.connection)
    send, stream, _, chat = echo.every_kind(bearer(issued.key), domain="other.com")
    for call in (send, stream, chat):  # from the request, and from the metadata (Chat)
        error = refused(call, issued.key)
        assert error.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "messages:send" in (error.details() or "")
    error = refused(lambda: echo.send(metadata=bearer(issued.key), method="/demo.Echo/Unlisted"), issued.key)
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "is not open to API keys" in (error.details() or "")


def test_grpc_rate_limited_key_is_resource_exhausted_with_retry_after(
    server: RunningServer, issued: Issued, start_echo: Callable[..., Echo]
) -> None:
    limited = issue(server, issued.account, rate_limits=[pb.RateLimit(limit=1, period=Duration(seconds=60))]).secret
    echo = start_echo(issued.connection)
    assert echo.send(metadata=bearer(limited))
    error = refused(lambda: echo.send(metadata=bearer(limited)), limited)
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    trailers = dict(error.trailing_metadata() or ())
    assert 1 <= int(trailers["retry-after"]) <= 60


def test_grpc_apikeyd_down_is_unavailable(issued: Issued, start_echo: Callable[..., Echo]) -> None:
    echo = start_echo(down())
    for call in echo.every_kind(bearer(issued.key)):
        error = refused(call, issued.key)
        assert error.code() is grpc.StatusCode.UNAVAILABLE
        assert "could not be checked" in (error.details() or "")


def test_async_client_errors_keep_their_code() -> None:
    """grpc.aio's errors are no grpc.Call: AsyncClient's AuthorizeError must still say UNAVAILABLE."""

    async def ask() -> AuthorizeError:
        async with AsyncClient(down(), watch=False) as client:
            with pytest.raises(AuthorizeError) as caught:
                await client.authorize(unknown_key())
            return caught.value

    assert asyncio.run(ask()).code is grpc.StatusCode.UNAVAILABLE


def test_grpc_other_header_and_unlisted_methods_for_any_key(issued: Issued, start_echo: Callable[..., Echo]) -> None:
    echo = start_echo(issued.connection, header="x-api-key", unlisted=Rule())
    assert echo.send(metadata=[("x-api-key", issued.key)]).startswith(issued.key_id.encode())
    assert echo.send(metadata=[("x-api-key", issued.key)], method="/demo.Echo/Unlisted").startswith(issued.key_id.encode())
    error = refused(lambda: echo.send(metadata=bearer(issued.key)), issued.key)
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "`x-api-key: <key>`" in (error.details() or "")


def test_rules_are_checked_when_made() -> None:
    with pytest.raises(ValueError, match="required_scopes"):
        Rule(["not a scope"])
    with pytest.raises(ValueError, match="both public and checked"):
        ApiKeyInterceptor(None, {PUBLIC: []}, public={PUBLIC})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="both public and checked"):
        ApiKeyMiddleware(None, {"/health": []}, public={"/health"})  # type: ignore[arg-type]


# --- the ASGI middleware under Starlette ---------------------------------------------------------------


async def whoami(request: Request) -> JSONResponse:
    key, decision = request.state.apikey, request.scope["apikeyd.decision"]
    credential = request.headers.get("authorization")
    return JSONResponse({"key_id": key.key_id, "account_id": key.account_id, "allowed": decision.allowed, "credential": credential})


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"apikey": hasattr(request.state, "apikey")})


async def websocket_whoami(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_json({"key_id": websocket.state.apikey.key_id})
    await websocket.close()


def asgi_app(connection: Connection) -> ApiKeyMiddleware:
    checked = [Route(path, whoami, methods=["GET", "POST"]) for path in ("/messages", "/messagesX", "/admin", "/other")]
    app = Starlette(routes=[*checked, Route("/health", health), WebSocketRoute("/ws", websocket_whoami)])
    routes = {
        "POST /messages": Requirement(["messages:send"], resource="example.com"),
        "/messages": [],  # any usable key
        "/admin": ["keys:manage"],
        "/ws": Requirement(["messages:send"], resource="example.com"),
    }
    return ApiKeyMiddleware(app, routes, client=lambda: AsyncClient(connection), public={"/health"})


def error_of(response: httpx.Response, *presented: str) -> str:
    no_key_in(f"{response.headers} {response.text}", *presented)
    return str(response.json()["error"]["code"])


def test_asgi_allowed_requests_reach_the_app_with_the_key(issued: Issued) -> None:
    with TestClient(asgi_app(issued.connection)) as http:
        for method in ("POST", "GET"):
            answer = http.request(method, "/messages", headers={"authorization": f"Bearer {issued.key}"})
            assert answer.status_code == 200, answer.text
            # The credential is taken off the request: the app never holds the key.
            assert answer.json() == {"key_id": issued.key_id, "account_id": issued.account, "allowed": True, "credential": None}
        assert http.get("/health").json() == {"apikey": False}
        with http.websocket_connect("/ws", headers={"authorization": f"Bearer {issued.key}"}) as websocket:
            assert websocket.receive_json() == {"key_id": issued.key_id}


def test_asgi_refusals(issued: Issued) -> None:
    with TestClient(asgi_app(issued.connection)) as http:
        answer = http.post("/messages")
        assert (answer.status_code, error_of(answer)) == (401, "MISSING_CREDENTIAL")
        assert answer.headers["www-authenticate"] == "Bearer"
        unknown = unknown_key()
        for key, code in [("not-a-key", "MALFORMED"), (unknown, "NOT_FOUND")]:
            answer = http.post("/messages", headers={"authorization": f"Bearer {key}"})
            assert (answer.status_code, error_of(answer, issued.key, unknown)) == (401, code)
            assert "invalid_token" in answer.headers["www-authenticate"]
        answer = http.get("/admin", headers={"authorization": f"Bearer {issued.key}"})
        assert (answer.status_code, error_of(answer, issued.key)) == (403, "INSUFFICIENT_SCOPE")
        assert "keys:manage" in answer.json()["error"]["message"]
        # A prefix covers what is below it, not what merely starts alike; a path is never echoed whole.
        for path in ("/other", "/messagesX", f"/{issued.key}"):
            answer = http.get(path, headers={"authorization": f"Bearer {issued.key}"})
            assert (answer.status_code, error_of(answer, issued.key)) == (403, "NO_RULE")
        with pytest.raises(WebSocketDenialResponse) as denial, http.websocket_connect("/ws"):
            pass
        assert denial.value.status_code == 401


def test_asgi_websocket_refused_without_the_denial_extension(issued: Issued) -> None:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: Any) -> None:
        sent.append(dict(message))

    async def connect() -> None:  # an ASGI server that offers no websocket.http.response
        await asgi_app(issued.connection)({"type": "websocket", "path": "/ws", "headers": []}, receive, send)

    asyncio.run(connect())
    assert [(m["type"], m["code"]) for m in sent] == [("websocket.close", 4401)]


def test_asgi_revoked_key_is_refused_within_the_lease(server: RunningServer, issued: Issued) -> None:
    with TestClient(asgi_app(issued.connection)) as http:
        headers = {"authorization": f"Bearer {issued.key}"}
        assert http.get("/messages", headers=headers).status_code == 200
        server.stub.RevokeApiKey(pb.RevokeApiKeyRequest(name=issued.name, reason="leaked"))

        def refused() -> httpx.Response | None:
            answer = http.get("/messages", headers=headers)
            return None if answer.status_code == 200 else answer

        answer = eventually(refused, "refused")
        assert (answer.status_code, error_of(answer, issued.key)) == (401, "REVOKED")


def test_asgi_rate_limited_key_is_429_with_retry_after(server: RunningServer, issued: Issued) -> None:
    limited = issue(server, issued.account, rate_limits=[pb.RateLimit(limit=1, period=Duration(seconds=60))]).secret
    with TestClient(asgi_app(issued.connection)) as http:
        assert http.post("/messages", headers={"authorization": f"Bearer {limited}"}).status_code == 200
        answer = http.post("/messages", headers={"authorization": f"Bearer {limited}"})
        assert (answer.status_code, error_of(answer, limited)) == (429, "RATE_LIMITED")
        assert 1 <= int(answer.headers["retry-after"]) <= 60


def test_asgi_apikeyd_down_is_503(issued: Issued) -> None:
    with TestClient(asgi_app(down())) as http:
        answer = http.post("/messages", headers={"authorization": f"Bearer {issued.key}"})
        assert (answer.status_code, error_of(answer, issued.key)) == (503, "UNAVAILABLE")


# --- the examples, so that they cannot rot -------------------------------------------------------------


def example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_grpc_example(issued: Issued) -> None:
    grpc_service = example("grpc_service")
    with Client(issued.connection) as client:
        server, port = grpc_service.serve(client, "127.0.0.1:0")
        try:
            address = f"127.0.0.1:{port}"
            assert grpc_service.call_send(address, "example.com", issued.key) == (
                f"sent from example.com by sender ({issued.account}/{issued.key_id})"
            )
            with pytest.raises(grpc.RpcError) as caught:
                grpc_service.call_send(address, "other.com", issued.key)
            assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
            assert grpc_service.check_health(address) == 1  # SERVING, with no key
        finally:
            server.stop(None)


def test_asgi_example(issued: Issued) -> None:
    app = example("asgi_app").make_app(lambda: AsyncClient(issued.connection))
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen()  # connections wait in the backlog until uvicorn has started: no race to start
    port = listening.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listening]}, daemon=True)
    thread.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            headers = {"authorization": f"Bearer {issued.key}"}
            answer = http.post("/messages/example.com", headers=headers)
            assert answer.json() == {"sent_from": "example.com", "by": "sender", "key_id": issued.key_id}
            answer = http.post("/messages/other.com", headers=headers)
            assert (answer.status_code, error_of(answer, issued.key)) == (403, "INSUFFICIENT_SCOPE")
            assert http.get("/whoami", headers=headers).json()["scopes"] == [SEND_SCOPE]
            assert http.get("/whoami").status_code == 401
            assert http.get("/health").json() == {"status": "ok"}
    finally:
        server.should_exit = True
        thread.join(10)
        listening.close()
