"""Verified keys by a keyed digest of the presented string, with per-key generations.

Everything here runs on the event loop thread, so it needs no locks. A mutation bumps its key's
generation; a verification that started before the bump cannot put its (possibly stale) result back.
"""

import hashlib
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from apikeyd.domain.decision import Decision
from apikeyd.domain.model import ApiKey
from apikeyd.domain.scopes import ScopeSet


@dataclass(slots=True)
class CachedKey:
    key: ApiKey
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


_MAX_GENERATIONS = 100_000


class VerifiedKeyCache:
    def __init__(
        self,
        max_entries: int = 100_000,
        ttl: float = 60.0,
        negative_ttl: float = 10.0,
        max_negative_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_entries = max_entries
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self._max_negative = max_negative_entries
        self._clock = clock
        # A per-process random key: the digest of a presented string is useless outside this process.
        self._digest_key = secrets.token_bytes(32)
        self._entries: OrderedDict[bytes, CachedKey] = OrderedDict()
        self._by_lookup_id: dict[str, set[bytes]] = {}
        self._negative: OrderedDict[bytes, float] = OrderedDict()
        self._generations: dict[str, int] = {}
        self._generation_floor = 0
        self._generation_counter = 0
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self._entries)

    def digest(self, presented: str) -> bytes:
        return hashlib.blake2b(presented.encode(), key=self._digest_key, digest_size=20).digest()

    def get(self, digest: bytes) -> CachedKey | None:
        entry = self._entries.get(digest)
        if entry is None:
            self.stats.misses += 1
            return None
        if entry.fresh_until <= self._clock():
            self._remove(digest, entry)
            self.stats.misses += 1
            return None
        self._entries.move_to_end(digest)
        self.stats.hits += 1
        return entry

    def generation(self, lookup_id: str) -> int:
        return self._generations.get(lookup_id, self._generation_floor)

    def put(self, digest: bytes, entry: CachedKey, generation: int) -> bool:
        """Cache a verification result unless its key changed since the verification started."""
        lookup_id = entry.key.lookup_id
        if self.generation(lookup_id) != generation:
            return False
        if self.max_entries <= 0:
            return False
        self._entries[digest] = entry
        self._entries.move_to_end(digest)
        self._by_lookup_id.setdefault(lookup_id, set()).add(digest)
        while len(self._entries) > self.max_entries:
            old_digest, old_entry = next(iter(self._entries.items()))
            self._remove(old_digest, old_entry)
            self.stats.evictions += 1
        return True

    def invalidate(self, lookup_id: str) -> None:
        """Forget a key at once, and make any verification of it already in flight uncacheable."""
        self._generation_counter += 1
        self._generations[lookup_id] = self._generation_counter
        if len(self._generations) > _MAX_GENERATIONS:
            # Every remembered generation is <= the counter, so raising the floor to it keeps the rule:
            # a snapshot taken before any bump still differs from what generation() now returns.
            self._generations.clear()
            self._generation_floor = self._generation_counter
        for digest in self._by_lookup_id.pop(lookup_id, ()):
            self._entries.pop(digest, None)

    def _remove(self, digest: bytes, entry: CachedKey) -> None:
        del self._entries[digest]
        digests = self._by_lookup_id.get(entry.key.lookup_id)
        if digests is not None:
            digests.discard(digest)
            if not digests:
                del self._by_lookup_id[entry.key.lookup_id]

    # --- negative cache: strings that verified as unknown or wrong --------------------------------

    def is_known_bad(self, digest: bytes) -> bool:
        deadline = self._negative.get(digest)
        if deadline is None:
            return False
        if deadline <= self._clock():
            del self._negative[digest]
            return False
        self.stats.negative_hits += 1
        return True

    def remember_bad(self, digest: bytes) -> None:
        if self.negative_ttl <= 0:
            return
        self._negative[digest] = self._clock() + self.negative_ttl
        self._negative.move_to_end(digest)
        while len(self._negative) > self._max_negative:
            self._negative.popitem(last=False)
