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
3. Faults. (a) Stream cut: the server SIGKILLed while the client polls a cached key: the time to its first
   non-allow, and the allows it gave after the kill (from the cache, before it saw the stream end); the key
   revoked meanwhile through a second server on the same SQLite file, and the server started again on the
   same port: from the revocation on, no check may allow (the cache is untrusted until the resumed stream
   has replayed what it missed). (b) Stalled server (PostgreSQL): the client streams from A; A is
   SIGSTOPped, the key revoked via B, and the client polled: the time from SIGSTOP to its first non-allow (a
   check that was not answered allow: the cache no longer trusted, the stopped server not answering within
   the client's deadline), and how long past the last heartbeat it received the client still allowed,
   against the lease (1 s). Then SIGCONT, and the key must be refused, never allowed again.
4. Idle streams: a child process opens STREAMS WatchApiKeyChanges streams, one connection each (as
   STREAMS client processes would), each read from its first response on. The server's cached Authorize
   latency (blocking stub) and throughput (48 in flight) with and without them, in interleaved rounds (the
   streams are opened and closed between), with the server's CPU per call and at rest (the heartbeats), and
   its VmRSS growth per open stream; then the same streams over MUX_CONNECTIONS connections on a fresh
   server (what is per connection, what per stream), and both against a floor: a bare grpc.aio servicer
   writing the same heartbeats on uvloop, as `apikeyd serve` runs.

Linux only (/proc, signals). Every loop is bounded in count and in time; everything is on 127.0.0.1.
"""

import argparse
import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection as Pipe
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

CUTS = 5  # SIGKILL and restart: each costs a server start
STALLS = 10  # SIGSTOP, revoke elsewhere, SIGCONT
STALL_TIMEOUT = 0.5  # the client's call deadline in the stall trials: how long a check waits on the stopped server
MARGIN = 0.05  # seconds past the lease an allow may still be given (scheduling, the heartbeat's transit)
RECOVER_WAIT = 10.0

STREAMS = 500
STREAM_ROUNDS = 4
STREAM_SEQUENTIAL = 1_000
STREAM_THROUGHPUT = 1.0  # seconds, 48 in flight
STREAM_SETTLE = 1.0  # seconds after the streams are open or closed before anything is measured
STREAM_OPEN_TIMEOUT = 60.0
MUX_CONNECTIONS = 5  # the same streams over few connections: what is per connection, what per stream


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


def _credential(server: ServerProcess) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {server.operator_key}")]


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
        pb.RevokeApiKeyRequest(name=key.name, reason="bench"), timeout=CALL_TIMEOUT, metadata=_credential(server)
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


def _wait_trusted(client: Client, timeout: float = RECOVER_WAIT) -> float:
    """Seconds until the client's cache is trusted again (a heartbeat of its stream)."""
    start = time.monotonic()
    while not client.cache.trusted:
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"the client's cache was not trusted again within {timeout:g} s")
        time.sleep(0.005)
    return time.monotonic() - start


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


# --- 3a. the stream cut: SIGKILL, and the server started again on the same port -------------------


@dataclass(frozen=True)
class _Cut:
    to_non_allow: float  # seconds from SIGKILL to the first check not answered allow
    allows_after_kill: int  # from the cache, before the client saw its stream end
    back: float  # seconds from SIGKILL to the client's cache trusted again (the restart included)
    restart: float  # seconds the restart took, `apikeyd serve` to SERVING and an admin key made
    refused_after: float  # seconds from the revocation's return to the first REVOKED
    allows_after_revoke: int  # must be 0


def _poll_until_not_allowed(client: Client, key: str, limit: float) -> tuple[float, list[float], str]:
    """Back-to-back checks until one is not answered allow: (the start of that check, the end of each allow,
    what the non-allow was: a refusal's code or the AuthorizeError's status), monotonic."""
    deadline = time.monotonic() + limit
    allows: list[float] = []
    while time.monotonic() < deadline:
        start = time.monotonic()
        try:
            decision = client.authorize(key, SCOPES)
        except AuthorizeError as error:
            return start, allows, error.code.name
        if not decision.allowed:
            return start, allows, decision.code.name
        allows.append(time.monotonic())
    raise RuntimeError(f"the client still allowed the key {limit:g} s on")


class _Poller:
    """A thread checking a key back to back (1 ms apart while the server cannot be asked) until it has
    seen a REVOKED and the cache trusted again; it counts every allow."""

    def __init__(self, client: Client, key: str) -> None:
        self.allows = 0
        self.refused_at: float | None = None
        self.trusted_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, args=(client, key), name="bench-poller", daemon=True)
        self._thread.start()

    def _poll(self, client: Client, key: str) -> None:
        while not self._stop.is_set() and (self.refused_at is None or self.trusted_at is None):
            if self.trusted_at is None and client.cache.trusted:
                self.trusted_at = time.monotonic()
            try:
                decision = client.authorize(key, SCOPES)
            except AuthorizeError:
                time.sleep(0.001)  # the server cannot be asked: never an allow
                continue
            if decision.allowed:
                self.allows += 1
            elif decision.code is AuthCode.REVOKED and self.refused_at is None:
                self.refused_at = time.monotonic()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        self._stop.set()
        self._thread.join(5.0)
        if self.refused_at is None or self.trusted_at is None:
            raise RuntimeError(f"the client had not refused the key and trusted its cache {timeout:g} s on")


def stream_cuts(
    stack: contextlib.ExitStack, server: ServerProcess, revoker: ServerProcess, workdir: Path, keys: list[_Key]
) -> list[_Cut]:
    """`server` SIGKILLed under a client polling a cached key; the key revoked via `revoker` (the same SQLite
    file) while it is down; `server` started again on the same port and database. From the revocation on,
    the client must never allow the key: its cache is untrusted from the cut until its resumed stream has
    replayed what it missed."""
    client = Client(_connection(server))
    cuts = []
    try:
        with grpc.insecure_channel(revoker.address) as channel:
            stub = pb_grpc.ApiKeyServiceStub(channel)
            for number, key in enumerate(keys):
                _ensure_cached(lambda k=key: client.authorize(k.secret, SCOPES), client.cache.stats)
                killed: list[float] = []

                def kill(pid: int = server.pid, killed: list[float] = killed) -> None:
                    killed.append(time.monotonic())
                    os.kill(pid, signal.SIGKILL)

                timer = threading.Timer(0.2, kill)
                timer.start()
                first_not, allows, _ = _poll_until_not_allowed(client, key.secret, 5.0)
                timer.join()
                server.process.wait(10.0)
                if first_not < killed[0]:
                    raise RuntimeError(f"the client refused the key {killed[0] - first_not:.3f} s before the kill")
                _revoke(stub, revoker, key)
                revoked = time.monotonic()
                poller = _Poller(client, key.secret)
                started = time.monotonic()
                server = stack.enter_context(running_server(workdir, address=server.address, name=f"restart-{number}"))
                restart = time.monotonic() - started
                poller.join(RECOVER_WAIT)
                assert poller.refused_at is not None and poller.trusted_at is not None
                cuts.append(
                    _Cut(
                        first_not - killed[0],
                        sum(end > killed[0] for end in allows),
                        poller.trusted_at - killed[0],
                        restart,
                        poller.refused_at - revoked,
                        poller.allows,
                    )
                )
    finally:
        client.close()
    return cuts


# --- 3b. the stalled server: SIGSTOP A, revoke via B -------------------------------------------------


@dataclass(frozen=True)
class _Stall:
    to_non_allow: float  # seconds from SIGSTOP to the start of the first check not answered allow
    last_allow_past_heartbeat: float  # the last allow's end minus the last heartbeat's receipt
    last_allow_past_trust: float  # the last allow's end minus (the last heartbeat's sync + lease): <= 0
    non_allow: str  # what the first non-allow was
    refused_after_cont: float  # seconds from SIGCONT to the first REVOKED


def stalls(a: ServerProcess, b: ServerProcess, keys: list[_Key]) -> list[_Stall]:
    client = Client(_connection(a, timeout=STALL_TIMEOUT))
    beats = _Receipts(client)
    results = []
    try:
        with grpc.insecure_channel(b.address) as channel:
            stub_b = pb_grpc.ApiKeyServiceStub(channel)
            for key in keys:
                _ensure_cached(lambda k=key: client.authorize(k.secret, SCOPES), client.cache.stats)
                time.sleep(0.1 + 0.4 * (len(results) % 5) / 5)  # SIGSTOP at varied points between heartbeats
                stopped = time.monotonic()
                os.kill(a.pid, signal.SIGSTOP)
                try:
                    _revoke(stub_b, b, key)
                    first_not, allows, what = _poll_until_not_allowed(client, key.secret, 5.0)
                    last_allow = allows[-1] if allows else float("-inf")
                    synced = client.cache._cache.synced_at  # the last heartbeat's sync point (receipt - sync_age)
                    heartbeat = beats.heartbeat
                finally:
                    os.kill(a.pid, signal.SIGCONT)
                resumed = time.monotonic()
                while True:
                    with contextlib.suppress(AuthorizeError):
                        decision = client.authorize(key.secret, SCOPES)
                        if decision.allowed:
                            raise RuntimeError("the client allowed a revoked key after its stream resumed")
                        if decision.code is AuthCode.REVOKED:
                            break
                    if time.monotonic() - resumed > RECOVER_WAIT:
                        raise RuntimeError(f"the client did not refuse the key within {RECOVER_WAIT:g} s of SIGCONT")
                refused = time.monotonic() - resumed
                _wait_trusted(client)
                results.append(
                    _Stall(
                        first_not - stopped,
                        last_allow - heartbeat,
                        last_allow - (synced + LEASE),
                        what,
                        refused,
                    )
                )
    finally:
        client.close()
    return results


def _fault_lines(cuts: list[_Cut], stall_results: list[_Stall]) -> Lines:
    if cuts:
        to = [c.to_non_allow * 1e3 for c in cuts]
        yield (
            "cut: SIGKILL",
            f"to the first non-allow max {max(to):.1f} ms  p99 {_cuts(to)[1]:.1f} ms  p50 {_cuts(to)[0]:.1f} ms; "
            f"allows after the kill (from the cache, before the stream's end was seen) max "
            f"{max(c.allows_after_kill for c in cuts)} ({len(cuts)} kills)",
        )
        refused = [c.refused_after * 1e3 for c in cuts]
        back = [c.back for c in cuts]
        yield (
            "  revoke while down",
            f"via a second server on the same SQLite file: allows after it {sum(c.allows_after_revoke for c in cuts)} "
            f"(must be 0), REVOKED after max {max(refused):.0f} ms (once the server is back); cached answers again "
            f"{min(back):.1f}-{max(back):.1f} s after the kill (restart {min(c.restart for c in cuts):.1f}-"
            f"{max(c.restart for c in cuts):.1f} s, then the client's reconnect backoff)",
        )
    if stall_results:
        to = [s.to_non_allow * 1e3 for s in stall_results]
        past = [s.last_allow_past_heartbeat * 1e3 for s in stall_results]
        trust = [s.last_allow_past_trust * 1e6 for s in stall_results]
        bound = (LEASE + MARGIN) * 1e3
        kinds = sorted({s.non_allow for s in stall_results})
        yield (
            "stall: SIGSTOP A",
            f"to the first non-allow max {max(to):.0f} ms  p99 {_cuts(to)[1]:.0f} ms  p50 {_cuts(to)[0]:.0f} ms "
            f"(lease {LEASE * 1e3:.0f} ms; {len(stall_results)} stops, revoked via B meanwhile; non-allows: "
            f"{', '.join(kinds)} after the {STALL_TIMEOUT:g} s call deadline)",
        )
        yield (
            "  last allow",
            f"after the last heartbeat's receipt max {max(past):.0f} ms  p99 {_cuts(past)[1]:.0f} ms "
            f"(bound lease + {MARGIN * 1e3:.0f} ms = {bound:.0f}: {'kept' if max(past) <= bound else 'EXCEEDED'}); "
            f"the last allow's end past the trust's end (sync + lease) max {max(trust):+.0f} us (<= one check's length)",
        )
        refused = [s.refused_after_cont * 1e3 for s in stall_results]
        yield ("  SIGCONT", f"the revoked key refused after max {max(refused):.0f} ms, never allowed again")


# --- 4. idle streams --------------------------------------------------------------------------------


async def _hold_streams(address: str, token: str, control: Pipe) -> None:
    """On command: open `streams` streams over `connections` channels of their own and read them all; close
    them; report the heartbeats received."""
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    loop = asyncio.get_running_loop()
    channels: list[grpc.aio.Channel] = []
    tasks: list[asyncio.Task[None]] = []
    heartbeats = 0

    async def follow(channel: grpc.aio.Channel, first: asyncio.Future[None]) -> None:
        nonlocal heartbeats
        call = pb_grpc.ApiKeyServiceStub(channel).WatchApiKeyChanges(pb.WatchApiKeyChangesRequest(), metadata=metadata)
        try:
            async for response in call:
                if not first.done():
                    first.set_result(None)
                heartbeats += response.heartbeat
        except grpc.RpcError as error:
            if not first.done():
                first.set_exception(error)
        finally:
            call.cancel()

    while True:
        command, argument = await loop.run_in_executor(None, control.recv)
        if command == "open":
            started = time.monotonic()
            streams, connections = argument
            options = [("grpc.use_local_subchannel_pool", 1)]  # a connection of its own, as a client process has
            channels = [grpc.aio.insecure_channel(address, options=options) for _ in range(connections)]
            firsts = []
            for number in range(streams):
                first = loop.create_future()
                firsts.append(first)
                tasks.append(asyncio.create_task(follow(channels[number % connections], first)))
            try:
                await asyncio.wait_for(asyncio.gather(*firsts), STREAM_OPEN_TIMEOUT)
                control.send(("open", time.monotonic() - started))
            except (TimeoutError, grpc.RpcError) as error:
                control.send(("failed", repr(error)))
        elif command == "count":
            control.send(("count", heartbeats))
        elif command == "close":
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for channel in channels:
                await channel.close()
            channels, tasks = [], []
            control.send(("closed", None))
        else:
            return


def _streams_main(address: str, token: str, control: Pipe) -> None:
    asyncio.run(_hold_streams(address, token, control))


class _StreamHolder:
    """The child process that holds the streams to `address`, calling with `token`."""

    def __init__(self, address: str, token: str) -> None:
        context = multiprocessing.get_context("spawn")  # this process runs gRPC, whose threads do not survive fork
        self._control, child = context.Pipe()
        self.process = context.Process(target=_streams_main, args=(address, token, child), daemon=True)
        self.process.start()
        child.close()

    def _ask(self, command: str, argument: object = None, timeout: float = STREAM_OPEN_TIMEOUT + 10.0) -> Any:
        self._control.send((command, argument))
        if not self._control.poll(timeout):
            raise RuntimeError(f"the stream process did not answer {command!r} within {timeout:g} s")
        answer, value = self._control.recv()
        if answer == "failed":
            raise RuntimeError(f"opening the streams failed: {value}")
        return value

    def open(self, streams: int, connections: int) -> float:
        return float(self._ask("open", (streams, connections)))

    def close_streams(self) -> None:
        self._ask("close")

    def heartbeats(self) -> int:
        return int(self._ask("count"))

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self._control.send(("quit", None))
        self.process.join(10.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _cpu(pid: int) -> float:
    cpu = load._server_cpu_seconds(pid)
    if cpu is None:
        raise RuntimeError("this section needs /proc")
    return cpu


# --- the floor for streams: a bare grpc.aio servicer that writes a heartbeat every feed interval ----------

FLOOR_START_TIMEOUT = 30.0
SQLITE_FEED_INTERVAL = 0.25  # apikeyd serve's feed reads SQLite this often, and heartbeats every stream after each


class _HeartbeatFloor(pb_grpc.ApiKeyServiceServicer):
    """WatchApiKeyChanges as little as grpc.aio allows: one response at once, then a constant heartbeat to
    every stream at each tick, all woken by one event as apikeyd's publish wakes its subscriptions."""

    def __init__(self) -> None:
        self._tick = asyncio.Event()
        self._first = pb.WatchApiKeyChangesResponse(position=1)
        self._beat = pb.WatchApiKeyChangesResponse(position=1, heartbeat=True)

    async def ticker(self) -> None:
        while True:
            await asyncio.sleep(SQLITE_FEED_INTERVAL)
            tick, self._tick = self._tick, asyncio.Event()
            tick.set()

    async def WatchApiKeyChanges(self, request: pb.WatchApiKeyChangesRequest, context: Any) -> None:
        await context.write(self._first)
        while True:
            await self._tick.wait()
            await context.write(self._beat)


async def _serve_floor(control: Pipe) -> None:
    servicer = _HeartbeatFloor()
    server = grpc.aio.server()
    pb_grpc.add_ApiKeyServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    ticker = asyncio.create_task(servicer.ticker())
    control.send(port)
    with contextlib.suppress(EOFError):  # the parent closing its end stops the floor
        await asyncio.get_running_loop().run_in_executor(None, control.recv)
    ticker.cancel()
    await server.stop(0)


def _floor_main(control: Pipe) -> None:
    import uvloop  # the loop `apikeyd serve` runs on

    uvloop.run(_serve_floor(control))


@contextlib.contextmanager
def _floor_server() -> Iterator[tuple[str, int]]:
    """(address, pid) of a fresh floor server."""
    context = multiprocessing.get_context("spawn")
    control, child = context.Pipe()
    process = context.Process(target=_floor_main, args=(child,), daemon=True)
    process.start()
    child.close()
    try:
        if not control.poll(FLOOR_START_TIMEOUT):
            raise RuntimeError(f"the floor server did not start within {FLOOR_START_TIMEOUT:.0f} s")
        yield f"127.0.0.1:{control.recv()}", process.pid  # type: ignore[misc]
    finally:
        control.close()
        process.join(10.0)
        if process.is_alive():
            process.kill()
            process.join()


@dataclass(frozen=True)
class _FloorFigures:
    kb_per_stream: float  # one connection each
    kb_per_stream_mux: float  # MUX_CONNECTIONS connections
    cpu_us_per_heartbeat: float


def floor_streams() -> _FloorFigures:
    """The same opens against fresh floor servers: what grpc.aio itself costs per stream and per heartbeat."""
    figures = []
    for connections in (STREAMS, MUX_CONNECTIONS):
        with _floor_server() as (address, pid):
            holder = _StreamHolder(address, "")
            try:
                before = _rss_kb(pid)
                holder.open(STREAMS, connections)
                time.sleep(STREAM_SETTLE)
                kb = (_rss_kb(pid) - before) / STREAMS
                beats, cpu = holder.heartbeats(), _cpu(pid)
                time.sleep(1.0)
                beats, cpu = holder.heartbeats() - beats, _cpu(pid) - cpu
                figures.append((kb, cpu * 1e6 / beats if beats else float("nan")))
                holder.close_streams()
            finally:
                holder.stop()
    return _FloorFigures(figures[0][0], figures[1][0], figures[0][1])


@dataclass
class _StreamRound:
    p50_ms: float
    p99_ms: float
    calls_per_s: float
    server_cpu_us: float
    rest_cores: float  # the server's CPU at rest (no calls), cores
    holder_cores: float  # the stream process's CPU over the round, cores

    @property
    def busy_cpu_us(self) -> float:
        """Server CPU per call less what it spends at rest (the heartbeats) over the same time."""
        return self.server_cpu_us - self.rest_cores * 1e6 / self.calls_per_s


async def _throughput(stub: Any, key: str, pid: int) -> tuple[float, float]:
    request = pb.AuthorizeRequest(key=key, required_scopes=SCOPES)

    async def call() -> None:
        load._expect_allowed(await stub.Authorize(request, timeout=CALL_TIMEOUT))

    result = await load._throughput(call, STREAM_THROUGHPUT, pid)
    return result.calls_per_s, result.server_cpu_us or 0.0


def _stream_round(
    stub: pb_grpc.ApiKeyServiceStub, loop: _LoopThread, aio_stub: Any, key: str, pid: int, holder_pid: int
) -> _StreamRound:
    started, holder = time.monotonic(), _cpu(holder_pid)
    before = _cpu(pid)
    time.sleep(0.5)
    rest = (_cpu(pid) - before) / 0.5
    request = pb.AuthorizeRequest(key=key, required_scopes=SCOPES)
    latency = load.latency(
        load._sequential(lambda: load._expect_allowed(stub.Authorize(request, timeout=CALL_TIMEOUT)), STREAM_SEQUENTIAL)
    )
    rate, cpu_us = loop.run(_throughput(aio_stub, key, pid))
    holder_cores = (_cpu(holder_pid) - holder) / (time.monotonic() - started)
    return _StreamRound(latency.p50_ms, latency.p99_ms, rate, cpu_us, rest, holder_cores)


@contextlib.contextmanager
def _stream_target(workdir: Path, name: str) -> Iterator[tuple[ServerProcess, str, _StreamHolder, Any]]:
    """A fresh server with one key, the stream process, and a function running one measured round."""
    with running_server(workdir / name, name=name) as server:
        key = _create_keys(server, 1, "streams")[0].secret
        holder = _StreamHolder(server.address, server.operator_key)
        loop = _LoopThread()
        try:
            aio_channel = loop.run(_aio_channel(server.address))
            with grpc.insecure_channel(server.address) as channel:
                stub, aio_stub = pb_grpc.ApiKeyServiceStub(channel), pb_grpc.ApiKeyServiceStub(aio_channel)
                yield (
                    server,
                    key,
                    holder,
                    lambda: _stream_round(stub, loop, aio_stub, key, server.pid, holder.process.pid),
                )
            loop.run(aio_channel.close())
        finally:
            loop.close()
            holder.stop()


def _open_measured(server: ServerProcess, holder: _StreamHolder, connections: int) -> tuple[float, float]:
    """Open STREAMS streams over `connections`: (KB of server VmRSS per stream, seconds to open them)."""
    before = _rss_kb(server.pid)
    seconds = holder.open(STREAMS, connections)
    time.sleep(STREAM_SETTLE)
    return (_rss_kb(server.pid) - before) / STREAMS, seconds


def idle_streams(workdir: Path) -> Lines:
    rounds: dict[bool, list[_StreamRound]] = {False: [], True: []}
    per_stream: list[float] = []  # KB, at each open
    open_seconds: list[float] = []
    beats: list[float] = []  # heartbeats per second that reached the streams, per open
    with _stream_target(workdir, "client-streams") as (server, _key, holder, measure):
        measure()  # warm-up: the server's cache, the channels, the allocator
        opened, counted, at = False, 0, 0.0
        for number in range(STREAM_ROUNDS):
            for with_streams in (False, True) if number % 2 == 0 else (True, False):
                if with_streams and not opened:
                    kb, seconds = _open_measured(server, holder, STREAMS)
                    per_stream.append(kb)
                    open_seconds.append(seconds)
                    opened, counted, at = True, holder.heartbeats(), time.monotonic()
                elif not with_streams and opened:
                    beats.append((holder.heartbeats() - counted) / (time.monotonic() - at))
                    holder.close_streams()
                    time.sleep(STREAM_SETTLE)
                    opened = False
                rounds[with_streams].append(measure())
        if opened:
            beats.append((holder.heartbeats() - counted) / (time.monotonic() - at))
            holder.close_streams()
    with _stream_target(workdir, "client-streams-mux") as (server, _key, holder, measure):
        measure()  # the same warm-up, so that the two first opens compare
        mux_kb, _ = _open_measured(server, holder, MUX_CONNECTIONS)
        holder.close_streams()
    yield from _stream_lines(rounds, per_stream, open_seconds, beats, mux_kb, floor_streams())


def _stream_lines(
    rounds: dict[bool, list[_StreamRound]],
    per_stream: list[float],
    open_seconds: list[float],
    beats: list[float],
    mux_kb: float,
    floor: _FloorFigures,
) -> Lines:
    def med(values: Iterable[float]) -> float:
        return statistics.median(values)

    without, with_ = rounds[False], rounds[True]
    for label, rs in (("without streams", without), (f"with {STREAMS} streams", with_)):
        yield (
            label,
            f"cached Authorize p50 {med(r.p50_ms for r in rs):.3f} ms  p99 {med(r.p99_ms for r in rs):.3f} ms   "
            f"{med(r.calls_per_s for r in rs):,.0f} calls/s ({min(r.calls_per_s for r in rs):,.0f}-"
            f"{max(r.calls_per_s for r in rs):,.0f}); server CPU {med(r.server_cpu_us for r in rs):.0f} us/call, "
            f"{med(r.busy_cpu_us for r in rs):.0f} less its CPU at rest ({med(r.rest_cores for r in rs):.2f} cores)",
        )
    pairs = list(zip(without, with_, strict=True))
    throughput = [w.calls_per_s / o.calls_per_s for o, w in pairs]
    p50 = [w.p50_ms / o.p50_ms for o, w in pairs]
    cpu = [w.server_cpu_us / o.server_cpu_us for o, w in pairs]
    busy = [w.busy_cpu_us / o.busy_cpu_us for o, w in pairs]
    yield (
        "with / without",
        f"throughput x{med(throughput):.2f} (rounds {min(throughput):.2f}-{max(throughput):.2f})  p50 x{med(p50):.2f} "
        f"({min(p50):.2f}-{max(p50):.2f})  server CPU/call x{med(cpu):.2f}, less its CPU at rest x{med(busy):.2f} "
        f"({min(busy):.2f}-{max(busy):.2f})",
    )
    rest = med(r.rest_cores for r in with_) - med(r.rest_cores for r in without)
    rate = med(beats)
    yield (
        "  heartbeats",
        f"{rate:,.0f}/s reached the streams (each stream one per feed read, {1 / SQLITE_FEED_INTERVAL:g}/s on SQLite); "
        f"the server spent {rest:.2f} cores on them at rest: {rest * 1e6 / rate:.0f} us each, the grpc.aio floor "
        f"{floor.cpu_us_per_heartbeat:.0f} us (x{rest * 1e6 / rate / floor.cpu_us_per_heartbeat:.1f}); the stream "
        f"process took {med(r.holder_cores for r in with_):.2f} cores of the machine's 2",
    )
    yield (
        "server RSS",
        f"+{per_stream[0]:.1f} KB per open stream, one connection each (first open; again after closing them: "
        f"{', '.join(f'{kb:+.1f}' for kb in per_stream[1:])}); {mux_kb:+.1f} KB per stream with {STREAMS} streams on "
        f"{MUX_CONNECTIONS} connections (fresh server); {STREAMS} opened in {med(open_seconds):.1f} s",
    )
    yield (
        "  grpc.aio floor",
        f"a bare servicer writing the same heartbeats (fresh processes): {floor.kb_per_stream:+.1f} KB per stream, "
        f"one connection each; {floor.kb_per_stream_mux:+.1f} KB on {MUX_CONNECTIONS} connections",
    )


async def _aio_channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address)


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
    yield ("", f"{_uptime()} at the start (other programs' load makes every figure noisier)")
    sqlite_dir = workdir / "client-sqlite"
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(running_server(sqlite_dir, name="client-sqlite"))
        keys = _create_keys(server, 1 + REVOKES + CUTS, "client")
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
        cuts = stream_cuts(stack, server, revoker, sqlite_dir, cut_keys)
        yield from _fault_lines(cuts, [])
    if problem := scaleout.postgres_problem():
        yield ("PostgreSQL", f"skipped: {scaleout.POSTGRES_ADMIN_URL} does not answer: {problem}")
    else:
        with scaleout.postgres_database("apikeyd_bench_client") as url:
            run_apikeyd("migrate", "--database-url", url)
            with (
                running_server(workdir / "client-pg", url, name="replica-a") as a,
                running_server(workdir / "client-pg", url, name="replica-b") as b,
            ):
                keys = _create_keys(b, REVOKES + STALLS, "client")
                time.sleep(LEASE + MARGIN)
                with Client(_connection(a)) as client:
                    _warm_all(client, keys[:REVOKES])
                    delays, received, polls = revocations(client, b, keys[:REVOKES])
                yield from _revocation_lines(
                    "revoke -> client", delays, received, polls, "PostgreSQL, client on replica A, revoked via B"
                )
                yield from _fault_lines([], stalls(a, b, keys[REVOKES:]))
    yield from idle_streams(workdir)
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
