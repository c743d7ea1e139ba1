"""An ASGI middleware that lets a request reach the app only with an API key that apikeyd allows for its route.
Plain ASGI, with no framework imported: it wraps a Starlette or FastAPI app, or any other.

    app = ApiKeyMiddleware(app, {"POST /messages": ["messages:send"], "/messages": ["messages:read"]},
                           public={"/health"})
    ...
    async def send(request):
        key = request.state.apikey  # the caller's VerifiedKey: key_id, account_id, project_id, scopes, labels

* **The key** comes in `Authorization: Bearer <key>`, or as the whole value of another header
  (`header="x-api-key"`). By default that header is taken off the request before the app sees it
  (`keep_credential=True` keeps it), so the app cannot log it by mistake.
* **Routes** are a mapping or a function. A mapping's keys are path prefixes, `"/messages"`, or a method and
  a prefix, `"POST /messages"`; a prefix covers its own path and those below it (`/messages/1`, not
  `/messagesX`); the longest one that matches wins, and one with a method over one without. Its values are
  the scopes needed, or a Requirement. A function takes the ASGI scope and returns a Requirement (or a
  `(scopes, resource, project_id)` tuple), or PUBLIC. `public` names prefixes that need no key at all. A
  request no rule covers (or for which the function returns None) is refused 403 without a check, so a new
  route stays closed until someone says what it needs.
* **The client's address** is the ASGI scope's `client`, for keys with allowed_ip_ranges: behind a proxy,
  run the server so that it reports the real client (uvicorn's --forwarded-allow-ips) or such keys see the
  proxy. A `client` that is no IP address (none, a test client's made-up name) gives no address, which
  such a key refuses and every other key ignores.
* **Allowed**: the app gets the key in `scope["state"]["apikey"]` (Starlette's `request.state.apikey`) and
  the whole Decision in `scope["apikeyd.decision"]`.
* **Refused**, as on Envoy's path (domain/refusals.py): 401 with `WWW-Authenticate: Bearer` for no usable
  key, 403 for one that may not do this (its address outside the key's ranges too), 429 with `Retry-After`
  (whole seconds) for a rate-limited one and with `X-Apikeyd-Credits-Remaining` for spent credits, 400
  when the check refused the request's own values (an over-long key, say), 503 when apikeyd cannot be
  asked; each with `{"error": {"code": ..., "message": ...}}`, the code an AuthCode name or
  MISSING_CREDENTIAL, AMBIGUOUS_CREDENTIAL, NO_RULE, INVALID_ARGUMENT or UNAVAILABLE. The presented key is
  never in an answer or a log line.
* **WebSockets** are checked like HTTP requests before the app sees them. A refusal is the same HTTP answer
  where the server offers ASGI's websocket.http.response extension (uvicorn and Starlette's TestClient
  do); elsewhere the handshake is closed with code 4000 + that status (4401, 4403, 4429, 4503), which
  servers turn into an HTTP 403. Lifespan messages pass through.
* **The AsyncClient** belongs to an event loop, and an app is built before its loop runs: `client` is a
  factory (by default AsyncClient(), from APIKEYD_ADDRESS and APIKEYD_TOKEN), called at lifespan startup or
  at the first request on a loop, and the client it made is closed at lifespan shutdown. An AsyncClient
  given as such is used as it is, and its owner closes it.
"""

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Collection, Mapping, MutableMapping, Sequence
from typing import Any, Final, NamedTuple

import grpc

from apikeyd.client.aio import AsyncClient
from apikeyd.client.errors import AuthorizeError
from apikeyd.client.parts import configured_scopes, peer_ip
from apikeyd.domain.decision import AuthCode, Decision
from apikeyd.domain.echo import quote
from apikeyd.domain.errors import InvalidArgument
from apikeyd.domain.refusals import (
    CREDITS_HEADER,
    OUT_OF_CREDITS,
    RESOURCE_EXHAUSTED,
    UNAUTHENTICATED,
    NoKey,
    presented_key,
    refusal,
    retry_after,
)
from apikeyd.domain.scopes import parse_required_scopes
from apikeyd.logs import Throttle

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class Requirement(NamedTuple):
    """What a route needs: every one of `scopes`, for `resource` (a scope's `{value}` qualifier) and
    `project_id` (for a project key)."""

    scopes: Sequence[str] = ()
    resource: str = ""
    project_id: str = ""


class _Public:
    def __repr__(self) -> str:
        return "PUBLIC"


PUBLIC: Final = _Public()  # what a route function returns for a route that needs no key
# What a route function returns: what the route needs, PUBLIC, or None for a route it does not know (refused).
RouteAnswer = Requirement | tuple[Sequence[str], str, str] | _Public | None
RouteFunction = Callable[[Scope], RouteAnswer]


class _Answer(NamedTuple):
    status: int
    code: str
    message: str
    headers: tuple[tuple[str, str], ...] = ()


def _requirement(value: Requirement | Sequence[str]) -> Requirement:
    if isinstance(value, Requirement):
        return value._replace(scopes=configured_scopes(tuple(value.scopes)))
    return Requirement(configured_scopes(value))


def _split(rule: str) -> tuple[str | None, str]:
    method, _, path = rule.strip().rpartition(" ")
    if not path.startswith("/"):
        raise ValueError(f"route {rule!r}: give a path prefix, /messages, or a method and one, POST /messages")
    return method.strip().upper() or None, path.rstrip("/") or "/"


class _Routes:
    """A mapping's rules, longest prefix first and, for one prefix, a method's rule before the method-less one."""

    def __init__(self, routes: Mapping[str, Requirement | Sequence[str]], public: Collection[str]) -> None:
        rules: dict[tuple[str | None, str], Requirement | _Public] = {}
        for rule in public:
            rules[_split(rule)] = PUBLIC
        for rule, value in routes.items():
            where = _split(rule)
            if where in rules:
                raise ValueError(f"route {rule!r} is named twice, or both public and checked")
            rules[where] = _requirement(value)
        self._rules = sorted(rules.items(), key=lambda item: (-len(item[0][1]), item[0][0] is None))

    def __call__(self, scope: Scope) -> Requirement | _Public | None:
        path, method = scope.get("path", ""), scope.get("method", "GET")
        for (wanted, prefix), value in self._rules:
            if (wanted is None or wanted == method) and (
                prefix == "/" or path == prefix or path.startswith(prefix + "/")
            ):
                return value
        return None


class ApiKeyMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        routes: Mapping[str, Requirement | Sequence[str]] | RouteFunction,
        *,
        client: AsyncClient | Callable[[], AsyncClient] = AsyncClient,
        public: Collection[str] = (),
        header: str = "authorization",
        keep_credential: bool = False,
    ) -> None:
        self.app = app
        if callable(routes):
            if public:
                raise ValueError("public: a route function says PUBLIC itself")
            self._routes, self._checked = routes, False
        else:
            self._routes, self._checked = _Routes(routes, public), True
        self._header = header.strip().lower()
        self._header_bytes = self._header.encode("latin-1")
        self._keep_credential = keep_credential
        self._factory = None if isinstance(client, AsyncClient) else client
        self._client = client if isinstance(client, AsyncClient) else None
        self._client_loop: asyncio.AbstractEventLoop | None = None
        self._outages = Throttle(log, 60.0)  # one line a minute while apikeyd is away, not one a request

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, self._lifespan_receive(receive), self._lifespan_send(send))
        elif scope["type"] in ("http", "websocket"):
            await self._guarded(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def close(self) -> None:
        """Close the client this middleware made, if any."""
        if self._factory is not None and self._client is not None:
            client, self._client = self._client, None
            await client.close()

    def client(self) -> AsyncClient:
        """The client for the running loop: made on first use, and again on a new loop, since an AsyncClient
        works only on the loop it was made on (a test client may run each request on a loop of its own)."""
        loop = asyncio.get_running_loop()
        if self._factory is None:
            assert self._client is not None
            return self._client
        if self._client is None or self._client_loop is not loop:
            self._client, self._client_loop = self._factory(), loop
        return self._client

    def _lifespan_receive(self, receive: Receive) -> Receive:
        async def wrapped() -> Message:
            message = await receive()
            if message.get("type") == "lifespan.startup":
                self.client()  # a wrong APIKEYD_* setting fails the startup, not the first request
            return message

        return wrapped

    def _lifespan_send(self, send: Send) -> Send:
        async def wrapped(message: Message) -> None:
            if message.get("type") in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                await self.close()
            await send(message)

        return wrapped

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        outcome = await self._decide(scope)
        if isinstance(outcome, _Answer):
            await _refuse(scope, receive, send, outcome)
            return
        if outcome is not None:
            scope = {**scope, "state": {**scope.get("state", {}), "apikey": outcome.key}, "apikeyd.decision": outcome}
            if not self._keep_credential:
                scope["headers"] = [(name, value) for name, value in scope.get("headers", ()) if name.lower() != self._header_bytes]
        await self.app(scope, receive, send)

    async def _decide(self, scope: Scope) -> Decision | _Answer | None:
        """The allowed Decision; None for a public route; otherwise the refusal to answer."""
        wanted = self._routes(scope)
        if wanted is PUBLIC:
            return None
        if wanted is None:
            # The path is the client's: quoted, as any value a message repeats, so a key in it never comes back.
            return _Answer(403, "NO_RULE", f"{scope.get('method', 'GET')} {quote(scope.get('path', ''))} is not open to API keys")
        assert not isinstance(wanted, _Public)
        scopes, resource, project_id = wanted
        if not self._checked:
            try:
                parse_required_scopes(tuple(scopes))
            except InvalidArgument as error:  # the app's mistake, not the caller's
                log.error("the route function asked for a wrong scope for %s: %s", quote(scope.get("path", "")), error)
                return _Answer(500, "MISCONFIGURED", "the route's required scopes are wrong")
        values = [value.decode("latin-1") for name, value in scope.get("headers", ()) if name.lower() == self._header_bytes]
        try:
            key = presented_key(values, self._header)
        except NoKey as refused:
            return _Answer(401, refused.code, str(refused), (("www-authenticate", "Bearer"),))
        try:
            client = scope.get("client")
            client_ip = peer_ip(str(client[0])) if client else ""
            decision = await self.client().authorize(key, scopes, resource, project_id, client_ip=client_ip)
        except AuthorizeError as error:
            if error.code is grpc.StatusCode.INVALID_ARGUMENT:  # the request's values: its details name the field
                return _Answer(400, "INVALID_ARGUMENT", error.details)
            self._outages.warning(
                "apikeyd could not check a request to %s (%s: %s): answered 503",
                quote(scope.get("path", "")), error.code.name, error.details, event="client.authorize_failed",
            )
            return _Answer(503, "UNAVAILABLE", "the API key could not be checked: apikeyd is unavailable, retry later")
        return decision if decision.allowed else _refused(decision)


def _refused(decision: Decision) -> _Answer:
    how = refusal(decision.code)
    headers: tuple[tuple[str, str], ...] = ()
    if how is UNAUTHENTICATED:
        headers = (("www-authenticate", 'Bearer error="invalid_token"'),)
    elif decision.code is AuthCode.INSUFFICIENT_SCOPE:
        headers = (("www-authenticate", 'Bearer error="insufficient_scope"'),)
    elif how is RESOURCE_EXHAUSTED:
        headers = (("retry-after", str(retry_after(decision))),)
    elif how is OUT_OF_CREDITS and decision.credits_remaining is not None:
        headers = ((CREDITS_HEADER, str(decision.credits_remaining)),)
    return _Answer(how.http_status, decision.code.name, decision.message, headers)


async def _refuse(scope: Scope, receive: Receive, send: Send, answer: _Answer) -> None:
    body = json.dumps({"error": {"code": answer.code, "message": answer.message}}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((name.encode("latin-1"), value.encode("latin-1")) for name, value in answer.headers),
    ]
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": answer.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return
    await receive()  # websocket.connect: a refusal answers it
    if "websocket.http.response" in scope.get("extensions", {}):
        await send({"type": "websocket.http.response.start", "status": answer.status, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        # A close reason holds at most 123 bytes of UTF-8 (RFC 6455).
        reason = answer.message.encode()[:123].decode(errors="ignore")
        await send({"type": "websocket.close", "code": 4000 + answer.status, "reason": reason})
