"""Start-up and wiring: one grpc.aio server with ApiKeyService, health and reflection."""

import asyncio
import contextlib
import logging
import signal
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from apikeyd.authorizer.authorizer import Authorizer
from apikeyd.authorizer.cache import VerifiedKeyCache
from apikeyd.authorizer.hashing import Argon2Parameters, SecretHasher
from apikeyd.config import Settings
from apikeyd.domain import keys
from apikeyd.domain.errors import Unavailable
from apikeyd.lifecycle import KeyManager, KeyPrefixes
from apikeyd.service.api_keys import ApiKeyService
from apikeyd.store import migrate
from apikeyd.store.repository import Repository
from apikeyd.v1 import api_keys_pb2, api_keys_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = api_keys_pb2.DESCRIPTOR.services_by_name["ApiKeyService"].full_name


class _MethodAwarePool:
    """grpcurl describes a method by its full name, which protobuf's own pool cannot map to a file."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)

    def FindFileContainingSymbol(self, symbol: str) -> Any:  # noqa: N802 - protobuf's name
        try:
            return self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            return self._pool.FindMethodByName(symbol).containing_service.file


class StartupError(Exception):
    """Settings or surroundings that keep the server from starting; the message says which."""


class App:
    """The object graph of one server process."""

    def __init__(self, settings: Settings) -> None:
        for name in ("account_key_prefix", "project_key_prefix"):
            if not keys.is_valid_prefix(getattr(settings, name)):
                raise StartupError(
                    f"{Settings.env_name(name)}={getattr(settings, name)!r} must match {keys.PREFIX_PATTERN}"
                )
        self.settings = settings
        self.repository = Repository.from_url(settings.database_url, settings.db_pool_size)
        self.hasher = SecretHasher(
            Argon2Parameters(settings.argon2_time_cost, settings.argon2_memory_kib, settings.argon2_parallelism)
        )
        self.verify_executor = ThreadPoolExecutor(settings.max_verifications, thread_name_prefix="verify")
        self.store_executor = ThreadPoolExecutor(settings.db_pool_size, thread_name_prefix="store")
        self.cache = VerifiedKeyCache(settings.cache_size, settings.cache_ttl, settings.negative_cache_ttl)
        self.authorizer = Authorizer(self.repository, self.hasher, self.cache, self.verify_executor)
        self.manager = KeyManager(
            self.repository,
            self.hasher,
            self.authorizer,
            self.store_executor,
            KeyPrefixes(settings.account_key_prefix, settings.project_key_prefix),
            settings.operator_account,
            settings.max_keys_per_account,
        )

    def close(self) -> None:
        self.verify_executor.shutdown()
        self.store_executor.shutdown()
        self.repository.close()


class Server:
    def __init__(self, app: App) -> None:
        self.app = app
        # One listener per port: grpcio sets SO_REUSEPORT by default, which would let a second server
        # share a taken port silently.
        self.grpc = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        self.health = health.aio.HealthServicer()
        service = ApiKeyService(app.manager, app.authorizer, app.settings.authorize_requires_key)
        api_keys_pb2_grpc.add_ApiKeyServiceServicer_to_server(service, self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.grpc,
            pool=_MethodAwarePool(descriptor_pool.Default()),
        )
        self.port = 0
        self._flusher: asyncio.Task[None] | None = None

    async def start(self, listen: str) -> int:
        try:
            self.port = self.grpc.add_insecure_port(listen)
        except RuntimeError as error:
            raise StartupError(f"cannot listen on {listen}: {error}") from None
        if self.port == 0:
            raise StartupError(f"cannot listen on {listen}: the address is taken or invalid")
        await self.grpc.start()
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._flusher = asyncio.create_task(self._flush_periodically())
        return self.port

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.app.settings.last_used_flush_interval)
            await self.app.authorizer.flush_last_used()
            try:
                await self.app.manager.forget_old_request_ids()
            except Unavailable:
                log.warning("could not drop old request ids: the database is unavailable; will retry")

    async def stop(self, grace: float, drain_delay: float = 0.0) -> None:
        """Drain: health says NOT_SERVING while calls are still served for `drain_delay` seconds; then the
        listener closes and in-flight calls get `grace` seconds; last-used times are written.

        grpc cancels calls that have arrived but not yet started when the listener closes, so a caller
        that keeps sending needs the delay to notice NOT_SERVING and go elsewhere first."""
        await self.health.enter_graceful_shutdown()
        if drain_delay > 0:
            await asyncio.sleep(drain_delay)
        await self.grpc.stop(grace)
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        await self.app.authorizer.flush_last_used()
        self.app.close()


def prepare_database(settings: Settings, repository: Repository) -> None:
    """`serve` brings an SQLite file up to date by itself; other databases are migrated with `apikeyd migrate`."""
    if repository.engine.dialect.name == "sqlite":
        migrate.upgrade(repository.engine)


async def serve(settings: Settings) -> None:
    app = App(settings)
    prepare_database(settings, app.repository)
    server = Server(app)
    port = await server.start(settings.listen)
    log.info("apikeyd serving on %s (port %d), database %s", settings.listen, port, app.repository.engine.url.render_as_string(hide_password=True))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info(
        "draining: NOT_SERVING for %.1f s, then in-flight calls get up to %.0f s",
        settings.drain_delay,
        settings.shutdown_grace,
    )
    await server.stop(settings.shutdown_grace, settings.drain_delay)
    log.info("stopped")
