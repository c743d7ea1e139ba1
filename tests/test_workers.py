"""`apikeyd serve --workers N`: N processes on one port under a supervisor (src/apikeyd/workers.py).

Each test runs the real command on a free port with an SQLite file (or a PostgreSQL database of its own).
Which worker answers a call is the kernel's choice per connection, so the tests open many connections (a
channel with a subchannel pool of its own makes a new one) and read each worker's own metrics endpoint to see
who served them."""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import psycopg
from grpc_health.v1 import health_pb2, health_pb2_grpc

from apikeyd.v1 import api_keys_pb2 as pb
from apikeyd.v1 import api_keys_pb2_grpc as pb_grpc
from tests.conftest import (
    POSTGRES_ADMIN_URL,
    BearerCredentials,
    ServeProcess,
    authorize,
    create_key,
    free_port,
    leaked_secrets,
    scratch_postgres_database,
)
from tests.test_server import APIKEYD, _admin_key


class Supervisor(ServeProcess):
    """`apikeyd serve --workers N` with its stderr (the supervisor's and the workers' JSON lines) collected."""

    def __init__(
        self, tmp_path: Path, port: int, *extra: str, workers: int = 2, database_url: str = ""
    ) -> None:
        self.port = port
        super().__init__(
            ["--workers", str(workers), "--listen", f"127.0.0.1:{port}",
             "--database-url", database_url or f"sqlite:///{tmp_path}/apikeyd.db", "--log-format", "json", *extra],
            # Workers share a fixed ext_authz port as they share the gRPC one.
            {**os.environ, "APIKEYD_METRICS_LISTEN": "127.0.0.1:0", "APIKEYD_EXT_AUTHZ_LISTEN": f"127.0.0.1:{free_port()}"},
        )

    def events(self, event: str, since: int = 0) -> list[dict[str, Any]]:
        """The JSON lines of `event`, from line number `since` on (a `len(running.lines)` taken earlier)."""
        found = []
        for line in self.lines[since:]:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("event") == event:
                found.append(entry)
        return found

    def wait_for(self, what: Callable[[], Any], timeout: float = 60) -> Any:
        deadline = time.monotonic() + timeout
        while not (result := what()):
            assert self.process.poll() is None or what(), f"apikeyd exited {self.process.returncode}:\n{self.stderr}"
            assert time.monotonic() < deadline, f"timed out; log so far:\n{self.stderr}"
            time.sleep(0.05)
        return result

    def serving_workers(self) -> dict[int, dict[str, Any]]:
        """worker index -> its latest "worker.serving" line (pid, metrics_port), once all serve."""
        self.wait_for(lambda: self.events("workers.serving"))
        return {entry["worker"]: entry for entry in self.events("worker.serving")}


@contextmanager
def supervisor(tmp_path: Path, *extra: str, workers: int = 2, database_url: str = "") -> Iterator[Supervisor]:
    running = Supervisor(tmp_path, free_port(), *extra, workers=workers, database_url=database_url)
    try:
        yield running
    finally:
        if running.process.poll() is None:
            running.process.kill()  # only on a failed test: a passing one has stopped it
            running.process.wait(timeout=30)


def _new_connection(port: int, token: str | None = None) -> grpc.Channel:
    """A channel with a TCP connection of its own (grpc otherwise shares one between channels to one address),
    so the kernel picks a worker for it afresh."""
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
    return grpc.intercept_channel(channel, BearerCredentials(token)) if token else channel


def _decisions(metrics_port: int, code: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    match = re.search(rf'^apikeyd_authorize_decisions_total\{{code="{code}"\}} (\S+)$', text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _authorize_on_new_connections(port: int, secret: str, times: int) -> list[int]:
    codes = []
    for _ in range(times):
        channel = _new_connection(port)
        try:
            stub = pb_grpc.ApiKeyServiceStub(channel)
            codes.append(stub.Authorize(pb.AuthorizeRequest(key=secret), timeout=30, wait_for_ready=True).code)
        finally:
            channel.close()
    return codes


def test_two_workers_share_the_port_and_each_serves_its_share(tmp_path):
    token = _admin_key(tmp_path)
    with supervisor(tmp_path) as running:
        workers = running.serving_workers()
        assert sorted(workers) == [0, 1]
        pids = {entry["pid"] for entry in workers.values()}
        assert len(pids) == 2 and running.process.pid not in pids
        assert {entry["pid"] for entry in running.events("worker.started")} == pids
        assert "rate limits are enforced per worker process" in running.stderr  # no rate_limit_url here
        assert len({entry["metrics_port"] for entry in workers.values()}) == 2  # each its own endpoint

        channel = _new_connection(running.port, token)
        created = create_key(pb_grpc.ApiKeyServiceStub(channel), "acme")
        channel.close()
        for _ in range(40):
            channel = _new_connection(running.port)
            try:
                health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
                assert health.status == health_pb2.HealthCheckResponse.SERVING
                assert authorize(pb_grpc.ApiKeyServiceStub(channel), created.secret).code == pb.AuthorizeResponse.OK
            finally:
                channel.close()
        # 40 connections: both workers answered some (all on one has odds of 2^-39)
        for entry in workers.values():
            assert _decisions(entry["metrics_port"], "OK") > 0, entry

        assert running.stop() == 0
    assert leaked_secrets(running.stderr, {created.secret, token}) == []


def test_sigterm_drains_every_worker_and_exits_0_with_no_worker_left(tmp_path):
    with supervisor(tmp_path, "--drain-delay", "0.5") as running:
        pids = {entry["pid"] for entry in running.serving_workers().values()}
        assert all(_alive(pid) for pid in pids)
        assert running.stop() == 0, running.stderr
    assert running.stderr.count("draining: NOT_SERVING for 0.5 s") == 2  # each worker drained as one server does
    assert running.events("workers.stopped")
    assert not any(_alive(pid) for pid in pids)


def test_a_killed_worker_is_restarted_and_the_service_keeps_answering(tmp_path):
    token = _admin_key(tmp_path)
    with supervisor(tmp_path) as running:
        workers = running.serving_workers()
        channel = _new_connection(running.port, token)
        created = create_key(pb_grpc.ApiKeyServiceStub(channel), "acme")
        channel.close()
        killed = workers[0]["pid"]
        os.kill(killed, signal.SIGKILL)
        # meanwhile new connections go to the worker that is left, then to both
        codes = _authorize_on_new_connections(running.port, created.secret, 20)
        died = running.wait_for(lambda: running.events("worker.died"))
        assert died[0]["pid"] == killed and died[0]["worker"] == 0 and "SIGKILL" in died[0]["message"]
        restarted = running.wait_for(
            lambda: [e for e in running.events("worker.serving") if e["worker"] == 0 and e["pid"] != killed]
        )[0]
        assert not _alive(killed) and _alive(restarted["pid"])
        codes += _authorize_on_new_connections(running.port, created.secret, 20)
        assert codes == [pb.AuthorizeResponse.OK] * 40
        assert _decisions(restarted["metrics_port"], "OK") > 0  # the new worker 0 serves too
        assert running.stop() == 0, running.stderr
    assert not _alive(restarted["pid"]) and not _alive(workers[1]["pid"])


def test_a_revoked_key_is_refused_by_every_worker(tmp_path):
    """A revoke goes through one worker; any worker that then verifies the key afresh (not cached: it never
    saw it) refuses it. How fast a worker that had it cached hears of the revoke is the change feed's part."""
    token = _admin_key(tmp_path)
    with supervisor(tmp_path) as running:
        workers = running.serving_workers()
        channel = _new_connection(running.port, token)
        stub = pb_grpc.ApiKeyServiceStub(channel)
        created = create_key(stub, "acme")
        stub.RevokeApiKey(pb.RevokeApiKeyRequest(name=created.api_key.name, reason="leaked"))
        channel.close()
        codes = _authorize_on_new_connections(running.port, created.secret, 30)
        assert codes == [pb.AuthorizeResponse.REVOKED] * 30
        for entry in workers.values():
            assert _decisions(entry["metrics_port"], "REVOKED") > 0, entry  # both workers refused it
        assert running.stop() == 0


def test_a_port_taken_by_another_program_is_a_clear_error_with_workers(tmp_path):
    with socket.socket() as other:  # not apikeyd, no SO_REUSEPORT
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        running = Supervisor(tmp_path, port)
        assert running.wait() == 2
    assert f"cannot listen on 127.0.0.1:{port}: the address is taken" in running.stderr
    assert not running.events("worker.started")


def _two_free_ports() -> int:
    """A port that is free and whose successor is free too (worker i takes the metrics port + i)."""
    for _ in range(50):
        base = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", base + 1))
            except OSError:
                continue
        return base
    raise AssertionError("found no two consecutive free ports")


def test_a_taken_metrics_port_of_a_worker_is_a_clear_error(tmp_path):
    base = _two_free_ports()
    with socket.socket() as other:
        other.bind(("127.0.0.1", base + 1))
        other.listen()
        taken = base + 1
        # worker 0 uses `base`, worker 1 `taken`
        running = Supervisor(tmp_path, free_port(), "--metrics-listen", f"127.0.0.1:{base}")
        assert running.wait() == 2
    assert f"cannot serve metrics of worker 1 on 127.0.0.1:{taken}" in running.stderr
    assert not running.events("worker.started")


def test_workers_0_is_a_usage_error(tmp_path):
    result = subprocess.run(
        [APIKEYD, "serve", "--workers", "0", "--listen", f"127.0.0.1:{free_port()}",
         "--database-url", f"sqlite:///{tmp_path}/apikeyd.db"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "Usage:" in result.stderr and "--workers (APIKEYD_WORKERS) must be 1 or more, not 0" in result.stderr
    assert not (tmp_path / "apikeyd.db").exists()  # refused before anything was done


# --- health answers for the host ------------------------------------------------------------------

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_ANSWERS = {"health.host_serving": SERVING, "health.host_not_serving": NOT_SERVING}


def _answers(running: Supervisor, since: int) -> dict[int, int]:
    """worker index -> what it last said it answers health checks with (its log), from line `since` on."""
    latest: dict[int, int] = {}
    for line in running.lines[since:]:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("event") in _ANSWERS:
            latest[entry["worker"]] = _ANSWERS[entry["event"]]
    return latest


def _wait_answers(running: Supervisor, since: int, expected: dict[int, int]) -> None:
    """Until every worker in `expected` has said (since line `since`) that it answers with its status."""
    running.wait_for(lambda: all(_answers(running, since).get(i) == status for i, status in expected.items()))


def _malformed(workers: dict[int, dict[str, Any]]) -> dict[int, float]:
    return {index: _decisions(entry["metrics_port"], "MALFORMED") for index, entry in workers.items()}


def _health_checks(port: int, times: int) -> list[int]:
    """`times` health checks, each on a new connection, for "" and for the service (which must agree). Each
    connection then sends one malformed Authorize, which the worker that answered counts (code MALFORMED,
    no database read): the workers' metrics show who answered the checks."""
    statuses = []
    for _ in range(times):
        channel = _new_connection(port)
        try:
            health = health_pb2_grpc.HealthStub(channel)
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=30, wait_for_ready=True).status
            service = health.Check(health_pb2.HealthCheckRequest(service="apikeyd.v1.ApiKeyService"), timeout=30)
            assert service.status == status
            statuses.append(status)
            answer = pb_grpc.ApiKeyServiceStub(channel).Authorize(pb.AuthorizeRequest(key="not a key"), timeout=30)
            assert answer.code == pb.AuthorizeResponse.MALFORMED
        finally:
            channel.close()
    return statuses


def _checks_answered_by_all(port: int, workers: dict[int, dict[str, Any]], at_least: int = 20) -> list[int]:
    """Health checks on new connections, at least `at_least`, until every worker in `workers` answered some."""
    before = _malformed(workers)
    statuses: list[int] = []
    while len(statuses) < at_least or not all(count > before[i] for i, count in _malformed(workers).items()):
        assert len(statuses) < 500, "the kernel gave no new connection to some worker"
        statuses += _health_checks(port, 1)
    return statuses


def _hold_port(port: int, timeout: float = 30) -> socket.socket:
    """Listen on `port` as soon as it is free (its worker has just been killed): the next worker to start
    with this metrics port fails to start, so it stays out of the gRPC port's group."""
    deadline = time.monotonic() + timeout
    while True:
        holder = socket.socket()
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            holder.bind(("127.0.0.1", port))
            holder.listen()
            return holder
        except OSError:
            holder.close()
            assert time.monotonic() < deadline, f"port {port} still taken"
            time.sleep(0.01)


def test_a_draining_worker_turns_the_host_not_serving_and_a_dead_one_no_longer_counts(tmp_path):
    """A worker that listens but is NOT_SERVING (here: draining) makes every worker answer NOT_SERVING; once it
    is killed the supervisor clears its state, and while its restart keeps failing (its metrics port is
    taken) the worker that is left answers SERVING alone."""
    base = _two_free_ports()
    with supervisor(tmp_path, "--drain-delay", "5", "--metrics-listen", f"127.0.0.1:{base}") as running:
        workers = running.serving_workers()
        _wait_answers(running, 0, {0: SERVING, 1: SERVING})
        assert _health_checks(running.port, 10) == [SERVING] * 10

        mark = len(running.lines)
        drained_at = time.monotonic()
        os.kill(workers[0]["pid"], signal.SIGTERM)  # worker 0 alone drains: 5 s NOT_SERVING, still serving calls
        _wait_answers(running, mark, {0: NOT_SERVING, 1: NOT_SERVING})
        assert [e["not_serving"] for e in running.events("health.host_not_serving", mark)] == [[0], [0]]
        statuses = _checks_answered_by_all(running.port, workers)  # both workers answer NOT_SERVING
        assert time.monotonic() - drained_at < 5, "too slow: worker 0's drain ended during the checks"
        assert set(statuses) == {NOT_SERVING}

        mark = len(running.lines)
        os.kill(workers[0]["pid"], signal.SIGKILL)  # mid-drain: its state still says NOT_SERVING
        holder = _hold_port(base)
        try:
            _wait_answers(running, mark, {1: SERVING})
            died = running.events("worker.died", mark)
            assert died[0]["pid"] == workers[0]["pid"] and "SIGKILL" in died[0]["message"]
            before = _malformed({1: workers[1]})
            assert _health_checks(running.port, 20) == [SERVING] * 20
            assert _malformed({1: workers[1]})[1] == before[1] + 20  # all from worker 1: worker 0 is gone
            # a worker 0 was started again and failed (its metrics port is taken): starting, it does not count
            running.wait_for(lambda: [e for e in running.events("worker.died", mark) if e["status"] == 2])
            assert _health_checks(running.port, 5) == [SERVING] * 5
        finally:
            holder.close()
        restarted = running.wait_for(
            lambda: [e for e in running.events("worker.serving", mark) if e["worker"] == 0]
        )[0]
        _wait_answers(running, mark, {0: SERVING, 1: SERVING})
        assert not running.events("health.host_not_serving", mark)
        assert set(_checks_answered_by_all(running.port, {0: restarted, 1: workers[1]})) == {SERVING}
        assert running.stop() == 0, running.stderr


def test_a_killed_worker_does_not_turn_the_host_not_serving(tmp_path):
    with supervisor(tmp_path) as running:
        workers = running.serving_workers()
        _wait_answers(running, 0, {0: SERVING, 1: SERVING})
        mark = len(running.lines)
        os.kill(workers[1]["pid"], signal.SIGKILL)
        # (a check sent to it as it dies would fail, not answer: a dead worker answers nothing)
        running.wait_for(lambda: running.events("worker.died", mark))
        statuses = []
        # fresh connections all along, while worker 1 is dead, restarting and back
        while not [e for e in running.events("worker.serving", mark) if e["worker"] == 1]:
            statuses += _health_checks(running.port, 1)
            assert running.process.poll() is None
        statuses += _health_checks(running.port, 20)
        assert len(statuses) > 20 and set(statuses) == {SERVING}
        assert not running.events("health.host_not_serving", mark)
        assert running.stop() == 0, running.stderr


def _client_ports(pid: int, server_port: int) -> list[int]:
    """The local ports of process `pid`'s TCP connections to `server_port`: its sockets (/proc/pid/fd) looked
    up by inode in its network namespace's tables."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[len("socket:["):-1])
    ports = []
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as lines:
            next(lines)
            for line in lines:
                columns = line.split()
                local, remote, inode = columns[1], columns[2], columns[9]
                if inode in inodes and int(remote.rpartition(":")[2], 16) == server_port:
                    ports.append(int(local.rpartition(":")[2], 16))
    return ports


def _cut_off_from_postgresql(database: str, pid: int) -> int:
    """New connections to `database` are refused, and process `pid`'s open ones are ended: that process's
    pings fail, while the other workers go on with the connections their pools hold. How many were ended."""
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
        ended = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND client_port = ANY(%s)",
            (database, _client_ports(pid, 5432)),
        ).fetchall()
    return len(ended)


def _allow_connections(database: str) -> None:
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')


def test_a_worker_that_loses_its_database_turns_the_host_not_serving_until_it_is_back(tmp_path):
    with scratch_postgres_database("apikeyd_workers") as (database, url), supervisor(
        tmp_path, "--health-check-interval", "0.2", database_url=url
    ) as running:
        workers = running.serving_workers()
        _wait_answers(running, 0, {0: SERVING, 1: SERVING})

        mark = len(running.lines)
        assert _cut_off_from_postgresql(database, workers[0]["pid"]) > 0
        _wait_answers(running, mark, {0: NOT_SERVING, 1: NOT_SERVING})
        # worker 1 is fine itself: only worker 0 is NOT_SERVING, and every worker answers so
        assert {tuple(e["not_serving"]) for e in running.events("health.host_not_serving", mark)} == {(0,)}
        assert set(_checks_answered_by_all(running.port, workers, 30)) == {NOT_SERVING}

        mark = len(running.lines)
        _allow_connections(database)
        _wait_answers(running, mark, {0: SERVING, 1: SERVING})
        assert set(_checks_answered_by_all(running.port, workers, 30)) == {SERVING}
        assert running.stop() == 0, running.stderr


# --- a worker that is alive but stuck ---------------------------------------------------------------


def test_the_heartbeats_share_the_health_board_without_touching_its_bytes():
    from apikeyd.host_health import HealthBoard

    board, fd = HealthBoard.create(3)
    try:
        other = HealthBoard(fd, 3)  # as a worker maps it
        assert os.fstat(fd).st_size == HealthBoard.length(3) == 8 + 3 * 8
        assert [board.last_beat(i) for i in range(3)] == [0.0] * 3 and board.states() == bytes(3)
        board[0], board[2] = HealthBoard.SERVING, HealthBoard.NOT_SERVING
        before = time.monotonic()
        other.beat(1)
        other.beat(2)
        assert before <= board.last_beat(1) <= board.last_beat(2) <= time.monotonic() and board.last_beat(0) == 0.0
        assert other.states() == bytes([HealthBoard.SERVING, 0, HealthBoard.NOT_SERVING])
        other.close()
    finally:
        board.close()
        os.close(fd)


def test_a_stopped_worker_is_killed_as_hung_and_restarted_and_the_service_keeps_answering(tmp_path):
    """A worker stopped with SIGSTOP keeps its place in the port's group and its SERVING byte; its event loop no
    longer beats its heartbeat, so the supervisor kills it after --worker-hang-timeout and starts another."""
    token = _admin_key(tmp_path)
    with supervisor(tmp_path, "--worker-hang-timeout", "1") as running:
        workers = running.serving_workers()
        _wait_answers(running, 0, {0: SERVING, 1: SERVING})
        channel = _new_connection(running.port, token)
        created = create_key(pb_grpc.ApiKeyServiceStub(channel), "acme")
        channel.close()

        mark = len(running.lines)
        stopped = workers[1]["pid"]
        stopped_at = time.monotonic()
        os.kill(stopped, signal.SIGSTOP)
        try:
            hung = running.wait_for(lambda: running.events("worker.hung", mark), timeout=10)
        finally:
            if not running.events("worker.hung", mark) and _alive(stopped):
                os.kill(stopped, signal.SIGKILL)  # only on a failed test: no stopped process left behind
        assert time.monotonic() - stopped_at < 5
        assert hung[0]["worker"] == 1 and hung[0]["pid"] == stopped and 1 < hung[0]["stale"] < 3, hung
        died = running.wait_for(lambda: running.events("worker.died", mark))
        assert died[0]["pid"] == stopped and died[0]["worker"] == 1 and "SIGKILL" in died[0]["message"]
        restarted = running.wait_for(
            lambda: [e for e in running.events("worker.serving", mark) if e["worker"] == 1]
        )[0]
        assert restarted["pid"] != stopped and not _alive(stopped) and _alive(restarted["pid"])
        _wait_answers(running, mark, {1: SERVING})

        assert set(_checks_answered_by_all(running.port, {0: workers[0], 1: restarted})) == {SERVING}
        codes = _authorize_on_new_connections(running.port, created.secret, 20)
        assert codes == [pb.AuthorizeResponse.OK] * 20
        assert len(running.events("worker.hung")) == 1  # the others beat on; so does the new worker 1
        assert running.stop() == 0, running.stderr
    assert not _alive(restarted["pid"]) and not _alive(workers[0]["pid"])


def test_a_drain_longer_than_the_hang_timeout_is_not_taken_for_a_hang(tmp_path):
    """A draining worker's event loop runs, and beats, until it exits: neither a worker drained alone nor a
    drain of the whole, each longer than the hang timeout, gets a worker killed."""
    with supervisor(tmp_path, "--worker-hang-timeout", "1", "--drain-delay", "2") as running:
        workers = running.serving_workers()
        mark = len(running.lines)
        os.kill(workers[0]["pid"], signal.SIGTERM)  # worker 0 alone drains, watched by the supervisor
        died = running.wait_for(lambda: running.events("worker.died", mark))
        assert died[0]["pid"] == workers[0]["pid"] and died[0]["status"] == 0, died  # drained, exited 0
        running.wait_for(lambda: [e for e in running.events("worker.serving", mark) if e["worker"] == 0])

        stopping = time.monotonic()
        assert running.stop() == 0, running.stderr
        assert time.monotonic() - stopping >= 2
    assert running.stderr.count("draining: NOT_SERVING for 2.0 s") == 3
    assert not running.events("worker.hung")
    assert not running.events("worker.killed")
