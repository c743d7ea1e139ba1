"""The change stream behind WatchApiKeyChanges: every read of the change feed (authorizer/feed.py), fanned
out to the clients that cache Authorize answers (apikeyd.client), each seeing only the keys in its reach.

* **What a stream carries.** The changes to keys (every event kind but DENIED; this process's own changes
  too), and after every successful read of the feed a heartbeat with the feed's low-water mark and when that
  read began: every change committed before then has been sent on this stream. A client trusts its cache for
  the lease past that, and so keeps the same bound as the server's own cache (feed.py, "The bound"). When
  the feed is lost, no heartbeat goes out and clients stop trusting their caches within the lease.
* **Resume.** A client that reconnects gives the last position it received. The stream subscribes first and
  then replays the events after that position from the table, so nothing committed in between is missed;
  some may be sent twice, which only drops an entry twice. More than `REPLAY_LIMIT` events behind, or a
  position past the table's largest id (another database), is OUT_OF_RANGE: the client starts afresh.
* **Cost.** A subscription holds its reach, a list of references to shared change objects (at most
  `MAX_PENDING`; a client that falls that far behind is ended with RESOURCE_EXHAUSTED and resumes), and an
  event. Publishing is a loop over the subscriptions; each stream's own task does its writes. grpc.aio's
  own state is most of a stream's memory, about 25 KB a call and 15 KB a connection (bench/client_streams.py). At
  most `max_streams` are open (APIKEYD_MAX_CHANGE_STREAMS); the server adds that many to grpc's bound on
  calls at once, so that streams never take the places of Authorize and management calls.
* **Drain.** `end_all` ends every stream (status OK); clients reconnect elsewhere with their position.
"""

import asyncio
import functools
import time
from concurrent.futures import Executor
from dataclasses import dataclass

from sqlalchemy import Engine

from apikeyd.authorizer.feed import ChangeFeed
from apikeyd.domain.access import Reach
from apikeyd.domain.errors import OutOfRange, ResourceExhausted, Unavailable
from apikeyd.domain.model import KeyChange
from apikeyd.store import key_changes

MAX_PENDING = 10_000  # changes waiting for one slow stream before it is ended
REPLAY_LIMIT = 10_000  # events a resumed stream may be behind
# A heartbeat at most this often per stream (changes go at once): every other read of the feed on SQLite,
# every read on PostgreSQL. A client's 1 s lease then has half a second to spare, and 500 idle streams
# cost the server half the CPU that a heartbeat per read did (bench/client_streams.py).
HEARTBEAT_INTERVAL = 0.45


@dataclass(slots=True)
class Batch:
    """What a stream sends next: changes, the position, and for a heartbeat the monotonic time its feed read
    began."""

    changes: list[KeyChange]
    position: int
    synced_at: float | None


class Subscription:
    __slots__ = ("_beat_at", "_changes", "_position", "_ready", "_synced_at", "ended", "overflowed", "reach")

    def __init__(self, reach: Reach, position: int) -> None:
        self.reach = reach
        self._changes: list[KeyChange] = []
        self._position = position
        self._synced_at: float | None = None
        self._beat_at = float("-inf")  # when the last heartbeat was taken to be sent
        self._ready = asyncio.Event()
        self.ended = False
        self.overflowed = False

    @property
    def position(self) -> int:
        """Every change in reach up to this event id has been, or is about to be, sent."""
        return self._position

    def offer(self, changes: list[KeyChange], position: int, synced_at: float | None, now: float) -> None:
        seen = [c for c in changes if self.reach.sees(c.account_id, c.project_id)] if changes else changes
        if len(self._changes) + len(seen) > MAX_PENDING:
            self.overflowed = True
        else:
            self._changes.extend(seen)
        self._position = max(self._position, position)
        if synced_at is not None:
            self._synced_at = synced_at
        if seen or (self._synced_at is not None and now - self._beat_at >= HEARTBEAT_INTERVAL):
            self._ready.set()

    def end(self) -> None:
        self.ended = True
        self._ready.set()

    async def next(self) -> Batch | None:
        """The changes and heartbeat gathered since the last call; None once the stream is to end."""
        await self._ready.wait()
        self._ready.clear()
        if self.overflowed:
            raise ResourceExhausted(
                f"this stream fell more than {MAX_PENDING} changes behind; reconnect with resume_after"
            )
        if self.ended:
            return None
        batch = Batch(self._changes, self._position, self._synced_at)
        if self._synced_at is not None:
            self._beat_at = time.monotonic()
        self._changes, self._synced_at = [], None
        return batch


class ChangeStreams:
    """Follows `feed` (as its subscriber) from construction on; replays read with `engine` on `executor`."""

    def __init__(self, feed: ChangeFeed, engine: Engine, executor: Executor, max_streams: int = 1000) -> None:
        self._feed = feed
        self._engine = engine
        self._executor = executor
        self.max_streams = max_streams
        self._subscriptions: set[Subscription] = set()
        feed.subscriber = self.publish

    @property
    def lease(self) -> float:
        """The feed's lease, told to every stream."""
        return self._feed.lease

    def __len__(self) -> int:
        return len(self._subscriptions)

    def publish(self, changes: list[KeyChange], position: int, synced_at: float | None) -> None:
        """The change feed's subscriber: on the loop, after each of its reads."""
        now = time.monotonic()
        for subscription in self._subscriptions:
            subscription.offer(changes, position, synced_at, now)

    def subscribe(self, reach: Reach) -> Subscription:
        position = self._feed.low_water
        if position is None:
            # The feed's first read sets its position from the table and reads no events: a heartbeat after
            # it would vouch for changes no stream was sent.
            raise Unavailable("this server's change feed has not made its first read yet; retry in a moment")
        if len(self._subscriptions) >= self.max_streams:
            raise ResourceExhausted(
                f"{self.max_streams} change streams are open on this server (APIKEYD_MAX_CHANGE_STREAMS); "
                "retry later or on another replica"
            )
        subscription = Subscription(reach, position)
        self._subscriptions.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscriptions.discard(subscription)

    async def replay(self, subscription: Subscription, after: int) -> Batch:
        """After `subscribe`: the changes in reach since event `after`, and the position they bring the stream
        to; OutOfRange when `after` is not a position of this database or too far behind."""
        start = subscription.position
        if after == 0:
            return Batch([], start, None)
        reach = subscription.reach
        read = functools.partial(
            key_changes.changes_after, self._engine, after, REPLAY_LIMIT + 1,
            None if reach.everything else reach.account_id, reach.project_id,
        )
        changes, top = await asyncio.get_running_loop().run_in_executor(self._executor, read)
        if after > top:
            raise OutOfRange(
                f"resume_after: {after} is past this server's last event ({top}): it is another database's "
                "position; start afresh (resume_after 0) with an empty cache"
            )
        if len(changes) > REPLAY_LIMIT:
            raise OutOfRange(
                f"resume_after: more than {REPLAY_LIMIT} changes have happened since {after}; start afresh "
                "(resume_after 0) with an empty cache"
            )
        # Everything up to the position at subscription was committed (or rolled back) before the read.
        return Batch(changes, max(after, start), None)

    def end_all(self) -> None:
        for subscription in self._subscriptions:
            subscription.end()
