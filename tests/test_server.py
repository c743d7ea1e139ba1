"""The server as operators meet it: health, reflection, the port, SIGTERM, a database that is down,
and logs that never hold a secret."""

import asyncio
import logging
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from apikeyd.config import Settings
from apikeyd.domain import keys
from apikeyd.server import App, StartupError
from apikeyd.v1 import api_keys_pb2 as pb
from apikeyd.v1 import api_keys_pb2_grpc as pb_grpc
from tests.conftest import (
    APIKEYD,
    BearerCredentials,
    RunningServer,
    authorize,
    count_keys,
    create_key,
    free_port,
    held_hasher,
    leaked_secrets,
    rpc_error,
)


def test_health_reports_serving_for_the_server_and_the_service(server):
    health = health_pb2_grpc.HealthStub(server.channel)
    for service in ("", "apikeyd.v1.ApiKeyService"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_every_service_and_resolves_every_method(server):
    database = ProtoReflectionDescriptorDatabase(server.channel)
    services = set(database.get_services())
    assert {"apikeyd.v1.ApiKeyService", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services
    pool = descriptor_pool.DescriptorPool(database)
    service = pool.FindServiceByName("apikeyd.v1.ApiKeyService")
    methods = {m.name: m.input_type.full_name for m in service.methods}
    assert methods == {
        "CreateApiKey": "apikeyd.v1.CreateApiKeyRequest",
        "GetApiKey": "apikeyd.v1.GetApiKeyRequest",
        "ListApiKeys": "apikeyd.v1.ListApiKeysRequest",
        "UpdateApiKey": "apikeyd.v1.UpdateApiKeyRequest",
        "RevokeApiKey": "apikeyd.v1.RevokeApiKeyRequest",
        "DeleteApiKey": "apikeyd.v1.DeleteApiKeyRequest",
        "RotateApiKey": "apikeyd.v1.RotateApiKeyRequest",
        "Authorize": "apikeyd.v1.AuthorizeRequest",
        "ListAuditEvents": "apikeyd.v1.ListAuditEventsRequest",
        "ListApiKeyUsage": "apikeyd.v1.ListApiKeyUsageRequest",
        "WatchApiKeyChanges": "apikeyd.v1.WatchApiKeyChangesRequest",
    }
    assert pool.FindMessageTypeByName("apikeyd.v1.ApiKey").fields_by_name["create_time"].message_type.full_name == (
        "google.protobuf.Timestamp"
    )


def test_a_taken_port_is_an_error_not_a_second_listener(server, database_url):
    with pytest.raises(StartupError, match=f"cannot listen on {server.address}"):
        RunningServer(Settings.load(environ={}, database_url=database_url), listen=server.address)
    assert count_keys(server.stub, "x") == 0


def test_a_feed_poll_that_is_not_shorter_than_the_lease_is_refused_at_start(database_url):
    # The cache would stop trusting its entries between two reads of the feed.
    with pytest.raises(StartupError, match="must be shorter than APIKEYD_FEED_LEASE"):
        App(Settings.load(environ={}, database_url=database_url, feed_poll_interval=1.0, feed_lease=1.0))
    with pytest.raises(StartupError, match=r"poll interval \(0.5 s\)|poll interval \(0.25 s\)"):
        App(Settings.load(environ={}, database_url=database_url, feed_lease=0.2))



def _serve(tmp_path: Path, port: int, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [APIKEYD, "serve", "--listen", f"127.0.0.1:{port}", "--database-url", f"sqlite:///{tmp_path}/apikeyd.db", *extra],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "APIKEYD_LOG_LEVEL": "DEBUG"},
    )


def _admin_key(tmp_path: Path) -> str:
    """An operator key made the way the README's quickstart makes the first one."""
    result = subprocess.run(
        [APIKEYD, "admin-key", "create", "--display-name", "tests", "--database-url", f"sqlite:///{tmp_path}/apikeyd.db"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert keys.parse(token) is not None and "\n" not in token  # the key alone on stdout
    assert "shown only now" in result.stderr and token not in result.stderr
    return token


def _wait_serving(port: int) -> grpc.Channel:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    grpc.channel_ready_future(channel).result(timeout=30)
    return channel


def test_the_cli_refuses_a_taken_port_with_a_clear_message(tmp_path):
    port = free_port()
    first = _serve(tmp_path, port)
    try:
        _wait_serving(port).close()
        second = _serve(tmp_path, port)
        _, stderr = second.communicate(timeout=60)
        assert second.returncode == 2
        assert f"cannot listen on 127.0.0.1:{port}" in stderr
    finally:
        first.terminate()
        first.communicate(timeout=60)


def test_sigterm_drains_flushes_last_used_times_and_exits_0(tmp_path):
    port = free_port()
    token = _admin_key(tmp_path)
    process = _serve(tmp_path, port, "--last-used-flush-interval", "3600")
    channel = grpc.intercept_channel(_wait_serving(port), BearerCredentials(token))
    stub = pb_grpc.ApiKeyServiceStub(channel)
    created = create_key(stub, "acme")
    assert authorize(stub, created.secret).code == pb.AuthorizeResponse.OK
    channel.close()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert "draining" in stderr
    with sqlite3.connect(tmp_path / "apikeyd.db") as db:
        (used,) = db.execute("SELECT last_used_time FROM api_keys WHERE key_id = ?", (created.api_key.key_id,)).fetchone()
    assert used is not None
    # secrets never reach the log, even at DEBUG
    assert leaked_secrets(stderr, {created.secret, token}) == []


@pytest.mark.parametrize(
    "url", ["sqlite:////nonexistent-dir/apikeyd.db", "postgresql://postgres@127.0.0.1:1/nothing"], ids=["sqlite", "postgresql"]
)
def test_a_database_that_is_down_gives_unavailable_and_nothing_worse(url):
    server = RunningServer(Settings.load(environ={}, database_url=url), operator=False)
    try:
        # any well-formed key: checking it needs the database, as does everything after
        stub = server.stub_for(keys.generate("AK_", keys.new_lookup_id())[0])
        calls = [
            lambda: create_key(stub, "acme"),
            lambda: stub.GetApiKey(pb.GetApiKeyRequest(name="accounts/a/apiKeys/00000000-0000-4000-8000-000000000000")),
            lambda: stub.ListApiKeys(pb.ListApiKeysRequest(parent="accounts/a")),
            lambda: authorize(stub, keys.generate("AK_", keys.new_lookup_id())[0]),
        ]
        for call in calls:
            error = rpc_error(call)
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
            assert "database" in error.details()
    finally:
        server.stop()


def test_no_secret_reaches_a_log_line_or_an_error(make_server, account, caplog):
    caplog.set_level(logging.DEBUG)
    server = make_server()
    stub = server.stub
    created = create_key(stub, account)
    secrets_seen = [created.secret]
    authorize(stub, created.secret, "messages:send")
    rotated = stub.RotateApiKey(pb.RotateApiKeyRequest(name=created.api_key.name))
    secrets_seen.append(rotated.secret)
    details = []
    for presented in (created.secret, rotated.secret, rotated.secret[:-1], rotated.secret + "x"):
        response = authorize(stub, presented, "messages:send")
        details.append(response.message)
        details.append(rpc_error(lambda presented=presented: authorize(stub, presented, "Bad Scope")).details())
    stub.RevokeApiKey(pb.RevokeApiKeyRequest(name=created.api_key.name))
    details.append(authorize(stub, rotated.secret).message)
    server.stop()
    text = "\n".join([record.getMessage() for record in caplog.records] + details)
    for secret in secrets_seen:
        assert secret not in text and keys.parse(secret).secret not in text
        assert secret[:-6] not in text  # not even without the checksum


def test_drain_says_not_serving_and_lets_in_flight_calls_finish(make_server, account):
    server = make_server()
    created = create_key(server.stub, account)
    with held_hasher(server, "verify") as (reached, release):
        # an Authorize that is still running when SIGTERM's drain begins
        in_flight = server.stub.Authorize.future(pb.AuthorizeRequest(key=created.secret))
        assert reached.wait(30)
        watch = health_pb2_grpc.HealthStub(server.channel).Watch(health_pb2.HealthCheckRequest(service=""))
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        stopping = asyncio.run_coroutine_threadsafe(server.server.stop(grace=30), server.loop)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()  # as a load balancer does once it has stopped routing here
        assert not in_flight.done()
        release.set()
        assert in_flight.result(timeout=30).code == pb.AuthorizeResponse.OK
    stopping.result(timeout=60)


def test_during_the_drain_delay_health_says_not_serving_and_calls_are_still_served(make_server, account):
    server = make_server()
    created = create_key(server.stub, account)
    health = health_pb2_grpc.HealthStub(server.channel)
    stopping = asyncio.run_coroutine_threadsafe(server.server.stop(grace=5, drain_delay=3), server.loop)
    deadline = time.monotonic() + 30
    while health.Check(health_pb2.HealthCheckRequest()).status != health_pb2.HealthCheckResponse.NOT_SERVING:
        assert time.monotonic() < deadline  # enter_graceful_shutdown is stop's first step, on the server's loop
    assert not stopping.done()
    assert authorize(server.stub, created.secret).code == pb.AuthorizeResponse.OK
    stopping.result(timeout=60)


def test_the_suites_log_check_finds_a_planted_secret():
    """The session-wide check in conftest.py must be able to fail: here it sees a secret in a log line."""
    secret = keys.generate("AK_", keys.new_lookup_id())[0]
    parsed = keys.parse(secret)
    assert leaked_secrets(f"created with {secret}", {secret}) == [secret[:12] + "..."]
    assert leaked_secrets(f"oops {parsed.secret} leaked", {secret}) == [secret[:12] + "..."]
    assert leaked_secrets(f"masked {keys.mask(secret)}", {secret}) == []
