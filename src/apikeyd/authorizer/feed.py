"""The change feed: every process follows the `key_events` table and drops from its own cache the keys other
processes changed, so a change acknowledged anywhere is in force everywhere within about a second.

Design, simplest correct one:

* **Invalidation.** Events name key ids; the cache is keyed by digests and its generations by lookup ids.
  The cache keeps a key id -> lookup id index of the keys it holds, so a cached key is dropped at once. A
  verification in flight has no cache entry yet, and its key id is not known before its read; so applying
  a batch of events starts a new cache *epoch* (`VerifiedKeyCache.apply_remote_changes`): the generation
  floor of every key is raised, and every verification that snapshotted its generation before the batch
  cannot store its result (it still answers its own callers, with what it read). One more miss for
  unrelated keys is the whole cost. A CREATED event clears the negative cache: the new key's string may
  have been remembered as unknown here.
* **Own events are skipped.** This process already invalidated its own changes after their commit and
  before their RPC returned (with the per-key generation rule); the feed notes the ids of the event rows
  inserted through this process's engine (a mapper `after_insert` hook) and passes over them, so a change
  made here does not also spoil the caching of the verification that follows it.
* **Wake-up.** On PostgreSQL every mutation sends `pg_notify('apikeyd_key_events', <event id>)` in its own
  transaction (delivered on commit only); the feed keeps one dedicated psycopg connection in autocommit
  that LISTENs, and reads the table as soon as a notification arrives, and at least every
  `APIKEYD_FEED_POLL_INTERVAL` (0.5 s by default) as a fallback. On SQLite it reads every 0.25 s by default.
  Reads run on a thread of the feed's own; the event loop only waits.
* **The bound.** Every successful read tells the cache when it started (`VerifiedKeyCache.synced`): every
  event committed before then has been applied. The cache trusts its entries for `APIKEYD_FEED_LEASE`
  (1 s) past that, so a change acknowledged by any process is in force here within the lease, whether the
  feed is working, slow, silently partitioned or lost. The poll interval must be shorter than the lease.
* **Start.** The position starts at the current largest event id: every older event is already in what
  this process will read from the table. The feed's first read happens before the server listens.
* **Loss.** When the LISTEN connection breaks or a read fails (or hangs past `_READ_TIMEOUT`), the cache is
  *suspended* at once, without waiting for the lease to run out: no hit trusted, every check verified
  afresh against the database (and, if the database does not answer either, served stale within
  `APIKEYD_STALE_IF_ERROR`). The feed retries by itself; once a read succeeds (after LISTEN is back, on
  PostgreSQL) it has caught up and the cache is trusted again, entries and all.
* **Change streams.** After every successful read the feed hands what it read (this process's own events
  included, DENIED ones not) to its `subscriber`, the change stream (change_stream.py), with its low-water
  mark (every id up to it has been read or given up on) and the read's start: WatchApiKeyChanges sends the
  changes and a heartbeat from that. A change committed here `wake`s the feed, so that streams carry it at
  once rather than at the next poll (on PostgreSQL its NOTIFY does the same).
* **Ordering.** PostgreSQL hands out sequence ids at insert time, so a transaction with a smaller id can
  commit after one with a larger id that was already read. The feed tracks *gaps*: ids below its position
  it has not seen (and, at start, the missing ids among the last `_START_WINDOW`). Each read asks for
  `id > position OR id IN (gaps)`; a gap is dropped once seen, or once every transaction that was running
  when it was first missed has ended (a rolled-back insert leaves a permanent hole): never by time alone,
  as a writer stalled between its insert and its commit may commit later than any time limit
  (store/key_changes.py, "Horizon"). The late commit's own notification triggers the read that finds it.
  On SQLite writers are serialized, so there are no gaps.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import psycopg
from sqlalchemy import Engine, event

from apikeyd.authorizer.cache import VerifiedKeyCache
from apikeyd.domain.model import EventKind, KeyChange
from apikeyd.exception_text import describe
from apikeyd.logs import fields
from apikeyd.store import key_changes
from apikeyd.store.models import KeyEventRow
from apikeyd.store.repository import FEED_CHANNEL

log = logging.getLogger(__name__)

SQLITE_POLL_INTERVAL = 0.25
POSTGRES_POLL_INTERVAL = 0.5
LEASE = 1.0  # seconds the cache trusts its entries past the last successful read
_READ_TIMEOUT = 1.0  # seconds a read of the feed may take before the cache is suspended
_BATCH = 1000  # events per read; a longer backlog is read in several
_START_WINDOW = 1000  # ids below the start position checked for gaps
_MAX_GAPS = 10_000
_RETRY_DELAY = 0.25  # seconds between attempts while the feed is lost (more on PostgreSQL: reconnect)


def effective_poll_interval(postgres: bool, poll_interval: float, lease: float) -> float:
    """The configured interval, or the backend's default for 0; ValueError unless shorter than the lease."""
    interval = poll_interval or (POSTGRES_POLL_INTERVAL if postgres else SQLITE_POLL_INTERVAL)
    if interval >= lease:
        raise ValueError(
            f"the change feed's poll interval ({interval} s) must be shorter than APIKEYD_FEED_LEASE ({lease} s), "
            "or the cache would stop trusting its entries between two reads"
        )
    return interval


# After every successful read, on the loop: the changes it found (of every kind but DENIED, this process's
# own included), the low-water mark (every event id up to it has been read), and when the read began
# (None for a batch of a longer backlog, the rest of which is still to be read).
Subscriber = Callable[[list[KeyChange], int, float | None], None]


class ChangeFeed:
    def __init__(
        self, engine: Engine, cache: VerifiedKeyCache, poll_interval: float = 0.0, lease: float = LEASE
    ) -> None:
        self._engine = engine
        self._cache = cache
        self._postgres = engine.dialect.name == "postgresql"
        self.poll_interval = effective_poll_interval(self._postgres, poll_interval, lease)
        self.lease = lease
        self.lost = False  # from a failure until the next successful read
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="feed")
        self.position: int | None = None  # the largest event id seen; None until the first read
        # id -> the transaction id below which its transaction is (key_changes.Horizon): looked for until
        # every transaction below it has ended.
        self._gaps: dict[int, int] = {}
        self._listener: psycopg.AsyncConnection[Any] | None = None
        self._task: asyncio.Task[None] | None = None
        self._pending: Future[Any] | None = None
        self._pending_started = 0.0
        self._own: set[int] = set()  # ids of event rows this process inserted, not yet passed by the feed
        self.applied = 0  # events applied to the cache (of every kind but DENIED)
        self.reads = 0
        self.failures = 0
        self.subscriber: Subscriber | None = None  # the change stream (change_stream.py)
        self._woken = asyncio.Event()
        self._found: list[KeyChange] = []  # the current read's changes, for the subscriber

    def wake(self) -> None:
        """Read now rather than at the next poll: this process has just committed a change, which the change
        stream's watchers should hear of at once (on PostgreSQL its NOTIFY does this)."""
        self._woken.set()

    @property
    def low_water(self) -> int | None:
        """Every event id up to this one has been read (or given up on as a rolled-back insert); None before
        the first read."""
        if self.position is None:
            return None
        return min(self._gaps, default=self.position + 1) - 1

    # --- life -------------------------------------------------------------------------------------

    def _inserted(self, _mapper: Any, connection: Any, target: KeyEventRow) -> None:
        """On a store thread, for every event row any engine inserts: note this process's own."""
        if connection.engine.pool is self._engine.pool and len(self._own) < _MAX_GAPS:
            self._own.add(target.id)  # a set's add is atomic under the GIL; the loop only discards

    async def start(self) -> None:
        """First position (and LISTEN) before the server serves; a failure leaves the cache suspended and
        the background task retrying."""
        event.listen(KeyEventRow, "after_insert", self._inserted)
        self._cache.follow(self.lease)
        try:
            if self._postgres:
                await self._listen()
            await self._read()
        except Exception as error:
            self._lost(error)
        self._task = asyncio.create_task(self._run(), name="apikeyd-change-feed")

    async def stop(self) -> None:
        if event.contains(KeyEventRow, "after_insert", self._inserted):
            event.remove(KeyEventRow, "after_insert", self._inserted)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(self._task, 5.0)
            self._task = None
        await self._close_listener()
        # A read still running finishes on its own thread; stopping never waits for it.
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _run(self) -> None:
        while True:
            try:
                if self.lost:
                    await asyncio.sleep(_RETRY_DELAY)
                    if self._postgres and self._listener is None:
                        await self._listen()
                    await self._read()
                    continue
                await self._wait()
                await self._read()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                self._lost(error)

    # --- reading ----------------------------------------------------------------------------------

    async def _wait(self) -> None:
        """Until a notification arrives (PostgreSQL) or the poll interval has passed."""
        if self._listener is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._woken.wait(), self.poll_interval)
            self._woken.clear()
            return
        async for _ in self._listener.notifies(timeout=self.poll_interval, stop_after=1):
            pass
        # Several commits often notify together: take them all in the same read.

    async def _read(self) -> None:
        """Read and apply everything new; the cache is trusted again, from the first read's start, once
        this succeeds."""
        synced_at: float | None = None
        while True:
            if self._pending is None or self._pending.done():
                self._pending_started = time.monotonic()  # before the read's snapshot, so never late
                self._pending = self._executor.submit(self._fetch, self.position, tuple(self._gaps))
            if synced_at is None:
                synced_at = self._pending_started  # an older read still running counts from its own start
            try:
                result = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self._pending)), _READ_TIMEOUT)
            finally:
                if self._pending.done():
                    self._pending = None
            self.reads += 1
            more = self._apply(*result)
            if not more:
                break
            self._publish(None)  # a long backlog goes out batch by batch
        self._cache.synced(synced_at)
        self._publish(synced_at)
        if self.lost:
            self.lost = False
            log.info(
                "change feed caught up at event %s: cache in use again", self.position,
                extra=fields(event="feed.resumed", position=self.position),
            )

    def _publish(self, synced_at: float | None) -> None:
        found, self._found = self._found, []
        low_water = self.low_water
        if self.subscriber is not None and low_water is not None:
            self.subscriber(found, low_water, synced_at)

    def _fetch(
        self, position: int | None, gaps: tuple[int, ...]
    ) -> tuple[int | None, list[KeyChange], list[int], key_changes.Horizon]:
        """On the feed's thread: (the start position and the ids present just below it) on the first read,
        else the events after the position or in a gap; and the read's horizon."""
        if position is None:
            top, present, horizon = key_changes.start_position(self._engine, _START_WINDOW)
            return top, [], present, horizon
        changes, horizon = key_changes.changes_since(self._engine, position, gaps, _BATCH)
        return None, changes, [], horizon

    def _apply(
        self, start: int | None, events: list[KeyChange], present: list[int], horizon: key_changes.Horizon
    ) -> bool:
        """On the loop: note the position and gaps, invalidate; whether a full batch asks for another read."""
        ended_below, started_below = horizon if horizon is not None else (0, 0)
        if start is not None:
            self.position = start
            missing = set(range(max(start - _START_WINDOW, 0) + 1, start + 1)) - set(present)
            self._gaps = {i: started_below for i in sorted(missing)[-_MAX_GAPS:]}
            return False
        assert self.position is not None
        changed: list[str] = []
        created = False
        for item in events:
            if item.event_id > self.position:
                for gap in range(self.position + 1, item.event_id):
                    self._gaps[gap] = started_below
                self.position = item.event_id
            else:
                self._gaps.pop(item.event_id, None)
            if item.kind is EventKind.DENIED:
                self._own.discard(item.event_id)
                continue
            self._found.append(item)
            if item.event_id in self._own:
                self._own.discard(item.event_id)
                continue
            changed.append(item.key_id)
            created = created or item.kind is EventKind.CREATED
        if changed:
            self._cache.apply_remote_changes(changed, created)
            self.applied += len(changed)
        # Gaps found before this read whose transactions had all ended when it began: rolled back.
        self._gaps = {i: below for i, below in self._gaps.items() if below > ended_below}
        if len(self._own) > 1000:  # ids of rolled-back inserts never show up
            self._own = {i for i in self._own if i > self.position or i in self._gaps}
        if len(self._gaps) > _MAX_GAPS:
            self._gaps = dict(sorted(self._gaps.items())[-_MAX_GAPS:])
        return len(events) >= _BATCH

    # --- PostgreSQL LISTEN ------------------------------------------------------------------------

    async def _listen(self) -> None:
        await self._close_listener()
        url = self._engine.url.set(drivername="postgresql")
        conninfo = url.render_as_string(hide_password=False)
        listener = await asyncio.wait_for(
            psycopg.AsyncConnection.connect(conninfo, autocommit=True, connect_timeout=5), _READ_TIMEOUT * 5
        )
        self._listener = listener
        await listener.execute(f"LISTEN {FEED_CHANNEL}")

    def listener_pid(self) -> int | None:
        """The LISTEN connection's backend pid (for tests and diagnostics)."""
        return None if self._listener is None or self._listener.closed else self._listener.info.backend_pid

    async def _close_listener(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(Exception):
                await listener.close()

    def _lost(self, error: BaseException) -> None:
        self.failures += 1
        if self._postgres:
            # Reconnect next time: a LISTEN connection that missed notifications cannot be trusted.
            listener, self._listener = self._listener, None
            if listener is not None:
                asyncio.get_running_loop().create_task(_close_quietly(listener))
        reason = describe(error)
        self._cache.suspend()
        if not self.lost:
            self.lost = True
            log.warning(
                "change feed lost (%s): cache suspended until it catches up", reason,
                extra=fields(event="feed.lost", reason=reason),
            )


async def _close_quietly(connection: "psycopg.AsyncConnection[Any]") -> None:
    with contextlib.suppress(Exception):
        await connection.close()
