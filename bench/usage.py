"""`python -m bench.usage`: what usage analytics costs, on this machine.

1. The hot path. Counting is one call of UsageCounter.count per decision that names a key. Its cost is
   timed in this process over 1,000 keys (a dict lookup and an increment each), against the same loop
   calling a no-op instead, interleaved over ROUNDS rounds; the difference is what counting adds to a
   check. The anchor is the server CPU one cached Authorize RPC costs in a real `apikeyd serve` (bench.
   grpc_cpu's measure, 48 calls in flight), measured in the same run: cached Authorize is CPU-bound, so
   count / anchor is the share of its throughput counting takes (target <= 3%). For a second view without
   grpc, Authorizer.check of a cached key in process, with counting on and with `usage.count` swapped for
   a no-op, interleaved: the ratio of their checks/s.
2. The read. 100 keys with a month of daily buckets (seeded through store/usage.py, as the flush writes
   them), read with one ListApiKeyUsage call (`apiKeys/-` with the 100 key_ids, 3,000 buckets) through
   `apikeyd serve`, p50/p99 over READS calls; the anchor is ListApiKeys of a page of those 100 keys on the
   same server in the same run; and what the seeding cost per 1000 keys, a flush's write. On SQLite, and on
   a fresh PostgreSQL database when 127.0.0.1:5432 answers.

Every loop is bounded in count and in time; everything is on 127.0.0.1.
"""

import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from apikeyd.app import App
from apikeyd.authorizer.usage import UsageCounter
from apikeyd.config import Settings
from apikeyd.domain.decision import AuthCode
from apikeyd.domain.model import KeyState, VerifiedKey
from apikeyd.domain.usage import Granularity, KeyCounts
from apikeyd.lifecycle import NewKey
from apikeyd.store import migrate
from apikeyd.store import usage as store_usage
from apikeyd.store.repository import Repository
from apikeyd.v1 import api_keys_pb2 as pb
from apikeyd.v1 import api_keys_pb2_grpc as pb_grpc
from bench import grpc_cpu
from bench.scaleout import POSTGRES_ADMIN_URL, postgres_database, postgres_problem
from bench.server_process import ServerProcess, create_keys, run_apikeyd, running_server

Lines = list[tuple[str, str]]
ROUNDS = 7
COUNTS = 200_000  # count calls per round
KEYS = 1000  # keys the counted calls are spread over
CHECKS = 50_000  # in-process checks per round
RPC_ROUNDS, RPC_CALLS = 5, 4000
READ_KEYS, READ_DAYS, READS = 100, 30, 50
TARGET = 0.03  # counting's share of a cached Authorize, at most
CALL_TIMEOUT = 30.0


def _verified(index: int) -> VerifiedKey:
    return VerifiedKey(f"key-{index}", "bench", "", "bench", ("messages:send:all",), {}, KeyState.ACTIVE, (), None)


def _timed(call: Callable[[VerifiedKey, AuthCode], None], keys: list[VerifiedKey]) -> float:
    """Seconds for COUNTS calls, cycling over `keys`."""
    code = AuthCode.OK
    rounds = COUNTS // len(keys)
    start = time.perf_counter()
    for _ in range(rounds):
        for key in keys:
            call(key, code)
    return time.perf_counter() - start


def count_cost() -> tuple[float, float, float]:
    """(ns per count, ns per no-op, ns counting adds): medians of interleaved rounds."""
    keys = [_verified(i) for i in range(KEYS)]
    counter = UsageCounter()

    def nothing(key: VerifiedKey, code: AuthCode) -> None:
        return None

    counted, bare = [], []
    for number in range(ROUNDS):
        pair = [(counted, counter.count), (bare, nothing)]
        for samples, call in pair if number % 2 else pair[::-1]:
            samples.append(_timed(call, keys) / COUNTS * 1e9)
        counter.take()
    added = statistics.median(a - b for a, b in zip(counted, bare))
    return statistics.median(counted), statistics.median(bare), added


class _NoUsage(UsageCounter):
    def count(self, key: VerifiedKey, code: AuthCode) -> None:
        return None


async def _checks_per_second(workdir: Path) -> tuple[float, float]:
    """Cached Authorizer.check per second with counting, and with a counter that counts nothing."""
    settings = Settings.load(environ={}, database_url=f"sqlite:///{workdir / 'usage-check.db'}", metrics_listen="")
    app = App(settings)
    migrate.upgrade(app.repository.engine)
    try:
        created = await app.manager.create(app.manager.operator("bench"), "bench", NewKey("usage", ("messages:send:all",)))
        authorizer = app.authorizer
        scopes = ("messages:send",)
        assert (await authorizer.authorize(created.secret, scopes, "", "")).allowed
        counting, silent = authorizer.usage, _NoUsage()
        rates: dict[bool, list[float]] = {True: [], False: []}
        for number in range(ROUNDS):
            for on in ((True, False) if number % 2 else (False, True)):
                authorizer.usage = counting if on else silent
                start = time.perf_counter()
                for _ in range(CHECKS):
                    authorizer.check(created.secret, scopes, "", "")
                rates[on].append(CHECKS / (time.perf_counter() - start))
        authorizer.usage = counting
        return statistics.median(rates[True]), statistics.median(rates[False])
    finally:
        app.close()


def authorize_server_cpu_us(workdir: Path) -> float:
    """Server CPU (us) per cached Authorize RPC of a real `apikeyd serve`: the anchor of part 1."""
    with running_server(workdir / "rpc") as server:
        key = create_keys(server, 1)[0]
        target = grpc_cpu.Target("Authorize", server.address, server.pid, "authorize")
        runs = grpc_cpu.measure([target], key, RPC_ROUNDS, RPC_CALLS, grpc_cpu.CONCURRENCY)["Authorize"]
    return statistics.median(run.server_cpu_us for run in runs)


def hot_path(workdir: Path) -> Lines:
    per_count, per_noop, added = count_cost()
    with_usage, without = asyncio.run(_checks_per_second(workdir))
    anchor = authorize_server_cpu_us(workdir)
    share = added / 1000 / anchor
    return [
        ("count", f"{per_count:.0f} ns a call, a no-op in the same loop {per_noop:.0f} ns: counting adds {added:.0f} ns"),
        ("Authorize RPC (anchor)", f"server CPU {anchor:.1f} us per cached call (median of {RPC_ROUNDS} rounds)"),
        ("count / Authorize", f"{share:.2%} of a cached Authorize's CPU  target <= {TARGET:.0%}  {'PASS' if share <= TARGET else 'MISS'}"),
        ("check() in process", f"{with_usage:,.0f} checks/s counting, {without:,.0f} without: ratio {with_usage / without:.3f}"),
    ]


# --- the read -----------------------------------------------------------------------------------------


def _seed(database_url: str, key_ids: list[str]) -> float:
    """Write the month as READ_DAYS flushes of every key; ms per 1000 keys flushed (3,000 upserts)."""
    repository = Repository.from_url(database_url)
    started = time.perf_counter()
    try:
        today = Granularity.DAY.start_of(datetime.now(UTC))
        for day in range(READ_DAYS):
            counted = {key_id: KeyCounts("bench", "") for key_id in key_ids}
            for entry in counted.values():
                entry.counts[AuthCode.OK], entry.counts[AuthCode.RATE_LIMITED] = 1000 + day, day
            store_usage.add(repository, (today - timedelta(days=day)).timestamp(), counted)
    finally:
        repository.close()
    return (time.perf_counter() - started) * 1e3 / (READ_DAYS * len(key_ids) / 1000)


def _latencies(call: Callable[[], object]) -> tuple[float, float]:
    call()  # a first call warms the server's caches and the channel
    samples = []
    for _ in range(READS):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1e3)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99) - 1]


def _read(server: ServerProcess, database_url: str) -> Lines:
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ApiKeyServiceStub(channel)
        create_keys(server, READ_KEYS)
        keys = stub.ListApiKeys(
            pb.ListApiKeysRequest(parent="accounts/bench", page_size=READ_KEYS), metadata=server.credential, timeout=CALL_TIMEOUT
        )
        key_ids = [key.key_id for key in keys.api_keys]
        flush_ms = _seed(database_url, key_ids)
        start = Timestamp()
        start.FromDatetime(datetime.now(UTC) - timedelta(days=READ_DAYS - 1))
        request = pb.ListApiKeyUsageRequest(
            parent="accounts/bench/apiKeys/-", granularity=pb.DAY, start_time=start, key_ids=key_ids, page_size=10_000
        )
        answer = stub.ListApiKeyUsage(request, metadata=server.credential, timeout=CALL_TIMEOUT)
        if len(answer.usage) != READ_KEYS * READ_DAYS or answer.next_page_token:
            raise RuntimeError(f"ListApiKeyUsage gave {len(answer.usage)} buckets, expected {READ_KEYS * READ_DAYS} in one page")
        usage = _latencies(lambda: stub.ListApiKeyUsage(request, metadata=server.credential, timeout=CALL_TIMEOUT))
        page = pb.ListApiKeysRequest(parent="accounts/bench", page_size=READ_KEYS)
        anchor = _latencies(lambda: stub.ListApiKeys(page, metadata=server.credential, timeout=CALL_TIMEOUT))
    return [
        ("ListApiKeyUsage", f"{READ_KEYS} keys x {READ_DAYS} days ({len(answer.usage)} buckets, one call): p50 {usage[0]:.1f} ms  p99 {usage[1]:.1f} ms"),
        ("ListApiKeys (anchor)", f"a page of {READ_KEYS} keys: p50 {anchor[0]:.1f} ms  p99 {anchor[1]:.1f} ms"),
        ("usage / anchor", f"p50 ratio {usage[0] / anchor[0]:.2f}"),
        ("flush write", f"{flush_ms:.0f} ms per 1000 keys flushed (3,000 upserts: their minute, hour and day rows)"),
    ]


def _backends(workdir: Path) -> Iterator[tuple[str, str]]:
    yield "SQLite", ""
    problem = postgres_problem()
    if problem:
        print(f"PostgreSQL: skipped: {POSTGRES_ADMIN_URL} does not answer: {problem}", flush=True)
        return
    with postgres_database("apikeyd_bench_usage") as url:
        run_apikeyd("migrate", "--database-url", url)
        yield "PostgreSQL", url


def month_for_a_hundred_keys(workdir: Path) -> Lines:
    lines: Lines = []
    for name, url in _backends(workdir):
        with running_server(workdir / f"read-{name}", database_url=url) as server:
            lines.append((f"on {name}", ""))
            lines += _read(server, url or f"sqlite:///{workdir / f'read-{name}' / 'bench.db'}")
    return lines


def usage_costs(workdir: Path) -> Lines:
    return hot_path(workdir) + month_for_a_hundred_keys(workdir)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="apikeyd-bench-usage-") as tmp:
        for label, text in usage_costs(Path(tmp)):
            print(f"{label:<24}{text}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
