"""`python -m bench.client`: the client library (apikeyd.client) against real `apikeyd serve` processes.

Every figure is printed beside an anchor measured in the same run (a ratio where one makes sense); targets
are reported as met or missed, never asserted: this is a benchmark, not a test.

1. Cached check, in process. One `apikeyd serve` on SQLite; a sync `Client` and an `AsyncClient` (on an
   asyncio loop in a thread of its own, so its change stream keeps being read) each with the key answered
   from its cache (after the stream's first heartbeat and the lease past the stream's start). ROUNDS
   interleaved rounds of: LIB_CALLS checks per client, each timed with perf_counter_ns; a tight loop of
   checks in one thread for LOOP_SECONDS (checks/s, and the share of a core that thread got); and the
   anchor, RPC_CALLS cached Authorize RPCs from a blocking stub to the same server. Medians of the rounds;
   the speed-up is the median of the per-round RPC p50 / library p50. Every timed check must be a cache hit
   (cache.stats), or the misses are shown.
2. Revocation reaching a client: REVOKES keys, each answered from the client's cache (its hits grow), then
   RevokeApiKey on another channel, and the client polled back to back from the RPC's return to its first
   refusal (REVOKED). On SQLite (one server) and on PostgreSQL (the client streams from replica A, the
   revocation goes to replica B, so it crosses the database's LISTEN/NOTIFY feed).
3. Faults: a stream cut (SIGKILL) and a stalled server (SIGSTOP), in bench.client_faults.
4. Idle streams: 500 open change streams, and a bare grpc.aio floor, in bench.client_streams.

This module runs them all (`client_library`, section 15 of `make bench`) and holds what they share.
Linux only (/proc, signals). Every loop is bounded in count and in time; everything is on 127.0.0.1.
"""

import argparse
import asyncio
import contextlib
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from apikeyd.client import AsyncClient, AuthCode, AuthorizeError, Client, Connection, Decision
from apikeyd.v1 import api_keys_pb2 as pb
from apikeyd.v1 import api_keys_pb2_grpc as pb_grpc
from bench import load, scaleout
from bench.server_process import ServerProcess, run_apikeyd, running_server

Lines = Iterator[tuple[str, str]]

SCOPES = load.REQUIRED_SCOPES
CALL_TIMEOUT = 10.0
LEASE = 1.0  # the client's default lease
LABEL = 22

ROUNDS = 5
LIB_CALLS = 20_000  # timed cached checks per client and round
RPC_CALLS = 1_000  # timed Authorize RPCs per round
LOOP_SECONDS = 0.5  # the tight loop, per client and round
WARM_CALLS = 2_000
P50_TARGET_US = 20.0
SPEEDUP_TARGET = 30.0

REVOKES = 200  # per backend
REVOKE_WAIT = 5.0  # seconds the client may take to refuse a revoked key before the run fails
REVOKE_TARGET_MS = 250.0  # p99
CREATE_THREADS = 4

MARGIN = 0.05  # seconds past the lease an allow may still be given (scheduling, the heartbeat's transit)
RECOVER_WAIT = 10.0


def _uptime() -> str:
    try:
        with open("/proc/loadavg") as loadavg:
            one, five, fifteen = loadavg.read().split()[:3]
    except OSError:
        return "load average n/a"
    return f"load average {one}, {five}, {fifteen} on {os.cpu_count()} CPUs"


def _cuts(samples: list[float]) -> tuple[float, float]:
    """p50 and p99 (inclusive: a few samples never extrapolate past their max)."""
    if len(samples) == 1:
        return samples[0], samples[0]
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return cuts[49], cuts[98]


def _connection(server: ServerProcess, timeout: float = 2.0) -> Connection:
    # The operator's key streams every account's changes; any key with apikeys:authorize would do.
    return Connection(server.address, token=server.operator_key, timeout=timeout)


@dataclass(frozen=True)
class _Key:
    name: str
    secret: str


def _create_keys(server: ServerProcess, count: int, label: str) -> list[_Key]:
    """`count` fresh keys, a few created at once (each costs the server an argon2 hash)."""
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ApiKeyServiceStub(channel)
        with ThreadPoolExecutor(CREATE_THREADS) as pool:
            created = list(pool.map(lambda n: scaleout._create(stub, server, f"{label} {n}"), range(count)))
    return [_Key(c.api_key.name, c.secret) for c in created]


def _revoke(stub: pb_grpc.ApiKeyServiceStub, server: ServerProcess, key: _Key) -> None:
    stub.RevokeApiKey(
        pb.RevokeApiKeyRequest(name=key.name, reason="bench"), timeout=CALL_TIMEOUT, metadata=server.credential
    )


class _Receipts:
    """Wraps the client's Follower.receive to note when each heartbeat and each key's change arrived on the
    stream thread (monotonic): how long a change took to reach the client, apart from how long its first
    refusal then took."""

    def __init__(self, client: Client) -> None:
        self.heartbeat = float("-inf")
        self.changes: dict[str, float] = {}  # key id -> receipt of its last change
        receive = client.follower.receive

        def noted(response: pb.WatchApiKeyChangesResponse, received_at: float) -> None:
            for change in response.changes:
                self.changes[change.key_id] = received_at
            receive(response, received_at)
            if response.heartbeat:
                self.heartbeat = received_at

        client.follower.receive = noted  # type: ignore[method-assign]


def _ensure_cached(check: Callable[[], Decision], stats: Any, timeout: float = RECOVER_WAIT) -> None:
    """Until a check is answered from the cache (its hits grow): after the stream's first heartbeat, the lease
    past the stream's start and past the key's own last change, and the miss that stores the answer."""
    deadline = time.monotonic() + timeout
    while True:
        hits = stats.hits
        with contextlib.suppress(AuthorizeError):
            decision = check()
            if not decision.allowed:
                raise RuntimeError(f"the client refused a live key: {decision.code.name}")
            if stats.hits > hits:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the key was not answered from the client's cache within {timeout:g} s")
        time.sleep(0.02)


class _LoopThread:
    """An asyncio loop running in a thread of its own, so that the AsyncClient's stream task keeps being
    read while this thread measures something else."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="bench-asyncio", daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, Any], timeout: float = 120.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        """As asyncio.run ends: what is still pending (grpc's own tasks of closed calls) cancelled first."""

        async def cancel_the_rest() -> None:
            tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            self.run(cancel_the_rest(), timeout=10.0)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10.0)
        self.loop.close()


# --- 1. the cached check ----------------------------------------------------------------------------


@dataclass
class _Timed:
    p50_us: list[float] = field(default_factory=list)
    p99_us: list[float] = field(default_factory=list)
    per_s: list[float] = field(default_factory=list)
    core: list[float] = field(default_factory=list)  # the loop thread's CPU time over its wall time
    misses: int = 0
    refused: int = 0

    def add(self, samples_ns: list[int]) -> None:
        p50, p99 = _cuts([s / 1e3 for s in samples_ns])
        self.p50_us.append(p50)
        self.p99_us.append(p99)


def _time_sync(authorize: Callable[..., Decision], key: str, calls: int) -> tuple[list[int], int]:
    clock = time.perf_counter_ns
    samples = [0] * calls
    refused = 0
    for n in range(calls):
        start = clock()
        decision = authorize(key, SCOPES)
        samples[n] = clock() - start
        if not decision.allowed:
            refused += 1
    return samples, refused


def _loop_sync(authorize: Callable[..., Decision], key: str, seconds: float) -> tuple[float, float]:
    """Checks per second in a tight loop in this thread, and the share of a core the thread had."""
    done, start, cpu = 0, time.perf_counter(), time.thread_time()
    end = start + seconds
    while True:
        for _ in range(1000):
            authorize(key, SCOPES)
        done += 1000
        if (now := time.perf_counter()) >= end:
            break
    return done / (now - start), (time.thread_time() - cpu) / (now - start)


async def _time_async(client: AsyncClient, key: str, calls: int) -> tuple[list[int], int]:
    clock = time.perf_counter_ns
    samples = [0] * calls
    refused = 0
    authorize = client.authorize
    for n in range(calls):
        start = clock()
        decision = await authorize(key, SCOPES)
        samples[n] = clock() - start
        if not decision.allowed:
            refused += 1
    return samples, refused


async def _loop_async(client: AsyncClient, key: str, seconds: float) -> tuple[float, float]:
    done, start, cpu = 0, time.perf_counter(), time.thread_time()
    end = start + seconds
    authorize = client.authorize
    while True:
        for _ in range(1000):
            await authorize(key, SCOPES)
        done += 1000
        if (now := time.perf_counter()) >= end:
            break
    return done / (now - start), (time.thread_time() - cpu) / (now - start)


def _time_rpc(stub: pb_grpc.ApiKeyServiceStub, key: str, calls: int) -> list[int]:
    request = pb.AuthorizeRequest(key=key, required_scopes=SCOPES)
    clock = time.perf_counter_ns
    samples = [0] * calls
    for n in range(calls):
        start = clock()
        reply = stub.Authorize(request, timeout=CALL_TIMEOUT)
        samples[n] = clock() - start
        load._expect_allowed(reply)
    return samples


def _timed_line(label: str, timed: _Timed) -> tuple[str, str]:
    text = (
        f"p50 {statistics.median(timed.p50_us):.2f} us  p99 {statistics.median(timed.p99_us):.2f} us "
        f"(round p50s {min(timed.p50_us):.2f}-{max(timed.p50_us):.2f})"
    )
    if timed.per_s:
        text += (
            f"   one thread: {statistics.median(timed.per_s):,.0f} checks/s "
            f"({min(timed.per_s):,.0f}-{max(timed.per_s):,.0f}; the thread had "
            f"{statistics.median(timed.core):.2f} of a core)"
        )
    if timed.misses or timed.refused:
        text += f"  [{timed.misses} timed checks missed the cache, {timed.refused} refused]"
    return label, text


def cached_check(server: ServerProcess, key: str) -> Lines:
    loop = _LoopThread()
    client = Client(_connection(server))

    async def open_async() -> AsyncClient:
        return AsyncClient(_connection(server))

    aclient: AsyncClient = loop.run(open_async())
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.ApiKeyServiceStub(channel)
            _ensure_cached(lambda: client.authorize(key, SCOPES), client.cache.stats)
            _ensure_cached(lambda: loop.run(aclient.authorize(key, SCOPES)), aclient.cache.stats)
            _time_sync(client.authorize, key, WARM_CALLS)
            loop.run(_time_async(aclient, key, WARM_CALLS))
            _time_rpc(stub, key, WARM_CALLS // 10)
            sync, asyn, rpc = _Timed(), _Timed(), _Timed()
            speedups: dict[str, list[float]] = {"sync": [], "async": []}
            for round_number in range(ROUNDS):

                def sync_round() -> None:
                    hits = client.cache.stats.hits
                    samples, refused = _time_sync(client.authorize, key, LIB_CALLS)
                    sync.misses += LIB_CALLS - (client.cache.stats.hits - hits)
                    sync.refused += refused
                    sync.add(samples)
                    rate, core = _loop_sync(client.authorize, key, LOOP_SECONDS)
                    sync.per_s.append(rate)
                    sync.core.append(core)

                def async_round() -> None:
                    hits = aclient.cache.stats.hits
                    samples, refused = loop.run(_time_async(aclient, key, LIB_CALLS))
                    asyn.misses += LIB_CALLS - (aclient.cache.stats.hits - hits)
                    asyn.refused += refused
                    asyn.add(samples)
                    rate, core = loop.run(_loop_async(aclient, key, LOOP_SECONDS))
                    asyn.per_s.append(rate)
                    asyn.core.append(core)

                parts = [sync_round, async_round, lambda: rpc.add(_time_rpc(stub, key, RPC_CALLS))]
                shift = round_number % len(parts)  # none always runs first
                for part in parts[shift:] + parts[:shift]:
                    part()
                speedups["sync"].append(rpc.p50_us[-1] / sync.p50_us[-1])
                speedups["async"].append(rpc.p50_us[-1] / asyn.p50_us[-1])
    finally:
        client.close()
        loop.run(aclient.close())
        loop.close()
    yield (
        "",
        f"{ROUNDS} interleaved rounds: {LIB_CALLS:,} timed checks per client, a {LOOP_SECONDS:g} s tight loop each, "
        f"{RPC_CALLS:,} Authorize RPCs; medians of the rounds",
    )
    yield _timed_line("Client (sync)", sync)
    yield _timed_line("AsyncClient", asyn)
    yield _timed_line("Authorize RPC anchor", rpc)
    yield ("", "(the anchor: a blocking stub to the same server, the key cached there; the clients' streams open)")
    p50 = max(statistics.median(sync.p50_us), statistics.median(asyn.p50_us))
    low = min(statistics.median(v) for v in speedups.values())
    met = p50 <= P50_TARGET_US and low >= SPEEDUP_TARGET
    yield (
        "library vs RPC",
        "  ".join(
            f"{name} x{statistics.median(v):.0f} faster (rounds {min(v):.0f}-{max(v):.0f})"
            for name, v in speedups.items()
        )
        + f"   target p50 <= {P50_TARGET_US:g} us and >= {SPEEDUP_TARGET:g}x: {'met' if met else 'MISSED'}",
    )


# --- 2. revocation reaching a client ---------------------------------------------------------------


def _warm_all(client: Client, keys: list[_Key]) -> None:
    """Each key's first check (a miss, verified by the server), a few at once; the lease after their CREATED
    changes has passed, so the answers are stored."""
    with ThreadPoolExecutor(CREATE_THREADS) as pool:
        list(pool.map(lambda key: client.authorize(key.secret, SCOPES), keys))


def revocations(client: Client, revoker: ServerProcess, keys: list[_Key]) -> tuple[list[float], list[float], list[int]]:
    """For each key: answered from the client's cache, revoked via `revoker` on a channel of its own, then
    the client polled back to back; seconds from the RPC's return to the first refusal, and to the change's
    receipt on the client's stream thread; and the polls."""
    delays, received, polls = [], [], []
    receipts = _Receipts(client)
    with grpc.insecure_channel(revoker.address) as channel:
        stub = pb_grpc.ApiKeyServiceStub(channel)
        for key in keys:
            _ensure_cached(lambda k=key: client.authorize(k.secret, SCOPES), client.cache.stats)
            _revoke(stub, revoker, key)
            returned = time.monotonic()
            count = 0
            while True:
                count += 1
                decision = client.authorize(key.secret, SCOPES)
                now = time.monotonic()
                if not decision.allowed:
                    if decision.code is not AuthCode.REVOKED:
                        raise RuntimeError(f"the client answered {decision.code.name}, not OK or REVOKED")
                    delays.append(now - returned)
                    polls.append(count)
                    break
                if now - returned > REVOKE_WAIT:
                    raise RuntimeError(f"the client still allowed a key {REVOKE_WAIT:g} s after it was revoked")
            got = receipts.changes.get(key.name.rsplit("/", 1)[1])
            if got is not None:  # else the refusal came from the server before the stream told the client
                received.append(got - returned)
    return delays, received, polls


def _revocation_lines(label: str, delays: list[float], received: list[float], polls: list[int], where: str) -> Lines:
    p50, p99 = _cuts(delays)
    yield (
        label,
        f"first refusal p50 {p50 * 1e3:.1f} ms  p99 {p99 * 1e3:.1f} ms  max {max(delays) * 1e3:.1f} ms  "
        f"({len(delays)} keys; {where})  target p99 <= {REVOKE_TARGET_MS:g} ms: "
        f"{'met' if p99 * 1e3 <= REVOKE_TARGET_MS else 'MISSED'}",
    )
    if received:
        r50, r99 = _cuts(received)
        yield (
            "",
            f"the change on the client's stream thread after p50 {r50 * 1e3:.1f} ms  p99 {r99 * 1e3:.1f} ms; the "
            f"refusal then takes one Authorize RPC, a cold check on the server (the change drops the entry); "
            f"polled back to back from one thread (median {statistics.median(polls):.0f} polls), which holds the GIL",
        )


# --- the section ------------------------------------------------------------------------------------


def client_library(workdir: Path) -> Lines:
    """Section 15 of `make bench`, as (label, text) lines, yielded as they are measured."""
    # The faults below make the client log its stream's failures (a WARNING each); they are expected here.
    follow_log = logging.getLogger("apikeyd.client.follow")
    level = follow_log.level
    follow_log.setLevel(logging.ERROR)
    try:
        yield from _client_library(workdir)
    finally:
        follow_log.setLevel(level)


def _client_library(workdir: Path) -> Lines:
    # Imported here: those modules import this one's helpers (and `python -m bench.client` runs it as __main__).
    from bench import client_faults, client_streams

    yield ("", f"{_uptime()} at the start (other programs' load makes every figure noisier)")
    sqlite_dir = workdir / "client-sqlite"
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(running_server(sqlite_dir, name="client-sqlite"))
        keys = _create_keys(server, 1 + REVOKES + client_faults.CUTS, "client")
        warm, revoked, cut_keys = keys[0], keys[1 : 1 + REVOKES], keys[1 + REVOKES :]
        time.sleep(LEASE + MARGIN)  # past the hold after each key's CREATED change
        yield from cached_check(server, warm.secret)
        with Client(_connection(server)) as client:
            _ensure_cached(lambda: client.authorize(warm.secret, SCOPES), client.cache.stats)
            _warm_all(client, revoked)
            delays, received, polls = revocations(client, server, revoked)
        yield from _revocation_lines(
            "revoke -> client", delays, received, polls, "SQLite, one server, revoked on another channel"
        )
        revoker = stack.enter_context(running_server(sqlite_dir, name="client-sqlite-revoker"))
        cuts = client_faults.stream_cuts(stack, server, revoker, sqlite_dir, cut_keys)
        yield from client_faults.fault_lines(cuts, [])
    if problem := scaleout.postgres_problem():
        yield ("PostgreSQL", f"skipped: {scaleout.POSTGRES_ADMIN_URL} does not answer: {problem}")
    else:
        with scaleout.postgres_database("apikeyd_bench_client") as url:
            run_apikeyd("migrate", "--database-url", url)
            with (
                running_server(workdir / "client-pg", url, name="replica-a") as a,
                running_server(workdir / "client-pg", url, name="replica-b") as b,
            ):
                keys = _create_keys(b, REVOKES + client_faults.STALLS, "client")
                time.sleep(LEASE + MARGIN)
                with Client(_connection(a)) as client:
                    _warm_all(client, keys[:REVOKES])
                    delays, received, polls = revocations(client, b, keys[:REVOKES])
                yield from _revocation_lines(
                    "revoke -> client", delays, received, polls, "PostgreSQL, client on replica A, revoked via B"
                )
                yield from client_faults.fault_lines([], client_faults.stalls(a, b, keys[REVOKES:]))
    yield from client_streams.idle_streams(workdir)
    yield ("", f"{_uptime()} at the end")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.client", description=__doc__.split("\n")[0])
    parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="apikeyd-bench-client-") as tmp:
        for label, text in client_library(Path(tmp)):
            print(f"{label:<{LABEL}}{text}", flush=True)
    print(f"{'':<{LABEL}}({time.monotonic() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
