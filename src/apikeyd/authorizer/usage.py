"""Usage counted on the hot path: Authorize outcomes per key and minute, in memory, with no I/O. The flush
(UsageFlusher, from server.py every APIKEYD_LAST_USED_FLUSH_INTERVAL and once more at drain) takes what has
been counted and adds it to the minute, hour and day buckets in the database (store/usage.py); what a failed
write could not commit is put back for the next. So SIGTERM loses nothing the database accepts, and SIGKILL
loses at most what was counted since the last flush.

Only keys whose secret verified are counted (MALFORMED and NOT_FOUND name no key), so the table holds real
keys only; it is still bounded: past MAX_KEYS keys in one flush interval, `count` asks for an early flush.
"""

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from datetime import UTC, datetime

from apikeyd.domain.decision import AuthCode
from apikeyd.domain.model import VerifiedKey
from apikeyd.domain.usage import Granularity, KeyCounts
from apikeyd.exception_text import describe
from apikeyd.logs import fields
from apikeyd.store import usage as store_usage
from apikeyd.store.repository import Repository

log = logging.getLogger(__name__)

# About 250 B a key (its id, a slotted entry, a list of 11 ints): 5 MB at most. Also what one flush writes
# at most, about 3 s on SQLite (150 ms per 1,000 keys), so that the last one at drain fits its time.
MAX_KEYS = 20_000
# Key-minutes kept while the database refuses writes (50 MB): past it the oldest minutes are dropped, and
# said so, rather than an outage growing the process without bound. 1,000 busy keys last 200 minutes.
MAX_HELD = 200_000

# Keys per write transaction: a flush after a busy interval (up to MAX_KEYS keys, three rows each) holds
# SQLite's write lock for a few milliseconds at a time, not for the whole batch.
KEYS_PER_TRANSACTION = 1000
# Rows per retention DELETE: each is one short transaction, however far behind the clean-up is.
ROWS_PER_DELETE = 1000

Minute = dict[str, KeyCounts]  # by key id


class UsageCounter:
    def __init__(self, clock: Callable[[], float] = time.time, max_keys: int = MAX_KEYS) -> None:
        self._clock = clock
        self._max_keys = max_keys
        self._minute_start = 0.0
        self._minute_end = 0.0  # the current minute ends here (Unix time); count() rolls over past it
        self._current: Minute = {}
        self._closed: list[tuple[float, Minute]] = []  # minutes that ended, not yet flushed
        self.keys = 0  # keys counted since the last take: the bound's measure
        self.full: Callable[[], None] = lambda: None  # told once when `keys` reaches max_keys

    def count(self, key: VerifiedKey, code: AuthCode) -> None:
        if self._clock() >= self._minute_end:
            self._roll()
        entry = self._current.get(key.key_id)
        if entry is None:
            entry = self._current[key.key_id] = KeyCounts(key.account_id, key.project_id)
            self.keys += 1
            if self.keys == self._max_keys:
                self.full()
        entry.counts[code] += 1

    def _roll(self) -> None:
        if self._current:
            self._closed.append((self._minute_start, self._current))
            self._current = {}
        now = self._clock()
        self._minute_start = now - now % 60
        self._minute_end = self._minute_start + 60

    def take(self) -> list[tuple[float, Minute]]:
        """Everything counted so far, by minute (its start as a Unix time), and a fresh start."""
        taken = self._closed
        if self._current:
            taken.append((self._minute_start, self._current))
        self._closed, self._current, self.keys = [], {}, 0
        return taken

    def put_back(self, minutes: list[tuple[float, Minute]]) -> int:
        """Counts a failed flush could not write, added back for the next one; returns how many checks were
        dropped to stay within MAX_HELD key-minutes, the oldest minutes first."""
        for start, minute in minutes:
            target = self._current if start == self._minute_start else None
            if target is None:
                self._closed.append((start, minute))
                continue
            for key_id, entry in minute.items():
                mine = target.get(key_id)
                if mine is None:
                    target[key_id] = entry
                else:
                    mine.counts = [a + b for a, b in zip(mine.counts, entry.counts)]
        held = len(self._current) + sum(len(minute) for _, minute in self._closed)
        dropped = 0
        if held > MAX_HELD:
            self._closed.sort(key=lambda closed: closed[0])
            while held > MAX_HELD and self._closed:
                _, oldest = self._closed.pop(0)
                held -= len(oldest)
                dropped += sum(sum(entry.counts) for entry in oldest.values())
        return dropped


class UsageFlusher:
    """Writes what a UsageCounter holds, on the store's pool, and deletes buckets past their retention.
    A flush cancelled at drain leaves its write running and `close` waits for it, so no count is written
    twice or dropped. Used on the event loop only."""

    def __init__(
        self,
        counter: UsageCounter,
        repository: Repository,
        executor: Executor,
        retention: Mapping[Granularity, float],
        cleanup_rows: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._counter = counter
        self._repository = repository
        self._executor = executor
        self._retention = {granularity: seconds for granularity, seconds in retention.items() if seconds > 0}
        self._cleanup_rows = cleanup_rows
        self._clock = clock
        self._writes: set[asyncio.Future[list[tuple[float, Minute]]]] = set()
        self._full = asyncio.Event()
        counter.full = self._full.set

    async def wait(self, interval: float) -> None:
        """Until the next flush is due: `interval` seconds, or sooner when the counter reaches its max_keys."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._full.wait(), interval)
        self._full.clear()

    async def flush(self) -> None:
        taken = self._counter.take()
        if not taken:
            return
        write = asyncio.get_running_loop().run_in_executor(self._executor, self._write, taken)
        self._writes.add(write)
        write.add_done_callback(functools.partial(self._written, taken))
        await asyncio.wait({write})  # unlike an await of it, a cancelled flush leaves the write running

    async def close(self) -> None:
        """At drain: the writes in flight, then what is left. Counts the database refuses now are lost."""
        while self._writes:
            await asyncio.wait(set(self._writes))
        await self.flush()

    def _write(self, taken: list[tuple[float, Minute]]) -> list[tuple[float, Minute]]:
        """On the store's pool: every minute in transactions of KEYS_PER_TRANSACTION keys, until one fails;
        returns what was not committed."""
        chunks = [
            (start, dict(items[first : first + KEYS_PER_TRANSACTION]))
            for start, minute in taken
            for items in [list(minute.items())]
            for first in range(0, len(items), KEYS_PER_TRANSACTION)
        ]
        for index, (start, chunk) in enumerate(chunks):
            try:
                store_usage.add(self._repository, start, chunk)
            except Exception as error:
                log.warning(
                    "could not write the usage of %d keys (%s); kept for the next flush",
                    sum(len(minute) for _, minute in chunks[index:]), describe(error),
                    extra=fields(event="usage.flush_failed", reason=describe(error)),
                )
                return chunks[index:]
        return []

    def _written(self, taken: list[tuple[float, Minute]], write: "asyncio.Future[list[tuple[float, Minute]]]") -> None:
        self._writes.discard(write)
        if write.cancelled():  # the pool shut down before it ran
            unwritten = taken
        elif (error := write.exception()) is not None:  # before its first commit: _write catches the writes' errors
            log.warning("could not write usage: %s; kept for the next flush", describe(error))
            unwritten = taken
        else:
            unwritten = write.result()
        if unwritten and (dropped := self._counter.put_back(unwritten)):
            log.warning(
                "dropped the usage of %d checks: the database has refused writes for longer than %d key-minutes "
                "can be kept", dropped, MAX_HELD, extra=fields(event="usage.dropped", checks=dropped),
            )

    async def clean_up(self) -> int:
        """Delete the buckets past their retention, at most `cleanup_rows` per granularity per call."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._delete_old, self._clock())

    def _delete_old(self, now: float) -> int:
        deleted = 0
        for granularity, seconds in self._retention.items():
            before = datetime.fromtimestamp(now - seconds, UTC)
            left = self._cleanup_rows
            while left > 0:
                batch = min(left, ROWS_PER_DELETE)
                count = store_usage.delete_before(self._repository, granularity, before, batch)
                deleted += count
                left -= count
                if count < batch:
                    break
        return deleted
