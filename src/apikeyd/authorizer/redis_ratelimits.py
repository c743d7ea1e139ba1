"""Rate-limit state shared by every process and replica: the same GCRA as domain/ratelimit.py, kept in
Redis (`APIKEYD_RATE_LIMIT_URL`) and decided by one Lua script per check.

One script covers all of a key's limits, so the check is atomic: every limit is read and checked before
any is written, and a denied request writes nothing. Each limit is one string key,
`{prefix}:rl:{<key_id>}:{limit}:{period}` (the braces are a Redis Cluster hash tag: a key's limits share a
slot, as one script needs), set with a PX of the period, after which an untouched limit is full again.

The clock is Redis's own (TIME inside the script), not the callers': replicas on different hosts would
otherwise each bring their own wall clock, and a few milliseconds of skew between them would hand out or
take away budget. One clock, read where the state lives, keeps the arithmetic of one process. (Redis 5+
replicates a script's effects, not the script, so TIME before writes is allowed.)

Arithmetic: Lua numbers are doubles, so a TAT as "epoch microseconds x limit" would not be exact. Each
limit stores `stamp:debt` instead, the Redis time (us) of its last accepted request and how far its TAT was
ahead of that time then, in units of 1/limit us (the emission interval P/L is then exactly P in us). The
debt is at most P*(L+1) while it is computed, so the arithmetic is exact while P(us)*(L+1) < 2^53; beyond
that doubles round (10^15 a day never counted down) and the integer reply overflows (2^63-1 came back as
-2^63). domain/model.py refuses limit x period above MAX_LIMIT_TIMES_PERIOD (9e9 request-seconds), which
keeps every accepted limit inside it. Time resolution is 1 us (TIME's).

When Redis cannot be reached, `hit` raises RateLimitUnavailable after counting
apikeyd_rate_limit_errors_total and logging at most one warning per LOG_EVERY seconds; the Authorizer
then allows or denies as APIKEYD_RATE_LIMIT_FAILURE says. After a failure, Redis is not tried again for
RETRY_AFTER seconds (each check in between fails at once instead of waiting on a dead host); the first
check after that which succeeds logs that limits are shared again.
"""

import logging
import time
from collections.abc import Iterator
from typing import NoReturn
from urllib.parse import urlsplit, urlunsplit

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from apikeyd.domain.model import RateLimit
from apikeyd.domain.ratelimit import RateOutcome
from apikeyd.logs import fields

log = logging.getLogger(__name__)

RATE_LIMIT_ERRORS = "apikeyd_rate_limit_errors_total"
FAILURE_POLICIES = ("allow", "deny")

# KEYS: one per limit. ARGV: limit, period in seconds, for each key in order.
# Returns {allowed 0/1, the tightest limit, remaining, retry_after in microseconds, the tightest's period}.
GCRA_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local allowed = 1
local best_limit, best_remaining, best_wait, best_period = 0, -1, 0, 0
local debts = {}
for i = 1, #KEYS do
  local limit = tonumber(ARGV[2 * i - 1])
  local period = tonumber(ARGV[2 * i]) * 1000000
  local debt = 0
  local stored = redis.call('GET', KEYS[i])
  if stored then
    local stamp, d = string.match(stored, '^(%d+):(%d+)$')
    if stamp then
      debt = tonumber(d) - (now - tonumber(stamp)) * limit
      if debt < 0 then debt = 0 end
    end
  end
  local new_debt = debt + period
  local excess = new_debt - period * limit
  if excess > 0 then
    local wait = math.floor(excess / limit)
    if wait * limit < excess then wait = wait + 1 end
    if allowed == 1 or wait > best_wait then
      best_limit, best_wait, best_period = limit, wait, tonumber(ARGV[2 * i])
    end
    allowed = 0
  else
    local remaining = math.floor(-excess / period)
    if remaining * period > -excess then remaining = remaining - 1 end
    if (remaining + 1) * period <= -excess then remaining = remaining + 1 end
    if allowed == 1 and (best_remaining < 0 or remaining < best_remaining) then
      best_limit, best_remaining, best_period = limit, remaining, tonumber(ARGV[2 * i])
    end
    debts[i] = new_debt
  end
end
if allowed == 0 then
  return {0, best_limit, 0, best_wait, best_period}
end
for i = 1, #KEYS do
  redis.call('SET', KEYS[i], string.format('%.0f:%.0f', now, debts[i]), 'PX', tonumber(ARGV[2 * i]) * 1000)
end
return {1, best_limit, best_remaining, 0, best_period}
"""


# Gives back one request that GCRA_SCRIPT counted and a later check refused (credits): each limit's debt, as
# of now, shrinks by one emission interval. Same KEYS and ARGV. Requests counted in between keep theirs.
REFUND_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
for i = 1, #KEYS do
  local limit = tonumber(ARGV[2 * i - 1])
  local period = tonumber(ARGV[2 * i]) * 1000000
  local stored = redis.call('GET', KEYS[i])
  if stored then
    local stamp, d = string.match(stored, '^(%d+):(%d+)$')
    if stamp then
      local debt = tonumber(d) - (now - tonumber(stamp)) * limit - period
      if debt < 0 then debt = 0 end
      redis.call('SET', KEYS[i], string.format('%.0f:%.0f', now, debt), 'PX', tonumber(ARGV[2 * i]) * 1000)
    end
  end
end
return 1
"""


class RateLimitUnavailable(Exception):
    """Redis could not answer; `allow` is the APIKEYD_RATE_LIMIT_FAILURE policy, `retry_after` a hint."""

    def __init__(self, allow: bool, retry_after: float) -> None:
        super().__init__("rate-limit state is unreachable")
        self.allow = allow
        self.retry_after = retry_after


def describe_url(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class RedisRateLimiter(Collector):
    """`await hit(key_id, limits)`, like LocalRateLimiter.hit but shared through Redis. Also a Prometheus
    collector of its own error count (registered by the App)."""

    LOG_EVERY = 30.0  # seconds between warnings while Redis stays unreachable
    RETRY_AFTER = 1.0  # seconds after a failure during which Redis is not tried
    TIMEOUT = 0.5  # seconds to connect, and to wait for an answer

    def __init__(self, url: str, prefix: str = "apikeyd", failure: str = "allow") -> None:
        if failure not in FAILURE_POLICIES:
            raise ValueError(f"rate_limit_failure must be one of {', '.join(FAILURE_POLICIES)}, got {failure!r}")
        self.url = describe_url(url)
        self.prefix = prefix
        self.allow_on_failure = failure == "allow"
        # One retry, at once, for a pooled connection that Redis closed (a restart); none for a timeout,
        # whose script may have run.
        self._client = Redis.from_url(
            url,
            socket_timeout=self.TIMEOUT,
            socket_connect_timeout=self.TIMEOUT,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        self._script = self._client.register_script(GCRA_SCRIPT)
        self._refund = self._client.register_script(REFUND_SCRIPT)
        self.errors = 0  # checks answered by the failure policy; plain int, bumped on the event loop
        self._failing = False
        self._skip_until = 0.0
        self._last_warning = -float("inf")
        self._suppressed = 0

    def _keys(self, key_id: str, limits: tuple[RateLimit, ...]) -> list[str]:
        return [f"{self.prefix}:rl:{{{key_id}}}:{rate.limit}:{rate.period_seconds}" for rate in limits]

    @staticmethod
    def _args(limits: tuple[RateLimit, ...]) -> list[int]:
        args: list[int] = []
        for rate in limits:
            args += (rate.limit, rate.period_seconds)
        return args

    async def refund(self, key_id: str, limits: tuple[RateLimit, ...]) -> None:
        """Give back one request `hit` counted; raises RateLimitUnavailable when Redis cannot answer."""
        try:
            await self._refund(keys=self._keys(key_id, limits), args=self._args(limits))
        except (RedisError, OSError, TimeoutError) as error:
            self._failed(error)

    async def hit(self, key_id: str, limits: tuple[RateLimit, ...]) -> RateOutcome:
        """Count one request against every limit, or none when any limit refuses it; raises
        RateLimitUnavailable when Redis cannot answer."""
        if self._failing and time.monotonic() < self._skip_until:
            self._failed(None)
        try:
            allowed, limit, remaining, wait_us, period = await self._script(
                keys=self._keys(key_id, limits), args=self._args(limits)
            )
        except (RedisError, OSError, TimeoutError) as error:
            self._failed(error)
        if self._failing:
            self._failing = False
            log.info(
                "rate-limit state reachable again at %s: limits are shared",
                self.url,
                extra=fields(event="rate_limit.recovered", suppressed_warnings=self._suppressed),
            )
            self._last_warning, self._suppressed = -float("inf"), 0
        return RateOutcome(bool(allowed), int(limit), int(remaining), int(wait_us) / 1_000_000, int(period))

    def _failed(self, error: BaseException | None) -> NoReturn:
        self.errors += 1
        now = time.monotonic()
        if error is not None:
            self._failing = True
            self._skip_until = now + self.RETRY_AFTER
        if now - self._last_warning >= self.LOG_EVERY:
            self._last_warning = now
            reason = f"{type(error).__name__}: {error}"[:300] if error is not None else "still unreachable"
            log.warning(
                "rate-limit state at %s unreachable (%s): %s requests of rate-limited keys%s",
                self.url,
                reason,
                "allowing" if self.allow_on_failure else "denying",
                f"; {self._suppressed} more failures since the last warning" if self._suppressed else "",
                extra=fields(
                    event="rate_limit.unreachable", reason=reason, policy="allow" if self.allow_on_failure else "deny"
                ),
            )
            self._suppressed = 0
        else:
            self._suppressed += 1
        raise RateLimitUnavailable(self.allow_on_failure, self.RETRY_AFTER)

    async def start(self) -> None:
        """Loads the script and says where limits live; an unreachable Redis is a warning, not an error."""
        try:
            await self._client.script_load(GCRA_SCRIPT)
            await self._client.script_load(REFUND_SCRIPT)
        except (RedisError, OSError, TimeoutError) as error:
            log.warning(
                "rate limits shared through %s, which does not answer yet (%s: %s); until it does, requests of "
                "rate-limited keys are %s",
                self.url,
                type(error).__name__,
                error,
                "allowed" if self.allow_on_failure else "denied",
                extra=fields(event="rate_limit.unreachable"),
            )
            return
        log.info(
            "rate limits shared through %s (key prefix %r)",
            self.url,
            self.prefix,
            extra=fields(event="rate_limit.shared", prefix=self.prefix),
        )

    async def close(self) -> None:
        try:
            await self._client.aclose()
        except (RedisError, OSError):
            pass

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            RATE_LIMIT_ERRORS.removesuffix("_total"),
            "rate-limit checks Redis could not answer, decided by APIKEYD_RATE_LIMIT_FAILURE instead",
            value=self.errors,
        )
