"""The failure budget: how many wrong secrets one lookup id may cost this process in a window.

A key string names its row by its lookup id, and anyone who has seen a key (or only its lookup id: the
checksum is public arithmetic) can send well-formed strings for it with made-up secrets, each costing a
database read and an argon2 verification (two for a rotated key). After `budget` of them have failed within
`window` seconds of the first, further strings for that lookup id that are not already verified (the cache is
looked up first, and a string this process has verified passes even once its entry has expired or been
dropped by a change: VerifiedKeyCache.verified_before) are refused as NOT_FOUND with no
database read and no argon2, until the window has passed. The answer is the one a wrong secret gets, so a
refusal tells the caller nothing new.

The price: a correct secret presented here for the first time while its lookup id is locked is refused too
(this process cannot tell it from a guess without the verification the budget withholds), until the window
passes. Other processes and replicas have budgets of their own.

Verifications in flight count against the budget as if they will fail, so a burst of concurrent guesses
cannot all slip in before the first one is known to be wrong; a verification that succeeds gives its share
back.

The table is keyed by caller input, so it is bounded: at most `max_entries` lookup ids (the oldest entry is
dropped to make room), each about `ENTRY_BYTES` (a 16-character str, a slotted entry, its dict slot), so
`max_entries * ENTRY_BYTES` bytes in all. Only lookup ids of real keys that failed (or are being verified)
have an entry: unknown lookup ids cost a database read once, then the negative cache answers them.

Everything here runs on the event loop thread.
"""

import logging
import time
from collections import OrderedDict
from collections.abc import Callable

from apikeyd.logs import fields

log = logging.getLogger(__name__)

ENTRY_BYTES = 320  # upper bound per entry, measured in tests/test_flood.py
MAX_ENTRIES = 20_000  # 20,000 * 320 B = 6.4 MB at most
_WARN_INTERVAL = 10.0  # seconds between the per-process WARNING lines about locked keys


class _Entry:
    __slots__ = ("failures", "pending", "started")

    def __init__(self, started: float) -> None:
        self.started = started  # monotonic time the window began: the first failure (or verification) in it
        self.failures = 0
        self.pending = 0  # verifications in flight


class FailureBudget:
    def __init__(
        self,
        budget: int = 5,
        window: float = 60.0,
        max_entries: int = MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.budget = budget
        self.window = window
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self.refusals = 0  # attempts refused by the budget: read by the metrics when Prometheus scrapes
        self._warned_at = float("-inf")
        self._locked_since_warning = 0

    def __len__(self) -> int:
        return len(self._entries)

    def _current(self, lookup_id: str) -> _Entry | None:
        """The entry of this lookup id in its current window; a window that has passed starts over."""
        entry = self._entries.get(lookup_id)
        if entry is not None and self._clock() - entry.started >= self.window:
            entry.started, entry.failures = self._clock(), 0
        return entry

    def exhausted(self, lookup_id: str) -> bool:
        """Whether this lookup id has used up its budget with wrong secrets: checked before a verification
        is even started, so a refused attempt costs no task, no database read and no argon2."""
        if self.budget <= 0:
            return False
        entry = self._current(lookup_id)
        if entry is None or entry.failures < self.budget:
            return False
        self.refusals += 1
        return True

    def admit(self, lookup_id: str) -> bool:
        """Reserve one verification for this lookup id, or refuse: its failures and verifications in flight
        have reached the budget. Every True must be followed by exactly one `settle`."""
        if self.budget <= 0:
            return True
        entry = self._current(lookup_id)
        if entry is None:
            entry = self._entries[lookup_id] = _Entry(self._clock())
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        elif entry.failures + entry.pending >= self.budget:
            self.refusals += 1
            return False
        entry.pending += 1
        return True

    def settle(self, lookup_id: str, wrong_secret_of: str | None) -> None:
        """The verification reserved by `admit` is over: `wrong_secret_of` is the name of the key whose secret
        did not match, None for a match, an unknown lookup id or an error (only a real key's wrong secret
        counts)."""
        if self.budget <= 0:
            return
        entry = self._entries.get(lookup_id)
        if entry is None:  # dropped to make room meanwhile
            return
        entry.pending = max(0, entry.pending - 1)
        if wrong_secret_of is None:
            if entry.failures == 0 and entry.pending == 0:
                del self._entries[lookup_id]
            return
        entry.failures += 1
        self._entries.move_to_end(lookup_id)  # the entries dropped first are those that failed longest ago
        if entry.failures == self.budget:
            self._warn(wrong_secret_of)

    def _warn(self, key_name: str) -> None:
        """At most one line per _WARN_INTERVAL for the whole process, however many keys are attacked. It
        names the key by its resource name, not by its lookup id: with the lookup id, anyone who reads the
        log could lock the key out themselves."""
        self._locked_since_warning += 1
        now = self._clock()
        if now - self._warned_at < _WARN_INTERVAL:
            return
        others = self._locked_since_warning - 1
        self._warned_at, self._locked_since_warning = now, 0
        log.warning(
            "key %s: %d wrong secrets in %.0f s; strings for it that are not already verified here are "
            "refused as NOT_FOUND until the window passes (APIKEYD_FAILURE_BUDGET)%s",
            key_name, self.budget, self.window,
            f"; {others} other key{'s' if others != 1 else ''} locked since the last such line" if others else "",
            extra=fields(event="authorize.failure_budget_exhausted", key=key_name, others=others),
        )
