"""What the verified-key cache costs in memory per cached key (issue 10: at most 1 KB).

N keys are written into a fresh SQLite database, migrated with the project's migrations, with the columns
CreateApiKey would give them: accounts of KEYS_PER_ACCOUNT keys, some in projects, each with a display
name, for half a description, 2-3 scopes such as `messages:send:{mail.customer-000042.com}` whose value is
the account's domain, two labels, creation, update and last-used times, for some an expiry or a rate limit,
and a real argon2id hash of its own secret (with the cheapest parameters: the hash is not what is measured).

Then, in a fresh process, the store reads the keys (Repository.list_keys, a page per account: the same rows
through the same conversion as find_by_lookup_id, so each ApiKey holds what the store really hands out, its
own str, dict and datetime objects per row) and each key's string (keys.generate, the real format) is checked
through Authorizer.identify: a first check, which misses, verifies the secret with argon2 on the verification
pool and puts the entry in through VerifiedKeyCache.put, then a second check of every string in another
order, which hits and reorders the LRU as a cache in use does. Nothing of an entry is built by hand.

Per key: the traced Python memory (tracemalloc) after the checks minus before, over N; and, in another fresh
process without tracemalloc (whose own tables would count), the resident set (RSS) after minus before, over
N, which also counts the allocator's rounding and fragmentation (and SQLite's page cache, a few MB). The key
strings are made before the measurement starts: the cache never keeps them.

Run alone with `python -m bench.cache_memory [N]`; a few minutes for 100,000 keys, most of it writing the
keys and tracemalloc.
"""

import asyncio
import gc
import multiprocessing
import os
import random
import sys
import tempfile
import threading
import time
import tracemalloc
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import insert

from apikeyd.authorizer.authorizer import Authorizer
from apikeyd.authorizer.cache import CachedKey, VerifiedKeyCache
from apikeyd.authorizer.hashing import Argon2Parameters, SecretHasher
from apikeyd.domain import keys
from apikeyd.domain.listing import Filter
from apikeyd.domain.model import ApiKey, Credentials
from apikeyd.store import migrate
from apikeyd.store.models import ApiKeyRow
from apikeyd.store.repository import Repository

KEYS = 100_000
KEYS_PER_ACCOUNT = 50
TARGET_BYTES = 1024  # per cached key (issue 10)
CONCURRENT_CHECKS = 16  # first checks in flight at once, as a busy server would have them
_CHEAPEST_ARGON2 = Argon2Parameters(time_cost=1, memory_cost_kib=8, parallelism=1)
_NO_EXPIRY = 86_400.0  # the cache TTL: no entry may expire between its two checks, however slow the machine
_PROJECTS = ("", "", "", "web-frontend", "mobile-app")  # most keys account-wide, some in one of two projects
_SERVICES = ("billing", "notifications", "checkout", "support", "marketing")


@dataclass(frozen=True)
class CacheMemory:
    keys: int
    traced_bytes_per_key: float
    rss_bytes_per_key: float
    seconds: float  # for the checks, under tracemalloc

    def lines(self) -> list[tuple[str, str]]:
        within = "within" if self.traced_bytes_per_key <= TARGET_BYTES else "OVER"
        return [
            ("cache memory", f"{self.keys:,} verified keys cached through Authorizer.identify"),
            ("  traced per key", f"{self.traced_bytes_per_key:,.0f} B ({within} the {TARGET_BYTES} B target)"),
            ("  RSS per key", f"{self.rss_bytes_per_key:,.0f} B"),
            ("  total traced", f"{self.traced_bytes_per_key * self.keys / 1e6:,.1f} MB"),
        ]


def _row(index: int, secret_hash: str, now: datetime) -> tuple[str, dict[str, Any]]:
    """One key's row as CreateApiKey writes it (lifecycle.py, Repository._create), and its key string."""
    account = index // KEYS_PER_ACCOUNT
    project_id = _PROJECTS[index % len(_PROJECTS)]
    prefix = "AKP_" if project_id else "AK_"
    presented, parsed = keys.generate(prefix, keys.new_lookup_id())
    domain = f"mail.customer-{account:06d}.com"
    service = _SERVICES[index % len(_SERVICES)]
    scopes = [f"messages:send:{{{domain}}}", "messages:read"] + ([f"domains:read:{{{domain}}}"] if index % 2 else [])
    created = now - timedelta(days=index % 365)
    row = {
        "key_id": str(uuid.uuid4()),
        "account_id": f"customer-{account:06d}",
        "project_id": project_id,
        "display_name": f"{service} worker {index % KEYS_PER_ACCOUNT}",
        "description": f"Sends the {service} messages of the production cluster." if index % 2 else "",
        "scopes": scopes,
        "labels": {"env": "prod" if index % 4 else "staging", "team": service},
        "state": "ACTIVE",
        "prefix": prefix,
        "lookup_id": parsed.lookup_id,
        "masked_key": keys.mask(presented),
        "secret_hash": secret_hash,
        "previous_secret_hash": None,
        "previous_secret_expire_time": None,
        "expire_time": now + timedelta(days=90) if index % 3 == 0 else None,
        "rate_limits": [[100, 60]] if index % 5 == 0 else [],
        "create_time": created,
        "update_time": created + timedelta(hours=index % 48),
        "last_used_time": now - timedelta(minutes=index % 600),
        "revoke_time": None,
        "revoke_reason": "",
        "revision": 1 + index % 4,
    }
    return presented, row


def _write_keys(repository: Repository, count: int) -> tuple[list[str], dict[str, str]]:
    """The key strings, and each lookup id's argon2id hash."""
    hasher = SecretHasher(_CHEAPEST_ARGON2)
    now = datetime.now(UTC)
    presented: list[str] = []
    rows: list[dict[str, Any]] = []
    for index in range(count):
        string, row = _row(index, "", now)
        parsed = keys.parse(string)
        assert parsed is not None
        row["secret_hash"] = hasher.hash(parsed.secret)
        presented.append(string)
        rows.append(row)
    with repository.engine.begin() as connection:
        connection.execute(insert(ApiKeyRow), rows)
    return presented, {row["lookup_id"]: row["secret_hash"] for row in rows}


class _ReadAhead(Repository):
    """find_by_lookup_id answered from keys the store reads a page at a time (list_keys, one page per account,
    in the order the keys are checked, each when a check first needs it): the same rows through the same
    conversion, but 100,000 reads one by one through SQLAlchemy take many minutes under tracemalloc. The
    hashes come from before the measurement: they are not kept."""

    def __init__(self, repository: Repository, hashes: dict[str, str], accounts: int) -> None:
        super().__init__(repository.engine)
        self._hashes = hashes
        self._accounts = iter(range(accounts))
        self._found: dict[str, tuple[ApiKey, Credentials]] = {}
        self._lock = threading.Lock()  # the verification pool's threads call in at once

    def find_by_lookup_id(self, lookup_id: str) -> tuple[ApiKey, Credentials] | None:
        with self._lock:
            while lookup_id not in self._found:
                account = next(self._accounts, None)
                if account is None:
                    return None
                page, _ = self.list_keys(f"customer-{account:06d}", Filter(), KEYS_PER_ACCOUNT, None)
                self._found.update((key.lookup_id, (key, Credentials(self._hashes[key.lookup_id]))) for key in page)
            return self._found.pop(lookup_id)  # once cached, the key is the cache's alone


async def _check_all(authorizer: Authorizer, presented: list[str]) -> None:
    """Every string's first check (a miss), then every string again in another order (a hit): an LRU in use
    reorders its entries, and what that costs is part of what is measured."""
    for start in range(0, len(presented), CONCURRENT_CHECKS):
        batch = presented[start : start + CONCURRENT_CHECKS]
        for found in await asyncio.gather(*(authorizer.identify(string) for string in batch)):
            assert isinstance(found, CachedKey), found
    for string in random.Random(0).sample(presented, len(presented)):
        assert isinstance(await authorizer.identify(string), CachedKey)


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _fill(database: str, presented: list[str], hashes: dict[str, str], traced: bool) -> tuple[int, float]:
    """In a process of its own: the memory that reading and checking every key leaves behind (traced, else
    RSS), in bytes, and the seconds it took."""
    repository = Repository.from_url(database)
    cache = VerifiedKeyCache(max_entries=len(presented), ttl=_NO_EXPIRY)
    accounts = -(-len(presented) // KEYS_PER_ACCOUNT)
    with ThreadPoolExecutor(4) as executor:
        gc.collect()
        if traced:
            tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0] if traced else _rss()
        started = time.perf_counter()
        read = _ReadAhead(repository, hashes, accounts)
        authorizer = Authorizer(read, SecretHasher(_CHEAPEST_ARGON2), cache, executor)
        asyncio.run(_check_all(authorizer, presented))
        del authorizer, read
        seconds = time.perf_counter() - started
        gc.collect()
        after = tracemalloc.get_traced_memory()[0] if traced else _rss()
    assert len(cache) == cache.stats.misses == cache.stats.hits == len(presented)
    return after - before, seconds


def measure(count: int = KEYS) -> CacheMemory:
    """Each figure in a fresh process (spawned), so that neither the rows written here nor tracemalloc's own
    tables (which inflate the RSS) count."""
    with tempfile.TemporaryDirectory(prefix="apikeyd-cache-memory-") as directory:
        database = f"sqlite:///{Path(directory) / 'keys.db'}"
        repository = Repository.from_url(database)
        migrate.upgrade(repository.engine)
        presented, hashes = _write_keys(repository, count)
        repository.close()
        with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
            rss, _ = pool.apply(_fill, (database, presented, hashes, False))
            traced, seconds = pool.apply(_fill, (database, presented, hashes, True))
    return CacheMemory(count, traced / count, rss / count, seconds)


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else KEYS
    for label, text in measure(count).lines():
        print(f"{label:<18} {text}")


if __name__ == "__main__":
    main()
