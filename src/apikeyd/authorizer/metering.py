"""What counts: a usable key's rate limits and credits, decided as one, after every other check has passed.

The rate limits' budget is taken first (in process, or one Redis script) and given back if the credits
then refuse or cannot be asked, so a denied request consumes neither; an allowed one consumes both. Credits
are spent last, by one conditional write in the database, the record (authorizer/credits.py batches a hot
key's writes), so no process or replica can over-spend them and no restart of Redis can refill them.

A caller cancelled while its spend is written gets no refund: the write goes on and may commit the spend,
and an allowed request consumes both."""

import dataclasses
from concurrent.futures import Executor

from apikeyd.authorizer.cache import CachedKey
from apikeyd.authorizer.credits import CreditSpender
from apikeyd.authorizer.ratelimits import LocalRateLimiter
from apikeyd.authorizer.redis_ratelimits import RateLimitUnavailable, RedisRateLimiter
from apikeyd.domain.decision import NOT_FOUND, AuthCode, Decision
from apikeyd.domain.model import VerifiedKey
from apikeyd.domain.ratelimit import RateOutcome
from apikeyd.store.repository import Repository


def format_period(seconds: int) -> str:
    """A limit's period as people write it: `minute`, `10 s`, `hour`, `day`."""
    names = {1: "second", 60: "minute", 3600: "hour", 86400: "day"}
    return names.get(seconds) or f"{seconds} s"


def rate_decision(key: VerifiedKey, rate: RateOutcome) -> Decision:
    if not rate.allowed:
        return Decision(
            AuthCode.RATE_LIMITED,
            f"rate limit of {rate.limit} per {format_period(rate.period_seconds)} exceeded; "
            f"retry after {rate.retry_after:.3f} s",
            key,
            rate,
        )
    return Decision(AuthCode.OK, "", key, rate)


class Meter:
    def __init__(
        self, repository: Repository, credit_executor: Executor, limiter: LocalRateLimiter | RedisRateLimiter | None
    ) -> None:
        # A shared limiter is awaited; the local one is called without an await, on a cached check's path.
        self.shared: RedisRateLimiter | None = limiter if isinstance(limiter, RedisRateLimiter) else None
        self.local: LocalRateLimiter = limiter if isinstance(limiter, LocalRateLimiter) else LocalRateLimiter()
        self._credits = CreditSpender(repository, credit_executor)

    def awaits(self, key: VerifiedKey) -> bool:
        """Whether `decide` needs an await for this key: shared limits or credits."""
        return self.shared is not None or key.has_credits

    def hit_local(self, key: VerifiedKey) -> Decision:
        """A key with rate limits and no credits, with limits kept in this process: no await."""
        return rate_decision(key, self.local.hit(key.key_id, key.rate_limits))

    async def decide(self, entry: CachedKey, cost: int) -> Decision:
        """Rate limits, then credits; raises Unavailable when the credits cannot be spent."""
        key = entry.key
        rate: RateOutcome | None = None
        if key.rate_limits:
            if self.shared is None:
                rate = self.local.hit(key.key_id, key.rate_limits)
            else:
                try:
                    rate = await self.shared.hit(key.key_id, key.rate_limits)
                except RateLimitUnavailable as error:  # counted and logged by the limiter
                    if not error.allow:
                        return Decision(
                            AuthCode.RATE_LIMITED,
                            f"rate limits cannot be checked right now; retry after {error.retry_after:.3f} s",
                            key,
                            RateOutcome(False, min(limit.limit for limit in key.rate_limits), 0, error.retry_after),
                        )
            if rate is not None and not rate.allowed:
                return rate_decision(key, rate)
        if not key.has_credits:
            return entry.allowed if rate is None else rate_decision(key, rate)
        try:
            spent = await self._credits.spend(key.key_id, cost)
        except Exception:
            if rate is not None:
                await self._refund(key)
            raise
        if spent.allowed:
            return dataclasses.replace(entry.allowed, rate=rate, credits_remaining=spent.remaining)
        if rate is not None:
            await self._refund(key)
        if spent.remaining is None:  # deleted since it was verified; the feed drops it within its lease
            return NOT_FOUND
        return Decision(
            AuthCode.CREDITS_EXHAUSTED,
            f"the key has {spent.remaining} credits left and the request costs {cost}",
            key,
            expire_at=entry.expire_at,
            secret_expire_at=entry.secret_expire_at,
            credits_remaining=spent.remaining,
        )

    async def _refund(self, key: VerifiedKey) -> None:
        """Give back the rate-limit budget a request took before the credits refused it."""
        if self.shared is None:
            self.local.refund(key.key_id, key.rate_limits)
            return
        try:
            await self.shared.refund(key.key_id, key.rate_limits)
        except RateLimitUnavailable:
            pass  # counted and logged by the limiter; the budget comes back within the period anyway
