"""Following the change stream (WatchApiKeyChanges) into the local cache: what the sync client's thread and
the asyncio client's task share. A stream is resumed from the last position it gave, so a reconnect misses
nothing; a stream that has said nothing for `stall_after` seconds is given up and replaced."""

import logging
import random
import time
from datetime import UTC

import grpc

from apikeyd.client.local import LocalCache
from apikeyd.domain.access import Reach
from apikeyd.v1 import api_keys_pb2 as pb

log = logging.getLogger(__name__)

_CREATED = pb.AuditEvent.Kind.CREATED
_MAX_BACKOFF = 2.0


class Follower:
    def __init__(self, cache: LocalCache) -> None:
        self._cache = cache
        self.position = 0  # resume_after for the next stream
        self.stall_after = 2 * cache.lease  # heartbeats come every 0.25 to 0.5 s
        self.streams = 0  # streams opened, for tests and diagnostics
        self.last_error: grpc.StatusCode | None = None
        self.last_heartbeat = float("-inf")  # monotonic receipt of the last heartbeat
        self._first = True
        self._fresh = True
        self._failures = 0

    def request(self) -> pb.WatchApiKeyChangesRequest:
        self.streams += 1
        self._first, self._fresh = True, self.position == 0
        return pb.WatchApiKeyChangesRequest(resume_after=self.position)

    def receive(self, response: pb.WatchApiKeyChangesResponse, received_at: float) -> None:
        """One response, at monotonic time `received_at`."""
        if self._first:
            self._first = False
            reach = response.reach
            self._cache.reach = Reach(reach.all_accounts, reach.account_id, reach.project_id)
            self._cache.server_lease = response.lease.ToTimedelta().total_seconds()
            # Heartbeats come at least once per server poll interval, which is shorter than its lease.
            self.stall_after = 2 * self._cache.hold
            if self._fresh:
                self._cache.restart(received_at)
        if response.changes:
            self._cache.changed(
                [change.key_id for change in response.changes],
                [change.key_id for change in response.changes if change.kind == _CREATED],
                received_at,
            )
        self.position = max(self.position, response.position)
        if response.heartbeat:
            self._failures = 0
            self.last_heartbeat = received_at
            if response.HasField("send_time"):
                # Low by the response's transit, which the stated bound already allows for.
                self._cache.clock_offset = response.send_time.ToDatetime(UTC).timestamp() - time.time()
            self._cache.synced(received_at - response.sync_age.ToTimedelta().total_seconds())

    def ended(self, code: grpc.StatusCode | None, details: str = "") -> float:
        """The stream is over (code None: it ended cleanly, the server draining, or it stalled); the seconds
        to wait before the next one."""
        self._cache.suspend()
        self.last_error = code
        if code is grpc.StatusCode.OUT_OF_RANGE:
            self.position = 0  # another database, or too far behind: start afresh
        if code is not None and code is not grpc.StatusCode.CANCELLED:
            level = logging.WARNING if self._failures == 0 else logging.DEBUG
            log.log(level, "apikeyd change stream failed (%s: %s); checking every key remotely until it is back", code.name, details)
        self._failures += 1
        if self._failures == 1:
            return 0.0
        return min(_MAX_BACKOFF, 0.05 * 2 ** min(self._failures, 10)) * random.uniform(0.5, 1.0)
