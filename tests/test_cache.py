"""The verified-key cache on its own, with a clock the test moves: TTL, LRU bound, generations."""

from apikeyd.authorizer.cache import CachedKey, VerifiedKeyCache
from apikeyd.domain.decision import AuthCode, Decision
from apikeyd.domain.model import KeyState, VerifiedKey
from apikeyd.domain.scopes import ScopeSet


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _entry(lookup_id: str, fresh_until: float) -> CachedKey:
    """An entry of the key with this lookup id, whose key id is `id-` and the lookup id."""
    key = VerifiedKey(
        key_id=f"id-{lookup_id}", account_id="a", project_id="", display_name="k", scopes=("x:y",), labels={},
        state=KeyState.ACTIVE, rate_limits=(), revoke_time=None,
    )
    return CachedKey(key, Decision(AuthCode.OK, "", key), ScopeSet(key.scopes), None, None, fresh_until)


def test_entries_expire_after_the_ttl():
    clock = Clock()
    cache = VerifiedKeyCache(ttl=60, clock=clock)
    digest = cache.digest("some key")
    assert cache.put(digest, _entry("l1", clock.now + 60), "l1", cache.generation("l1"))
    clock.now += 59.9
    assert cache.get(digest) is not None
    clock.now += 0.2
    assert cache.get(digest) is None
    assert len(cache) == 1  # kept where it is: stale-if-error may still need it (test_feed.py)


def test_the_least_recently_used_entry_goes_first_and_the_size_stays_bounded():
    clock = Clock()
    cache = VerifiedKeyCache(max_entries=3, clock=clock)
    digests = [cache.digest(f"key {i}") for i in range(4)]
    for i, digest in enumerate(digests[:3]):
        cache.put(digest, _entry(f"l{i}", clock.now + 60), f"l{i}", cache.generation(f"l{i}"))
    cache.get(digests[0])  # now the most recent
    cache.put(digests[3], _entry("l3", clock.now + 60), "l3", cache.generation("l3"))
    assert len(cache) == 3 and cache.stats.evictions == 1
    assert cache.get(digests[1]) is None
    assert all(cache.get(d) is not None for d in (digests[0], digests[2], digests[3]))


def test_a_verification_that_started_before_an_invalidation_is_not_cached():
    cache = VerifiedKeyCache()
    digest = cache.digest("key")
    snapshot = cache.generation("l1")
    cache.invalidate("l1", "id-l1")
    assert not cache.put(digest, _entry("l1", 1e12), "l1", snapshot)
    assert cache.get(digest) is None
    assert cache.put(digest, _entry("l1", 1e12), "l1", cache.generation("l1"))


def test_the_generation_rule_survives_forgetting_old_generations():
    cache = VerifiedKeyCache()
    snapshot = cache.generation("target")
    for i in range(100_001):  # more keys than generations are remembered for
        cache.invalidate(f"other-{i}", f"id-other-{i}")
    cache.invalidate("target", "id-target")
    for i in range(100_001):
        cache.invalidate(f"more-{i}", f"id-more-{i}")
    assert cache.generation("target") != snapshot
    assert not cache.put(cache.digest("key"), _entry("target", 1e12), "target", snapshot)


def test_invalidate_drops_every_digest_of_the_key():
    cache = VerifiedKeyCache()
    old, new = cache.digest("old secret"), cache.digest("new secret")
    cache.put(old, _entry("l1", 1e12), "l1", cache.generation("l1"))
    cache.put(new, _entry("l1", 1e12), "l1", cache.generation("l1"))
    cache.invalidate("l1", "id-l1")
    assert cache.get(old) is None and cache.get(new) is None and len(cache) == 0


def test_a_key_with_two_cached_secrets_loses_one_to_eviction_and_then_the_other_to_a_change():
    cache = VerifiedKeyCache(max_entries=2)
    old, new, other = cache.digest("old secret"), cache.digest("new secret"), cache.digest("other key")
    cache.put(old, _entry("l1", 1e12), "l1", cache.generation("l1"))
    cache.put(new, _entry("l1", 1e12), "l1", cache.generation("l1"))
    cache.put(new, _entry("l1", 1e12), "l1", cache.generation("l1"))  # verified again (its TTL had passed)
    cache.put(other, _entry("l2", 1e12), "l2", cache.generation("l2"))  # evicts `old`
    cache.invalidate("l1", "id-l1")
    assert cache.get(old) is None and cache.get(new) is None and cache.get(other) is not None and len(cache) == 1


def test_a_verified_string_is_still_known_once_its_entry_is_evicted_or_dropped_within_a_bound():
    cache = VerifiedKeyCache(max_entries=2)
    digests = [cache.digest(f"key {i}") for i in range(5)]

    def put(i: int) -> None:
        assert cache.put(digests[i], _entry(f"l{i}", 1e12), f"l{i}", cache.generation(f"l{i}"))

    for i in range(3):
        put(i)
    assert cache.get(digests[0]) is None and cache.verified_before(digests[0])  # evicted
    cache.invalidate("l1", "id-l1")
    assert cache.get(digests[1]) is None and cache.verified_before(digests[1])  # dropped by a change
    assert cache.verified_before(digests[2]) and not cache.verified_before(digests[3])
    put(3)
    put(4)  # evicts 2: of the three gone, the first to go is forgotten
    assert not cache.verified_before(digests[0])
    assert all(cache.verified_before(digest) for digest in digests[1:])


def test_bad_strings_are_remembered_for_the_negative_ttl_only():
    clock = Clock()
    cache = VerifiedKeyCache(negative_ttl=10, clock=clock)
    digest = cache.digest("wrong")
    cache.remember_bad(digest)
    clock.now += 9.9
    assert cache.is_known_bad(digest)
    clock.now += 0.2
    assert not cache.is_known_bad(digest)


def test_the_digest_is_keyed_per_process_and_never_the_string():
    a, b = VerifiedKeyCache(), VerifiedKeyCache()
    assert a.digest("AK_secret") != b.digest("AK_secret")
    assert b"AK_secret" not in a.digest("AK_secret")
