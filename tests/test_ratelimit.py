"""GCRA rate limiting: bursts, remaining counts, retry_after, several limits at once, and long-run bounds."""

import math
from fractions import Fraction

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from apikeyd.domain import ratelimit
from apikeyd.domain.model import RateLimit
from apikeyd.domain.ratelimit import NANOS, RateOutcome


def check(
    limits: tuple[RateLimit, ...], tats: list[float] | list[Fraction], now: float
) -> tuple[RateOutcome, list[Fraction] | None]:
    """The domain's check in seconds. It keeps each TAT as integer nanoseconds times the limit; as exact
    fractions of a second the TATs pass through these tests without rounding."""
    scaled = [round(Fraction(tat) * NANOS * rate.limit) for rate, tat in zip(limits, tats)]
    outcome, new = ratelimit.check(limits, scaled, round(Fraction(now) * NANOS))
    if new is None:
        return outcome, None
    return outcome, [Fraction(tat, NANOS * rate.limit) for rate, tat in zip(limits, new)]

periods = st.one_of(st.sampled_from([1, 2, 3, 7, 10, 60, 3600, 86400]), st.integers(1, 86400))
limits_per_period = st.integers(1, 100)
# start times like those of a freshly started process (large clocks have tests of their own below)
small_nows = st.one_of(st.just(0.0), st.floats(0.0, 100.0, allow_nan=False, allow_infinity=False))


def burst(rate: RateLimit, now: float) -> tuple[list[RateOutcome], list[float]]:
    """Requests at one instant from a fresh state until the first denial: the outcomes and the final TATs."""
    tats = [0.0]
    outcomes = []
    for _ in range(rate.limit + 5):
        outcome, new_tats = check((rate,), tats, now)
        outcomes.append(outcome)
        if not outcome.allowed:
            assert new_tats is None
            break
        assert new_tats is not None
        tats = new_tats
    return outcomes, tats


def simulate(limits: tuple[RateLimit, ...], times: list[float]) -> list[tuple[float, RateOutcome]]:
    """Feed requests at these times, storing the TATs only when a request is allowed, as the service does."""
    tats = [0.0] * len(limits)
    results = []
    for now in times:
        before = list(tats)
        outcome, new_tats = check(limits, tats, now)
        assert tats == before, "check must not change the list it is given"
        if outcome.allowed:
            assert new_tats is not None and len(new_tats) == len(limits)
            tats = new_tats
        else:
            assert new_tats is None
        results.append((now, outcome))
    return results


# --- one limit ----------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(limits_per_period, periods, small_nows)
@example(1, 1, 0.0)
@example(3, 1, 1000.0)
@example(100, 86400, 50.0)
def test_exactly_limit_requests_at_one_instant_then_denied(limit: int, period: int, now: float) -> None:
    rate = RateLimit(limit, period)
    outcomes, _ = burst(rate, now)
    allowed = [o for o in outcomes if o.allowed]
    assert len(allowed) == limit
    assert [o.remaining for o in allowed] == list(range(limit - 1, -1, -1))
    assert all(o.limit == limit and o.retry_after == 0.0 for o in allowed)
    denied = outcomes[-1]
    assert not denied.allowed
    assert denied.limit == limit
    assert denied.remaining == 0
    assert denied.retry_after == pytest.approx(period / limit, abs=1e-9)  # whole nanoseconds, rounded up


@settings(max_examples=200, deadline=None)
@given(limits_per_period, periods, small_nows)
def test_waiting_retry_after_lets_exactly_one_more_request_through(limit: int, period: int, now: float) -> None:
    rate = RateLimit(limit, period)
    outcomes, tats = burst(rate, now)
    later = now + outcomes[-1].retry_after
    outcome, new_tats = check((rate,), tats, later)
    assert outcome.allowed and new_tats is not None
    assert outcome.remaining == 0
    again, none = check((rate,), new_tats, later)
    assert not again.allowed and none is None
    assert again.retry_after == pytest.approx(period / limit, abs=1e-9)  # whole nanoseconds, rounded up
    # waiting a little less than retry_after is not enough
    early, _ = check((rate,), tats, now + outcomes[-1].retry_after * 0.99)
    assert not early.allowed


def test_fresh_state_with_one_request_per_second() -> None:
    rate = RateLimit(1, 1)
    assert check((rate,), [0.0], 10.0) == (RateOutcome(True, 1, 0, 0.0), [11.0])
    outcome, new_tats = check((rate,), [11.0], 10.5)
    assert new_tats is None
    assert outcome.allowed is False and outcome.limit == 1 and outcome.remaining == 0
    assert outcome.retry_after == pytest.approx(0.5)
    assert check((rate,), [11.0], 11.0) == (RateOutcome(True, 1, 0, 0.0), [12.0])


def test_budget_refills_at_limit_over_period() -> None:
    rate = RateLimit(10, 60)  # one request's worth every 6 s
    _, tats = burst(rate, 100.0)
    assert check((rate,), tats, 105.9)[0].allowed is False
    outcome, _ = check((rate,), tats, 106.0)
    assert outcome.allowed and outcome.remaining == 0
    # after a whole idle period the full burst is back
    outcome, _ = check((rate,), tats, 100.0 + 60 + 60)
    assert outcome.allowed and outcome.remaining == 9


# --- several limits -----------------------------------------------------------------------------

PER_SECOND = RateLimit(2, 1)
PER_MINUTE = RateLimit(5, 60)


def test_two_limits_tightest_governs_and_denials_consume_nothing() -> None:
    limits = (PER_SECOND, PER_MINUTE)
    tats = [0.0, 0.0]
    t0 = 50.0

    outcome, tats = check(limits, tats, t0)
    assert outcome == RateOutcome(True, 2, 1, 0.0)  # per second: 1 left, per minute: 4 left
    outcome, tats = check(limits, tats, t0)
    assert outcome == RateOutcome(True, 2, 0, 0.0)
    assert tats == pytest.approx([t0 + 1.0, t0 + 24.0])

    # the per-second limit denies; the per-minute one would allow, but its budget is left alone
    outcome, refused = check(limits, tats, t0)
    assert refused is None
    assert (outcome.allowed, outcome.limit, outcome.remaining) == (False, 2, 0)
    assert outcome.retry_after == pytest.approx(0.5)

    for t in (t0 + 0.5, t0 + 1.0, t0 + 1.5):
        outcome, tats = check(limits, tats, t)
        assert outcome.allowed and tats is not None
    assert tats == pytest.approx([t0 + 2.5, t0 + 60.0])  # five per minute used up

    # now the per-minute limit denies while the per-second one would allow: nothing is consumed
    outcome, refused = check(limits, tats, t0 + 2.5)
    assert refused is None
    assert (outcome.allowed, outcome.limit, outcome.remaining) == (False, 5, 0)
    assert outcome.retry_after == pytest.approx(9.5)  # the first of the five frees at t0 + 12
    # denied again and again: still the same state, the same answer
    for t in (t0 + 3.0, t0 + 10.0, t0 + 11.99):
        outcome, refused = check(limits, tats, t)
        assert refused is None and outcome.limit == 5
        assert outcome.retry_after == pytest.approx(t0 + 12.0 - t)
    outcome, tats = check(limits, tats, t0 + 12.0)
    assert outcome == RateOutcome(True, 5, 0, 0.0)  # per second: 1 left; per minute: 0 left, so it governs
    assert tats == pytest.approx([t0 + 12.5, t0 + 72.0])


def test_when_both_limits_deny_retry_after_is_the_longer_wait() -> None:
    limits = (PER_SECOND, PER_MINUTE)
    # both used up at t = 0: per second frees at 0.5 s, per minute at 12 s
    outcome, refused = check(limits, [1.0, 60.0], 0.0)
    assert refused is None and not outcome.allowed
    assert outcome.limit == 5 and outcome.retry_after == pytest.approx(12.0)
    outcome, _ = check(tuple(reversed(limits)), [60.0, 1.0], 0.0)
    assert outcome.limit == 5 and outcome.retry_after == pytest.approx(12.0)


def _combine(single: list[RateOutcome]) -> tuple[bool, float, int]:
    if all(o.allowed for o in single):
        return True, 0.0, min(o.remaining for o in single)
    return False, max(o.retry_after for o in single if not o.allowed), 0


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.builds(RateLimit, limits_per_period, periods), min_size=1, max_size=4, unique=True).flatmap(
        lambda limits: st.tuples(
            st.just(tuple(limits)),
            st.lists(st.floats(0.0, 200.0), min_size=len(limits), max_size=len(limits)),
            st.floats(0.0, 100.0),
        )
    )
)
def test_several_limits_behave_as_their_tightest_and_consume_all_or_nothing(
    case: tuple[tuple[RateLimit, ...], list[float], float],
) -> None:
    limits, tats, now = case
    single = [check((rate,), [tat], now) for rate, tat in zip(limits, tats)]
    outcome, new_tats = check(limits, tats, now)
    allowed, retry_after, remaining = _combine([o for o, _ in single])
    assert outcome.allowed == allowed
    assert outcome.retry_after == pytest.approx(retry_after)
    assert outcome.remaining == remaining
    if allowed:
        assert new_tats == [t[0] for _, t in single]  # type: ignore[index]
        assert outcome.limit in {o.limit for o, _ in single if o.remaining == remaining}
    else:
        assert new_tats is None
        assert outcome.limit in {o.limit for o, _ in single if not o.allowed and o.retry_after == pytest.approx(retry_after)}


# --- sequences of requests against exact GCRA -------------------------------------------------


def exact_gcra(rate: RateLimit, times: list[Fraction]) -> list[bool]:
    """GCRA in exact arithmetic: allow when max(tat, now) + P/L <= now + P."""
    interval = Fraction(rate.period_seconds, rate.limit)
    tat = Fraction(0)
    decisions = []
    for now in times:
        new_tat = max(tat, now) + interval
        ok = new_tat - now <= rate.period_seconds
        if ok:
            tat = new_tat
        decisions.append(ok)
    return decisions


@st.composite
def request_sequences(draw: st.DrawFn) -> tuple[RateLimit, list[Fraction]]:
    rate = draw(st.builds(RateLimit, st.integers(1, 10), st.sampled_from([1, 2, 5, 60])))
    # times on a millisecond grid within three periods: many exact ties, many bursts
    ticks = draw(st.lists(st.integers(0, 3000 * rate.period_seconds), min_size=1, max_size=60))
    clustered = draw(st.lists(st.sampled_from(ticks), max_size=20))
    return rate, [Fraction(t, 1000) + 10 for t in sorted(ticks + clustered)]


@settings(max_examples=150, deadline=None)
@given(request_sequences())
def test_decisions_match_exact_gcra_over_any_request_sequence(case: tuple[RateLimit, list[Fraction]]) -> None:
    rate, times = case
    results = simulate((rate,), [float(t) for t in times])
    assert [o.allowed for _, o in results] == exact_gcra(rate, times)


@settings(max_examples=150, deadline=None)
@given(request_sequences())
def test_allowed_requests_never_exceed_burst_plus_refill_in_any_window(case: tuple[RateLimit, list[Fraction]]) -> None:
    """The GCRA bound: in any window of length W at most L + W * L / P requests get through."""
    rate, times = case
    allowed = [now for now, o in simulate((rate,), [float(t) for t in times]) if o.allowed]
    for i in range(len(allowed)):
        for j in range(i, len(allowed)):
            window = allowed[j] - allowed[i]
            assert j - i + 1 <= rate.limit + window * rate.limit / rate.period_seconds + 1e-6
    # and never more than L at one instant
    for now in set(allowed):
        assert allowed.count(now) <= rate.limit


@settings(max_examples=200, deadline=None)
@given(limits_per_period, periods, small_nows, st.integers(1, 50))
def test_requests_spaced_by_period_over_limit_are_never_denied(limit: int, period: int, start: float, count: int) -> None:
    rate = RateLimit(limit, period)
    spacing = period / limit
    results = simulate((rate,), [start + i * spacing * 1.000001 for i in range(count)])
    assert all(o.allowed for _, o in results)


# --- large clock values -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limit", "period", "now"),
    [
        (3, 1, 1e7),  # ~116 days of uptime: only 2 of 3 allowed
        (5, 1, 1.7e9),  # a time.time() clock: only 4 of 5 allowed
        (1000, 3600, 1e5),  # ~28 hours of uptime: only 999 of 1000 allowed
        (41, 1, 1e4),  # ~3 hours of uptime: all 41 allowed, but `remaining` skips a value
    ],
)
def test_burst_at_one_instant_with_a_large_clock_value(limit: int, period: int, now: float) -> None:
    outcomes, _ = burst(RateLimit(limit, period), now)
    allowed = [o for o in outcomes if o.allowed]
    assert [o.remaining for o in allowed] == list(range(limit - 1, -1, -1))
    assert outcomes[-1].retry_after == pytest.approx(period / limit, abs=1e-9)


def test_remaining_is_a_whole_count_within_bounds() -> None:
    rate = RateLimit(7, 10)
    results = simulate((rate,), [float(t) / 4 for t in range(0, 80)])
    for _, outcome in results:
        assert 0 <= outcome.remaining <= rate.limit - 1
        assert isinstance(outcome.remaining, int)
        assert (outcome.retry_after == 0.0) == outcome.allowed
        assert math.isfinite(outcome.retry_after) and outcome.retry_after >= 0
