"""One place that turns domain errors into gRPC status codes; nothing reaches the caller as UNKNOWN."""

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from time import perf_counter
from typing import Any, TypeVar

import grpc

from apikeyd.domain.errors import (
    Aborted,
    ApiKeyError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from apikeyd.logs import CURRENT_CALL, next_call_number

log = logging.getLogger(__name__)

_CODES: dict[type[ApiKeyError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    Aborted: grpc.StatusCode.ABORTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
}

R = TypeVar("R")
Handler = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[R]]


def _count(counts: dict[tuple[str, str], int], key: tuple[str, str]) -> None:
    counts[key] = counts.get(key, 0) + 1


def status_code(error: ApiKeyError) -> grpc.StatusCode:
    for kind in type(error).__mro__:
        if kind in _CODES:
            return _CODES[kind]
    return grpc.StatusCode.INTERNAL


def grpc_errors(handler: Handler[R]) -> Handler[R]:
    """Also counts the call by method and status code in the servicer's `rpc_counts`, times it into its
    `rpc_timers[method]` if there is one (apikeyd.metrics), and binds the call for the log lines it writes
    (apikeyd.logs)."""
    method = handler.__name__
    ok = (method, "OK")

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> R:
        counts = self.rpc_counts
        timer = self.rpc_timers.get(method)
        CURRENT_CALL.set((context, method, next_call_number()))
        started = perf_counter()
        try:
            result = await handler(self, request, context)
        except ApiKeyError as error:
            code = status_code(error)
            _count(counts, (method, code.name))
            await context.abort(code, str(error))
        except asyncio.CancelledError:
            _count(counts, (method, "CANCELLED"))
            raise
        except Exception:
            _count(counts, (method, "INTERNAL"))
            # The request may hold a secret, so the log names the method only.
            log.exception("internal error in %s", handler.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; the server log has the details")
        else:
            try:
                counts[ok] += 1
            except KeyError:
                counts[ok] = 1
            return result
        finally:
            if timer is not None:
                timer.observe(perf_counter() - started)
        raise AssertionError("context.abort returned")

    return wrapper
