"""Usage counted on the hot path: Authorize outcomes per key and minute, in memory, with no I/O. The flush
(server.py, every APIKEYD_LAST_USED_FLUSH_INTERVAL) takes what has been counted and adds it to the minute,
hour and day buckets in the database (store/usage.py); a flush that fails puts its counts back for the next.

Only keys whose secret verified are counted (MALFORMED and NOT_FOUND name no key), so the table holds real
keys only; it is still bounded: past MAX_KEYS keys in one flush interval, `count` asks for an early flush.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from apikeyd.domain.decision import AuthCode
from apikeyd.domain.model import VerifiedKey

# The codes a key's usage is counted under; the others (MALFORMED, NOT_FOUND) have no key.
COUNTED = (
    AuthCode.OK,
    AuthCode.RATE_LIMITED,
    AuthCode.CREDITS_EXHAUSTED,
    AuthCode.INSUFFICIENT_SCOPE,
    AuthCode.PROJECT_MISMATCH,
    AuthCode.EXPIRED,
    AuthCode.DISABLED,
    AuthCode.REVOKED,
    AuthCode.IP_NOT_ALLOWED,
)
MAX_KEYS = 100_000  # about 250 B a key (its id, a slotted entry, a list of 11 ints): 25 MB at most
_SLOTS = max(AuthCode) + 1


@dataclass(slots=True)
class KeyCounts:
    account_id: str
    project_id: str
    counts: list[int] = field(default_factory=lambda: [0] * _SLOTS)  # by AuthCode


Minute = dict[str, KeyCounts]  # by key id


class UsageCounter:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._minute_start = 0.0
        self._minute_end = 0.0  # the current minute ends here (Unix time); count() rolls over past it
        self._current: Minute = {}
        self._closed: list[tuple[float, Minute]] = []  # minutes that ended, not yet flushed
        self.keys = 0  # keys counted since the last take: the bound's measure
        self.full: Callable[[], None] = lambda: None  # told once when `keys` passes MAX_KEYS

    def count(self, key: VerifiedKey, code: AuthCode) -> None:
        if self._clock() >= self._minute_end:
            self._roll()
        entry = self._current.get(key.key_id)
        if entry is None:
            entry = self._current[key.key_id] = KeyCounts(key.account_id, key.project_id)
            self.keys += 1
            if self.keys == MAX_KEYS:
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

    def put_back(self, minutes: list[tuple[float, Minute]]) -> None:
        """Counts a failed flush could not write, added back for the next one."""
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
