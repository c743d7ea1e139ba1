"""GCRA (the generic cell rate algorithm): one number per limit, the theoretical arrival time (TAT).

A limit of L per period P admits a burst of L and then refills evenly, one request every P/L: the
token-bucket behaviour, so any window of length W admits at most L + W*L/P requests. A request at `now`
passes when the TAT it would leave, max(tat, now) + P/L, is at most now + P. Every limit is checked before
any is consumed, so a denied request spends no budget.

The arithmetic is exact: times are integer nanoseconds and each TAT is kept multiplied by its limit, so
P/L never has to be rounded. (Floats drift once the clock counts days of uptime.)
"""

from dataclasses import dataclass, field

from apikeyd.domain.model import RateLimit

NANOS = 1_000_000_000


@dataclass(frozen=True, slots=True)
class RateOutcome:
    allowed: bool
    limit: int
    remaining: int
    retry_after: float  # seconds; 0 when allowed
    # The tightest limit's period, for the message that names it (0 when unknown); not part of the outcome.
    period_seconds: int = field(default=0, compare=False)


def check(limits: tuple[RateLimit, ...], tats: list[int], now_ns: int) -> tuple[RateOutcome, list[int] | None]:
    """The outcome for the tightest limit and, when allowed, the TATs to keep (0 is a fresh limit)."""
    new_tats: list[int] = []
    tightest: RateOutcome | None = None
    for rate, tat in zip(limits, tats):
        period = rate.period_seconds * NANOS
        now = now_ns * rate.limit  # in units of 1/limit ns, where the emission interval P/L is exactly `period`
        new_tat = max(tat, now) + period
        excess = new_tat - now - period * rate.limit
        if excess > 0:
            wait_ns = -(-excess // rate.limit)  # rounded up: waiting retry_after is always enough
            outcome = RateOutcome(False, rate.limit, 0, wait_ns / NANOS, rate.period_seconds)
            if tightest is None or tightest.allowed or outcome.retry_after > tightest.retry_after:
                tightest = outcome
            continue
        remaining = -excess // period
        if tightest is None or (tightest.allowed and remaining < tightest.remaining):
            tightest = RateOutcome(True, rate.limit, remaining, 0.0, rate.period_seconds)
        new_tats.append(new_tat)
    assert tightest is not None, "check needs at least one limit"
    return tightest, new_tats if tightest.allowed else None
