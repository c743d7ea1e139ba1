"""WireErrors wraps handlers as they are registered (service/wire.py): services added only as generic
handlers are checked too, registered methods still come before generic handlers, and a method nobody
hosts is still UNIMPLEMENTED. Each over a real channel to a real grpc.aio server."""

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import uvloop
from grpc_health.v1 import health_pb2

from apikeyd.service.wire import WireErrors
from tests.conftest import RunningServer

METHOD = "/test.Echo/Say"


def _say(answer: str) -> grpc.RpcMethodHandler:
    async def say(request: health_pb2.HealthCheckRequest, context: Any) -> health_pb2.HealthCheckRequest:
        return health_pb2.HealthCheckRequest(service=f"{answer}:{request.service}")

    return grpc.unary_unary_rpc_method_handler(
        say,
        request_deserializer=health_pb2.HealthCheckRequest.FromString,
        response_serializer=health_pb2.HealthCheckRequest.SerializeToString,
    )


async def _call(address: str, data: bytes) -> tuple[grpc.StatusCode, str]:
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            reply = await channel.unary_unary(METHOD)(data, timeout=10)
        except grpc.aio.AioRpcError as error:
            return error.code(), error.details() or ""
    return grpc.StatusCode.OK, health_pb2.HealthCheckRequest.FromString(reply).service


def _serving(register: Callable[[grpc.aio.Server], None], calls: Callable[[str], Awaitable[Any]]) -> Any:
    async def run() -> Any:
        server = WireErrors().guard(grpc.aio.server())
        register(server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            return await calls(f"127.0.0.1:{port}")
        finally:
            await server.stop(None)

    return uvloop.run(run())


def test_a_service_with_only_a_generic_handler_refuses_undecodable_bytes_with_invalid_argument() -> None:
    def register(server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Echo", {"Say": _say("generic")})])

    async def calls(address: str) -> list[tuple[grpc.StatusCode, str]]:
        valid = health_pb2.HealthCheckRequest(service="hi").SerializeToString()
        return [await _call(address, b"\xff"), await _call(address, valid)]

    assert _serving(register, calls) == [
        (grpc.StatusCode.INVALID_ARGUMENT, "the request is not a valid grpc.health.v1.HealthCheckRequest"),
        (grpc.StatusCode.OK, "generic:hi"),
    ]


def test_a_registered_method_takes_precedence_over_a_generic_handler_for_the_same_name() -> None:
    def register(server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Echo", {"Say": _say("generic")})])
        server.add_registered_method_handlers("test.Echo", {"Say": _say("registered")})

    async def calls(address: str) -> tuple[grpc.StatusCode, str]:
        return await _call(address, health_pb2.HealthCheckRequest(service="hi").SerializeToString())

    assert _serving(register, calls) == (grpc.StatusCode.OK, "registered:hi")


def test_methods_the_server_does_not_host_are_unimplemented(server: RunningServer) -> None:
    async def calls() -> list[grpc.StatusCode]:
        codes = []
        async with grpc.aio.insecure_channel(server.address) as channel:
            for method in ("/apikeyd.v1.ApiKeyService/NoSuchMethod", "/no.such.Service/Check"):
                try:
                    await channel.unary_unary(method)(b"", timeout=10)
                except grpc.aio.AioRpcError as error:
                    codes.append(error.code())
        return codes

    assert asyncio.run(calls()) == [grpc.StatusCode.UNIMPLEMENTED] * 2
