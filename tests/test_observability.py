"""What operators watch: Prometheus metrics over HTTP, JSON log lines with request ids, and health that
follows the database."""

import asyncio
import json
import logging
import os
import re
import socket
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from apikeyd import logs, metrics
from apikeyd.config import Settings
from apikeyd.domain import keys
from apikeyd.server import StartupError
from apikeyd.store import migrate
from apikeyd.store.engine import create_db_engine
from apikeyd.v1 import api_keys_pb2 as pb
from tests.conftest import (
    ISSUED_SECRETS,
    POSTGRES_ADMIN_URL,
    RunningServer,
    authorize,
    count_keys,
    create_key,
    leaked_secrets,
    rpc_error,
    scratch_postgres_database,
)
from tests.test_server import APIKEYD

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
UUID_SHAPE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


# --- metrics --------------------------------------------------------------------------------------


def scrape(server: RunningServer) -> tuple[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    """The exposition text, and every sample by (name, sorted labels)."""
    assert server.server.metrics_endpoint is not None
    with urllib.request.urlopen(
        f"http://127.0.0.1:{server.server.metrics_endpoint.port}/metrics", timeout=10
    ) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return text, samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_refusals_left_out_of_the_audit_log_are_counted(make_server, account):
    server = make_server(metrics_listen="127.0.0.1:0")
    reader = server.stub_for(create_key(server.stub, account, ("apikeys:read",), display_name="reader").secret)
    for _ in range(3):  # one rule, one method, one key: the first is audited, the next two are counted
        rpc_error(lambda: create_key(reader, account))
    _, samples = scrape(server)
    assert value(samples, "apikeyd_audit_denials_suppressed_total") == 2


def test_metrics_count_decisions_calls_cache_and_verifications_with_safe_labels(make_server, account):
    server = make_server(metrics_listen="127.0.0.1:0")
    stub = server.stub
    created = create_key(stub, account, scopes=("messages:send:all",), display_name="billing robot")
    secret = created.secret
    for _ in range(3):
        assert authorize(stub, secret, "messages:send").code == pb.AuthorizeResponse.OK
    assert authorize(stub, secret, "domains:read").code == pb.AuthorizeResponse.INSUFFICIENT_SCOPE
    assert authorize(stub, "not-a-key").code == pb.AuthorizeResponse.MALFORMED
    unknown = keys.generate("AK_", keys.new_lookup_id())[0]
    assert authorize(stub, unknown).code == pb.AuthorizeResponse.NOT_FOUND
    assert (
        rpc_error(lambda: authorize(stub, secret, "Not A Scope")).code() == grpc.StatusCode.INVALID_ARGUMENT
    )
    missing = f"accounts/{account}/apiKeys/{uuid.uuid4()}"
    assert (
        rpc_error(lambda: stub.GetApiKey(pb.GetApiKeyRequest(name=missing))).code()
        == grpc.StatusCode.NOT_FOUND
    )

    text, samples = scrape(server)

    decisions = "apikeyd_authorize_decisions_total"
    assert value(samples, decisions, code="OK") == 3
    assert value(samples, decisions, code="INSUFFICIENT_SCOPE") == 1
    assert value(samples, decisions, code="MALFORMED") == 1
    assert value(samples, decisions, code="NOT_FOUND") == 1
    assert value(samples, decisions, code="REVOKED") == 0  # every code is there, at zero
    rpcs = "apikeyd_rpcs_total"
    assert value(samples, rpcs, method="CreateApiKey", code="OK") == 1
    assert value(samples, rpcs, method="Authorize", code="OK") == 6
    assert value(samples, rpcs, method="Authorize", code="INVALID_ARGUMENT") == 1
    assert value(samples, rpcs, method="GetApiKey", code="NOT_FOUND") == 1
    # the Authorize histogram: every call, the failed one too
    assert value(samples, "apikeyd_authorize_duration_seconds_count") == 7
    assert value(samples, "apikeyd_authorize_duration_seconds_bucket", le="+Inf") == 7
    assert 0 < value(samples, "apikeyd_authorize_duration_seconds_sum") < 7 * 5
    assert value(samples, "apikeyd_ext_authz_check_duration_seconds_count") == 0
    # cache and verifications, read at scrape time
    assert value(samples, "apikeyd_cache_hits_total") >= 3
    assert value(samples, "apikeyd_cache_misses_total") >= 2
    assert value(samples, "apikeyd_cache_entries") >= 2  # the operator's key and the new one
    assert value(samples, "apikeyd_cache_evictions_total") == 0
    assert value(samples, "apikeyd_argon2_verifications_total") == server.app.hasher.verifications >= 2
    assert value(samples, "apikeyd_verification_duration_seconds_count") >= 2
    assert value(samples, "apikeyd_verifications_in_flight") == 0
    assert value(samples, "apikeyd_cache_stale_hits_total") == 0
    assert value(samples, "apikeyd_audit_denials_suppressed_total") == 0
    assert value(samples, "process_cpu_seconds_total") > 0

    # Nothing of a tenant anywhere in the exposition: no key, key id, lookup id, account or name.
    parsed = keys.parse(secret)
    assert parsed is not None
    tenant_data = {
        secret, parsed.secret, parsed.lookup_id, created.api_key.key_id, account, "billing robot",
        server.operator_key, created.api_key.name,
    }  # fmt: skip
    assert [item for item in tenant_data if item in text] == []
    allowed_labels = {
        "code",
        "method",
        "le",
        "generation",
        "implementation",
        "major",
        "minor",
        "patchlevel",
        "version",
    }
    for _, labels in samples:
        assert {name for name, _ in labels} <= allowed_labels
        for name, label in labels:
            if name == "method":
                assert label in {"CreateApiKey", "GetApiKey", "Authorize"}
            if name == "code":
                assert label in {c.name for c in grpc.StatusCode} | set(pb.AuthorizeResponse.Code.keys())


def test_cache_evictions_and_size_are_read_when_scraped(make_server, account):
    server = make_server(metrics_listen="127.0.0.1:0", cache_size=2)
    secrets = [create_key(server.stub, account).secret for _ in range(3)]
    for secret in secrets:
        assert authorize(server.stub, secret, "messages:send").allowed
    _, samples = scrape(server)
    assert value(samples, "apikeyd_cache_entries") == len(server.app.cache) == 2
    assert value(samples, "apikeyd_cache_evictions_total") == server.app.cache.stats.evictions >= 2


def test_each_server_has_its_own_registry(make_server, account):
    first = make_server(metrics_listen="127.0.0.1:0")
    second = make_server(metrics_listen="127.0.0.1:0")
    assert first.server.metrics_endpoint.port != second.server.metrics_endpoint.port  # type: ignore[union-attr]
    secret = create_key(first.stub, account).secret
    authorize(first.stub, secret, "messages:send")
    _, one = scrape(first)
    _, two = scrape(second)
    assert value(one, "apikeyd_authorize_decisions_total", code="OK") == 1
    assert value(two, "apikeyd_authorize_decisions_total", code="OK") == 0
    assert value(two, "apikeyd_rpcs_total", method="CreateApiKey", code="OK") == 0


def test_an_empty_metrics_listen_serves_no_metrics(make_server):
    server = make_server(metrics_listen="")
    assert server.server.metrics_endpoint is None


def test_a_taken_metrics_port_stops_the_start_and_leaves_the_grpc_port_free(database_url):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            grpc_port = probe.getsockname()[1]
        settings = Settings.load(environ={}, database_url=database_url, metrics_listen=f"127.0.0.1:{port}")
        with pytest.raises(StartupError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            RunningServer(settings, listen=f"127.0.0.1:{grpc_port}", operator=False)
    with socket.socket() as again:  # the gRPC port was never bound, so it is still free
        again.bind(("127.0.0.1", grpc_port))


def test_the_loop_histogram_uses_prometheus_bucket_bounds():
    histogram = metrics.LoopHistogram("apikeyd_test_seconds", "test", (0.001, 0.01))
    for seconds in (0.0005, 0.001, 0.005, 0.02):
        histogram.observe(seconds)
    family = histogram.family()
    buckets = {s.labels["le"]: s.value for s in family.samples if s.name.endswith("_bucket")}
    assert buckets == {"0.001": 2, "0.01": 3, "+Inf": 4}  # `le`: a value on a bound counts in its bucket
    assert {s.name: s.value for s in family.samples if not s.name.endswith("_bucket")} == {
        "apikeyd_test_seconds_count": 4,
        "apikeyd_test_seconds_sum": pytest.approx(0.0265),
    }


# --- logs -----------------------------------------------------------------------------------------


class JsonLines(logging.Handler):
    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.setFormatter(logs.JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines]


@pytest.fixture
def json_lines() -> Iterator[Callable[[int], JsonLines]]:
    """Attach a JSON handler to the apikeyd logger (at DEBUG, as the suite runs it), at a given level."""
    handlers: list[JsonLines] = []
    logger = logging.getLogger("apikeyd")
    level = logger.level

    def attach(handler_level: int) -> JsonLines:
        handler = JsonLines(handler_level)
        logger.addHandler(handler)
        handlers.append(handler)
        return handler

    logger.setLevel(logging.DEBUG)
    yield attach
    for handler in handlers:
        logger.removeHandler(handler)
        lines = "\n".join(handler.lines)
        assert leaked_secrets(lines, ISSUED_SECRETS) == [], "a secret in a JSON log line"
    logger.setLevel(level)


def _only(events: list[dict[str, Any]], **match: Any) -> dict[str, Any]:
    found = [e for e in events if all(e.get(k) == v for k, v in match.items())]
    assert len(found) == 1, (match, events)
    return found[0]


def test_mutations_and_denials_are_one_json_line_each_with_their_request_id(make_server, account, json_lines):
    server = make_server()
    lines = json_lines(logging.INFO)
    stub = server.stub
    operator_name = server.run(server.app.manager.authenticate(server.operator_key, "", "")).key.name  # type: ignore[union-attr]

    created = stub.CreateApiKey(
        pb.CreateApiKeyRequest(
            parent=f"accounts/{account}", api_key=pb.ApiKey(display_name="reader", scopes=["apikeys:read"])
        ),
        metadata=[("x-request-id", "req-create-1")],
    )
    stub.RevokeApiKey(pb.RevokeApiKeyRequest(name=created.api_key.name, reason="leaked"))  # no x-request-id
    # A read-only key is refused a write: a denial, logged in its own account.
    second = create_key(stub, account, scopes=("apikeys:read",))
    reader = server.stub_for(second.secret)
    denied = rpc_error(
        lambda: reader.CreateApiKey(
            pb.CreateApiKeyRequest(
                parent=f"accounts/{account}", api_key=pb.ApiKey(display_name="x", scopes=["a:b"])
            ),
            metadata=[("x-request-id", "req-denied-7")],
        )
    )
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED

    events = lines.events()
    assert len(events) == len(lines.lines)  # every line is one JSON object
    for event in events:
        assert {"time", "level", "logger", "message"} <= set(event)
        assert datetime.fromisoformat(event["time"]).tzinfo is not None

    create = _only(events, event="key.created", key=created.api_key.name)
    assert create["level"] == "INFO" and create["logger"] == "apikeyd.lifecycle"
    assert create["request_id"] == "req-create-1"
    assert create["method"] == "CreateApiKey"
    assert create["account"] == account
    assert create["actor"] == operator_name
    assert create["peer"].startswith("ipv4:127.0.0.1:")
    assert create["state"] == "ACTIVE" and create["replayed"] is False
    assert create["masked_key"] == created.api_key.masked_key
    assert created.api_key.name in create["message"]

    revoke = _only(events, event="key.revoked", key=created.api_key.name)
    assert revoke["method"] == "RevokeApiKey" and revoke["state"] == "REVOKED"
    assert "state" in revoke["changed_fields"]
    assert UUID_SHAPE.fullmatch(revoke["request_id"]), revoke["request_id"]  # made up: there was none

    denial = _only(events, event="access.denied")
    assert denial["level"] == "INFO"
    assert denial["request_id"] == "req-denied-7"
    assert denial["method"] == "CreateApiKey"
    assert denial["account"] == account
    assert denial["actor"] == second.api_key.name
    assert denial["actor_key_id"] == second.api_key.key_id
    assert denial["target"] == f"accounts/{account}"
    assert "apikeys:write" in denial["reason"]

    # each call has its own id; none of these lines is an Authorize decision (those are DEBUG)
    ids = [e["request_id"] for e in events if e.get("event", "").startswith("key.")]
    assert len(ids) == len(set(ids))
    assert not [e for e in events if e.get("event") == "authorize"]


def test_authorize_decisions_are_logged_at_debug_only_and_never_with_the_key(
    make_server, account, json_lines
):
    server = make_server()
    created = create_key(server.stub, account)
    info, debug = json_lines(logging.INFO), json_lines(logging.DEBUG)
    server.stub.Authorize(
        pb.AuthorizeRequest(key=created.secret, required_scopes=["messages:send"]),
        metadata=[("x-request-id", "edge-42")],
    )
    server.stub.Authorize(
        pb.AuthorizeRequest(key=created.secret, required_scopes=["domains:read"]),
        metadata=[("x-request-id", "bad id with spaces")],
    )
    assert not [e for e in info.events() if e.get("event") == "authorize"]
    decisions = [e for e in debug.events() if e.get("event") == "authorize"]
    assert [d["code"] for d in decisions] == ["OK", "INSUFFICIENT_SCOPE"]
    assert decisions[0]["request_id"] == "edge-42"
    assert decisions[0]["key"] == created.api_key.name and decisions[0]["account"] == account
    assert decisions[0]["method"] == "Authorize"
    assert UUID_SHAPE.fullmatch(decisions[1]["request_id"])  # an unusable client id is replaced
    assert decisions[1]["missing_scopes"] == ["domains:read"]
    assert created.secret not in "\n".join(debug.lines)


def test_a_shared_verification_logs_as_no_call_and_never_names_the_lookup_id(make_server, account, json_lines):
    """A verification is shared by every check of the same string and may outlive the call that started it,
    so its lines belong to no call (reading a finished call's peer is not safe in grpc). And it names the key,
    never its lookup id: with the public checksum, a lookup id is enough to spend the key's failure budget."""
    server = make_server()
    created = create_key(server.stub, account)
    debug = json_lines(logging.DEBUG)
    server.stub.Authorize(pb.AuthorizeRequest(key=created.secret), metadata=[("x-request-id", "first-caller")])
    verified = _only(debug.events(), event="authorize.verified")
    assert "request_id" not in verified and "method" not in verified, verified
    assert verified["key"] == created.api_key.name and verified["match"] == "current"
    lookup_id = keys.parse(created.secret).lookup_id  # type: ignore[union-attr]
    assert lookup_id not in "\n".join(debug.lines)


def test_the_text_format_keeps_the_message_and_adds_the_request_id():
    record = logging.LogRecord("apikeyd.x", logging.INFO, __file__, 1, "hello %s", ("there",), None)
    assert logs.formatter("text").format(record).endswith("INFO apikeyd.x: hello there")
    with pytest.raises(ValueError, match="APIKEYD_LOG_FORMAT='xml'"):
        logs.formatter("xml")


def _migrate_with(env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("APIKEYD_")}
    return subprocess.run(
        [APIKEYD, "migrate", "--database-url", f"sqlite:///{tmp_path}/apikeyd.db"],
        check=False,
        capture_output=True, text=True, timeout=120, env={**clean, **env},
    )  # fmt: skip


def test_the_command_logs_json_by_default_text_when_asked_and_refuses_other_formats(tmp_path):
    default = _migrate_with({}, tmp_path)
    assert default.returncode == 0, default.stderr
    logged = [line for line in default.stderr.splitlines() if line.startswith("{")]
    assert logged, default.stderr
    assert all({"time", "level", "logger", "message"} <= set(json.loads(line)) for line in logged)
    text = _migrate_with({"APIKEYD_LOG_FORMAT": "text"}, tmp_path)
    assert text.returncode == 0 and not [line for line in text.stderr.splitlines() if line.startswith("{")]
    wrong = _migrate_with({"APIKEYD_LOG_FORMAT": "xml"}, tmp_path)
    assert wrong.returncode == 2 and "APIKEYD_LOG_FORMAT='xml'" in wrong.stderr


# --- health follows the database ----------------------------------------------------------------


def _status(server: RunningServer) -> int:
    return health_pb2_grpc.HealthStub(server.channel).Check(health_pb2.HealthCheckRequest(service="")).status


def _wait_for(server: RunningServer, status: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        statuses = {
            health_pb2_grpc.HealthStub(server.channel).Check(health_pb2.HealthCheckRequest(service=s)).status
            for s in ("", "apikeyd.v1.ApiKeyService")
        }
        if statuses == {status}:
            return
        assert time.monotonic() < deadline, f"health stayed {statuses}, expected {status}"
        time.sleep(0.05)


def _sqlite_server(tmp_path: Path, **settings: Any) -> tuple[RunningServer, Path]:
    directory = tmp_path / "db"
    directory.mkdir()
    url = f"sqlite:///{directory / 'apikeyd.db'}"
    engine = create_db_engine(url)
    migrate.upgrade(engine)
    engine.dispose()
    settings = {"health_check_interval": 0.1, "metrics_listen": "", **settings}
    server = RunningServer(Settings.load(environ={}, database_url=url, **settings))
    return server, directory


def _break_sqlite(server: RunningServer, directory: Path) -> Path:
    """The file's directory goes away, and with it the connections (an open SQLite connection keeps
    working on its file descriptor, as one to a lost network disk would not)."""
    moved = directory.with_name("db-gone")
    directory.rename(moved)
    server.app.repository.engine.dispose()
    return moved


def test_health_is_not_serving_while_the_sqlite_file_cannot_be_opened(tmp_path):
    server, directory = _sqlite_server(tmp_path)
    try:
        _wait_for(server, SERVING)
        moved = _break_sqlite(server, directory)
        _wait_for(server, NOT_SERVING)
        moved.rename(directory)
        _wait_for(server, SERVING)
        assert count_keys(server.stub, "a") == 0
    finally:
        server.stop()


def test_health_never_returns_to_serving_once_the_drain_has_begun(tmp_path):
    server, directory = _sqlite_server(tmp_path)
    try:
        moved = _break_sqlite(server, directory)
        _wait_for(server, NOT_SERVING)
        stopping = asyncio.run_coroutine_threadsafe(server.server.stop(grace=1, drain_delay=1.5), server.loop)
        time.sleep(0.2)
        moved.rename(directory)  # the database is back, but the server is leaving
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and not stopping.done():
            assert _status(server) == NOT_SERVING
            time.sleep(0.05)
        stopping.result(timeout=30)
    finally:
        server.stop()


@pytest.mark.postgres
def test_health_is_not_serving_while_postgresql_refuses_connections():
    with scratch_postgres_database("apikeyd_health") as (name, url):
        server = RunningServer(
            Settings.load(environ={}, database_url=url, health_check_interval=0.1, metrics_listen="")
        )
        try:
            _wait_for(server, SERVING)
            with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
                admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
                admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
                )
            _wait_for(server, NOT_SERVING)
            error = rpc_error(lambda: server.stub.ListApiKeys(pb.ListApiKeysRequest(parent="accounts/a")))
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
                admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            _wait_for(server, SERVING)
            assert count_keys(server.stub, "a") == 0
        finally:
            server.stop()


def test_a_zero_interval_turns_the_database_watch_off(tmp_path):
    server, directory = _sqlite_server(tmp_path, health_check_interval=0)
    try:
        _break_sqlite(server, directory)
        time.sleep(0.3)
        assert _status(server) == SERVING
    finally:
        server.stop()
