"""Which refusals the audit log records (KeyManager._denials): a tenant refused in a loop must not write one
audit row per request, yet the log must still show who was refused, for what, since when and how often."""

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from apikeyd.logs import fields

log = logging.getLogger(__name__)

# At most one DENIED audit event per (calling key, method, rule) in this many seconds; the refusals in
# between are counted and the count goes into the next one recorded. A script refused in a loop then writes
# one row per 10 s per (key, method, rule) instead of one per request, while the log still shows its first
# refusal at once and, for as long as the refusals go on, a count at most one window old. Shorter windows
# buy little for a reader (who needs "who, what, since when, how many") and multiply the rows.
DENIAL_WINDOW_SECONDS = 10.0
# Windows kept, least recently refused dropped first (a dropped window's pending count is logged): about
# 200 bytes each, so at most a few MB. A key whose window was dropped is simply recorded again at once.
DENIAL_WINDOWS_KEPT = 10_000

DenialKey = tuple[str, str, str]  # (calling key id, method, rule)


@dataclass
class _DenialWindow:
    opened: float  # the clock when the last DENIED event of this (key, method, rule) was recorded
    suppressed: int = 0  # refusals since then, not recorded


class DenialThrottle:
    """Which refusals the audit log records: the first of each (calling key, method, rule) at once, then at
    most one per `window` seconds, each carrying how many were left out since the previous one. Per process,
    in memory: every server applies it on its own. Used on the event loop only (KeyManager._denials), so it
    needs no lock. `clock` is injectable for tests (monotonic seconds)."""

    def __init__(
        self,
        window: float = DENIAL_WINDOW_SECONDS,
        capacity: int = DENIAL_WINDOWS_KEPT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window = window
        self.capacity = capacity
        self.clock = clock
        self.suppressed_total = 0  # refusals not written to the audit log, for a metric
        self._windows: OrderedDict[DenialKey, _DenialWindow] = OrderedDict()

    def __len__(self) -> int:
        return len(self._windows)

    def admit(self, key: DenialKey) -> int | None:
        """None to leave this refusal out (it is counted); otherwise record it, with the returned number of
        refusals left out since the previous recorded one."""
        now = self.clock()
        window = self._windows.get(key)
        if window is not None:
            self._windows.move_to_end(key)
            if now - window.opened < self.window:
                window.suppressed += 1
                self.suppressed_total += 1
                return None
            suppressed, window.opened, window.suppressed = window.suppressed, now, 0
            return suppressed
        self._windows[key] = _DenialWindow(now)
        while len(self._windows) > self.capacity:
            (key_id, method, rule), old = self._windows.popitem(last=False)
            if old.suppressed:
                log.warning(
                    "%d refusals of %s to key %s (%s) were left out of the audit log and their count is "
                    "dropped with its window", old.suppressed, method, key_id, rule or "-",
                    extra=fields(
                        event="access.denials_dropped", actor_key_id=key_id, method=method, rule=rule,
                        count=old.suppressed,
                    ),
                )
        return 0

    def unrecorded(self, key: DenialKey, suppressed: int) -> None:
        """The event `admit` let through could not be written (the database did not answer): it and the
        refusals it would have counted are counted into the next one, which is tried after the window as
        usual, so a flood during an outage costs one failed write per window, not one per refusal."""
        window = self._windows.setdefault(key, _DenialWindow(self.clock()))
        window.suppressed += suppressed + 1
