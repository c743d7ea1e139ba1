"""The Authorize decision. A cache hit is plain Python on the event loop: no database, no argon2, no
await. A miss does one indexed read and one argon2 verification on a small thread pool, shared by every
concurrent miss of the same string, so cached checks keep flowing while it runs. Misses are admitted by the
failure budget of their lookup id (budget.py) and take turns on the pool by lookup id (fairqueue.py), so a
flood of guesses for one key costs a few verifications and never holds every thread.

When the database does not answer, a miss of a key this process verified before is answered from its
entry within the cache's stale-if-error window (cache.py); any other miss is UNAVAILABLE. For
`_DATABASE_RETRY` seconds after such a failure (or until a health ping or a read of the change feed
succeeds), misses do not try the database again: a database that hangs must not make every check wait for its timeout."""

import asyncio
import contextvars
import dataclasses
import functools
import logging
import time
from collections.abc import Coroutine, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from apikeyd.authorizer.budget import FailureBudget
from apikeyd.authorizer.cache import CachedKey, VerifiedKeyCache
from apikeyd.authorizer.fairqueue import FairQueue, QueueFull
from apikeyd.authorizer.hashing import SecretHasher
from apikeyd.authorizer.metering import Meter
from apikeyd.authorizer.ratelimits import LocalRateLimiter
from apikeyd.authorizer.redis_ratelimits import RedisRateLimiter
from apikeyd.authorizer.usage import UsageCounter
from apikeyd.domain import decide, keys
from apikeyd.domain.access import Caller
from apikeyd.domain.credits import validate_cost
from apikeyd.domain.decision import MALFORMED, NOT_FOUND, Decision
from apikeyd.domain.errors import Unavailable
from apikeyd.domain.model import ApiKey
from apikeyd.domain.scopes import ScopeSet, parse_required_scopes
from apikeyd.logs import fields
from apikeyd.metrics import Metrics
from apikeyd.store.repository import Repository

log = logging.getLogger(__name__)

Match = Literal["current", "previous", "none"]

_DATABASE_RETRY = 1.0  # seconds after a failed verification read during which misses do not try again


def _timestamp(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


def _log_decision(decision: Decision, required_scopes: Sequence[str], project_id: str) -> None:
    """At DEBUG only: one line per decision, with the key's name once its secret verified; never the key."""
    key = decision.key
    log.debug(
        "authorize: %s%s",
        decision.code.name,
        f" for {key.name}" if key is not None else "",
        extra=fields(
            event="authorize",
            code=decision.code.name,
            key=key.name if key is not None else "",
            account=key.account_id if key is not None else "",
            project=project_id,
            required_scopes=list(required_scopes),
            missing_scopes=list(decision.missing_scopes),
        ),
    )


def _usable(entry: CachedKey) -> CachedKey | Decision:
    """A verified key's entry, or the denial of a key that is no longer usable: revoked, disabled, expired."""
    denial = decide.unusable(entry, time.time())
    return entry if denial is None else denial


@dataclass(frozen=True, slots=True)
class _Request:
    """What an Authorize asks, beyond the key string."""

    required: tuple[tuple[str, tuple[str, str]], ...]  # parsed required scopes
    resource: str
    project_id: str
    caller: Caller | None
    required_scopes: Sequence[str]  # as given, for the debug line
    client_ip: str
    cost: int


@dataclass(frozen=True, slots=True)
class _Miss:
    """A well-formed string the cache cannot answer for: it needs a verification."""

    digest: bytes
    parsed: keys.ParsedKey


@dataclass(slots=True)
class _Flight:
    """A verification in flight, and the generation of its key when it began."""

    generation: int
    task: "asyncio.Task[CachedKey | None]"


class Authorizer:
    def __init__(
        self,
        repository: Repository,
        hasher: SecretHasher,
        cache: VerifiedKeyCache,
        verify_executor: Executor,
        limiter: LocalRateLimiter | RedisRateLimiter | None = None,
        metrics: Metrics | None = None,
        *,
        budget: FailureBudget | None = None,
        queue: FairQueue | None = None,
        credit_executor: Executor | None = None,
    ) -> None:
        self._repository = repository
        self._hasher = hasher
        self.cache = cache
        self._executor = verify_executor
        # Wrong secrets per lookup id (budget.py); without one, none are refused.
        self._budget = budget if budget is not None else FailureBudget(budget=0)
        # The verification pool's turns, by lookup id (fairqueue.py).
        self._queue = queue if queue is not None else FairQueue(verify_executor)
        # Rate limits and credits (metering.py); credits are spent on the store's pool, not behind argon2.
        self._meter = Meter(repository, credit_executor if credit_executor is not None else verify_executor, limiter)
        self._inflight: dict[bytes, _Flight] = {}
        self._database_failed_at = float("-inf")  # monotonic time of the last verification read that failed
        self._database_answered_at = float("-inf")  # start of the last health ping that succeeded
        self._last_used: dict[str, float] = {}
        self._previous_used: dict[str, float] = {}  # keys whose rotated-out secret was used, in its grace
        self.usage = UsageCounter()
        metrics = metrics or Metrics()
        self._decisions = metrics.decisions  # plain counters by AuthCode, read when Prometheus scrapes
        self._verification_seconds = metrics.verification_seconds

    def verifications_in_flight(self) -> int:
        """Strings being verified now, including those waiting for a thread of the verification pool."""
        return len(self._inflight)

    async def authorize(
        self,
        presented: str,
        required_scopes: Sequence[str],
        resource: str,
        project_id: str,
        caller: Caller | None = None,
        *,
        client_ip: str = "",
        cost: int = 1,
    ) -> Decision:
        """The answer for a presented key; with a calling key that is not an operator's, keys outside its
        account (or project) are answered as unknown. `client_ip` is checked against a key's IP ranges; `cost`
        is what an allowed request spends from a key with credits."""
        decision = self.check(presented, required_scopes, resource, project_id, caller, client_ip=client_ip, cost=cost)
        return decision if isinstance(decision, Decision) else await decision

    def check(
        self,
        presented: str,
        required_scopes: Sequence[str],
        resource: str,
        project_id: str,
        caller: Caller | None = None,
        *,
        client_ip: str = "",
        cost: int = 1,
    ) -> Decision | Coroutine[None, None, Decision]:
        """`authorize` without an await where none is needed: the decision itself when the cache answers and
        no shared limiter is asked, or else a coroutine that gives it. The HTTP ext_authz endpoint answers a
        cached check from its protocol callback this way, with no task and no turn of the event loop."""
        # A bad required scope is the caller's bug: InvalidArgument, not a denial.
        required = parse_required_scopes(tuple(required_scopes))
        if cost != 1:
            validate_cost(cost)
        request = _Request(required, resource, project_id, caller, required_scopes, client_ip, cost)
        found = self._identify_now(presented)
        if isinstance(found, _Miss):
            return self._authorize_miss(found, request)
        return self._conclude(found, request)

    async def _authorize_miss(self, miss: _Miss, request: "_Request") -> Decision:
        # A stale entry of a key with credits still has to spend them in the database: `_metered` refuses.
        found, stale = await self._verified_or_stale(miss)
        decision = self._conclude(found, request)
        if not isinstance(decision, Decision):
            decision = await decision
        # Said in the answer, so that a client-side cache does not keep it past the outage.
        return dataclasses.replace(decision, stale=True) if stale else decision

    def _conclude(self, found: CachedKey | Decision, request: "_Request") -> Decision | Coroutine[None, None, Decision]:
        # Reach first: a key outside the caller's account must not even show that it is revoked.
        caller = request.caller
        if caller is not None and found.key is not None and not caller.reaches(found.key):
            return self._counted(NOT_FOUND, request)
        if isinstance(found, Decision):
            return self._counted(found, request)
        decision = self._decide(found, request)
        if decision is None:  # shared rate limits or credits: the one await of a cached check
            return self._counted_later(self._metered(found, request.cost), request)
        return self._counted(decision, request)

    async def _counted_later(self, decision: Coroutine[None, None, Decision], request: "_Request") -> Decision:
        return self._counted(await decision, request)

    def _counted(self, decision: Decision, request: "_Request") -> Decision:
        self._decisions[decision.code] += 1
        if decision.key is not None:
            self.usage.count(decision.key, decision.code)
        if log.isEnabledFor(logging.DEBUG):
            _log_decision(decision, request.required_scopes, request.project_id)
        return decision

    async def identify(self, presented: str) -> CachedKey | Decision:
        """The verified key behind a presented string, or the denial that comes before knowing what it may
        do: MALFORMED, NOT_FOUND, REVOKED, DISABLED or EXPIRED. Management callers authenticate here too."""
        found = self._identify_now(presented)
        return await self._identify_miss(found) if isinstance(found, _Miss) else found

    def _identify_now(self, presented: str) -> CachedKey | Decision | _Miss:
        """`identify` as far as it goes without I/O: a miss that must be verified comes back as a _Miss."""
        digest = self.cache.digest(presented)
        entry = self.cache.get(digest)
        if entry is not None:
            return _usable(entry)
        # Only well-formed strings ever get an entry, so a hit needs no parse and no checksum.
        parsed = keys.parse(presented)
        if parsed is None:
            return MALFORMED
        if self.cache.is_known_bad(digest):
            return NOT_FOUND
        # A lookup id alone never equals a key string, so its digest is an entry of its own: an unknown
        # lookup id, remembered by `_checked`.
        if self.cache.is_known_bad(self.cache.digest(parsed.lookup_id)):
            return NOT_FOUND
        if not self.cache.verified_before(digest) and self._budget.exhausted(parsed.lookup_id):
            return NOT_FOUND
        return _Miss(digest, parsed)

    async def _identify_miss(self, miss: _Miss) -> CachedKey | Decision:
        return (await self._verified_or_stale(miss))[0]

    async def _verified_or_stale(self, miss: _Miss) -> tuple[CachedKey | Decision, bool]:
        """The fresh verification's result, or (while the database does not answer) the entry verified here
        earlier, and whether it is that stale one."""
        try:
            entry = await self._verify(miss.digest, miss.parsed)
        except Unavailable:
            entry = self.cache.stale(miss.digest)
            if entry is None:
                raise
            return _usable(entry), True
        return (NOT_FOUND if entry is None else _usable(entry)), False

    def _database_down(self) -> bool:
        """A database call failed less than _DATABASE_RETRY ago, and nothing has succeeded since: a health ping
        or a read of the change feed that began after the failure and succeeded says the database is back."""
        failed_at = self._database_failed_at
        answered_at = max(self._database_answered_at, self.cache.synced_at)
        return failed_at > answered_at and time.monotonic() - failed_at < _DATABASE_RETRY

    def database_answered(self, since: float) -> None:
        """A database call begun at monotonic time `since` succeeded (the health watcher's ping)."""
        self._database_answered_at = max(self._database_answered_at, since)

    def invalidate(self, key: ApiKey) -> None:
        """Called on this process after every committed change to a key, before the RPC returns."""
        self.cache.invalidate(key.lookup_id, key.key_id)

    # --- what a usable key may do, in the contract's order -----------------------------------------

    def _decide(self, entry: CachedKey, request: "_Request") -> Decision | None:
        """After identify: the client's address, project, scopes, then what counts. None: all passed but the
        shared rate limits or the credits, which `_metered` awaits."""
        key = entry.key
        if key.ip_ranges:
            denial = decide.outside_ranges(entry, request.client_ip)
            if denial is not None:
                return denial
        denial = decide.wrong_project(entry, request.project_id)
        if denial is not None:
            return denial
        now = time.time()
        self._last_used[key.key_id] = now
        if entry.secret_expire_at is not None:
            self._previous_used[key.key_id] = now
        denial = decide.lacking_scopes(entry, request.required, request.resource)
        if denial is not None:
            return denial
        if not key.rate_limits and not key.has_credits:
            return entry.allowed
        if self._meter.awaits(key):
            return None
        return self._meter.hit_local(key)

    async def _metered(self, entry: CachedKey, cost: int) -> Decision:
        if entry.key.has_credits and self._database_down():  # fail at once, not after a connect timeout each
            raise Unavailable("the database is unavailable and the key's credits are kept there; retry later")
        try:
            return await self._meter.decide(entry, cost)
        except Unavailable:
            self._database_failed_at = time.monotonic()  # a real attempt: recovery is a later success
            raise

    # --- misses -----------------------------------------------------------------------------------

    async def _verify(self, digest: bytes, parsed: keys.ParsedKey) -> CachedKey | None:
        """One verification per presented string at a time; a caller that goes away does not cancel it.

        A check joins a verification in flight only if the key has not changed since that verification
        began: one that began before a change may have read the old row, and a change that has returned
        must be in force for every check that arrives after it. A late check starts a fresh one instead."""
        generation = self.cache.generation(parsed.lookup_id)
        flight = self._inflight.get(digest)
        if flight is None or flight.generation != generation:
            if self._database_down():
                raise Unavailable("the database is unavailable; retry later")
            # In a context of its own: the verification serves every check that joins it and may outlive the
            # call that started it, whose log fields (its grpc context) must not be read once it has ended.
            task = asyncio.get_running_loop().create_task(
                self._verification(digest, parsed, generation), context=contextvars.Context()
            )
            flight = _Flight(generation, task)
            self._inflight[digest] = flight
            flight.task.add_done_callback(functools.partial(self._verification_done, digest, flight))
        return await asyncio.shield(flight.task)

    def _verification_done(self, digest: bytes, flight: "_Flight", _: object) -> None:
        if self._inflight.get(digest) is flight:  # a later verification of the same string may have replaced it
            del self._inflight[digest]
        if not flight.task.cancelled():
            flight.task.exception()  # the waiters re-raise it; without waiters it must not be logged as lost

    async def _verification(self, digest: bytes, parsed: keys.ParsedKey, generation: int) -> CachedKey | None:
        """`generation`: the key's generation when the verification began, before its database read."""
        started = time.perf_counter()
        try:
            checked = await self._checked(digest, parsed, generation)
        except QueueFull:
            raise  # the pool is busy, not the database
        except Unavailable:
            if time.monotonic() - self._database_failed_at > _DATABASE_RETRY * 2:  # once per outage, roughly
                log.warning(
                    "the database does not answer: keys verified here in the last %.0f s are still "
                    "authorized (APIKEYD_STALE_IF_ERROR), unknown ones get UNAVAILABLE", self.cache.stale_if_error,
                    extra=fields(event="authorize.database_unavailable"),
                )
            self._database_failed_at = time.monotonic()
            raise
        finally:
            self._verification_seconds.observe(time.perf_counter() - started)
        if checked is None:  # refused by the failure budget: never verified, so not remembered as bad either
            return None
        key, match = checked
        log.debug(
            "verified %s: %s", key.name if key is not None else "an unknown lookup id", match,
            extra=fields(event="authorize.verified", key=key.name if key is not None else "", match=match),
        )
        if key is None or match == "none":
            self.cache.remember_bad(digest, parsed.lookup_id, generation)
            return None
        verified = key.verified()
        expire_at = _timestamp(key.expire_time)
        secret_expire_at = _timestamp(key.previous_secret_expire_time) if match == "previous" else None
        entry = CachedKey(
            key=verified,
            allowed=decide.allowed(verified, expire_at, secret_expire_at),
            scopes=ScopeSet(verified.scopes),
            expire_at=expire_at,
            secret_expire_at=secret_expire_at,
            fresh_until=time.monotonic() + self.cache.ttl,
        )
        self.cache.put(digest, entry, parsed.lookup_id, generation)
        return entry

    async def _checked(
        self, digest: bytes, parsed: keys.ParsedKey, generation: int
    ) -> tuple[ApiKey | None, Match] | None:
        """`_load_and_verify` within the lookup id's failure budget, in the lookup id's turn on the pool; None
        when the budget refuses it."""
        lookup_id = parsed.lookup_id
        # A string that verified here before is no guess: it neither needs a share of the budget nor spends one.
        budgeted = not self.cache.verified_before(digest)
        if budgeted and not self._budget.admit(lookup_id):
            return None
        wrong_secret_of: str | None = None
        try:
            key, match = await self._queue.run(lookup_id, self._load_and_verify, parsed)
            if key is None:  # distinct secrets with this lookup id now cost no read until the entry expires
                self.cache.remember_bad(self.cache.digest(lookup_id), lookup_id, generation)
            elif match == "none":
                wrong_secret_of = key.name
            return key, match
        finally:
            if budgeted:
                self._budget.settle(lookup_id, wrong_secret_of)

    def _load_and_verify(self, parsed: keys.ParsedKey) -> tuple[ApiKey | None, Match]:
        """On the verification pool: the one indexed read and the one argon2 check of a miss."""
        found = self._repository.find_by_lookup_id(parsed.lookup_id)
        if found is None:
            return None, "none"
        key, credentials = found
        if key.prefix != parsed.prefix:
            return key, "none"
        if self._hasher.verify(credentials.secret_hash, parsed.secret):
            return key, "current"
        if credentials.previous_secret_hash and self._hasher.verify(credentials.previous_secret_hash, parsed.secret):
            return key, "previous"
        return key, "none"

    # --- last-used times --------------------------------------------------------------------------

    async def flush_last_used(self) -> int:
        """Write the last-used times gathered since the previous flush; Authorize never waits for this."""
        if not self._last_used:
            return 0
        batch, self._last_used = self._last_used, {}
        previous, self._previous_used = self._previous_used, {}
        times = {key_id: datetime.fromtimestamp(t, UTC) for key_id, t in batch.items()}
        previous_times = {key_id: datetime.fromtimestamp(t, UTC) for key_id, t in previous.items()}
        try:
            await asyncio.get_running_loop().run_in_executor(
                self._executor, self._repository.record_last_used, times, previous_times
            )
        except Exception:
            for kept, taken in ((self._last_used, batch), (self._previous_used, previous)):
                for key_id, t in taken.items():  # keep them for the next flush, newest wins
                    if t > kept.get(key_id, 0.0):
                        kept[key_id] = t
            log.warning("could not write %d last-used times; will retry", len(batch), exc_info=True)
            return 0
        self._meter.local.prune()
        return len(batch)
