"""Start-up and wiring: one grpc.aio server with ApiKeyService, health and reflection, over an App (app.py)."""

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from apikeyd import tls, tracing
from apikeyd.app import App, StartupError
from apikeyd.config import Settings
from apikeyd.domain import limits
from apikeyd.domain.errors import Unavailable
from apikeyd.exception_text import describe
from apikeyd.graces import end_idle_graces
from apikeyd.logs import fields
from apikeyd.metrics import MetricsEndpoint
from apikeyd.ports import port_problem
from apikeyd.service import ext_authz
from apikeyd.service.api_keys import ApiKeyService
from apikeyd.service.envoy_checks import EnvoyChecks
from apikeyd.service.ext_authz_http import UNIX_PREFIX, HttpCheckEndpoint, HttpChecks
from apikeyd.service.health import HealthServicer
from apikeyd.service.wire import WireErrors
from apikeyd.store import migrate
from apikeyd.usage_queries import UsageQueries
from apikeyd.v1 import api_keys_pb2, api_keys_pb2_grpc

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import SpanProcessor

log = logging.getLogger(__name__)
T = TypeVar("T")

SERVICE_NAME = api_keys_pb2.DESCRIPTOR.services_by_name["ApiKeyService"].full_name
_PING_TIMEOUT = 5.0  # seconds a database ping may take before health turns NOT_SERVING
# Seconds the last write of last-used times and usage may take once the grace is over; a database that does
# not answer must not hold the exit.
_FINAL_FLUSH_TIMEOUT = 10.0  # the last writes at drain: usage of up to MAX_KEYS keys takes about 3 s on SQLite
_STATUS = {True: health_pb2.HealthCheckResponse.SERVING, False: health_pb2.HealthCheckResponse.NOT_SERVING}


class _MethodAwarePool:
    """grpcurl describes a method by its full name, which protobuf's own pool cannot map to a file."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)

    def FindFileContainingSymbol(self, symbol: str) -> Any:
        try:
            return self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            return self._pool.FindMethodByName(symbol).containing_service.file


def grpc_limits(settings: Settings) -> list[tuple[str, int]]:
    """The sizes grpc refuses before apikeyd sees a call (domain/limits.py): a message above
    APIKEYD_MAX_REQUEST_BYTES, metadata above GRPC_METADATA_BYTES, both RESOURCE_EXHAUSTED. Metadata's soft
    and hard limits are one, so that nothing below it is refused at random (grpc's soft limit refuses a
    share of calls above it); below it, metadata over MAX_METADATA_BYTES gets INVALID_ARGUMENT from us."""
    return [
        ("grpc.max_receive_message_length", settings.max_request_bytes),
        ("grpc.max_metadata_size", limits.GRPC_METADATA_BYTES),
        ("grpc.absolute_max_metadata_size", limits.GRPC_METADATA_BYTES),
    ]


def _keepalive(settings: Settings) -> list[tuple[str, int]]:
    """Pings that find a client gone without a word (a host that vanished, a process stopped): its change
    streams would otherwise hold their places, and grpc's per-call memory, for as long as TCP does."""
    if settings.keepalive_interval <= 0:
        return []
    interval = max(int(settings.keepalive_interval * 1000), 1)
    return [
        ("grpc.keepalive_time_ms", interval),
        ("grpc.keepalive_timeout_ms", interval),
        # What grpc (1.85) waits for a ping's answer: without it, 60 s, and a stopped client's stream stays.
        ("grpc.http2.ping_timeout_ms", interval),
    ]


class Server:
    def __init__(self, app: App, span_processor: "SpanProcessor | None" = None) -> None:
        """`span_processor` (an OpenTelemetry SpanProcessor) turns tracing on with it in place of
        APIKEYD_TRACING's exporter: the tests' in-memory one (apikeyd.tracing)."""
        self.app = app
        # None with tracing off; then no interceptor either, so grpc finds each handler as before.
        self.tracing = tracing.from_settings(app.settings, span_processor)
        # One listener per port: grpcio sets SO_REUSEPORT by default, which would let a second server
        # share a taken port silently. `--workers N` (N > 1) shares it on purpose: its supervisor has
        # checked the port is free first (src/apikeyd/workers.py).
        reuse_port = 1 if app.settings.workers > 1 else 0
        # WireErrors: undecodable requests get INVALID_ARGUMENT on every service registered with self.grpc
        # (service/wire.py); it wraps the handlers once, as they are registered, not on every call.
        self.wire_errors = WireErrors()
        # A bound on calls at once: each open stream (a health Watch) holds grpc's per-call memory, and anyone
        # may open them. Change streams have a bound of their own (change_stream.py), added here, so that
        # clients' streams never take the places of other calls.
        self.grpc = self.wire_errors.guard(
            grpc.aio.server(
                options=[("grpc.so_reuseport", reuse_port), *grpc_limits(app.settings), *_keepalive(app.settings)],
                maximum_concurrent_rpcs=app.settings.max_concurrent_rpcs + app.settings.max_change_streams,
                interceptors=None if self.tracing is None else [self.tracing.interceptor],
            )
        )
        self.health = HealthServicer()
        service = ApiKeyService(
            app.manager, app.authorizer, app.metrics, app.streams, app.settings.authorize_requires_key,
            usage=UsageQueries(app.manager, app.repository), tracing=self.tracing,
        )
        api_keys_pb2_grpc.add_ApiKeyServiceServicer_to_server(service, self.grpc)
        # Envoy's external authorization, on the same port and with the same Authorizer as Authorize.
        checks = EnvoyChecks(app.authorizer, app.settings.xff_trusted_hops)
        ext_authz.add_to_server(
            ext_authz.ExtAuthzService(
                app.manager, checks, app.metrics, app.settings.authorize_requires_key, self.tracing
            ),
            self.grpc,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        # The same checks over HTTP, Envoy's cheaper way to ask (service/ext_authz_http.py), on the same loop.
        self.http_checks = HttpCheckEndpoint(
            HttpChecks(app.manager, checks, app.metrics, app.settings.authorize_requires_key, self.tracing)
        )
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                ext_authz.SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            self.grpc,
            pool=_MethodAwarePool(descriptor_pool.Default()),
        )
        self.port = 0
        self._flusher: asyncio.Task[None] | None = None
        self.health_services = ("", SERVICE_NAME)  # what the database watcher turns NOT_SERVING and back
        self.metrics_endpoint: MetricsEndpoint | None = None
        self._db_watcher: asyncio.Task[None] | None = None
        self._check: asyncio.Future[None] | None = None  # the database check running (_database_usable)
        self._check_started = 0.0
        self._draining = False
        # `--workers N` sets this: the server then reports its own health (SERVING, NOT_SERVING, or UNKNOWN once
        # it stops listening) to it instead of answering with it, as a worker answers for the host (workers.py).
        self.report_health: Callable[[Server, int], Awaitable[None]] | None = None

    async def start(self, listen: str) -> int:
        try:
            credentials = tls.server_credentials(self.app.settings)
        except tls.TlsSettingsError as error:
            raise StartupError(str(error)) from None
        # A probe first, so that a taken gRPC port is named as such even when the metrics port is taken too
        # (a second `make run`), and grpc's core has nothing to log about it. Workers share the port on
        # purpose; their supervisor probed it.
        if self.app.settings.workers == 1 and (problem := port_problem(listen)):
            raise StartupError(f"cannot listen on {listen}: {problem}")
        # Before the gRPC port: a gRPC server keeps a port it has bound even if it never starts.
        self._open_metrics()
        try:
            await self._open_http_checks()
        except StartupError:
            self._close_metrics()
            raise
        try:
            if credentials is None:
                self.port = self.grpc.add_insecure_port(listen)
            else:
                self.port = self.grpc.add_secure_port(listen, credentials)
        except RuntimeError as error:
            await self._close_listeners()
            raise StartupError(f"cannot listen on {listen}: {error}") from None
        if self.port == 0:
            await self._close_listeners()
            raise StartupError(f"cannot listen on {listen}: the address is taken or invalid")
        await self.app.feed.start()  # its position is taken before the first check is served
        interval = self.app.settings.health_check_interval
        # Health starts from a first check, never SERVING on a database that does not answer or has not
        # (or no longer has) this apikeyd's schema; and it is set before the first call is taken, which
        # would otherwise find no status for the service (NOT_FOUND).
        serving = interval <= 0 or await self._database_usable(True, interval)
        await self._set_health(_STATUS[serving])
        await self.grpc.start()
        self._flusher = asyncio.create_task(self._flush_periodically())
        if self.app.shared_limiter is not None:
            await self.app.shared_limiter.start()
        if interval > 0:
            self._db_watcher = asyncio.create_task(self._watch_database(interval, serving))
        return self.port

    def _open_metrics(self) -> None:
        listen = self.app.settings.metrics_listen
        if not listen:
            return
        try:
            self.metrics_endpoint = MetricsEndpoint(self.app.metrics.registry, listen)
        except (OSError, ValueError) as error:
            raise StartupError(f"cannot serve metrics on {listen}: {error}") from None
        log.info(
            "metrics on http://%s/metrics",
            listen.rpartition(":")[0] + f":{self.metrics_endpoint.port}",
            extra=fields(event="metrics.listening", port=self.metrics_endpoint.port),
        )

    async def _open_http_checks(self) -> None:
        listen = self.app.settings.ext_authz_listen
        if not listen:
            return
        shared = self.app.settings.workers > 1  # the supervisor checked the port (workers.py)
        if not shared and not listen.startswith(UNIX_PREFIX) and (problem := port_problem(listen)):
            raise StartupError(f"cannot answer ext_authz on {listen}: {problem}")
        try:
            await self.http_checks.start(listen, reuse_port=shared)
        except (OSError, ValueError) as error:
            raise StartupError(f"cannot answer ext_authz on {listen}: {describe(error)}") from None
        where = listen if listen.startswith(UNIX_PREFIX) else listen.rpartition(":")[0] + f":{self.http_checks.port}"
        log.info("Envoy ext_authz over HTTP on %s", where, extra=fields(event="ext_authz.listening", listen=where))

    async def _close_listeners(self) -> None:
        await self.http_checks.stop(0.0)
        self._close_metrics()

    def _close_metrics(self) -> None:
        """Blocks up to 50 ms (the endpoint's poll): at start-up, or off the event loop."""
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.close()
            self.metrics_endpoint = None

    async def _watch_database(self, interval: float, serving: bool) -> None:
        """Health follows the database: NOT_SERVING while a check fails (or hangs past its timeout), SERVING
        again once one succeeds, unless the server is draining by then. One check at a time."""
        while not self._draining:
            await asyncio.sleep(interval)  # start() has made the first check
            usable = await self._database_usable(serving, interval)
            if self._draining:
                return
            if usable != serving:
                serving = usable
                await self._set_health(_STATUS[serving])

    async def _database_usable(self, was_usable: bool, interval: float) -> bool:
        """One database check (or the wait for the one still running), logged when the answer changes."""
        if self._check is None or self._check.done():
            self._check_started = time.monotonic()
            self._check = asyncio.get_running_loop().run_in_executor(self.app.store_executor, self._check_database)
        try:
            await asyncio.wait_for(asyncio.shield(self._check), timeout=max(interval, _PING_TIMEOUT))
            failure = ""
            self.app.authorizer.database_answered(self._check_started)
        except TimeoutError:
            failure = f"no answer in {max(interval, _PING_TIMEOUT):.0f} s"
        except migrate.SchemaNotCurrent as error:
            failure = str(error)
        except Exception as error:
            failure = describe(error)
        if was_usable == (not failure):
            return was_usable
        if failure:
            log.warning(
                "database unusable (%s): health NOT_SERVING", failure,
                extra=fields(event="health.not_serving", reason=failure),
            )
        else:
            log.info("database usable again: health SERVING", extra=fields(event="health.serving"))
        return not failure

    def _check_database(self) -> None:
        """A ping, and the schema revision read (as cheap): a database migrated back under a running server
        turns health NOT_SERVING as an unreachable one does, and calls would fail alike."""
        self.app.repository.ping()
        migrate.check_schema(self.app.repository.engine)

    async def _set_health(self, status: int) -> None:
        if self.report_health is not None:
            await self.report_health(self, status)
            return
        for service in self.health_services:
            await self.health.set(service, status)

    async def _flush_periodically(self) -> None:
        while True:
            await self.app.usage.wait(self.app.settings.last_used_flush_interval)
            await self.app.authorizer.flush_last_used()
            await self.app.usage.flush()
            try:
                await self.app.usage.clean_up()
            except Unavailable:
                log.warning("could not delete old usage buckets: the database is unavailable; will retry")
            except Exception:  # a bug must not stop the flushes with it
                log.warning("could not delete old usage buckets; will retry", exc_info=True)
            # After the flush, so this process's own last uses of previous secrets are in the database.
            margin = timedelta(seconds=2 * self.app.settings.last_used_flush_interval)
            try:
                await end_idle_graces(self.app.manager, self.app.repository, margin)
            except Exception:  # a bug must not stop last-used flushing with it
                log.warning("could not end idle rotation graces; will retry", exc_info=True)
            try:
                await self.app.manager.forget_old_request_ids()
            except Unavailable:
                log.warning("could not drop old request ids: the database is unavailable; will retry")

    async def stop(self, grace: float, drain_delay: float = 0.0) -> int:
        """Drain: health says NOT_SERVING while calls are still served for `drain_delay` seconds; then the
        listener closes and in-flight calls get `grace` seconds; last-used times are written. Returns how
        many calls were cancelled but still run in a thread (App.close).

        grpc cancels calls that have arrived but not yet started when the listener closes, so a caller
        that keeps sending needs the delay to notice NOT_SERVING and go elsewhere first."""
        self._draining = True  # the database watcher must not turn health back to SERVING now
        if self._db_watcher is not None:
            self._db_watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._db_watcher
        await self.health.enter_graceful_shutdown()
        if self.report_health is not None:
            await self.report_health(self, health_pb2.HealthCheckResponse.NOT_SERVING)
        if drain_delay > 0:
            await asyncio.sleep(drain_delay)
        if self.report_health is not None:  # the listener closes now: no longer part of the host
            await self.report_health(self, health_pb2.HealthCheckResponse.UNKNOWN)
        self.health.end_watches()  # they have seen NOT_SERVING; open ones would hold the stop for the grace
        self.app.streams.end_all()  # likewise; their clients resume elsewhere
        await asyncio.gather(self.grpc.stop(grace), self.http_checks.stop(grace))
        await self.app.feed.stop()
        if self._flusher is not None:
            self._flusher.cancel()
            try:
                await self._flusher
            except asyncio.CancelledError:
                pass
            except Exception:  # it died earlier: the final flush below still writes what is held
                log.warning("the periodic flush had stopped; writing what is held now", exc_info=True)
        try:
            await asyncio.wait_for(
                asyncio.gather(self.app.authorizer.flush_last_used(), self.app.usage.close()), _FINAL_FLUSH_TIMEOUT
            )
        except TimeoutError:
            log.warning(
                "the last write of last-used times and usage did not finish in %.0f s; exiting without it",
                _FINAL_FLUSH_TIMEOUT,
            )
        if self.app.shared_limiter is not None:
            await self.app.shared_limiter.close()
        if self.tracing is not None:  # the spans of the last calls, exported within the same bound
            await asyncio.get_running_loop().run_in_executor(None, self.tracing.shutdown, _FINAL_FLUSH_TIMEOUT)
        await asyncio.get_running_loop().run_in_executor(None, self._close_metrics)  # scraped until the end
        return self.app.close()


def prepare_database(engine: Engine, wait_for_database: bool = False) -> None:
    """`serve` brings an SQLite file up to date by itself; other databases are migrated with `apikeyd migrate`.
    Either way the schema must then be this apikeyd's (or newer): StartupError otherwise, naming `apikeyd
    migrate`, since every call would fail. With `wait_for_database` (serve), a PostgreSQL that does not answer
    yet is left to the health watcher, which keeps health NOT_SERVING until it answers with that schema."""
    where = engine.url.render_as_string(hide_password=True)
    sqlite = engine.dialect.name == "sqlite"
    try:
        try:
            note = migrate.check_schema(engine)
        except migrate.SchemaNotCurrent:
            if not sqlite:
                raise
            migrate.upgrade(engine)
            note = migrate.check_schema(engine)
    except migrate.SchemaNotCurrent as error:
        raise StartupError(str(error)) from None
    except SQLAlchemyError as error:
        reason = describe(error)
        if wait_for_database and not sqlite:
            log.warning(
                "the database at %s does not answer (%s): its schema is checked once it does; health NOT_SERVING "
                "until then", where, reason, extra=fields(event="schema.unchecked", reason=reason),
            )
            return
        raise  # one line, exit 1, from the command (src/apikeyd/cli/server_commands.py)
    if note:
        log.warning("%s", note, extra=fields(event="schema.newer"))


async def serve(
    settings: Settings,
    *,
    prepare: bool = True,
    started: Callable[[Server, asyncio.Event], None] | None = None,
    report_health: Callable[[Server, int], Awaitable[None]] | None = None,
) -> None:
    """A worker of `--workers N` (src/apikeyd/workers.py) passes prepare=False (its supervisor migrated the
    database), `started`, called once the server listens and signals are handled, with the stop event, and
    `report_health` (see Server.report_health)."""
    app = App(settings)
    if prepare:
        prepare_database(app.repository.engine, wait_for_database=True)
    server = Server(app)
    server.report_health = report_health
    port = await server.start(settings.listen)
    log.info("apikeyd serving on %s (port %d, %s), database %s", settings.listen, port, tls.describe(settings), app.repository.engine.url.render_as_string(hide_password=True))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if started is not None:
        started(server, stop)
    await stop.wait()
    log.info(
        "draining: NOT_SERVING for %.1f s, then in-flight calls get up to %.0f s",
        settings.drain_delay,
        settings.shutdown_grace,
    )
    left_running = await server.stop(settings.shutdown_grace, settings.drain_delay)
    if left_running:
        # Python would wait for their threads at exit, however long they take: the grace would not hold.
        log.warning(
            "stopped; %d cancelled call(s) still ran in a thread (argon2 or a database statement): exiting "
            "without waiting for them", left_running,
            extra=fields(event="server.stopped", left_running=left_running),
        )
        logging.shutdown()
        os._exit(0)
    log.info("stopped")
