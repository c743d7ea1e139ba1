"""Rate-limit state for one process: a GCRA arrival time per key and limit."""

import time
from collections.abc import Callable

from apikeyd.domain import ratelimit
from apikeyd.domain.model import RateLimit


class LocalRateLimiter:
    def __init__(self, clock: Callable[[], int] = time.monotonic_ns) -> None:
        self._clock = clock
        self._tats: dict[str, dict[RateLimit, int]] = {}

    def hit(self, key_id: str, limits: tuple[RateLimit, ...]) -> ratelimit.RateOutcome:
        """Count one request against every limit, or none when any limit refuses it."""
        now = self._clock()
        state = self._tats.setdefault(key_id, {})
        outcome, new_tats = ratelimit.check(limits, [state.get(rate, 0) for rate in limits], now)
        if new_tats is not None:
            state.update(zip(limits, new_tats))
        return outcome

    def refund(self, key_id: str, limits: tuple[RateLimit, ...]) -> None:
        """Give back one request that `hit` counted and a later check refused: each TAT moves back by one
        emission interval. Requests counted in between keep theirs, so the state is never more generous
        than if the refunded one had not come."""
        state = self._tats.get(key_id)
        if state is None:
            return
        for rate in limits:
            if rate in state:
                state[rate] -= rate.period_seconds * ratelimit.NANOS

    def prune(self) -> None:
        """Drop keys whose every limit has refilled: they hold nothing a fresh start would not."""
        now = self._clock()
        for key_id in [k for k, state in self._tats.items() if all(tat <= now * rate.limit for rate, tat in state.items())]:
            del self._tats[key_id]
