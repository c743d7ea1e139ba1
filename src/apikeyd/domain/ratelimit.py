"""GCRA (the generic cell rate algorithm): one number per limit, the theoretical arrival time (TAT).

A limit of L per period P lets a request through at `now` when the TAT it would leave, max(tat, now) + P/L,
is at most now + P. Checking every limit before consuming any keeps a denied request from spending budget.
"""

import math
from dataclasses import dataclass

from apikeyd.domain.model import RateLimit


@dataclass(frozen=True, slots=True)
class RateOutcome:
    allowed: bool
    limit: int
    remaining: int
    retry_after: float  # seconds; 0 when allowed


def check(limits: tuple[RateLimit, ...], tats: list[float], now: float) -> tuple[RateOutcome, list[float] | None]:
    """The outcome for the tightest limit and, when allowed, the TATs to store."""
    new_tats: list[float] = []
    tightest: RateOutcome | None = None
    for rate, tat in zip(limits, tats):
        interval = rate.period_seconds / rate.limit
        new_tat = max(tat, now) + interval
        if new_tat - now > rate.period_seconds + 1e-9:
            retry = new_tat - now - rate.period_seconds
            outcome = RateOutcome(False, rate.limit, 0, retry)
            if tightest is None or tightest.allowed or retry > tightest.retry_after:
                tightest = outcome
            continue
        remaining = math.floor((rate.period_seconds - (new_tat - now)) / interval + 1e-9)
        if tightest is None or (tightest.allowed and remaining < tightest.remaining):
            tightest = RateOutcome(True, rate.limit, remaining, 0.0)
        new_tats.append(new_tat)
    assert tightest is not None, "check needs at least one limit"
    return tightest, new_tats if tightest.allowed else None
