"""Verified keys by a keyed digest of the presented string, with per-key generations.

Everything here runs on the event loop thread, so it needs no locks. A mutation bumps its key's
generation; a verification that started before the bump cannot put its (possibly stale) result back.

Trust. A process sees its own changes at once; other processes' changes reach it through the change feed
(authorizer/feed.py). A cache that follows a feed trusts its entries only for `lease` seconds past the
feed's last successful read (`synced`), and not at all from the moment the feed is lost (`suspend`) until
it has caught up: whatever fails or stalls, a change acknowledged elsewhere is in force here within the
lease. While not trusted, every check is verified afresh, and nothing is thrown away: the feed's catch-up
applies every event since its position, after which the entries are as good as before.

Stale if error. When a fresh verification fails because the database does not answer, `stale` hands back
the entry of a key this process verified before (even past its TTL), for `stale_if_error` seconds past the
feed's last successful read. A key whose change this process has seen has no entry to hand back: its own
changes and the feed's events drop entries outright.
"""

import hashlib
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from apikeyd.domain.decision import Decision
from apikeyd.domain.model import VerifiedKey
from apikeyd.domain.scopes import ScopeSet


@dataclass(slots=True)
class CachedKey:
    key: VerifiedKey
    allowed: Decision  # made once: the answer for every allowed check of a key without rate limits
    scopes: ScopeSet
    expire_at: float | None  # the key's expire_time, as a Unix time
    secret_expire_at: float | None  # set when the presented secret is the previous one, in its grace period
    fresh_until: float  # monotonic; the TTL safety net


@dataclass(slots=True)
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    negative_hits: int = 0
    stale_hits: int = 0  # answered from an entry while the database did not answer


_MAX_GENERATIONS = 100_000


class VerifiedKeyCache:
    def __init__(
        self,
        max_entries: int = 100_000,
        ttl: float = 60.0,
        negative_ttl: float = 10.0,
        max_negative_entries: int = 10_000,
        stale_if_error: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_entries = max_entries
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.stale_if_error = stale_if_error
        self._max_negative = max_negative_entries
        self._clock = clock
        # A per-process random key: the digest of a presented string is useless outside this process.
        self._digest_key = secrets.token_bytes(32)
        # An OrderedDict, not a plain dict: moving a hit to the end of a dict (pop, insert) leaves a hole each
        # time, so its table ends up twice the size (110 rather than 52 B an entry) and is rebuilt at once
        # every so often, which held the loop for 14 ms at 100,000 entries and 130 ms at a million.
        self._entries: OrderedDict[bytes, CachedKey] = OrderedDict()
        # Each cached key's digests, to drop its entries on a change. By key id, which both this process's
        # changes and the change feed's events (authorizer/feed.py) name. Most keys have one, kept as it is (a
        # tuple of one would cost 48 B a key); a key in its rotation's grace period has two, current and
        # previous secret, kept as a tuple.
        self._digests: dict[str, bytes | tuple[bytes, ...]] = {}
        self._negative: OrderedDict[bytes, float] = OrderedDict()
        # Digests of strings this process has verified as a key's secret whose entries have gone since
        # (dropped by a change to the key, or evicted), at most max_entries, the oldest dropped first: with
        # the entries' own, what verified_before() knows. The failure budget (budget.py) lets them through,
        # since a string that verified here is no guess, so a flood cannot lock out a secret in use once its
        # entry goes. Kept apart from the entries' digests so that a cached key costs no entry here.
        self._verified_gone: OrderedDict[bytes, None] = OrderedDict()
        self._generations: dict[str, int] = {}
        self._generation_floor = 0
        self._generation_counter = 0
        # Set by follow(): without a feed, a process sees every change itself and its cache is always in sync.
        self._lease: float | None = None
        self._synced_at = float("-inf")  # monotonic start of the feed's last successful read
        self._trusted_until = float("inf")
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self._entries)

    def digest(self, presented: str) -> bytes:
        return hashlib.blake2b(presented.encode(), key=self._digest_key, digest_size=20).digest()

    def get(self, digest: bytes) -> CachedKey | None:
        """A trusted, fresh entry; an expired one stays where it is, for `stale`, until it is replaced or
        evicted."""
        entry = self._entries.get(digest)
        if entry is None:
            self.stats.misses += 1
            return None
        now = self._clock()
        if entry.fresh_until <= now or now >= self._trusted_until:
            self.stats.misses += 1
            return None
        self._entries.move_to_end(digest)
        self.stats.hits += 1
        return entry

    def stale(self, digest: bytes) -> CachedKey | None:
        """For a check whose fresh verification failed because the database did not answer: the entry this
        process verified earlier, while the feed's last successful read is at most `stale_if_error` old."""
        entry = self._entries.get(digest)
        if entry is None:
            return None
        now = self._clock()
        synced_at = now if self._lease is None else self._synced_at
        if now - synced_at >= self.stale_if_error:
            return None
        self.stats.stale_hits += 1
        return entry

    def verified_before(self, digest: bytes) -> bool:
        """Whether this string verified as a key's secret here, even if its entry has gone since."""
        return digest in self._entries or digest in self._verified_gone

    def generation(self, lookup_id: str) -> int:
        return self._generations.get(lookup_id, self._generation_floor)

    def put(self, digest: bytes, entry: CachedKey, lookup_id: str, generation: int) -> bool:
        """Cache a verification result unless its key (by the lookup id the verification read it by) changed
        since the verification started."""
        if self.generation(lookup_id) != generation:
            return False
        if self.max_entries <= 0:
            return False
        replaced = self._entries.pop(digest, None)
        if replaced is not None:
            self._forget_digest(replaced.key.key_id, digest)
        self._entries[digest] = entry
        self._set_digests(entry.key.key_id, (*self._digests_of(entry.key.key_id), digest))
        self._verified_gone.pop(digest, None)
        while len(self._entries) > self.max_entries:
            old_digest, old_entry = self._entries.popitem(last=False)
            self._forget_digest(old_entry.key.key_id, old_digest)
            self._entry_gone(old_digest)
            self.stats.evictions += 1
        return True

    def invalidate(self, lookup_id: str, key_id: str) -> None:
        """Forget a key at once, and make any verification of it already in flight uncacheable."""
        self._generation_counter += 1
        self._generations[lookup_id] = self._generation_counter
        if len(self._generations) > _MAX_GENERATIONS:
            # Every remembered generation is <= the counter, so raising the floor above it keeps the rule:
            # a snapshot taken before any bump still differs from what generation() now returns.
            self._new_epoch()
        self._drop(key_id)

    def _drop(self, key_id: str) -> None:
        """Every cached entry of one key (one per secret presented: current and, in a rotation, previous)."""
        for digest in self._digests_of(key_id):
            del self._entries[digest]
            self._entry_gone(digest)
        self._digests.pop(key_id, None)

    def _entry_gone(self, digest: bytes) -> None:
        self._verified_gone[digest] = None
        if len(self._verified_gone) > self.max_entries:
            self._verified_gone.popitem(last=False)

    def _forget_digest(self, key_id: str, digest: bytes) -> None:
        """After its entry has gone: the digest no longer names an entry of the key."""
        self._set_digests(key_id, tuple(other for other in self._digests_of(key_id) if other != digest))

    def _digests_of(self, key_id: str) -> tuple[bytes, ...]:
        digests = self._digests.get(key_id, ())
        return (digests,) if isinstance(digests, bytes) else digests

    def _set_digests(self, key_id: str, digests: tuple[bytes, ...]) -> None:
        if not digests:
            self._digests.pop(key_id, None)
        else:
            self._digests[key_id] = digests[0] if len(digests) == 1 else digests

    # --- changes made by other processes (the change feed) ----------------------------------------

    def _new_epoch(self) -> None:
        """Make every verification in flight uncacheable: generation() of every key now returns a value
        no earlier snapshot can equal (the same step as forgetting old generations)."""
        self._generation_counter += 1
        self._generations.clear()
        self._generation_floor = self._generation_counter

    def apply_remote_changes(self, key_ids: Iterable[str], created: bool) -> None:
        """Keys changed elsewhere: drop their cached entries, make every verification now in flight
        uncacheable (its key may be one of them; events name key ids, in-flight verifications only lookup
        ids), and after a create forget the negative cache (the new key may be remembered as unknown)."""
        self._new_epoch()
        for key_id in key_ids:
            self._drop(key_id)
        if created:
            self._negative.clear()

    def clear(self) -> None:
        """Forget every entry, every negative answer and every verification in flight's right to be stored: a
        client's cache whose change stream starts afresh cannot tell which of its entries are stale."""
        self._new_epoch()
        self._entries.clear()
        self._digests.clear()
        self._negative.clear()

    # --- trust, which the change feed gives -------------------------------------------------------

    def follow(self, lease: float) -> None:
        """From now on entries are trusted only `lease` seconds past each `synced`; not yet."""
        self._lease = lease
        self._trusted_until = float("-inf")

    @property
    def trusted(self) -> bool:
        return self._clock() < self._trusted_until

    @property
    def synced_at(self) -> float:
        """Monotonic start of the feed's last successful read (-inf before the first)."""
        return self._synced_at

    def synced(self, at: float) -> None:
        """The feed has applied every event committed before monotonic time `at`."""
        if self._lease is not None and at > self._synced_at:
            self._synced_at = at
            self._trusted_until = at + self._lease

    def suspend(self) -> None:
        """The feed is lost: it may have missed events, so no entry is trusted until its next `synced`."""
        self._trusted_until = float("-inf")

    # --- negative cache: strings that verified as unknown or wrong --------------------------------

    def is_known_bad(self, digest: bytes) -> bool:
        if self._clock() >= self._trusted_until:  # the key may have been created elsewhere since
            return False
        deadline = self._negative.get(digest)
        if deadline is None:
            return False
        if deadline <= self._clock():
            del self._negative[digest]
            return False
        self.stats.negative_hits += 1
        return True

    def remember_bad(self, digest: bytes, lookup_id: str | None = None, generation: int | None = None) -> None:
        """With a generation snapshot: only if nothing changed since (a key created meanwhile elsewhere)."""
        if self.negative_ttl <= 0:
            return
        if lookup_id is not None and self.generation(lookup_id) != generation:
            return
        self._negative[digest] = self._clock() + self.negative_ttl
        self._negative.move_to_end(digest)
        while len(self._negative) > self._max_negative:
            self._negative.popitem(last=False)
