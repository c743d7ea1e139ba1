"""What a new user meets when starting apikeyd, with the real `apikeyd` command: a database without (or with
an older) schema, empty variables, taken ports, Ctrl-C before it serves. Each failure is one line on stderr
with the exit status the README gives, never a traceback."""

import contextlib
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import psycopg
import pytest
from alembic import command
from alembic.script import ScriptDirectory
from grpc_health.v1 import health_pb2, health_pb2_grpc

from apikeyd.config import Settings
from apikeyd.store import migrate
from apikeyd.store.engine import create_db_engine
from tests.conftest import (
    POSTGRES_ADMIN_URL,
    RunningServer,
    ServeProcess,
    _postgres_reachable,
    free_port,
    scratch_postgres_database,
)
from tests.test_server import APIKEYD

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _env(**changes: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("APIKEYD_", "GRPC_VERBOSITY"))}
    return {**env, "APIKEYD_METRICS_LISTEN": "127.0.0.1:0", **changes}


def _run(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [APIKEYD, *args], capture_output=True, text=True, timeout=60, env=env or _env(), cwd=cwd, check=False
    )


def _one_line(stderr: str, *expected: str) -> str:
    """The last stderr line (log lines may come before it) holds `expected`, and nothing is a traceback."""
    assert "Traceback" not in stderr and "$argon2" not in stderr, stderr
    line = stderr.strip().splitlines()[-1]
    for text in expected:
        assert text in line, stderr
    return line


class Serving(ServeProcess):
    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        super().__init__(args, env or _env())

    def wait_for(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.stderr:
            assert self.process.poll() is None or text in self.stderr, f"exited {self.process.returncode}: {self.stderr}"
            assert time.monotonic() < deadline, f"no {text!r} in: {self.stderr}"
            time.sleep(0.05)


@contextlib.contextmanager
def serving(*args: str, env: dict[str, str] | None = None) -> Iterator[Serving]:
    running = Serving(*args, env=env)
    try:
        yield running
    finally:
        if running.process.poll() is None:
            running.process.kill()  # only on a failed test
            running.process.wait(timeout=30)


def _health(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return int(stub.Check(health_pb2.HealthCheckRequest(), timeout=10, wait_for_ready=True).status)


# --- the schema --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _empty_postgres() -> Iterator[str]:
    if not _postgres_reachable():
        pytest.skip("skipped: no PostgreSQL at 127.0.0.1:5432")
    name = f"apikeyd_startup_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _downgrade(url: str, revision: str) -> None:
    engine = create_db_engine(url)
    try:
        command.downgrade(migrate.alembic_config(engine), revision)
    finally:
        engine.dispose()


@pytest.fixture(params=["empty", "older"])
def unmigrated_postgres(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    """A PostgreSQL database without apikeyd's schema, or at the revision before the head; and the words the
    refusal must say about it."""
    if request.param == "empty":
        with _empty_postgres() as url:
            yield url, "has no apikeyd schema"
        return
    with scratch_postgres_database("apikeyd_startup") as (_, url):
        _downgrade(url, "-1")
        head = ScriptDirectory.from_config(migrate.alembic_config()).get_revision("head")
        yield url, f"is at schema revision {head.down_revision}, older than this apikeyd's {head.revision}"


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_on_an_unmigrated_postgresql_stops_with_one_line_naming_migrate(unmigrated_postgres, workers):
    url, what = unmigrated_postgres
    result = _run("serve", "--listen", f"127.0.0.1:{free_port()}", "--database-url", url, "--workers", workers)
    assert result.returncode == 2, result.stderr
    _one_line(result.stderr, what, "run `apikeyd migrate`")
    assert "serving" not in result.stderr


def test_admin_key_create_on_an_unmigrated_postgresql_is_one_line_without_the_hash(unmigrated_postgres):
    url, what = unmigrated_postgres
    result = _run("admin-key", "create", "--display-name", "ops", "--database-url", url)
    assert result.returncode == 2 and result.stdout == "", result.stderr
    _one_line(result.stderr, what, "run `apikeyd migrate`")
    # and after `apikeyd migrate`, both work
    assert _run("migrate", "--database-url", url).returncode == 0
    created = _run("admin-key", "create", "--display-name", "ops", "--database-url", url)
    assert created.returncode == 0 and created.stdout.startswith("AK_"), created.stderr


@pytest.mark.parametrize("state", ["empty", "older"])
def test_serve_brings_an_sqlite_file_up_to_date_and_serves(tmp_path, state):
    url = f"sqlite:///{tmp_path}/apikeyd.db"
    if state == "older":
        assert _run("migrate", "--database-url", url).returncode == 0
        _downgrade(url, "-1")
    port = free_port()
    with serving("--listen", f"127.0.0.1:{port}", "--database-url", url) as running:
        running.wait_for("apikeyd serving")
        assert _health(port) == SERVING
        assert running.stop() == 0
    engine = create_db_engine(url)
    try:
        assert migrate.check_schema(engine) == ""  # at the head
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def scratch_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated database of this test's own, since the test migrates it back."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/apikeyd.db"
        engine = create_db_engine(url)
        migrate.upgrade(engine)
        engine.dispose()
        yield url
        return
    with scratch_postgres_database("apikeyd_startup") as (_, url):
        yield url


def _wait_health(server: RunningServer, status: int) -> None:
    deadline = time.monotonic() + 30
    stub = health_pb2_grpc.HealthStub(server.channel)
    while stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status != status:
        assert time.monotonic() < deadline, f"health never turned {status}"
        time.sleep(0.05)


def test_a_database_migrated_back_under_a_running_server_turns_health_not_serving(scratch_url):
    server = RunningServer(Settings.load(environ={}, database_url=scratch_url, health_check_interval=0.2))
    try:
        _wait_health(server, SERVING)
        _downgrade(scratch_url, "-1")
        _wait_health(server, NOT_SERVING)
        engine = create_db_engine(scratch_url)
        migrate.upgrade(engine)
        engine.dispose()
        _wait_health(server, SERVING)
    finally:
        server.stop()


def test_a_server_started_on_an_older_schema_never_says_serving(scratch_url):
    """Without `apikeyd serve`'s check (an App built by hand, as the tests and workers do), health starts
    from the first database check."""
    _downgrade(scratch_url, "-1")
    server = RunningServer(
        Settings.load(environ={}, database_url=scratch_url, health_check_interval=0.2), operator=False
    )
    try:
        stub = health_pb2_grpc.HealthStub(server.channel)
        assert stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status == NOT_SERVING
    finally:
        server.stop()


# --- empty variables ---------------------------------------------------------------------------------------


def test_an_empty_metrics_listen_variable_disables_metrics(tmp_path):
    port = free_port()
    args = ("--listen", f"127.0.0.1:{port}", "--database-url", f"sqlite:///{tmp_path}/apikeyd.db")
    with serving(*args, env=_env(APIKEYD_METRICS_LISTEN="")) as running:
        running.wait_for("apikeyd serving")
        assert _health(port) == SERVING
        assert running.stop() == 0
    assert "metrics.listening" not in running.stderr and "metrics on" not in running.stderr


@pytest.mark.parametrize("variable", ["APIKEYD_RATE_LIMIT_URL", "APIKEYD_TLS_CERT"])
def test_an_empty_variable_of_a_setting_that_can_be_off_turns_it_off(variable, tmp_path):
    port = free_port()
    env = _env(**{variable: "", "APIKEYD_TLS_KEY": ""})
    with serving("--listen", f"127.0.0.1:{port}", "--database-url", f"sqlite:///{tmp_path}/apikeyd.db", env=env) as running:
        running.wait_for("apikeyd serving")
        assert "plaintext" in running.stderr
        assert _health(port) == SERVING
        assert running.stop() == 0


@pytest.mark.parametrize("variable", ["APIKEYD_CACHE_TTL", "APIKEYD_DATABASE_URL", "APIKEYD_LISTEN", "APIKEYD_WORKERS"])
def test_an_empty_variable_of_any_other_setting_is_a_usage_error_naming_it(variable, tmp_path):
    result = _run("serve", env=_env(**{variable: " "}), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    _one_line(result.stderr, f"{variable} is set but empty")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["serve", "--log-level", "loud"], "--log-level (APIKEYD_LOG_LEVEL) must be"),
        (["serve", "--database-url", "not a url"], "--database-url (APIKEYD_DATABASE_URL) is not a database URL"),
        (["migrate", "--database-url", "mysql://u:secret@h/x"], "--database-url (APIKEYD_DATABASE_URL) is not"),
        (["admin-key", "create", "--display-name", "x", "--database-url", "nope"], "--database-url"),
    ],
)
def test_a_bad_server_setting_is_a_usage_error(args, expected):
    result = _run(*args)
    assert result.returncode == 2
    assert "secret" not in _one_line(result.stderr, expected)


@pytest.mark.parametrize("command", [["migrate"], ["admin-key", "create", "--display-name", "x"]])
def test_a_database_that_does_not_answer_is_one_line_exit_1(command):
    url = f"postgresql://nobody:secret@127.0.0.1:{free_port()}/x"
    result = _run(*command, "--database-url", url)
    assert result.returncode == 1
    line = _one_line(result.stderr, "cannot use the database at", "Connection refused")
    assert "secret" not in line


# --- ports, noise and Ctrl-C -------------------------------------------------------------------------------


def test_a_second_serve_names_the_grpc_port_it_cannot_have_without_grpc_noise(tmp_path):
    port, metrics = free_port(), free_port()
    url = f"sqlite:///{tmp_path}/apikeyd.db"
    args = ("--listen", f"127.0.0.1:{port}", "--metrics-listen", f"127.0.0.1:{metrics}", "--database-url", url)
    with serving(*args) as first:
        first.wait_for("apikeyd serving")
        second = _run("serve", *args)  # both ports taken: a second `make run`
        assert second.returncode == 2
        _one_line(second.stderr, f"cannot listen on 127.0.0.1:{port}: the address is taken")
        assert "metrics" not in second.stderr.strip().splitlines()[-1]
        assert not [line for line in second.stderr.splitlines() if line[:1] in "EWI" and line[1:5].isdigit()]

        other = free_port()  # the metrics port alone taken: it is the one named
        third = _run("serve", *args[2:], "--listen", f"127.0.0.1:{other}")
        assert third.returncode == 2
        _one_line(third.stderr, f"cannot serve metrics on 127.0.0.1:{metrics}")
        assert first.stop() == 0


def test_with_workers_a_taken_metrics_port_gets_no_hint_about_the_grpc_port(tmp_path):
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        metrics = other.getsockname()[1]
        result = _run(
            "serve", "--workers", "2", "--listen", f"127.0.0.1:{free_port()}", "--metrics-listen",
            f"127.0.0.1:{metrics}", "--database-url", f"sqlite:///{tmp_path}/apikeyd.db",
        )  # fmt: skip
    assert result.returncode == 2
    line = _one_line(result.stderr, f"cannot serve metrics of worker 0 on 127.0.0.1:{metrics}: the address is taken")
    assert "--workers shares a port" not in line


@pytest.mark.parametrize("workers", ["1", "2"])
def test_ctrl_c_before_serving_exits_130_quietly(workers):
    with socket.socket() as silent:  # a "PostgreSQL" that accepts connections and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        silent.settimeout(60)
        url = f"postgresql://postgres@127.0.0.1:{silent.getsockname()[1]}/x"
        with serving("--listen", f"127.0.0.1:{free_port()}", "--database-url", url, "--workers", workers) as running:
            connection, _ = silent.accept()  # start-up now waits for the database (libpq's 5 s connect timeout)
            running.process.send_signal(signal.SIGINT)
            assert running.wait() == 130, running.stderr
            connection.close()
    assert "Aborted" not in running.stderr and "Traceback" not in running.stderr and "serving on" not in running.stderr
