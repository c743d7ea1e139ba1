"""Faults under `apikeyd serve --workers N`: a worker killed with SIGKILL in the middle of creates.

What must hold afterwards: every create a caller saw succeed made a key that exists and authorizes; a create
whose call failed (the connection died with its worker) and was retried with the same request_id made at most
one key, which the retry names; and the database holds nothing half-made: every key has its secret hash and
its CREATED event, no event of a live kind lacks its key, every request_id points at its key.

The test drives creates from several threads, each on new connections (the kernel spreads them over the
workers), kills worker 0 a few times once it is taking creates, and then checks through the API (new
connections, both workers) and in the tables themselves."""

import os
import re
import signal
import subprocess
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from sqlalchemy import text

from apikeyd.store.engine import create_db_engine
from apikeyd.v1 import api_keys_pb2 as pb
from apikeyd.v1 import api_keys_pb2_grpc as pb_grpc
from tests.conftest import ISSUED_SECRETS, leaked_secrets, scratch_postgres_database
from tests.test_server import APIKEYD
from tests.test_workers import _new_connection, supervisor

THREADS = 8  # creates in flight at once, about half of them on the worker that is killed
KILLS = 3
SERVER_UNAVAILABLE = "the database"  # how apikeyd's own UNAVAILABLE answers begin (a lost connection's do not)


@pytest.fixture(params=["postgresql", "sqlite"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database of this test's own: PostgreSQL (migrated here), or an SQLite file (the supervisor migrates)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/apikeyd.db"
        return
    with scratch_postgres_database("apikeyd_faults") as (_, url):
        yield url


def _operator_key(database_url: str) -> str:
    result = subprocess.run(
        [APIKEYD, "admin-key", "create", "--display-name", "faults", "--database-url", database_url],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    ISSUED_SECRETS.add(result.stdout.strip())
    return result.stdout.strip()


@dataclass
class Create:
    """One create, as its caller saw it: the failed attempts (code, details), then the answer."""

    request: pb.CreateApiKeyRequest
    failures: list[tuple[grpc.StatusCode, str]] = field(default_factory=list)
    response: pb.CreateApiKeyResponse | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id


def _create_until_answered(port: int, token: str, request: pb.CreateApiKeyRequest) -> Create:
    """Sends the create, each attempt on a new connection, until it is answered; a retry keeps the request_id,
    as a client that did not hear back must. Only UNAVAILABLE is retried."""
    create = Create(request)
    deadline = time.monotonic() + 120
    while create.response is None:
        assert time.monotonic() < deadline, f"{request.request_id}: no answer after {create.failures}"
        channel = _new_connection(port, token)
        try:
            create.response = pb_grpc.ApiKeyServiceStub(channel).CreateApiKey(request, timeout=30, wait_for_ready=True)
        except grpc.RpcError as error:
            create.failures.append((error.code(), error.details() or ""))
            if error.code() != grpc.StatusCode.UNAVAILABLE:
                raise AssertionError(f"{request.request_id}: {error.code()} {error.details()}") from None
        finally:
            channel.close()
    if create.response.secret:
        ISSUED_SECRETS.add(create.response.secret)
    return create


def _load(port: int, token: str, account: str, stop: threading.Event, done: list[Create], errors: list[str]) -> None:
    try:
        while not stop.is_set():
            request_id = str(uuid.uuid4())
            request = pb.CreateApiKeyRequest(
                parent=f"accounts/{account}",
                request_id=request_id,
                # the display name carries the request_id, so the tables show which request made which key
                api_key=pb.ApiKey(display_name=request_id, scopes=["messages:send:all"]),
            )
            done.append(_create_until_answered(port, token, request))
    except BaseException as error:  # reported by the test
        errors.append(f"{account}: {error!r}")


def _creates_answered(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        body = response.read().decode()
    match = re.search(r'^apikeyd_rpcs_total\{code="OK",method="CreateApiKey"\} (\S+)$', body, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def _verify_through_the_api(port: int, token: str, creates: list[Create]) -> None:
    """Every answered create's key exists (GetApiKey) and, where the caller got its secret, authorizes; a
    retry of every create that failed at first answers with the same key. New connections, both workers."""

    def check(batch: list[Create]) -> list[str]:
        problems = []
        channel = _new_connection(port, token)
        try:
            stub = pb_grpc.ApiKeyServiceStub(channel)
            for create in batch:
                assert create.response is not None
                name = create.response.api_key.name
                got = stub.GetApiKey(pb.GetApiKeyRequest(name=name), timeout=30)
                if got.display_name != create.request_id or got.state != pb.ApiKey.ACTIVE:
                    problems.append(f"{name}: {got.display_name} {got.state}")
                if create.response.secret:
                    decision = stub.Authorize(pb.AuthorizeRequest(key=create.response.secret), timeout=30)
                    if decision.code != pb.AuthorizeResponse.OK or decision.key_id != create.response.api_key.key_id:
                        problems.append(f"{name}: Authorize {decision.code}")
                if create.failures:
                    again = stub.CreateApiKey(create.request, timeout=30)
                    if not again.secret_already_delivered or again.api_key.name != name or again.secret:
                        problems.append(f"{name}: a retry of {create.request_id} answered {again.api_key.name}")
        finally:
            channel.close()
        return problems

    batches = [creates[i : i + 10] for i in range(0, len(creates), 10)]  # a new connection per 10 keys
    with ThreadPoolExecutor(THREADS) as pool:
        problems = [problem for found in pool.map(check, batches) for problem in found]
    assert problems == []


def _verify_the_tables(database_url: str, creates: list[Create]) -> None:
    engine = create_db_engine(database_url)
    try:
        with engine.connect() as db:
            keys = db.execute(text("SELECT key_id, account_id, display_name, secret_hash, lookup_id FROM api_keys")).all()
            events = db.execute(text("SELECT key_id, account_id, kind FROM key_events")).all()
            request_ids = db.execute(text("SELECT request_id, account_id, key_id FROM request_ids")).all()
    finally:
        engine.dispose()
    by_id = {row.key_id: row for row in keys}
    created = Counter(row.key_id for row in events if row.kind == "created")
    # every key is whole: its secret hash, its lookup id, exactly one CREATED event
    assert [row.key_id for row in keys if not row.secret_hash.startswith("$argon2id$") or not row.lookup_id] == []
    assert [row.key_id for row in keys if created[row.key_id] != 1] == []
    # no event of a kept kind without its key (deletes leave their events; denials may name no key)
    assert [row for row in events if row.kind not in ("deleted", "denied") and row.key_id not in by_id] == []
    assert [row for row in events if row.key_id in by_id and by_id[row.key_id].account_id != row.account_id] == []
    # every request_id points at an existing key of its account
    assert [row for row in request_ids if row.key_id not in by_id or by_id[row.key_id].account_id != row.account_id] == []

    # the load's keys: exactly one per request, the one its caller was told of, and none that no caller was told of
    load = [row for row in keys if row.account_id.startswith("faults-")]
    per_request = Counter(row.display_name for row in load)
    assert [name for name, count in per_request.items() if count != 1] == []
    told = {}
    for create in creates:
        assert create.response is not None
        told[create.request_id] = create.response.api_key.key_id
    assert {row.display_name: row.key_id for row in load} == told
    remembered = {row.request_id: row.key_id for row in request_ids}
    assert [rid for rid, key_id in told.items() if remembered.get(rid) != key_id] == []


def test_acknowledged_creates_survive_a_worker_killed_mid_flight(tmp_path, database_url):
    token = _operator_key(database_url)
    with supervisor(tmp_path, "--max-keys-per-account", "100000", database_url=database_url) as running:
        victim = running.serving_workers()[0]
        stop = threading.Event()
        done: list[Create] = []
        errors: list[str] = []
        threads = [
            threading.Thread(target=_load, args=(running.port, token, f"faults-{i}", stop, done, errors), daemon=True)
            for i in range(THREADS)
        ]
        for thread in threads:
            thread.start()
        killed = []
        started = time.monotonic()
        try:
            for _ in range(KILLS):
                # worker 0 is taking creates (its own count since it started), so some are in flight on it
                port = victim["metrics_port"]
                running.wait_for(lambda: _creates_answered(port) >= 10 or errors)  # noqa: B023
                assert not errors, errors
                mark = len(running.lines)
                os.kill(victim["pid"], signal.SIGKILL)
                killed.append(victim["pid"])
                victim = running.wait_for(
                    lambda: [e for e in running.events("worker.serving", mark) if e["worker"] == 0]  # noqa: B023
                )[0]
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=180)
        loaded = time.monotonic() - started
        assert not errors, errors
        assert not any(thread.is_alive() for thread in threads)
        died = [e["pid"] for e in running.events("worker.died")]
        assert died == killed

        failures = [failure for create in done for failure in create.failures]
        lost = [details for code, details in failures if not details.startswith(SERVER_UNAVAILABLE)]
        replayed = [c for c in done if c.failures and c.response is not None and c.response.secret_already_delivered]
        print(
            f"{len(done)} creates in {loaded:.1f} s, {len(failures)} failed attempts ({len(lost)} lost with their "
            f"worker), {len(replayed)} retries answered as replays"
        )
        # not vacuous: calls were in flight on the killed workers
        assert lost, f"no create was in flight at any of {KILLS} kills"
        assert all(code == grpc.StatusCode.UNAVAILABLE for code, _ in failures)

        _verify_through_the_api(running.port, token, done)
        assert running.stop() == 0, running.stderr
    _verify_the_tables(database_url, done)
    secrets = {create.response.secret for create in done if create.response is not None and create.response.secret}
    assert leaked_secrets(running.stderr, secrets | {token}) == []
