"""`apikeyd serve --workers N`: N processes on one port under a supervisor (src/apikeyd/workers.py).

Each test runs the real command on a free port with an SQLite file. Which worker answers a call is the
kernel's choice per connection, so the tests open many connections (a channel with a subchannel pool of its
own makes a new one) and read each worker's own metrics endpoint to see who served them."""

import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from apikeyd.v1 import api_keys_pb2 as pb
from apikeyd.v1 import api_keys_pb2_grpc as pb_grpc
from tests.conftest import BearerCredentials, authorize, create_key, leaked_secrets
from tests.test_server import APIKEYD, _admin_key, _free_port


class Supervisor:
    """`apikeyd serve --workers N` with its stderr (the supervisor's and the workers' JSON lines) collected."""

    def __init__(self, tmp_path: Path, port: int, *extra: str, workers: int = 2) -> None:
        self.port = port
        self.process = subprocess.Popen(
            [APIKEYD, "serve", "--workers", str(workers), "--listen", f"127.0.0.1:{port}",
             "--database-url", f"sqlite:///{tmp_path}/apikeyd.db", "--log-format", "json", *extra],
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "APIKEYD_METRICS_LISTEN": "127.0.0.1:0"},
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def events(self, event: str) -> list[dict[str, Any]]:
        found = []
        for line in list(self.lines):
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

    def stop(self, timeout: float = 60) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float = 60) -> int:
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code


@contextmanager
def supervisor(tmp_path: Path, *extra: str, workers: int = 2) -> Iterator[Supervisor]:
    running = Supervisor(tmp_path, _free_port(), *extra, workers=workers)
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
        base = _free_port()
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
        running = Supervisor(tmp_path, _free_port(), "--metrics-listen", f"127.0.0.1:{base}")
        assert running.wait() == 2
    assert f"cannot serve metrics of worker 1 on 127.0.0.1:{taken}" in running.stderr
    assert not running.events("worker.started")


def test_workers_0_is_a_usage_error(tmp_path):
    result = subprocess.run(
        [APIKEYD, "serve", "--workers", "0", "--listen", f"127.0.0.1:{_free_port()}",
         "--database-url", f"sqlite:///{tmp_path}/apikeyd.db"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "Usage:" in result.stderr and "--workers (APIKEYD_WORKERS) must be 1 or more, not 0" in result.stderr
    assert not (tmp_path / "apikeyd.db").exists()  # refused before anything was done
