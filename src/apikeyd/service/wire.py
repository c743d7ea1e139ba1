"""Requests that are not valid protobuf get INVALID_ARGUMENT, on every service the server hosts.

grpc.aio decodes a request with the method's `request_deserializer` before any servicer code runs: for a
unary request before a ServicerContext even exists, for a streamed one inside `context.read()`. A
DecodeError there escapes to grpc's own handler, which answers UNKNOWN "Unexpected DecodeError" and logs an
ERROR with a traceback for every garbled request, an unauthenticated way to fill the log. Raising anything
else from the deserializer ends the same way, and without a context there is no way to set a status.

So WireErrors wraps each method handler: its deserializer turns undecodable bytes into an `Undecodable`
marker instead of raising, and its behaviour, which does have a context, answers a marker with
`context.abort(INVALID_ARGUMENT, ...)` before the servicer sees it. For streamed requests the check sits on
the request iterator, so every message of the stream is checked as it arrives. Each refusal is counted; a
WARNING line says so at most once per LOG_EVERY seconds, without the bytes.

The handlers are wrapped once, as they are registered: `guard(server)` is the server the services are
added to. An interceptor could do the same, but grpc.aio runs interceptors on every call, a chain of
coroutines through its Python before the handler is even found. Generic handlers, which grpc asks on each
call for a method with no registered handler, are wrapped as they answer, so no service escapes the check.
"""

import inspect
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from apikeyd import handlers
from apikeyd.logs import Throttle

log = logging.getLogger(__name__)

LOG_EVERY = 60.0  # seconds between warnings about undecodable requests


class Undecodable:
    """Stands in for a request whose bytes are not a valid `type_name`."""

    __slots__ = ("type_name",)

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name


def _type_name(deserializer: Callable[[bytes], Any]) -> str:
    message_class = getattr(deserializer, "__self__", None)  # `Message.FromString`, bound to its class
    descriptor = getattr(message_class, "DESCRIPTOR", None)
    return str(getattr(descriptor, "full_name", "request message"))


def _tolerant(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    marker = Undecodable(_type_name(deserializer))

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError:
            return marker

    return deserialize


class WireErrors:
    def __init__(self) -> None:
        self.refused = 0  # undecodable requests answered INVALID_ARGUMENT; bumped on the event loop
        self._warnings = Throttle(log, LOG_EVERY)

    def guard(self, server: grpc.aio.Server) -> grpc.aio.Server:
        """`server`, with every handler registered through the result wrapped."""
        return _GuardedServer(server, self)

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if handler.request_deserializer is None:
            return handler
        original = handlers.behavior(handler)
        # grpc runs a plain function on its thread pool with another context; every servicer here is async.
        if not (inspect.iscoroutinefunction(original) or inspect.isasyncgenfunction(original)):
            return handler
        checked = self._checked_stream(method, original) if handler.request_streaming else self._checked(method, original)
        return handlers.with_behavior(handler, checked, request_deserializer=_tolerant(handler.request_deserializer))

    async def _refuse(self, method: str, request: Undecodable, context: grpc.aio.ServicerContext) -> None:
        self.refused += 1
        self._warnings.warning(
            "refused an undecodable request to %s (not a valid %s)", method, request.type_name,
            event="rpc.undecodable", method=method,
        )
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid {request.type_name}")

    def _checked(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.isasyncgenfunction(behavior):

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                if request.__class__ is Undecodable:
                    await self._refuse(method, request, context)
                async for response in behavior(request, context):
                    yield response

            return stream

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if request.__class__ is Undecodable:
                await self._refuse(method, request, context)
            return await behavior(request, context)

        return unary

    def _checked_stream(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def requests(iterator: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async for request in iterator:
                if request.__class__ is Undecodable:
                    await self._refuse(method, request, context)
                yield request

        if inspect.isasyncgenfunction(behavior):

            async def stream(iterator: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                async for response in behavior(requests(iterator, context), context):
                    yield response

            return stream

        async def unary(iterator: Any, context: grpc.aio.ServicerContext) -> Any:
            return await behavior(requests(iterator, context), context)

        return unary


class _GuardedGeneric(grpc.GenericRpcHandler):
    def __init__(self, handler: grpc.GenericRpcHandler, wire: WireErrors) -> None:
        self._handler = handler
        self._wire = wire
        # Wrapped handlers by method: only names the handler resolved get here, so one entry per method it
        # hosts, whatever names callers send.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = self._handler.service(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wire.wrap(method, handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped


class _MethodTable(grpc.GenericRpcHandler):
    """The registered methods of every service, looked up by full method name."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        return self.handlers.get(handler_call_details.method)


class _GuardedServer(grpc.aio.Server):
    """Registers wrapped handlers with the server it stands for; everything else is passed on as it is.

    Registered methods are served through one generic handler, `_MethodTable`, added first, so that they
    still take precedence over the other generic handlers, as grpc documents. grpc.aio keeps one pending
    request per registered method and, for every call it accepts, `asyncio.wait`s on all of them again
    (a done-callback added to and removed from each): every hosted method would add to the CPU of every
    call, of any method. One generic handler keeps one request pending (bench/grpc_cpu.py measures it)."""

    def __init__(self, server: grpc.aio.Server, wire: WireErrors) -> None:
        self._server = server
        self._wire = wire
        self._methods = _MethodTable()
        server.add_generic_rpc_handlers([self._methods])

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers([_GuardedGeneric(handler, self._wire) for handler in generic_rpc_handlers])

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        for name, handler in method_handlers.items():
            method = f"/{service_name}/{name}"
            self._methods.handlers[method] = self._wire.wrap(method, handler)

    def add_insecure_port(self, address: str) -> int:
        return int(self._server.add_insecure_port(address))

    def add_secure_port(self, address: str, server_credentials: grpc.ServerCredentials) -> int:
        return int(self._server.add_secure_port(address, server_credentials))

    async def start(self) -> None:
        await self._server.start()

    async def stop(self, grace: float | None) -> None:
        await self._server.stop(grace)

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        return bool(await self._server.wait_for_termination(timeout))
