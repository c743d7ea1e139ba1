"""Envoy's external authorization over HTTP (the ext_authz filter's `http_service`), the path of the example
config deploy/envoy/envoy.yaml. Envoy spends far less on an HTTP/1.1 check than on a gRPC one, and Envoy's
worker, not apikeyd, is what limits a sidecar's throughput (README, performance). Served by the same process
and event loop as the gRPC server, so it shares their cache, change feed, rate limiter and metrics, and
answers exactly as Check does (service/envoy_checks.py).

A check is the client's request as Envoy forwards it: its method and path, the headers the filter's
allowed_headers lets through, and no body. A route's settings come in one header that the route's
http_service adds (`headers_to_add`), which replaces any the client sent:

    x-apikeyd-route: required_scopes=messages:send; resource_header=x-sender-domain
    x-apikeyd-route: any                          (no settings: any usable key)

A check without it is the config's mistake: 500, so that a route nobody configured is never open. With
APIKEYD_AUTHORIZE_REQUIRES_KEY, Envoy adds `x-apikeyd-authorization: Bearer <key>` the same way. The
client's address comes the same way too, as Envoy 1.40 fills headers_to_add from its substitution
formatters: `x-apikeyd-downstream-address: %DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT%`, the peer of
Envoy's connection (the formatter without DIRECT is taken from x-forwarded-for, which the client writes,
unless the listener sets use_remote_address). Without it a key with allowed_ip_ranges is refused.

Allowed: 200, the identity in x-apikey-* headers (the config's allowed_upstream_headers copies them onto
the request), the credential and forged x-apikey-* headers in `x-envoy-auth-headers-to-remove`, and rate
headers for the client (allowed_client_headers_on_success). Denied: the status, headers and JSON body the
client gets, as Envoy passes them on.

HTTP parsing is httptools (llhttp, Node.js's parser): hand-written parsing of attacker-controlled bytes is
what this project does not write. Sizes are bounded before anything is decoded: a request head of at most
MAX_REQUEST_BYTES, MAX_REQUEST_HEADERS headers, MAX_PIPELINED requests waiting on one connection,
MAX_CONNECTIONS connections, and a head must arrive within HEAD_TIMEOUT seconds of its first byte.
"""

import asyncio
import contextlib
import functools
import logging
import os
import socket
import stat
import time
from collections import deque
from collections.abc import Coroutine, Mapping
from http import HTTPStatus
from typing import Any, cast

import httptools

from apikeyd.domain import limits
from apikeyd.domain.access import AUTHORIZE, Caller
from apikeyd.domain.echo import quote
from apikeyd.domain.errors import InvalidArgument, PermissionDenied, Unauthenticated, Unavailable
from apikeyd.exception_text import describe
from apikeyd.lifecycle import KeyManager
from apikeyd.logs import Throttle
from apikeyd.metrics import Metrics, split_listen
from apikeyd.service.envoy_checks import ROUTE_SETTINGS, Answer, EnvoyChecks, denied
from apikeyd.tracing import Tracing

log = logging.getLogger(__name__)

ROUTE_HEADER = "x-apikeyd-route"
PROXY_CREDENTIAL_HEADER = "x-apikeyd-authorization"
DOWNSTREAM_HEADER = "x-apikeyd-downstream-address"
UNIX_PREFIX = "unix:"

MAX_REQUEST_BYTES = 16 * 1024  # a request head with its headers; Envoy's own default limit is 60 KiB
MAX_PIPELINED = 16  # requests parsed but not yet answered on one connection; Envoy sends one at a time
MAX_CONNECTIONS = 4096  # each holds a parser and buffers (a few KB): a bound of some tens of MB
HEAD_TIMEOUT = 10.0  # seconds from a request's first byte to its last header
_SWEEP_EVERY = 1.0

_ANY_KEY = "any"
# Headers of every check that no decision reads (as Envoy writes them, lower case): Envoy's own, not the
# client's, so no route takes its resource from them. (Host may be a route's resource_header.)
_UNREAD = frozenset((b"content-length", b"x-envoy-internal", b"x-envoy-expected-rq-timeout-ms"))
_REASONS = {status.value: status.phrase for status in HTTPStatus}


class BadRequestHead(Exception):
    """A request that cannot be answered on its own terms: the connection answers it and closes."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def route_settings(value: str | None) -> tuple[tuple[str, str], ...]:
    """`name=value; ...` (or `any`) as sorted settings; InvalidArgument when the header is missing or not
    that shape. Known names and values are checked by envoy_checks.parse_route."""
    if value is None:
        raise InvalidArgument(ROUTE_HEADER, "missing: the route's http_service must add it (headers_to_add)")
    limits.check_length(ROUTE_HEADER, value, limits.MAX_CONTEXT_EXTENSION_VALUE_LENGTH * len(ROUTE_SETTINGS))
    if value.strip() == _ANY_KEY:
        return ()
    settings: dict[str, str] = {}
    for item in value.split(";"):
        name, equals, setting = item.partition("=")
        name = name.strip()
        if not equals or not name:
            raise InvalidArgument(ROUTE_HEADER, f"{quote(item.strip())} is not name=value; or send `any`")
        if name in settings:
            raise InvalidArgument(ROUTE_HEADER, f"{quote(name)} is set twice")
        settings[name] = setting.strip()
    return tuple(sorted(settings.items()))


def render(answer: Answer, keep_alive: bool) -> bytes:
    """The HTTP/1.1 response Envoy reads. Header values are ids, names, numbers and fixed texts, and the
    body is JSON, so nothing here can break a header line."""
    lines = [f"HTTP/1.1 {answer.status} {_REASONS.get(answer.status, 'Unknown')}"]
    lines += [f"{name}: {value}" for name, value in answer.headers]
    if answer.allowed:
        if answer.remove:
            lines.append("x-envoy-auth-headers-to-remove: " + ",".join(answer.remove))
        lines += [f"{name}: {value}" for name, value in answer.client_headers]
        body = b""
    else:
        body = answer.body().encode()
    if not keep_alive:
        lines.append("connection: close")
    lines.append(f"content-length: {len(body)}\r\n\r\n")
    return "\r\n".join(lines).encode() + body


class HttpChecks:
    """What the connections share: the checks, the proxy's credential rule, the counters."""

    def __init__(
        self, manager: KeyManager, checks: EnvoyChecks, metrics: Metrics, requires_key: bool,
        tracing: Tracing | None = None,
    ) -> None:
        self._manager = manager
        self.tracing = tracing  # None with tracing off: a check's whole cost of it is one check
        self._checks = checks
        self._requires_key = requires_key
        self._counts = metrics.ext_authz_http_answers
        self._timer = metrics.ext_authz_check_seconds
        self._failures = Throttle(log, 60.0)

    def answer(self, headers: Mapping[str, str], peer: str) -> Answer | Coroutine[Any, Any, Answer]:
        try:
            settings = route_settings(headers.get(ROUTE_HEADER))
        except InvalidArgument as error:
            return self._checks.misconfigured(error)
        if self._requires_key:
            return self._answer_for_proxy(settings, headers, peer)
        return self._checks.answer(settings, headers, None, headers.get(DOWNSTREAM_HEADER, ""))

    async def _answer_for_proxy(self, settings: tuple[tuple[str, str], ...], headers: Mapping[str, str], peer: str) -> Answer:
        """With APIKEYD_AUTHORIZE_REQUIRES_KEY: the proxy's own key first, as for Check over gRPC, whose
        refusal Envoy turns into its status_on_error; here the refusal is answered 503 at once."""
        try:
            caller = await self._proxy(headers, peer)
        except (Unauthenticated, PermissionDenied, InvalidArgument) as error:
            return denied(503, "PROXY_NOT_AUTHORIZED", f"the proxy may not ask for checks: {error}")
        except Unavailable as error:
            return denied(503, "UNAVAILABLE", str(error))
        answer = self._checks.answer(settings, headers, caller, headers.get(DOWNSTREAM_HEADER, ""))
        return answer if isinstance(answer, Answer) else await answer

    async def _proxy(self, headers: Mapping[str, str], peer: str) -> Caller:
        scheme, _, token = headers.get(PROXY_CREDENTIAL_HEADER, "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated(f"send `{PROXY_CREDENTIAL_HEADER}: Bearer <key>` (the http_service's headers_to_add)")
        limits.check_length(PROXY_CREDENTIAL_HEADER, token, limits.MAX_KEY_LENGTH)
        caller = await self._manager.authenticate(token.strip(), peer, "Check")
        caller.require(AUTHORIZE)
        return caller

    def failed(self, error: BaseException) -> Answer:
        """A check that raised what it should not: a 500 without details, and one log line a minute."""
        self._failures.warning("an HTTP ext_authz check failed: %s", describe(error), event="ext_authz.http_failed")
        return denied(500, "INTERNAL", "apikeyd could not answer this check; see its log")

    def count(self, status: int, started: float) -> None:
        self._counts[status] = self._counts.get(status, 0) + 1
        self._timer.observe(time.perf_counter() - started)


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection from Envoy: requests answered in order, a cached one within its callback."""

    def __init__(self, endpoint: "HttpCheckEndpoint") -> None:
        self._endpoint = endpoint
        self._checks = endpoint.checks
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._peer = ""
        self._headers: dict[str, str] = {}
        self._header_count = 0
        self._received = 0  # bytes since the last complete request
        self.head_started: float | None = None  # monotonic time of the first byte of a request in progress
        self._waiting: deque[tuple[dict[str, str], bool, float]] = deque()
        self._busy = False  # an answer is being awaited; the ones behind it wait their turn
        self.closing = False

    # --- asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport subclasses
        if not self._endpoint.opened(self):
            self._transport.abort()
            return
        peer = transport.get_extra_info("peername")
        self._peer = f"ipv4:{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix:"

    def connection_lost(self, exc: Exception | None) -> None:
        self._endpoint.closed(self)
        self._transport = None

    def data_received(self, data: bytes) -> None:
        if self.head_started is None:
            self.head_started = time.monotonic()
        self._received += len(data)
        try:
            if self._received > MAX_REQUEST_BYTES:
                raise BadRequestHead(431, f"a check request may have at most {MAX_REQUEST_BYTES} bytes")
            self._parser.feed_data(data)
        except BadRequestHead as error:
            self._fail(error.status, str(error))
        except httptools.HttpParserUpgrade:
            self._fail(400, "upgrades are not served here")
        except httptools.HttpParserError as error:
            # httptools wraps what a callback raised; a refusal of ours keeps its own status.
            refusal = error.__context__
            if isinstance(refusal, BadRequestHead):
                self._fail(refusal.status, str(refusal))
            else:
                self._fail(400, f"not an HTTP/1.1 request: {error}")

    # --- httptools callbacks ----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._headers = {}
        self._header_count = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > limits.MAX_REQUEST_HEADERS:
            raise BadRequestHead(431, f"a check request may have at most {limits.MAX_REQUEST_HEADERS} headers")
        if name in _UNREAD:  # what Envoy adds to every check: no need to decode it
            return
        key = name.decode("latin-1").lower()
        text = value.decode("utf-8", "replace")
        known = self._headers.get(key)
        # A header sent twice is one value joined with a comma, as Envoy joins them for gRPC checks.
        self._headers[key] = text if known is None else f"{known},{text}"

    def on_message_complete(self) -> None:
        self._received = 0
        self.head_started = None
        if len(self._waiting) >= MAX_PIPELINED:
            raise BadRequestHead(503, f"at most {MAX_PIPELINED} requests may wait on one connection")
        self._waiting.append((self._headers, self._parser.should_keep_alive(), time.perf_counter()))
        self._serve()

    # --- answers ----------------------------------------------------------------------------------

    def _serve(self) -> None:
        while self._waiting and not self._busy and self._transport is not None:
            headers, keep_alive, started = self._waiting.popleft()
            try:
                answer = self._checks.answer(headers, self._peer)
            except Exception as error:
                answer = self._checks.failed(error)
            if isinstance(answer, Answer):
                self._send(answer, headers, keep_alive, started)
                continue
            self._busy = True
            self._transport.pause_reading()
            task = asyncio.get_running_loop().create_task(answer)
            task.add_done_callback(
                functools.partial(self._answered, headers=headers, keep_alive=keep_alive, started=started)
            )

    def _answered(
        self, task: "asyncio.Task[Answer]", *, headers: dict[str, str], keep_alive: bool, started: float
    ) -> None:
        self._busy = False
        if task.cancelled():
            answer = self._checks.failed(asyncio.CancelledError())
        elif (error := task.exception()) is not None:
            answer = self._checks.failed(error)
        else:
            answer = task.result()
        if self._transport is None:  # the connection went away meanwhile: nobody to answer
            return
        self._send(answer, headers, keep_alive, started)
        if self._transport is not None:
            self._transport.resume_reading()
            self._serve()

    def _send(self, answer: Answer, headers: dict[str, str], keep_alive: bool, started: float) -> None:
        assert self._transport is not None
        keep_alive = keep_alive and not self.closing
        self._checks.count(answer.status, started)  # first: whoever reads the answer may read the counts next
        if self._checks.tracing is not None:
            self._checks.tracing.http_check(answer, headers, started)
        self._transport.write(render(answer, keep_alive))
        if not keep_alive:
            self._transport.close()
            self._transport = None

    def _fail(self, status: int, message: str) -> None:
        """A request that cannot be parsed or is too big: answered, and the connection closed."""
        if self._transport is None:
            return
        self._waiting.clear()
        self._transport.write(render(denied(status, "BAD_REQUEST", message), keep_alive=False))
        self._transport.close()
        self._transport = None

    def idle(self) -> bool:
        return not self._busy and not self._waiting and self.head_started is None

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def abandon_slow_head(self, now: float) -> None:
        if self.head_started is not None and now - self.head_started > HEAD_TIMEOUT:
            self._fail(408, f"a request head must arrive within {HEAD_TIMEOUT:.0f} s")


class HttpCheckEndpoint:
    """The listener: `host:port` (shared with SO_REUSEPORT by `--workers N`) or `unix:/path`."""

    def __init__(self, checks: HttpChecks) -> None:
        self.checks = checks
        self._connections: set[_Connection] = set()
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._unix_path = ""
        self.port = 0

    async def start(self, listen: str, reuse_port: bool) -> None:
        """OSError or ValueError when it cannot listen (the caller names the setting)."""
        loop = asyncio.get_running_loop()
        if listen.startswith(UNIX_PREFIX):
            self._unix_path = listen.removeprefix(UNIX_PREFIX)
            _remove_stale_socket(self._unix_path)
            self._server = await loop.create_unix_server(lambda: _Connection(self), self._unix_path)
        else:
            host, port = split_listen(listen)
            self._server = await loop.create_server(
                lambda: _Connection(self), host, port, reuse_port=reuse_port, reuse_address=True
            )
            self.port = self._server.sockets[0].getsockname()[1]
        self._sweeper = loop.create_task(self._sweep())

    def opened(self, connection: _Connection) -> bool:
        if len(self._connections) >= MAX_CONNECTIONS:
            self.checks.failed(ConnectionRefusedError(f"more than {MAX_CONNECTIONS} connections at once"))
            return False
        self._connections.add(connection)
        return True

    def closed(self, connection: _Connection) -> None:
        self._connections.discard(connection)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(_SWEEP_EVERY)
            now = time.monotonic()
            for connection in list(self._connections):
                connection.abandon_slow_head(now)

    async def stop(self, grace: float) -> None:
        """No new connections; idle ones close now, busy ones after their answer (which says
        `connection: close`), within `grace` seconds."""
        if self._server is None:
            return
        self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        deadline = time.monotonic() + grace
        for connection in list(self._connections):
            connection.closing = True
            if connection.idle():
                connection.close()
        while self._connections and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for connection in list(self._connections):
            connection.close()
        if self._unix_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._unix_path)
        self._server = None


def _remove_stale_socket(path: str) -> None:
    """A socket file left by an apikeyd that was killed is reused; a live listener or any other file is an
    error, never removed."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(f"{path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)
            return
    raise OSError(f"{path}: another process is listening on it")
