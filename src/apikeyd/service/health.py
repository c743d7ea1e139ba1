"""grpc.health.v1.Health: grpc_health's asyncio servicer, with List, and Watch streams that end at shutdown.

grpc_health leaves List to the generated base class, whose plain function raises NotImplementedError on a
worker thread: every List logged an ERROR traceback. And a Watch waits for the next status change forever,
so each open stream held `Server.stop` for the whole shutdown grace before grpc cancelled it. Here Watch
ends (status OK, after the NOT_SERVING that draining sent) once `end_watches` is called as the listener
closes, and the server stops as soon as its other calls are done.

Health takes calls from anyone, and an open Watch keeps its request for as long as it stays open: a
service name longer than MAX_HEALTH_SERVICE_LENGTH gets INVALID_ARGUMENT before any work, as every other
field does (service/request_limits.py).
"""

import asyncio
import contextlib
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2

from apikeyd.domain import limits
from apikeyd.domain.errors import InvalidArgument


async def _check_service(request: health_pb2.HealthCheckRequest, context: Any) -> None:
    try:
        limits.check_length("service", request.service, limits.MAX_HEALTH_SERVICE_LENGTH)
    except InvalidArgument as error:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))


class HealthServicer(health.aio.HealthServicer):
    def __init__(self) -> None:
        super().__init__()
        self._ending = asyncio.Event()

    async def List(self, request: health_pb2.HealthListRequest, context: Any) -> health_pb2.HealthListResponse:
        return health_pb2.HealthListResponse(
            statuses={
                name: health_pb2.HealthCheckResponse(status=status) for name, status in self._server_status.items()
            }
        )

    async def Check(self, request: health_pb2.HealthCheckRequest, context: Any) -> health_pb2.HealthCheckResponse:
        await _check_service(request, context)
        return await super().Check(request, context)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:
        await _check_service(request, context)
        watch = asyncio.ensure_future(super().Watch(request, context))
        ending = asyncio.ensure_future(self._ending.wait())
        try:
            await asyncio.wait((watch, ending), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (watch, ending):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def end_watches(self) -> None:
        self._ending.set()
