"""The load client. It runs in a process of its own (see `measure_in_own_process`) so that its CPU use
never competes with the server's event loop inside one interpreter.

Sequential latency uses the blocking stub: it adds the least client time to each call, so the
Authorize/health p50 ratio reflects the server and not the client's event loop. Throughput uses a
grpc.aio channel with many calls in flight, the way a busy caller would drive the server.
"""

import asyncio
import multiprocessing
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from apikeyd.v1 import api_keys_pb2 as pb
from apikeyd.v1 import api_keys_pb2_grpc as pb_grpc

ROUNDS = 6  # health and Authorize alternate this many times; each figure is the median of the rounds
WARMUP_CALLS = 200
SEQUENTIAL_CALLS = 2000
CONCURRENCY = 48  # calls in flight over one channel
THROUGHPUT_SECONDS = 1.5
THROUGHPUT_MAX_CALLS = 500_000  # a bound in count as well as in time
WARMUP_SECONDS = 0.5
CALL_TIMEOUT = 10.0  # seconds; a stuck call fails the run instead of hanging it
REQUIRED_SCOPES = ["messages:send"]


@dataclass(frozen=True)
class Latency:
    p50_ms: float
    p99_ms: float


@dataclass(frozen=True)
class Spread:
    """The median over the rounds, with the lowest and highest round: how far to trust the median."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: list[float]) -> "Spread":
        return cls(statistics.median(values), min(values), max(values))


@dataclass(frozen=True)
class Figures:
    """One RPC's figures over the rounds: medians of the per-round values."""

    latency: Latency
    calls_per_s: Spread
    # CPU time per call during the throughput runs: a side near one core per call rate is the bottleneck
    server_cpu_us: float | None  # None where /proc is missing
    client_cpu_us: float


@dataclass(frozen=True)
class Results:
    health: Figures
    authorize: Figures
    # Medians of per-round Authorize/health ratios. Each pairs two runs next to each other in time, so
    # background load that comes and goes over the run cancels out better than in a ratio of medians.
    throughput_ratio: Spread
    latency_ratio: Spread
    cold: Latency
    cold_calls: int
    # Every sequential call's seconds, by RPC, over the rounds: the distributions bench/plots.py draws.
    samples: dict[str, list[float]]


@dataclass(frozen=True)
class Target:
    """Where to send calls, and the keys to present."""

    address: str
    server_pid: int
    warm_key: str
    cold_keys: list[str]


def latency(samples: list[float]) -> Latency:
    cuts = statistics.quantiles(samples, n=100)
    return Latency(p50_ms=cuts[49] * 1e3, p99_ms=cuts[98] * 1e3)


def _server_cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time of the server process, from /proc (Linux); None elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            # The command name (field 2) may hold spaces, so count fields from after its ')'.
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- sequential latency: one call at a time on the blocking stub -----------------------------------


def _sequential(call: Callable[[], object], count: int) -> list[float]:
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return samples


# --- throughput: many calls in flight on a grpc.aio channel ----------------------------------------


@dataclass(frozen=True)
class Throughput:
    calls_per_s: float
    server_cpu_us: float | None
    client_cpu_us: float


async def _throughput(call: Callable[[], Awaitable[object]], seconds: float, server_pid: int) -> Throughput:
    done = 0
    deadline = time.perf_counter() + seconds

    async def caller() -> None:
        nonlocal done
        while done < THROUGHPUT_MAX_CALLS and time.perf_counter() < deadline:
            await call()
            done += 1

    server_before, client_before = _server_cpu_seconds(server_pid), time.process_time()
    start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(CONCURRENCY)))
    elapsed = time.perf_counter() - start
    server_after, client_after = _server_cpu_seconds(server_pid), time.process_time()
    server_cpu = None if server_before is None or server_after is None else server_after - server_before
    return Throughput(
        done / elapsed,
        None if server_cpu is None else server_cpu / done * 1e6,
        (client_after - client_before) / done * 1e6,
    )


# --- the two RPCs, each as a blocking and an aio call ---------------------------------------------


@dataclass(frozen=True)
class Rpc:
    name: str
    blocking: Callable[[], object]
    aio: Callable[[], Awaitable[object]]


def _expect_allowed(reply: pb.AuthorizeResponse) -> None:
    # A denial is a normal answer with status OK, so without this check we could time the wrong path.
    if not reply.allowed:
        raise RuntimeError(f"Authorize denied the bench key: {pb.AuthorizeResponse.Code.Name(reply.code)}")


def _rpcs(channel: grpc.Channel, aio_channel: grpc.aio.Channel, key: str) -> tuple[Rpc, Rpc]:
    check = health_pb2.HealthCheckRequest(service="")
    authorize = pb.AuthorizeRequest(key=key, required_scopes=REQUIRED_SCOPES)
    health_stub, health_aio = health_pb2_grpc.HealthStub(channel), health_pb2_grpc.HealthStub(aio_channel)
    keys_stub, keys_aio = pb_grpc.ApiKeyServiceStub(channel), pb_grpc.ApiKeyServiceStub(aio_channel)

    async def authorize_aio() -> None:
        _expect_allowed(await keys_aio.Authorize(authorize, timeout=CALL_TIMEOUT))

    health = Rpc(
        "health",
        lambda: health_stub.Check(check, timeout=CALL_TIMEOUT),
        lambda: health_aio.Check(check, timeout=CALL_TIMEOUT),
    )
    cached = Rpc(
        "authorize",
        lambda: _expect_allowed(keys_stub.Authorize(authorize, timeout=CALL_TIMEOUT)),
        authorize_aio,
    )
    return health, cached


@dataclass(frozen=True)
class Round:
    latency: Latency
    throughput: Throughput


def _median_figures(rounds: list[Round]) -> Figures:
    server_cpu = [r.throughput.server_cpu_us for r in rounds if r.throughput.server_cpu_us is not None]
    return Figures(
        Latency(
            statistics.median(r.latency.p50_ms for r in rounds),
            statistics.median(r.latency.p99_ms for r in rounds),
        ),
        Spread.of([r.throughput.calls_per_s for r in rounds]),
        statistics.median(server_cpu) if server_cpu else None,
        statistics.median(r.throughput.client_cpu_us for r in rounds),
    )


async def _warm_rounds(target: Target, samples: dict[str, list[float]]) -> dict[str, list[Round]]:
    """Health and cached Authorize, interleaved so that machine noise hits both alike."""
    with grpc.insecure_channel(target.address) as channel:
        async with grpc.aio.insecure_channel(target.address) as aio_channel:
            rpcs = _rpcs(channel, aio_channel, target.warm_key)
            # The first Authorize is the miss that fills the cache; the rest warm channels and code paths.
            for rpc in rpcs:
                _sequential(rpc.blocking, WARMUP_CALLS)
                await _throughput(rpc.aio, WARMUP_SECONDS, target.server_pid)
            rounds: dict[str, list[Round]] = {rpc.name: [] for rpc in rpcs}
            for round_number in range(ROUNDS):
                # Alternate which RPC goes first, so neither always runs on a just-disturbed machine.
                order = rpcs if round_number % 2 == 0 else rpcs[::-1]
                taken = {rpc.name: _sequential(rpc.blocking, SEQUENTIAL_CALLS) for rpc in order}
                for name, seconds in taken.items():
                    samples.setdefault(name, []).extend(seconds)
                latencies = {name: latency(seconds) for name, seconds in taken.items()}
                for rpc in order:
                    throughput = await _throughput(rpc.aio, THROUGHPUT_SECONDS, target.server_pid)
                    rounds[rpc.name].append(Round(latencies[rpc.name], throughput))
    return rounds


def _cold(target: Target) -> Latency:
    """Each fresh key's first Authorize: a cache miss, so one database read and one argon2id check."""
    samples = []
    with grpc.insecure_channel(target.address) as channel:
        stub = pb_grpc.ApiKeyServiceStub(channel)
        for key in target.cold_keys:
            request = pb.AuthorizeRequest(key=key, required_scopes=REQUIRED_SCOPES)
            start = time.perf_counter()
            reply = stub.Authorize(request, timeout=CALL_TIMEOUT)
            samples.append(time.perf_counter() - start)
            _expect_allowed(reply)
    return latency(samples)


def measure(target: Target) -> Results:
    samples: dict[str, list[float]] = {}
    rounds = asyncio.run(_warm_rounds(target, samples))
    pairs = list(zip(rounds["health"], rounds["authorize"], strict=True))
    return Results(
        health=_median_figures(rounds["health"]),
        authorize=_median_figures(rounds["authorize"]),
        throughput_ratio=Spread.of([a.throughput.calls_per_s / h.throughput.calls_per_s for h, a in pairs]),
        latency_ratio=Spread.of([a.latency.p50_ms / h.latency.p50_ms for h, a in pairs]),
        cold=_cold(target),
        cold_calls=len(target.cold_keys),
        samples=samples,
    )


def measure_in_own_process(target: Target, timeout: float) -> Results:
    # spawn, not fork: the parent already runs gRPC, whose threads do not survive a fork. Leaving the
    # Pool's block terminates the worker, so a timeout cannot leave a client process behind.
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply_async(measure, (target,)).get(timeout)
