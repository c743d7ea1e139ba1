"""SIGTERM's grace holds: a call stuck in a thread (argon2, a database statement waiting on a lock) cannot
stretch the shutdown past APIKEYD_SHUTDOWN_GRACE and a short close."""

import asyncio
import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterator

import grpc
import psycopg
import pytest

from apikeyd.v1 import api_keys_pb2 as pb
from apikeyd.v1 import api_keys_pb2_grpc as pb_grpc
from tests.conftest import APIKEYD, BearerCredentials, create_key, free_port, held_hasher, scratch_postgres_database

GRACE = 2.0
# What the close after the grace may take on a busy machine: writing last-used times, closing the pools.
CLOSE_BOUND = 6.0


def test_a_held_verification_does_not_hold_the_stop_past_its_grace(make_server, account):
    server = make_server()
    created = create_key(server.stub, account)
    with held_hasher(server, "verify") as (reached, release):
        in_flight = server.stub.Authorize.future(pb.AuthorizeRequest(key=created.secret))
        assert reached.wait(30)
        started = time.monotonic()
        left_running = server.run(server.server.stop(grace=GRACE))
        stopped_in = time.monotonic() - started
        assert in_flight.exception(timeout=30) is not None  # cancelled at the end of the grace
        assert left_running == 1  # the verification, still in its thread: serve() exits without it
        # serve() would exit now. Here the verification ends on the loop first, so that the loop closes
        # cleanly; its DEBUG line would ask grpc for the peer of a call whose server is gone, which crashes
        # grpc, so it is not written.
        apikeyd_log = logging.getLogger("apikeyd")
        level = apikeyd_log.level
        apikeyd_log.setLevel(logging.INFO)
        try:
            release.set()
            deadline = time.monotonic() + 30
            while server.app.verify_executor.unfinished() or server.app.authorizer.verifications_in_flight():
                assert time.monotonic() < deadline
                server.run(asyncio.sleep(0.01))
        finally:
            apikeyd_log.setLevel(level)
    for channel in server._channels:
        channel.close()
    server._stop_loop()  # the rest of the fixture's stop, whose server.stop() has run
    assert stopped_in < GRACE + CLOSE_BOUND, f"stop took {stopped_in:.1f} s against a grace of {GRACE} s"


def _postgres_backend_waiting_on_a_lock(admin: psycopg.Connection, database: str) -> bool:
    row = admin.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'", (database,)
    ).fetchone()
    return bool(row and row[0])


@pytest.fixture
def postgres() -> Iterator[tuple[str, str]]:
    with scratch_postgres_database("apikeyd_grace") as database:
        yield database


def test_sigterm_exits_within_the_grace_while_a_statement_waits_on_a_lock(postgres):
    """A real `apikeyd serve`: an UpdateApiKey waits for a row lock the test holds (PostgreSQL waits for a
    lock without end; SQLite gives up after its busy timeout), and SIGTERM must still end the process within
    the grace, and exit 0."""
    database, database_url = postgres
    key = subprocess.run(
        [APIKEYD, "admin-key", "create", "--display-name", "grace", "--database-url", database_url],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout.strip()
    port = free_port()
    process = subprocess.Popen(
        [APIKEYD, "serve", "--listen", f"127.0.0.1:{port}", "--database-url", database_url,
         "--shutdown-grace", str(GRACE)],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "APIKEYD_LOG_LEVEL": "INFO"},
    )
    plain = psycopg.connect(database_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True)
    holder = psycopg.connect(database_url.replace("postgresql+psycopg://", "postgresql://"))
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(channel).result(timeout=30)
        stub = pb_grpc.ApiKeyServiceStub(grpc.intercept_channel(channel, BearerCredentials(key)))
        created = create_key(stub, "grace")
        holder.execute("SELECT 1 FROM api_keys WHERE key_id = %s FOR UPDATE", (created.api_key.key_id,))
        update = stub.UpdateApiKey.future(
            pb.UpdateApiKeyRequest(api_key=pb.ApiKey(name=created.api_key.name, display_name="renamed"))
        )
        deadline = time.monotonic() + 30
        while not _postgres_backend_waiting_on_a_lock(plain, database):
            assert time.monotonic() < deadline, f"the update never reached the lock: {update.done() and update.exception()}"
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
        exited_in = time.monotonic() - started
        assert process.returncode == 0, stderr
        assert exited_in < GRACE + CLOSE_BOUND, f"exit took {exited_in:.1f} s against a grace of {GRACE} s"
        assert update.exception(timeout=30) is not None
        channel.close()
    finally:
        holder.rollback()
        holder.close()
        plain.close()
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=30)
