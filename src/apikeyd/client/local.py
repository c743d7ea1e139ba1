"""The client's local cache of Authorize answers, and the rules that keep it as fresh as the server's.

* **Keyed** like the server's (authorizer/cache.py, the same class): a keyed digest of the presented
  string, under a key of this process's own, never the string. Bounded in entries (`max_entries`, and
  `max_negative` strings answered NOT_FOUND) and in bytes: an answer whose entry would weigh more than
  `MAX_ENTRY_BYTES` (`weight`, an over-estimate of what tracemalloc measures) is not cached, so the entries
  hold at most max_entries x MAX_ENTRY_BYTES (80 MiB at the default 10,000; a key with one scope weighs
  about 1 KB). A TTL is the safety net.
* **The same decision.** An entry keeps what the server's answer said of the key (identity, scopes,
  expiry, state); a later check with other scopes, another project or at a later time is decided by the
  server's own rules (domain/decide.py), and a malformed string by the same parser, with no call at all.
* **What is never cached**: keys with rate limits, credits or IP ranges (every check counts or depends on
  the client's address, `has_limits`: they are asked of the server each time), keys outside the
  reach of the stream's watcher key (their changes are not sent to it), and answers that came with an
  error. NOT_FOUND is cached for `negative_ttl` and forgotten on any CREATED change, as on the server. REVOKED, DISABLED and EXPIRED are cached: the stream reports any change that would undo them.
* **Trust.** Entries are trusted only for the lease past the change stream's last heartbeat (its receipt,
  less the age the server gave it), and not at all before the first heartbeat of a stream or once the
  stream is lost; meanwhile every check is asked of the server.
* **Changes.** A reported change drops the key's entries and starts a new generation epoch, so an answer in
  flight from before the change cannot be stored (it still answers its own callers), and a check arriving
  after the change does not join a call made before it (`Miss.generation`). An answer for a key the
  stream reported changed (other than created) less than a lease (ours or the server's, the longer) before
  the call was sent is not stored either, nor a NOT_FOUND that soon after any key was created: another
  replica may not have applied the change yet (each does within the server's lease). A stream that starts afresh (not resumed) clears the cache, and nothing asked before that lease
  after its start is stored, for the same reason. An answer the server marks `stale` (given from what it
  verified before its database went away) is not stored.
* **Time.** Expiry is decided on the server's clock (`clock_offset`, from the heartbeats' send_time), so a
  host whose clock is behind does not keep allowing an expired key.
"""

import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, timedelta

from google.protobuf.timestamp_pb2 import Timestamp

from apikeyd.authorizer.cache import CachedKey, VerifiedKeyCache
from apikeyd.domain import decide, keys
from apikeyd.domain.access import Reach
from apikeyd.domain.decision import MALFORMED, NOT_FOUND, AuthCode, Decision
from apikeyd.domain.model import KeyState, VerifiedKey
from apikeyd.domain.ratelimit import RateOutcome
from apikeyd.domain.scopes import ScopeSet, parse_required_scopes
from apikeyd.v1 import api_keys_pb2 as pb

MAX_ENTRY_BYTES = 8192  # by weight(): a key of about 25 scopes of 40 characters fits
_MAX_HELD = 100_000  # recently changed key ids remembered; past this, nothing is stored for a lease
_STATES = {AuthCode.REVOKED: KeyState.REVOKED, AuthCode.DISABLED: KeyState.DISABLED}


@dataclass(frozen=True, slots=True)
class Miss:
    """A check the cache cannot answer: ask the server, then `learn` from the answer."""

    digest: bytes
    lookup_id: str
    generation: int
    sent_at: float  # monotonic


def _time(timestamp: Timestamp) -> float | None:
    return timestamp.ToDatetime(UTC).timestamp() if timestamp.seconds or timestamp.nanos else None


def decision_from_pb(response: pb.AuthorizeResponse) -> Decision:
    """The server's answer as the domain's Decision, the object every check returns."""
    code = AuthCode(response.code)
    key = None
    if response.key_id:
        key = VerifiedKey(
            key_id=response.key_id,
            account_id=response.account_id,
            project_id=response.project_id,
            display_name=response.display_name,
            scopes=tuple(response.scopes),
            labels=dict(response.labels),
            state=_STATES.get(code, KeyState.ACTIVE),
            rate_limits=(),  # not sent; a key with any is never cached (has_limits)
            revoke_time=response.revoke_time.ToDatetime(UTC) if response.HasField("revoke_time") else None,
        )
    rate = None
    if response.limit:
        retry = response.retry_after.ToTimedelta() if response.HasField("retry_after") else timedelta()
        rate = RateOutcome(response.allowed, response.limit, response.remaining, retry.total_seconds())
    return Decision(
        code,
        response.message,
        key,
        rate,
        tuple(response.missing_scopes),
        expire_at=_time(response.expire_time),
        secret_expire_at=_time(response.secret_expire_time),
        credits_remaining=response.credits_remaining if response.HasField("credits_remaining") else None,
    )


def weight(key: VerifiedKey) -> int:
    """An entry's bytes, over-estimated: its strings as Python holds them, twice over for the tuple, dict,
    ScopeSet and Decision around them (tracemalloc measures 1.6 to 1.8 times the strings), plus the rest."""
    strings = (key.key_id, key.account_id, key.project_id, key.display_name, *key.scopes, *key.labels.keys(), *key.labels.values())
    return 2 * sum(map(sys.getsizeof, strings)) + 300


class LocalCache:
    """Thread-safe: the sync client's callers and its stream thread share it under one lock."""

    def __init__(
        self,
        lease: float = 1.0,
        max_entries: int = 10_000,
        ttl: float = 60.0,
        negative_ttl: float = 10.0,
        max_negative: int = 10_000,
    ) -> None:
        self.lease = lease
        self._cache = VerifiedKeyCache(max_entries, ttl, negative_ttl, max_negative)
        self._cache.follow(lease)  # untrusted until the stream's first heartbeat
        self._lock = threading.Lock()
        # The stream's reach (its first response): answers for keys outside it are never kept, as no change
        # to them would reach this cache. None until a stream has said.
        self.reach: Reach | None = None
        # The server's own lease (the stream's first response): how long its replicas may take to apply a
        # change; the holds below last the longer of it and ours.
        self.server_lease = 0.0
        # The server's clock less this host's, from the stream's heartbeats: expiry is decided on the
        # server's time, as the server decides it, whatever this host's clock says.
        self.clock_offset = 0.0
        self._held: dict[str, float] = {}  # key id -> monotonic receipt of its last reported change
        self._created_at = float("-inf")  # monotonic receipt of the last key created
        self._hold_all_until = float("-inf")
        self.stats = self._cache.stats

    def __len__(self) -> int:
        return len(self._cache)

    @property
    def hold(self) -> float:
        """How long after a change no answer about its key is kept."""
        return max(self.lease, self.server_lease)

    @property
    def trusted(self) -> bool:
        return self._cache.trusted

    # --- checks -----------------------------------------------------------------------------------

    def lookup(
        self, presented: str, required_scopes: Sequence[str], resource: str, project_id: str
    ) -> Decision | Miss:
        """The decision, when the cache can make it; else what to ask the server. InvalidArgument for a
        malformed required scope, as the server would answer."""
        required = parse_required_scopes(tuple(required_scopes))
        with self._lock:
            digest = self._cache.digest(presented)
            entry = self._cache.get(digest)
            if entry is not None:
                return (
                    decide.unusable(entry, time.time() + self.clock_offset)
                    or decide.wrong_project(entry, project_id)
                    or decide.lacking_scopes(entry, required, resource)
                    or entry.allowed
                )
            parsed = keys.parse(presented)
            if parsed is None:
                return MALFORMED
            if self._cache.is_known_bad(digest):
                return NOT_FOUND
            return Miss(digest, parsed.lookup_id, self._cache.generation(parsed.lookup_id), time.monotonic())

    def learn(self, miss: Miss, response: pb.AuthorizeResponse) -> Decision:
        """The server's answer to a miss, kept if nothing that could make it stale happened since it was asked."""
        decision = decision_from_pb(response)
        key = decision.key
        with self._lock:
            if self._cache.generation(miss.lookup_id) != miss.generation or miss.sent_at < self._hold_all_until:
                return decision
            if response.stale:  # true while the server's database is out; maybe not once it is back
                return decision
            if decision.code is AuthCode.NOT_FOUND:
                if miss.sent_at >= self._created_at + self.hold:  # else maybe a replica that has not seen it
                    self._cache.remember_bad(miss.digest, miss.lookup_id, miss.generation)
                return decision
            # MALFORMED names no key; RATE_LIMITED, CREDITS_EXHAUSTED and IP_NOT_ALLOWED only keys with limits.
            if key is None or response.has_limits:
                return decision
            if self.reach is None or not self.reach.sees(key.account_id, key.project_id):
                return decision
            held = self._held.get(key.key_id)
            if held is not None and miss.sent_at < held + self.hold:
                return decision
            if weight(key) > MAX_ENTRY_BYTES:
                return decision
            entry = CachedKey(
                key=key,
                allowed=decide.allowed(key, decision.expire_at, decision.secret_expire_at),
                scopes=ScopeSet(key.scopes),
                expire_at=decision.expire_at,
                secret_expire_at=decision.secret_expire_at,
                fresh_until=time.monotonic() + self._cache.ttl,
            )
            self._cache.put(miss.digest, entry, miss.lookup_id, miss.generation)
        return decision

    # --- what the change stream reports -------------------------------------------------------------

    def changed(self, key_ids: Iterable[str], created: Iterable[str], received_at: float) -> None:
        """Changes to `key_ids`, of which `created` are new keys. A new key has no older state that a lagging
        replica could answer with, so only its NOT_FOUND answers are held back (for a while, none is kept)."""
        new = set(created)
        ids = [key_id for key_id in key_ids if key_id not in new]
        with self._lock:
            self._cache.apply_remote_changes([*ids, *new], bool(new))
            if new:
                self._created_at = received_at
            horizon = received_at - self.hold
            if len(self._held) + len(ids) > _MAX_HELD:
                self._held.clear()
                self._hold_all_until = max(self._hold_all_until, received_at + self.hold)
            else:
                for key_id in ids:
                    self._held.pop(key_id, None)  # reinserted last: the dict stays in receipt order
                    self._held[key_id] = received_at
                for key_id, at in list(self._held.items()):
                    if at > horizon:
                        break
                    del self._held[key_id]

    def synced(self, at: float) -> None:
        """A heartbeat: every change committed before monotonic time `at` has been reported."""
        with self._lock:
            self._cache.synced(at)

    def suspend(self) -> None:
        """The stream is lost: trust nothing until a heartbeat of its successor."""
        with self._lock:
            self._cache.suspend()

    def restart(self, started_at: float) -> None:
        """A stream that starts afresh: nothing cached before can be vouched for."""
        with self._lock:
            self._cache.clear()
            self._cache.suspend()
            self._held.clear()
            self._hold_all_until = max(self._hold_all_until, started_at + self.hold)

