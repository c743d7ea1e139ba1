"""Credits: a key's budget of uses, and its refill. Pure arithmetic; the store applies it in the one
conditional write that spends (store/credits.py), so a balance is exact however many processes spend it.

A refill is due at `next_refill`; when a spend finds it passed, the refills that have come due since are
applied first, then the cost is taken: REPLACE sets the balance to the amount (several missed intervals
still give one amount), ADD adds the amount once per interval, up to the cap. Calendar intervals fall at
00:00 UTC (each day, or the first of each month); a duration counts from when the refill was set.
"""

import enum
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from apikeyd.domain.errors import InvalidArgument

MAX_CREDITS = 10**15  # far below int64, so that a cap plus a refill amount can never overflow a column
MAX_COST = 10**9
MIN_REFILL_INTERVAL = timedelta(seconds=1)
MAX_REFILL_INTERVAL = timedelta(days=366)


class Calendar(enum.Enum):
    DAILY = "daily"
    MONTHLY = "monthly"


class RefillMode(enum.Enum):
    REPLACE = "replace"
    ADD = "add"


@dataclass(frozen=True, slots=True)
class Refill:
    amount: int
    mode: RefillMode = RefillMode.REPLACE
    calendar: Calendar | None = None
    every: timedelta | None = None  # exactly one of calendar and every
    cap: int = 0  # ADD only; 0 means `amount`

    @property
    def ceiling(self) -> int:
        return self.cap or self.amount

    def next_after(self, due: datetime, now: datetime) -> tuple[int, datetime]:
        """How many refills have come due from `due` (itself one of them) up to `now`, and the next due."""
        if self.every is not None:
            periods = (now - due) // self.every + 1
            return periods, due + periods * self.every
        periods, following = 1, self._calendar_step(due)
        while following <= now:  # a daily refill missed for a year steps 365 times: microseconds
            periods, following = periods + 1, self._calendar_step(following)
        return periods, following

    def first_due(self, now: datetime) -> datetime:
        """The first refill after credits are set at `now`."""
        if self.every is not None:
            return now + self.every
        return self._calendar_step(now)

    def _calendar_step(self, after: datetime) -> datetime:
        """The first calendar boundary strictly after `after`."""
        day = after.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        if self.calendar is Calendar.DAILY:
            return day + timedelta(days=1)
        month = day.replace(day=1)
        return month.replace(year=month.year + 1, month=1) if month.month == 12 else month.replace(month=month.month + 1)


@dataclass(frozen=True, slots=True)
class Credits:
    remaining: int
    refill: Refill | None = None
    next_refill: datetime | None = None  # set by the store: when the next refill is due

    def refilled(self, now: datetime) -> "Credits":
        """The balance at `now`, with every refill that has come due applied."""
        if self.refill is None or self.next_refill is None or now < self.next_refill:
            return self
        periods, following = self.refill.next_after(self.next_refill, now)
        if self.refill.mode is RefillMode.REPLACE:
            remaining = self.refill.amount
        else:
            ceiling = self.refill.ceiling
            remaining = self.remaining if self.remaining >= ceiling else min(ceiling, self.remaining + periods * self.refill.amount)
        return Credits(remaining, self.refill, following)


def set_at(credits: Credits | None, now: datetime) -> Credits | None:
    """Credits as set (created or replaced) at `now`: the refill's first interval starts then."""
    if credits is None or credits.refill is None:
        return credits
    return Credits(credits.remaining, credits.refill, credits.refill.first_due(now))


def validate_credits(credits: Credits | None, field: str = "credits") -> Credits | None:
    if credits is None:
        return None
    if not 0 <= credits.remaining <= MAX_CREDITS:
        raise InvalidArgument(f"{field}.remaining", f"must be from 0 to {MAX_CREDITS}, got {credits.remaining}")
    refill = credits.refill
    if refill is not None:
        where = f"{field}.refill"
        if not 1 <= refill.amount <= MAX_CREDITS:
            raise InvalidArgument(f"{where}.amount", f"must be from 1 to {MAX_CREDITS}, got {refill.amount}")
        if (refill.calendar is None) == (refill.every is None):
            raise InvalidArgument(where, "needs exactly one interval: `calendar` (DAILY or MONTHLY) or `every` (a duration)")
        if refill.every is not None and not MIN_REFILL_INTERVAL <= refill.every <= MAX_REFILL_INTERVAL:
            raise InvalidArgument(f"{where}.every", f"must be from 1 second to 366 days, got {refill.every.total_seconds():g} s")
        if refill.mode is RefillMode.REPLACE and refill.cap:
            raise InvalidArgument(f"{where}.cap", "applies only to mode ADD; leave it unset with REPLACE")
        if refill.cap and not refill.amount <= refill.cap <= MAX_CREDITS:
            raise InvalidArgument(
                f"{where}.cap", f"must be from the amount ({refill.amount}) to {MAX_CREDITS}, got {refill.cap}"
            )
    return Credits(credits.remaining, refill)


def validate_cost(cost: int) -> int:
    if not 0 <= cost <= MAX_COST:
        raise InvalidArgument("cost", f"must be from 0 to {MAX_COST}, got {cost}")
    return cost
