"""The database goes away and comes back, on a PostgreSQL server of this test's own (initdb and pg_ctl on a
free port; the shared one is never stopped).

While it is down: keys this process verified keep being authorized for APIKEYD_STALE_IF_ERROR seconds past
the change feed's last successful read, and not a moment longer; a key whose change this process has seen
(made here, or read from the feed) and a key it never verified get UNAVAILABLE, as do management calls;
health says NOT_SERVING; no create is half-written. When it is back, everything resumes by itself."""

import glob
import os
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from apikeyd.config import Settings
from apikeyd.store import migrate
from apikeyd.store.engine import create_db_engine
from apikeyd.v1 import api_keys_pb2 as pb
from tests.conftest import RunningServer, authorize, create_key, free_port

R = pb.AuthorizeResponse
STALE = 3.0  # APIKEYD_STALE_IF_ERROR for this test: long enough to look at, short enough to wait out
_BINARIES = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))



class PrivatePostgres:
    """A throwaway cluster in a temporary directory. initdb refuses to run as root, so as root the cluster
    belongs to the `postgres` user and its commands run as that user."""

    def __init__(self) -> None:
        self.bin = Path(_BINARIES[-1]).parent
        self.dir = Path(tempfile.mkdtemp(prefix="apikeyd-pg-"))  # not under pytest's root-only tmp_path
        self.data = self.dir / "data"
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self._as:
            shutil.chown(self.dir, "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync")

    def _run(self, program: str, *args: str) -> None:
        subprocess.run([*self._as, str(self.bin / program), *args], check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.dir / "log"), "-w", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        subprocess.run([*self._as, str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def postgres() -> Iterator[PrivatePostgres]:
    if not _BINARIES:
        pytest.skip("skipped: no PostgreSQL server binaries (pg_ctl) to start a private PostgreSQL")
    cluster = PrivatePostgres()
    try:
        cluster.start()
        engine = create_db_engine(cluster.url)
        migrate.upgrade(engine)
        engine.dispose()
        yield cluster
    finally:
        cluster.remove()


def _wait_for(condition: Callable[[], Any], timeout: float, what: str) -> float:
    """Monotonic time at which `condition()` first held; fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout} s: {what}")
        time.sleep(0.005)
    return time.monotonic()


def _code(call: Callable[[], Any]) -> Any:
    try:
        result = call()
    except grpc.RpcError as error:
        return error.code()
    return result.code if isinstance(result, pb.AuthorizeResponse) else grpc.StatusCode.OK


def _health(server: RunningServer) -> Any:
    stub = health_pb2_grpc.HealthStub(server.channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status


class CreateLoad:
    """Creates keys with request ids on a thread of its own until stopped, across the outage."""

    def __init__(self, server: RunningServer, account: str) -> None:
        self._stub = server.stub_for(server.operator_key)
        self._account = account
        self.acknowledged: dict[str, str] = {}  # request id -> key name
        self.failed: list[str] = []  # request ids whose call failed
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="create-load", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            request_id = str(uuid.uuid4())
            try:
                created = self._stub.CreateApiKey(
                    pb.CreateApiKeyRequest(
                        parent=f"accounts/{self._account}",
                        api_key=pb.ApiKey(display_name="load", scopes=["messages:send:all"]),
                        request_id=request_id,
                    ),
                    timeout=10,
                )
                self.acknowledged[request_id] = created.api_key.name
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
                self.failed.append(request_id)
                time.sleep(0.01)  # pacing a client's retries while the database is down, not a race

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def test_verified_keys_outlive_the_database_for_stale_if_error_and_everything_resumes(postgres, account):
    settings = Settings.load(
        environ={}, database_url=postgres.url, stale_if_error=STALE, health_check_interval=0.2,
        metrics_listen="127.0.0.1:0",
    )
    server = RunningServer(settings)
    replica = RunningServer(settings)
    load: CreateLoad | None = None
    try:
        stub = server.stub
        cached = create_key(stub, account)
        revoked_here = create_key(stub, account)
        revoked_there = create_key(stub, account)
        never_seen = create_key(replica.stub, account)
        for issued in (cached, revoked_here, revoked_there):
            assert authorize(stub, issued.secret).code == R.OK
        stub.RevokeApiKey(pb.RevokeApiKeyRequest(name=revoked_here.api_key.name))
        replica.stub.RevokeApiKey(pb.RevokeApiKeyRequest(name=revoked_there.api_key.name))
        # The server has read the replica's revoke from its feed (not by checking the key, which would
        # cache it as REVOKED).
        with psycopg.connect(postgres.url.replace("+psycopg", "")) as connection:
            top = connection.execute("SELECT max(id) FROM key_events").fetchone()[0]
        _wait_for(lambda: (server.app.feed.position or 0) >= top, 5, "the feed reads the replica's revoke")
        # Cached now: a verification that overlapped the feed's reads of the other keys' events was rightly
        # kept out of the cache, so check once more after them, then see a hit.
        assert authorize(stub, cached.secret).code == R.OK
        hits = server.app.cache.stats.hits
        assert authorize(stub, cached.secret).code == R.OK
        assert server.app.cache.stats.hits == hits + 1

        load = CreateLoad(server, account)
        _wait_for(lambda: len(load.acknowledged) >= 3, 10, "creates before the outage")
        postgres.stop()
        lost_at = _wait_for(lambda: server.app.feed.lost, 5, "the feed notices the database is gone")
        synced_at = server.app.cache.synced_at
        assert lost_at - synced_at < settings.feed_lease + 0.5

        # Not trusted (the feed is lost), so an OK now can only come from the stale entry. (The create load's
        # bearer key is served stale too, so the counter only has to move.)
        assert not server.app.cache.trusted
        stale_hits = server.app.cache.stats.stale_hits
        stale = authorize(stub, cached.secret)
        assert stale.code == R.OK  # verified here before: still authorized,
        assert stale.stale  # and said to be, so that no client-side cache keeps it past the outage
        assert server.app.cache.stats.stale_hits > stale_hits
        for issued in (revoked_here, revoked_there, never_seen):
            assert _code(lambda issued=issued: authorize(stub, issued.secret)) == grpc.StatusCode.UNAVAILABLE
        # A database that is down is not asked again by every check: about once a second.
        attempts = sum(server.app.metrics.verification_seconds.counts)
        started = time.monotonic()
        for _ in range(50):
            assert _code(lambda: authorize(stub, never_seen.secret)) == grpc.StatusCode.UNAVAILABLE
        tried = sum(server.app.metrics.verification_seconds.counts) - attempts
        assert tried <= 2 + (time.monotonic() - started) / 1.0, tried
        with pytest.raises(grpc.RpcError) as refused:
            stub.GetApiKey(pb.GetApiKeyRequest(name=cached.api_key.name))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "database" in (refused.value.details() or "")
        assert _code(lambda: create_key(stub, account)) == grpc.StatusCode.UNAVAILABLE
        _wait_for(lambda: _health(server) == health_pb2.HealthCheckResponse.NOT_SERVING, 5, "health follows")
        _wait_for(lambda: len(load.failed) >= 3, 10, "creates fail while the database is down")

        # The window runs from the last successful read of the feed, not from the outage's discovery.
        ended = _wait_for(
            lambda: _code(lambda: authorize(stub, cached.secret)) == grpc.StatusCode.UNAVAILABLE,
            STALE + 5, "the stale window ends",
        )
        assert synced_at + STALE <= ended < synced_at + STALE + 1.0

        postgres.start()
        _wait_for(lambda: _health(server) == health_pb2.HealthCheckResponse.SERVING, 10, "health comes back")
        _wait_for(lambda: not server.app.feed.lost and server.app.cache.trusted, 10, "the feed catches up")
        _wait_for(lambda: len(load.acknowledged) >= 6, 20, "creates succeed again")
        load.stop()
        assert authorize(stub, cached.secret).code == R.OK and not authorize(stub, cached.secret).stale
        assert authorize(stub, never_seen.secret).code == R.OK
        assert authorize(stub, revoked_here.secret).code == R.REVOKED
        assert authorize(stub, revoked_there.secret).code == R.REVOKED

        # Every acknowledged create exists; a failed one retried with its request id makes at most one key.
        for name in load.acknowledged.values():
            assert stub.GetApiKey(pb.GetApiKeyRequest(name=name)).name == name
        names = set(load.acknowledged.values())
        for request_id in load.failed:
            retried = stub.CreateApiKey(
                pb.CreateApiKeyRequest(
                    parent=f"accounts/{account}",
                    api_key=pb.ApiKey(display_name="load", scopes=["messages:send:all"]),
                    request_id=request_id,
                )
            )
            assert retried.api_key.name not in names
            names.add(retried.api_key.name)
        with psycopg.connect(postgres.url.replace("+psycopg", "")) as connection:
            half_made = connection.execute(
                "SELECT count(*) FROM api_keys k WHERE k.secret_hash = '' OR NOT EXISTS "
                "(SELECT 1 FROM key_events e WHERE e.key_id = k.key_id AND e.kind = 'created')"
            ).fetchone()[0]
            stored = connection.execute(
                "SELECT count(*) FROM api_keys WHERE account_id = %s AND display_name = 'load'", (account,)
            ).fetchone()[0]
        assert half_made == 0
        assert stored == len(names)
    finally:
        if load is not None:
            load.stop()
        replica.stop()
        server.stop()
