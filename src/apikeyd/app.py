"""The object graph of one server process (App) and the checks of its settings that come first: what
`serve`, each worker and `admin-key create` build before anything listens."""

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from sqlalchemy import make_url

from apikeyd.authorizer.authorizer import Authorizer
from apikeyd.authorizer.budget import FailureBudget
from apikeyd.authorizer.cache import VerifiedKeyCache
from apikeyd.authorizer.fairqueue import FairQueue
from apikeyd.authorizer.feed import ChangeFeed, effective_poll_interval
from apikeyd.authorizer.hashing import Argon2Parameters, SecretHasher
from apikeyd.authorizer.redis_ratelimits import FAILURE_POLICIES, RedisRateLimiter
from apikeyd.authorizer.usage import UsageFlusher
from apikeyd.change_stream import ChangeStreams
from apikeyd.config import Settings
from apikeyd.domain import keys, limits
from apikeyd.domain.usage import Granularity
from apikeyd.lifecycle import KeyManager, KeyPrefixes
from apikeyd.logs import fields
from apikeyd.metrics import Metrics
from apikeyd.store.engine import normalize_url
from apikeyd.store.repository import Repository

log = logging.getLogger(__name__)
T = TypeVar("T")


class StartupError(Exception):
    """Settings or surroundings that keep the server from starting; the message says which."""


def check_key_prefixes(settings: Settings) -> None:
    for name in ("account_key_prefix", "project_key_prefix"):
        if not keys.is_valid_prefix(getattr(settings, name)):
            raise StartupError(
                f"{Settings.env_name(name)}={getattr(settings, name)!r} must match {keys.PREFIX_PATTERN}"
            )


def check_request_size(settings: Settings) -> None:
    if settings.max_request_bytes < limits.MIN_MAX_REQUEST_BYTES:
        raise StartupError(
            f"{Settings.env_name('max_request_bytes')}={settings.max_request_bytes} is below "
            f"{limits.MIN_MAX_REQUEST_BYTES}: requests of ordinary size would be refused"
        )
    if settings.max_concurrent_rpcs < limits.MIN_CONCURRENT_RPCS:
        raise StartupError(
            f"{Settings.env_name('max_concurrent_rpcs')}={settings.max_concurrent_rpcs} is below "
            f"{limits.MIN_CONCURRENT_RPCS}: a busy sidecar alone would be refused"
        )
    if settings.max_change_streams < 0:
        raise StartupError(
            f"{Settings.env_name('max_change_streams')}={settings.max_change_streams}: give 0 (no change streams) or more"
        )
    if settings.xff_trusted_hops < 0:
        raise StartupError(
            f"{Settings.env_name('xff_trusted_hops')}={settings.xff_trusted_hops}: give 0 (Envoy's downstream address) or more"
        )


def check_feed_timing(settings: Settings) -> None:
    postgres = make_url(normalize_url(settings.database_url)).get_backend_name() == "postgresql"
    try:
        effective_poll_interval(postgres, settings.feed_poll_interval, settings.feed_lease)
    except ValueError as error:
        raise StartupError(str(error)) from None


class App:
    """The object graph of one server process."""

    def __init__(self, settings: Settings) -> None:
        check_key_prefixes(settings)
        check_feed_timing(settings)
        check_request_size(settings)
        retention = _usage_retention(settings)
        self.settings = settings
        self.shared_limiter = _shared_limiter(settings)  # before anything that needs closing
        self.repository = Repository.from_url(settings.database_url, settings.db_pool_size)
        self.cache = VerifiedKeyCache(
            settings.cache_size,
            settings.cache_ttl,
            settings.negative_cache_ttl,
            stale_if_error=settings.stale_if_error,
        )
        # Drops from this process's cache the keys other processes change (key_events; LISTEN on PostgreSQL).
        self.feed = ChangeFeed(self.repository.engine, self.cache, settings.feed_poll_interval, settings.feed_lease)
        self.hasher = SecretHasher(
            Argon2Parameters(settings.argon2_time_cost, settings.argon2_memory_kib, settings.argon2_parallelism)
        )
        self.verify_executor = CallPool(settings.max_verifications, thread_name_prefix="verify")
        self.store_executor = CallPool(settings.db_pool_size, thread_name_prefix="store")
        self.verify_queue = FairQueue(self.verify_executor, settings.max_verifications, settings.verification_queue)
        self.failure_budget = FailureBudget(settings.failure_budget, settings.failure_window)
        self.metrics = Metrics()  # a registry of this App's own: servers in one process never clash
        if self.shared_limiter is not None:
            self.metrics.registry.register(self.shared_limiter)
        self.authorizer = Authorizer(
            self.repository,
            self.hasher,
            self.cache,
            self.verify_executor,
            limiter=self.shared_limiter,  # None: the Authorizer keeps limits in process
            metrics=self.metrics,
            budget=self.failure_budget,
            queue=self.verify_queue,
            credit_executor=self.store_executor,
        )
        # Usage counted by the Authorizer, written by the server's flush loop (server.py).
        self.usage = UsageFlusher(
            self.authorizer.usage,
            self.repository,
            self.store_executor,
            retention,
            settings.usage_cleanup_rows,
        )
        self.manager = KeyManager(
            self.repository,
            self.hasher,
            self.authorizer,
            self.store_executor,
            KeyPrefixes(settings.account_key_prefix, settings.project_key_prefix),
            settings.operator_account,
            settings.max_keys_per_account,
        )
        # The feed's reads, fanned out to WatchApiKeyChanges streams (change_stream.py).
        self.streams = ChangeStreams(
            self.feed, self.repository.engine, self.store_executor, settings.max_change_streams
        )
        self.manager.committed = self.feed.wake
        self.metrics.watch(
            cache=self.cache,
            hasher=self.hasher,
            in_flight=self.authorizer.verifications_in_flight,
            denials=self.manager.denials,
            budget=self.failure_budget,
            queue=self.verify_queue,
            streams=self.streams,
        )

    def close(self) -> int:
        """Close without waiting for calls still running in a thread, which nothing can stop (an argon2
        verification, a statement waiting on a lock): waiting would stretch the shutdown past its grace
        without bound. Returns how many there are; serve() then exits without them."""
        for pool in (self.verify_executor, self.store_executor):
            pool.shutdown(wait=False, cancel_futures=True)
        self.repository.close()  # the idle connections; one still in use closes with the process
        return self.verify_executor.unfinished() + self.store_executor.unfinished()


class CallPool(ThreadPoolExecutor):
    """A thread pool that counts its calls not finished yet, for App.close."""

    def __init__(self, max_workers: int, thread_name_prefix: str) -> None:
        super().__init__(max_workers, thread_name_prefix=thread_name_prefix)
        self._pending: set[Future[Any]] = set()

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> "Future[T]":
        future = super().submit(fn, *args, **kwargs)
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)  # at once if it is already done
        return future

    def unfinished(self) -> int:
        return len(self._pending)


def _shared_limiter(settings: Settings) -> RedisRateLimiter | None:
    """Rate limits in Redis with APIKEYD_RATE_LIMIT_URL; without it, per process (and said so)."""
    if settings.rate_limit_failure not in FAILURE_POLICIES:
        raise StartupError(
            f"{Settings.env_name('rate_limit_failure')}={settings.rate_limit_failure!r} must be one of "
            + ", ".join(FAILURE_POLICIES)
        )
    if not settings.rate_limit_url:  # with --workers N the supervisor also warns (workers.py)
        log.info(
            "rate limits are per process: each process and replica enforces each limit on its own; set "
            "APIKEYD_RATE_LIMIT_URL to share them",
            extra=fields(event="rate_limit.per_process"),
        )
        return None
    try:
        return RedisRateLimiter(settings.rate_limit_url, settings.rate_limit_prefix, settings.rate_limit_failure)
    except ValueError as error:
        raise StartupError(f"{Settings.env_name('rate_limit_url')}: {error}") from None


MAX_RETENTION = 100 * 365.25 * 86400  # past it a cut-off falls before year 1, which datetime cannot hold


def _usage_retention(settings: Settings) -> dict[Granularity, float]:
    retention = {granularity: getattr(settings, f"usage_retention_{granularity.value}") for granularity in Granularity}
    for granularity, seconds in retention.items():
        if not 0 <= seconds <= MAX_RETENTION:  # NaN fails this too
            name = Settings.env_name(f"usage_retention_{granularity.value}")
            raise StartupError(
                f"{name}={seconds:g}: give the seconds to keep {granularity.value} buckets, at most "
                f"{MAX_RETENTION:.0f} (100 years), or 0 to keep them"
            )
    if settings.usage_cleanup_rows < 1:
        raise StartupError(f"{Settings.env_name('usage_cleanup_rows')}={settings.usage_cleanup_rows}: give 1 or more")
    return retention
