"""The health service: List answers every status, and an open Watch ends quietly when the server stops."""

import logging
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from apikeyd.server import SERVICE_NAME
from tests.conftest import RunningServer


def test_list_answers_the_status_of_every_service(server: RunningServer) -> None:
    statuses = health_pb2_grpc.HealthStub(server.channel).List(health_pb2.HealthListRequest(), timeout=10).statuses
    assert {name: status.status for name, status in statuses.items()} == {
        "": health_pb2.HealthCheckResponse.SERVING,
        SERVICE_NAME: health_pb2.HealthCheckResponse.SERVING,
    }


def test_an_open_watch_ends_without_an_error_line_when_the_server_stops(
    make_server, caplog: pytest.LogCaptureFixture
) -> None:
    """The stream sees NOT_SERVING, then ends: it does not hold the stop for the whole grace."""
    server: RunningServer = make_server()
    channel = grpc.insecure_channel(server.address)
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    seen: list[object] = []
    reader = threading.Thread(target=lambda: seen.extend(_drain(watch)))
    reader.start()
    started = time.monotonic()
    with caplog.at_level(logging.DEBUG):
        server.stop(grace=30)
    stopping = time.monotonic() - started
    reader.join(timeout=30)
    channel.close()
    assert not reader.is_alive()
    assert seen == [health_pb2.HealthCheckResponse.NOT_SERVING]
    assert stopping < 15, f"the open Watch held the stop for {stopping:.1f} s of a 30 s grace"
    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert not errors, [record.getMessage()[:200] for record in errors]


def _drain(watch: grpc.Future) -> list[object]:
    answers: list[object] = []
    try:
        for answer in watch:
            answers.append(answer.status)
    except grpc.RpcError as error:
        answers.append(error.code())
    return answers
