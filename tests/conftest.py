"""Fixtures: a real apikeyd server on an ephemeral port, over SQLite and, when it answers, PostgreSQL.

Every test that uses a database runs once per backend. The server runs its own event loop in a thread, so
tests call it over a real channel with the ordinary blocking stubs and can still look inside the app
(argon2 counts, cache stats) between calls.
"""

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
import psycopg
import pytest
import uvloop

from apikeyd.app import App
from apikeyd.config import Settings
from apikeyd.domain import keys
from apikeyd.lifecycle import NewKey
from apikeyd.logs import JsonFormatter
from apikeyd.server import Server
from apikeyd.store import migrate
from apikeyd.store.engine import create_db_engine
from apikeyd.v1 import api_keys_pb2 as pb
from apikeyd.v1 import api_keys_pb2_grpc as pb_grpc

T = TypeVar("T")
POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"
APIKEYD = str(Path(sys.executable).with_name("apikeyd"))  # the command the venv installed
# `apikeyd serve` started by a test inherits this: metrics on an ephemeral port, never a clash on 9464.
os.environ.setdefault("APIKEYD_METRICS_LISTEN", "127.0.0.1:0")
os.environ.setdefault("APIKEYD_EXT_AUTHZ_LISTEN", "127.0.0.1:0")


def _postgres_reachable() -> bool:
    try:
        psycopg.connect(POSTGRES_ADMIN_URL, connect_timeout=2).close()
        return True
    except psycopg.Error:
        return False


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A migrated database of its own for this test session: parallel runs never share one."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'apikeyd.db'}"
        _migrate(url)
        yield url
        return
    with scratch_postgres_database("apikeyd_test") as (_, url):
        yield url


@contextlib.contextmanager
def scratch_postgres_database(prefix: str) -> Iterator[tuple[str, str]]:
    """A migrated PostgreSQL database of its own, (name, SQLAlchemy URL), dropped afterwards even if a test
    closed it to connections; skips the test when PostgreSQL does not answer."""
    if not _postgres_reachable():
        pytest.skip("skipped: no PostgreSQL at 127.0.0.1:5432")
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
        _migrate(url)
        yield name, url
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _migrate(url: str) -> None:
    engine = create_db_engine(url)
    migrate.upgrade(engine)
    engine.dispose()


ISSUED_SECRETS: set[str] = set()  # every key string the suite was given: none may appear in a log
ISSUED_HASHES: set[str] = set()  # every argon2 hash the suite's servers stored: none may appear either
ARGON2_MARK = "$argon2"  # how every argon2 hash string starts, whoever made it


class BearerCredentials(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Sends the bearer key, and notes every secret a response carries for the log check."""

    def __init__(self, token: str | None) -> None:
        self._metadata = [("authorization", f"Bearer {token}")] if token else []

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        details = details._replace(metadata=list(details.metadata or []) + self._metadata)
        outcome = continuation(details, request)
        outcome.add_done_callback(self._note_secret)
        return outcome

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(details._replace(metadata=list(details.metadata or []) + self._metadata), request)

    @staticmethod
    def _note_secret(outcome: Any) -> None:
        if outcome.exception() is None and getattr(outcome.result(), "secret", ""):
            ISSUED_SECRETS.add(outcome.result().secret)


def leaked_secrets(text: str, secrets: set[str], hashes: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """What `text` gives away: each key string found whole, without its checksum or as its secret part (the
    key without prefix and checksum); each hash found whole or as its digest (its last `$` part); and any
    argon2 hash string at all."""
    found = []
    for secret in secrets:
        parsed = keys.parse(secret)
        if secret[: -keys.CHECKSUM_LENGTH] in text or (parsed is not None and parsed.secret in text):
            found.append(secret[:12] + "...")
    for hashed in hashes:
        if hashed.rsplit("$", 1)[-1] in text:
            found.append(hashed[:36] + "...")
    if ARGON2_MARK in text:
        found.append(f"a {ARGON2_MARK} hash")
    return found


class _LogRecorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture(scope="session", autouse=True)
def no_secret_in_any_log() -> Iterator[None]:
    """Runs the whole suite's logs, apikeyd's at DEBUG, through a check that no issued key string, no hash
    the suite's servers stored, and no argon2 hash at all appears (leaked_secrets)."""
    recorder = _LogRecorder()
    recorder.setFormatter(JsonFormatter())  # the message and every structured field of the line
    logging.getLogger().addHandler(recorder)
    apikeyd_logger = logging.getLogger("apikeyd")
    level = apikeyd_logger.level
    apikeyd_logger.setLevel(logging.DEBUG)
    logging.getLogger("apikeyd.tests").debug("the secret check is listening")
    yield
    apikeyd_logger.setLevel(level)
    logging.getLogger().removeHandler(recorder)
    assert any("the secret check is listening" in line for line in recorder.lines), "the log check is not wired up"
    leaks = leaked_secrets("\n".join(recorder.lines), ISSUED_SECRETS, ISSUED_HASHES)
    assert not leaks, f"secrets or hashes in the logs: {leaks}"


class RunningServer:
    """A server on its own loop thread, with a channel and stub to it."""

    def __init__(
        self, settings: Settings, listen: str = "127.0.0.1:0", operator: bool = True, span_processor: Any = None
    ) -> None:
        """`span_processor` traces the server into it (tests/test_tracing.py)."""
        defaults = Settings()
        # Metrics and HTTP ext_authz on ephemeral ports, not the fixed defaults: servers here run side by side.
        if settings.metrics_listen == defaults.metrics_listen:
            settings = dataclasses.replace(settings, metrics_listen="127.0.0.1:0")
        if settings.ext_authz_listen == defaults.ext_authz_listen:
            settings = dataclasses.replace(settings, ext_authz_listen="127.0.0.1:0")
        self.loop = uvloop.new_event_loop()  # the loop `apikeyd serve` runs on
        self._thread = threading.Thread(target=self.loop.run_forever, name="apikeyd-test-server", daemon=True)
        self._thread.start()
        self.app = App(settings)
        self._note_hashes()
        self._span_processor = span_processor
        self.server: Server = self.run(self._make_server())
        try:
            self.port = self.run(self.server.start(listen))
        except BaseException:
            self._stop_loop()
            self.app.close()
            raise
        self.address = f"127.0.0.1:{self.port}"
        self.channel = grpc.insecure_channel(self.address)
        self._channels = [self.channel]
        # The tests that are not about rights act as an operator, with a key made as `admin-key create` does.
        self.operator_key = self.run(self._operator_key()).secret if operator else ""
        self.stub = self.stub_for(self.operator_key or None)

    def _note_hashes(self) -> None:
        """Every hash this server stores goes into ISSUED_HASHES for the log check."""
        hasher = self.app.hasher
        make = hasher.hash

        def noted(secret: str) -> str:
            hashed = make(secret)
            ISSUED_HASHES.add(hashed)
            return hashed

        hasher.hash = noted  # type: ignore[method-assign]

    async def _operator_key(self) -> Any:
        manager = self.app.manager
        issued = await manager.create(manager.operator("tests"), manager.operator_account, NewKey("tests", ("*",)))
        ISSUED_SECRETS.add(issued.secret)
        return issued

    def stub_for(self, token: str | None) -> pb_grpc.ApiKeyServiceStub:
        """A stub that sends `authorization: Bearer <token>` (nothing for None) on every call."""
        channel = grpc.insecure_channel(self.address)
        self._channels.append(channel)
        return pb_grpc.ApiKeyServiceStub(grpc.intercept_channel(channel, BearerCredentials(token)))

    async def _make_server(self) -> Server:
        return Server(self.app, self._span_processor)  # grpc.aio objects must be made on the loop that runs them

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=60)

    def call_soon(self, function: Callable[[], T]) -> T:
        """Run plain code on the server's loop, where the cache lives."""

        async def wrapped() -> T:
            return function()

        return self.run(wrapped())

    def stop(self, grace: float = 1.0) -> None:
        if self.loop.is_closed():
            return
        for channel in self._channels:
            channel.close()
        self.run(self.server.stop(grace))
        self._stop_loop()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


@pytest.fixture
def make_server(database_url: str) -> Iterator[Callable[..., RunningServer]]:
    """Start servers with settings overrides: make_server(cache_ttl=0.5)."""
    started: list[RunningServer] = []

    def start(**overrides: Any) -> RunningServer:
        overrides.setdefault("database_url", database_url)
        settings = Settings.load(environ={}, **overrides)
        server = RunningServer(settings)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def server(make_server: Callable[..., RunningServer]) -> RunningServer:
    return make_server()


@pytest.fixture
def stub(server: RunningServer) -> pb_grpc.ApiKeyServiceStub:
    return server.stub


@pytest.fixture
def account() -> str:
    """A fresh account per test: tests share a database and never see each other's keys."""
    return f"acct-{uuid.uuid4().hex[:10]}"


def create_key(
    stub: pb_grpc.ApiKeyServiceStub, account: str, scopes: tuple[str, ...] = ("messages:send:all",), **fields: Any
) -> pb.CreateApiKeyResponse:
    fields.setdefault("display_name", "test key")
    return stub.CreateApiKey(
        pb.CreateApiKeyRequest(parent=f"accounts/{account}", api_key=pb.ApiKey(scopes=list(scopes), **fields))
    )


def count_keys(stub: pb_grpc.ApiKeyServiceStub, account: str, **fields: Any) -> int:
    """How many keys this caller can list in `account` (with `filter=...` if given): every page, followed to
    the end, as ListApiKeys gives no total. It follows next_page_token, not the pages' contents: a page may be
    short or empty while more follow (a `labels.` term reads a bounded number of keys a page)."""
    total, token = 0, ""
    for _ in range(1000):
        page = stub.ListApiKeys(pb.ListApiKeysRequest(parent=f"accounts/{account}", page_token=token, **fields))
        total += len(page.api_keys)
        token = page.next_page_token
        if not token:
            return total
    raise AssertionError(f"accounts/{account}: still more pages after 1000")


def free_port() -> int:
    """A loopback port nobody listens on right now (closed again at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def authorize(stub: pb_grpc.ApiKeyServiceStub, key: str, *scopes: str, **fields: Any) -> pb.AuthorizeResponse:
    return stub.Authorize(pb.AuthorizeRequest(key=key, required_scopes=list(scopes), **fields))


@contextlib.contextmanager
def held_hasher(server: RunningServer, method: str) -> Iterator[tuple[threading.Event, threading.Event]]:
    """Hold every call of the server's SecretHasher `method` ("verify": a verification after its database
    read; "hash": the hash of a Create or Rotate) until `release` is set, so a test can force an
    interleaving (a change, a drain) instead of hoping for it. `reached` is set once one is held."""
    hasher = server.app.hasher
    real = getattr(hasher, method)
    reached, release = threading.Event(), threading.Event()

    def held(*args: Any) -> Any:
        reached.set()
        assert release.wait(30)
        return real(*args)

    setattr(hasher, method, held)
    try:
        yield reached, release
    finally:
        release.set()
        setattr(hasher, method, real)


def rpc_error(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


class ServeProcess:
    """`apikeyd serve ARGS` in the background, its stderr collected line by line."""

    def __init__(self, args: Sequence[str], env: dict[str, str]) -> None:
        self.process = subprocess.Popen([APIKEYD, "serve", *args], stderr=subprocess.PIPE, text=True, env=env)
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

    def wait(self, timeout: float = 60) -> int:
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.wait(timeout)


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    """`condition()`'s first truthy value, polled every millisecond; fails naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(0.001)
    return value
