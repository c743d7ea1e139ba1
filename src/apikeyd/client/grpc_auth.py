"""gRPC server interceptors that let a call reach its handler only with an API key that apikeyd allows for the
call's method: `ApiKeyInterceptor` for grpc.server, with a Client, and `AsyncApiKeyInterceptor` for
grpc.aio.server, with an AsyncClient made on the server's loop.

    interceptor = ApiKeyInterceptor(
        Client(),
        {
            "/mail.v1.Mail/Send": Rule(["messages:send"], resource=lambda call: call.request.domain),
            "/mail.v1.Mail/List": ["messages:read"],
        },
        public={"/grpc.health.v1.Health/Check"},
    )
    server = grpc.server(executor, interceptors=[interceptor])
    ...
    def Send(self, request, context):
        key = current_key()  # the caller's VerifiedKey: key_id, account_id, project_id, scopes, labels

* **The key** comes in `authorization: Bearer <key>` metadata, or as the whole value of another entry
  (`header="x-api-key"`). A call with none, or with the entry twice, is UNAUTHENTICATED without a check.
* **Methods.** Each method is named in `methods`, with the scopes it needs, or in `public`, checked not at
  all. A method in neither is refused PERMISSION_DENIED without a check, so that a method added to a service
  stays closed until someone says what it needs; `unlisted=Rule()` lets any usable key call such methods
  instead. A method the server does not have is UNIMPLEMENTED, as without the interceptor.
* **The client's address** is the call's peer (`context.peer()`), for keys with allowed_ip_ranges; a peer
  that is no IP address (a unix socket) gives none, which such a key refuses and every other key ignores.
* **Denials** are answered as on Envoy's path (domain/refusals.py): UNAUTHENTICATED for a key that is not
  usable, PERMISSION_DENIED for one that may not do this (its address outside the key's ranges too),
  RESOURCE_EXHAUSTED with a `retry-after` trailer (whole seconds) for a rate-limited one and an
  `x-apikeyd-credits-remaining` trailer for one whose credits are spent, each with the decision's message
  as its details. When apikeyd
  cannot be asked, UNAVAILABLE (and INVALID_ARGUMENT when the check refused the call's own values, such as
  an over-long key or resource). The presented key is never in a status, a trailer or a log line; it does
  stay in the handler's `context.invocation_metadata()`, which grpc does not let an interceptor change.
* **Where the check runs**: inside the call's handler, so that a Rule's extractors see the request (None
  for a streaming request), and `current_key()` is set in the context the handler runs in, its thread or
  its task, and in no other. With grpc.aio the handlers must be coroutines or async generators, as the
  servicers grpc generates are.
"""

import contextlib
import contextvars
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, NoReturn, TypeVar

import grpc

from apikeyd import handlers
from apikeyd.client.aio import AsyncClient
from apikeyd.client.errors import AuthorizeError
from apikeyd.client.parts import configured_scopes, peer_ip
from apikeyd.client.sync import Client
from apikeyd.domain.decision import Decision
from apikeyd.domain.ip_ranges import grpc_peer_host
from apikeyd.domain.model import VerifiedKey
from apikeyd.domain.refusals import (
    CREDITS_HEADER,
    OUT_OF_CREDITS,
    RESOURCE_EXHAUSTED,
    NoKey,
    presented_key,
    refusal,
    retry_after,
)
from apikeyd.logs import Throttle

log = logging.getLogger(__name__)

_decision: contextvars.ContextVar[Decision | None] = contextvars.ContextVar("apikeyd_decision", default=None)


def current_decision() -> Decision | None:
    """The allowed decision for the call being handled (its rate outcome too); None in a public method."""
    return _decision.get()


def current_key() -> VerifiedKey:
    """The key the call being handled was allowed with. LookupError in a public method, or outside a call
    behind the interceptor: a handler that needs an identity must not run without one."""
    decision = _decision.get()
    if decision is None or decision.key is None:
        raise LookupError("no API key was checked for this call: its method is public or not behind the interceptor")
    return decision.key


@dataclass(frozen=True, slots=True)
class Call:
    """What a Rule's extractors are given."""

    method: str  # /package.Service/Method
    metadata: Mapping[str, str]  # the text entries by lower-case name, the first of each
    request: Any  # the request message; None when the method takes a stream of them


Extractor = Callable[[Call], str]


@dataclass(frozen=True)
class Rule:
    """What one method needs: every one of `scopes`, for `resource` (a scope's `{value}` qualifier) and
    `project_id` (for a project key), each given as a value or as a function of the Call."""

    scopes: Sequence[str] = ()
    resource: str | Extractor = ""
    project_id: str | Extractor = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "scopes", configured_scopes(self.scopes))


@dataclass(frozen=True, slots=True)
class _Denial:
    code: grpc.StatusCode
    details: str
    trailers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class _Check:
    key: str
    scopes: Sequence[str]
    resource: str
    project_id: str
    client_ip: str


def _value(given: str | Extractor, call: Call) -> str:
    return given if isinstance(given, str) else given(call)


# By the peer string, which every call on one connection shares: one parse a connection, not a call.
@functools.lru_cache(maxsize=4096)
def _peer_ip(peer: str) -> str:
    """grpc's peer as a client_ip."""
    return peer_ip(grpc_peer_host(peer))


class _Policy:
    """What both interceptors decide alike: which methods are checked, with what, and every answer but allow."""

    def __init__(
        self, methods: Mapping[str, Rule | Sequence[str]], public: Collection[str], unlisted: Rule | None, header: str
    ) -> None:
        self.rules = {name: rule if isinstance(rule, Rule) else Rule(rule) for name, rule in methods.items()}
        self.public = frozenset(public)
        both = sorted(self.public & self.rules.keys())
        if both:
            raise ValueError(f"{both[0]} is both public and checked: name it in one of the two")
        self.unlisted = unlisted
        self.header = header.strip().lower()
        self._outages = Throttle(log, 60.0)  # one line a minute while apikeyd is away, not one a call

    def rule(self, method: str) -> Rule | None:
        return self.rules.get(method, self.unlisted)

    def check(self, method: str, rule: Rule | None, request: Any, metadata: Any, peer: str) -> _Check | _Denial:
        if rule is None:
            return _Denial(grpc.StatusCode.PERMISSION_DENIED, f"{method} is not open to API keys")
        entries: dict[str, str] = {}
        values: list[str] = []
        for name, value in metadata or ():
            if isinstance(value, str):
                entries.setdefault(name, value)
                if name == self.header:
                    values.append(value)
        try:
            key = presented_key(values, self.header)
        except NoKey as refused:
            return _Denial(grpc.StatusCode.UNAUTHENTICATED, str(refused))
        call = Call(method, entries, request)
        return _Check(key, rule.scopes, _value(rule.resource, call), _value(rule.project_id, call), _peer_ip(peer))

    def answer(self, decision: Decision) -> Decision | _Denial:
        if decision.allowed:
            return decision
        how = refusal(decision.code)
        trailers: tuple[tuple[str, str], ...] = ()
        if how is RESOURCE_EXHAUSTED:
            trailers = (("retry-after", str(retry_after(decision))),)
        elif how is OUT_OF_CREDITS and decision.credits_remaining is not None:
            trailers = ((CREDITS_HEADER, str(decision.credits_remaining)),)
        return _Denial(grpc.StatusCode[how.grpc_code], decision.message, trailers)

    def failed(self, method: str, error: AuthorizeError) -> _Denial:
        if error.code is grpc.StatusCode.INVALID_ARGUMENT:  # the call's values: its details name the field
            return _Denial(grpc.StatusCode.INVALID_ARGUMENT, error.details)
        self._outages.warning(
            "apikeyd could not check a call to %s (%s: %s): answered UNAVAILABLE",
            method, error.code.name, error.details, event="client.authorize_failed",
        )
        return _Denial(grpc.StatusCode.UNAVAILABLE, "the API key could not be checked: apikeyd is unavailable, retry later")


# --- grpc.server ---------------------------------------------------------------------------------------


def _abort(context: grpc.ServicerContext, denial: _Denial) -> NoReturn:
    if denial.trailers:
        context.set_trailing_metadata(denial.trailers)
    context.abort(denial.code, denial.details)
    raise AssertionError("grpc's abort returned")  # it raises; this says so to the type checker


def _iterate_in(context: contextvars.Context, responses: Iterator[Any]) -> Iterator[Any]:
    """A response stream whose every step runs in `context`, as the handler's first did."""
    try:
        while True:
            try:
                item = context.run(next, responses)
            except StopIteration:
                return
            yield item
    finally:
        close = getattr(responses, "close", None)
        if close is not None:
            context.run(close)


C = TypeVar("C", Client, AsyncClient)


class _Guard(Generic[C]):
    """What both interceptors are made with: the client, and the methods' rules (see the module's docs)."""

    def __init__(
        self,
        client: C,
        methods: Mapping[str, Rule | Sequence[str]],
        *,
        public: Collection[str] = (),
        unlisted: Rule | None = None,
        header: str = "authorization",
    ) -> None:
        self._client: C = client
        self._policy = _Policy(methods, public, unlisted, header)


class ApiKeyInterceptor(_Guard[Client], grpc.ServerInterceptor):
    """For grpc.server: the check is a blocking Client.authorize on the handler's worker thread. The identity
    is set in a copy of the context the call runs in: recent grpc gives each call a fresh one, and the copy
    keeps an identity from staying behind for a worker thread's next call on any grpc."""

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        method = details.method
        if handler is None or method in self._policy.public:
            return handler
        rule, behavior, streamed_request = self._policy.rule(method), handlers.behavior(handler), handler.request_streaming
        streamed_response = handler.response_streaming

        def checked(request: Any, context: grpc.ServicerContext) -> Any:
            decision = self._decide(method, rule, None if streamed_request else request, context)
            run_in = contextvars.copy_context()
            run_in.run(_decision.set, decision)
            result = run_in.run(behavior, request, context)
            return _iterate_in(run_in, result) if streamed_response else result

        return handlers.with_behavior(handler, checked)

    def _decide(self, method: str, rule: Rule | None, request: Any, context: grpc.ServicerContext) -> Decision:
        check = self._policy.check(method, rule, request, context.invocation_metadata(), context.peer())
        if isinstance(check, _Denial):
            _abort(context, check)
        try:
            decision = self._client.authorize(
                check.key, check.scopes, check.resource, check.project_id, client_ip=check.client_ip
            )
        except AuthorizeError as error:
            _abort(context, self._policy.failed(method, error))
        answer = self._policy.answer(decision)
        if isinstance(answer, _Denial):
            _abort(context, answer)
        return answer


# --- grpc.aio.server -----------------------------------------------------------------------------------


async def _abort_aio(context: grpc.aio.ServicerContext, denial: _Denial) -> NoReturn:
    await context.abort(denial.code, denial.details, trailing_metadata=denial.trailers)
    raise AssertionError("grpc's abort returned")  # it raises; this says so to the type checker


class AsyncApiKeyInterceptor(_Guard[AsyncClient], grpc.aio.ServerInterceptor):
    """For grpc.aio.server: the check awaits AsyncClient.authorize in the call's own task (a cached answer
    awaits nothing), where the identity is then set for the handler and unset after it."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        method = details.method
        if handler is None or method in self._policy.public:
            return handler
        rule, behavior, streamed_request = self._policy.rule(method), handlers.behavior(handler), handler.request_streaming
        decide = self._decide

        if handler.response_streaming and inspect.isasyncgenfunction(behavior):

            async def checked_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                token = _decision.set(await decide(method, rule, None if streamed_request else request, context))
                responses = behavior(request, context)
                try:
                    async for item in responses:
                        yield item
                finally:
                    await responses.aclose()
                    # A stream given up by its client may be finalized from another task, whose context
                    # never had the token; the call's own task is gone by then, and its context with it.
                    with contextlib.suppress(ValueError):
                        _decision.reset(token)

            return handlers.with_behavior(handler, checked_stream)

        async def checked(request: Any, context: grpc.aio.ServicerContext) -> Any:
            token = _decision.set(await decide(method, rule, None if streamed_request else request, context))
            try:
                return await behavior(request, context)
            finally:
                _decision.reset(token)

        return handlers.with_behavior(handler, checked)

    async def _decide(self, method: str, rule: Rule | None, request: Any, context: grpc.aio.ServicerContext) -> Decision:
        check = self._policy.check(method, rule, request, context.invocation_metadata(), context.peer())
        if isinstance(check, _Denial):
            await _abort_aio(context, check)
        try:
            decision = await self._client.authorize(
                check.key, check.scopes, check.resource, check.project_id, client_ip=check.client_ip
            )
        except AuthorizeError as error:
            await _abort_aio(context, self._policy.failed(method, error))
        answer = self._policy.answer(decision)
        if isinstance(answer, _Denial):
            await _abort_aio(context, answer)
        return answer
