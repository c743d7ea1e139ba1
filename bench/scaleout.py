"""The scale-out sections of `make bench`, each against real `apikeyd serve` processes:

1. revocation propagation between two replicas on one PostgreSQL database (the change feed);
2. cached Authorize throughput with 1, 2 and os.cpu_count() worker processes (`serve --workers`);
3. what a Redis rate-limit check adds to a cached Authorize, against the in-process limiter.

Each returns the lines to print, as (label, text), or a reason to skip. Every loop is bounded in count and
in time; everything listens on and connects to 127.0.0.1 only.
"""

import asyncio
import contextlib
import multiprocessing
import multiprocessing.pool
import os
import re
import secrets
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf import duration_pb2

from apikeyd.v1 import api_keys_pb2 as pb
from apikeyd.v1 import api_keys_pb2_grpc as pb_grpc
from bench import load
from bench.server_process import ServerProcess, run_apikeyd, running_server

Lines = list[tuple[str, str]]

CALL_TIMEOUT = 10.0
REQUIRED_SCOPES = ["messages:send"]

# --- 1. revocation propagation on PostgreSQL -------------------------------------------------------

POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"
REVOKES = 30
REVOKE_WAIT = 5.0  # seconds B may take to refuse a revoked key before the run counts it as a failure


def _credential(server: ServerProcess) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {server.operator_key}")]


def _create(
    stub: pb_grpc.ApiKeyServiceStub, server: ServerProcess, name: str, **fields: object
) -> pb.CreateApiKeyResponse:
    return stub.CreateApiKey(
        pb.CreateApiKeyRequest(
            parent="accounts/bench",
            api_key=pb.ApiKey(display_name=name, scopes=["messages:send:all"], **fields),
        ),
        timeout=CALL_TIMEOUT,
        metadata=_credential(server),
    )


@contextlib.contextmanager
def _postgres_database() -> Iterator[str]:
    """A fresh database on the local PostgreSQL, dropped on the way out; its URL."""
    import psycopg

    name = f"apikeyd_bench_{secrets.token_hex(4)}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=3) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=3) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _postgres_problem() -> str:
    try:
        import psycopg

        with psycopg.connect(POSTGRES_ADMIN_URL, connect_timeout=3) as probe:
            probe.execute("SELECT 1")
    except Exception as error:  # any failure means: skip, and say why
        return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    return ""


def revocation_propagation(workdir: Path) -> Lines:
    """Create on A, authorize on B (B caches it), revoke on A, poll B until REVOKED: the delay from A's
    RevokeApiKey returning to B's first REVOKED, for REVOKES keys."""
    if problem := _postgres_problem():
        return [("revoke A -> B", f"skipped: PostgreSQL ({POSTGRES_ADMIN_URL}) does not answer: {problem}")]
    delays: list[float] = []
    polls: list[int] = []
    with _postgres_database() as url:
        run_apikeyd("migrate", "--database-url", url)
        with (
            running_server(workdir, url, name="replica-a") as a,
            running_server(workdir, url, name="replica-b") as b,
            grpc.insecure_channel(a.address) as channel_a,
            grpc.insecure_channel(b.address) as channel_b,
        ):
            stub_a, stub_b = pb_grpc.ApiKeyServiceStub(channel_a), pb_grpc.ApiKeyServiceStub(channel_b)
            for n in range(REVOKES):
                created = _create(stub_a, a, f"revoke {n}")
                check = pb.AuthorizeRequest(key=created.secret, required_scopes=REQUIRED_SCOPES)
                for _ in range(2):  # the first fills B's cache, the second is served from it
                    load._expect_allowed(stub_b.Authorize(check, timeout=CALL_TIMEOUT))
                stub_a.RevokeApiKey(
                    pb.RevokeApiKeyRequest(name=created.api_key.name, reason="bench"),
                    timeout=CALL_TIMEOUT,
                    metadata=_credential(a),
                )
                revoked = time.perf_counter()
                deadline = revoked + REVOKE_WAIT
                count = 0
                while True:
                    count += 1
                    code = stub_b.Authorize(check, timeout=CALL_TIMEOUT).code
                    if code == pb.AuthorizeResponse.REVOKED:
                        delays.append(time.perf_counter() - revoked)
                        polls.append(count)
                        break
                    if code != pb.AuthorizeResponse.OK:
                        raise RuntimeError(f"B answered {pb.AuthorizeResponse.Code.Name(code)}, not OK or REVOKED")
                    if time.perf_counter() > deadline:
                        raise RuntimeError(f"B still allowed a key {REVOKE_WAIT:g} s after A revoked it")
    cuts = statistics.quantiles(delays, n=100, method="inclusive")  # 30 samples: no extrapolation past max
    return [
        (
            "revoke A -> B",
            f"p50 {cuts[49] * 1e3:.1f} ms  p99 {cuts[98] * 1e3:.1f} ms  max {max(delays) * 1e3:.1f} ms  "
            f"({len(delays)} keys; from A's RevokeApiKey returning to B's first REVOKED, "
            f"B polled back to back, median {statistics.median(polls):.0f} polls)",
        ),
        ("", "two `apikeyd serve` replicas on one fresh PostgreSQL database (LISTEN/NOTIFY feed), dropped after"),
    ]


# --- 2. throughput with 1, 2 and N workers ---------------------------------------------------------

CLIENT_PROCESSES = 2
CHANNELS_PER_CLIENT = 4  # separate connections, so SO_REUSEPORT can spread them over the workers
IN_FLIGHT_PER_CHANNEL = 12
THROUGHPUT_SECONDS = 3.0
WARMUP_SECONDS = 1.0
WORKERS_STARTUP = 30.0


@dataclass(frozen=True)
class _Load:
    address: str
    key: str
    start_at: float  # time.time() at which every client process starts counting, so their windows overlap
    seconds: float


async def _client_load(job: _Load) -> tuple[int, float]:
    """Calls completed within the window by this process, and its CPU seconds over the window."""
    request = pb.AuthorizeRequest(key=job.key, required_scopes=REQUIRED_SCOPES)
    options = [("grpc.use_local_subchannel_pool", 1)]  # one connection per channel, not one shared
    channels = [grpc.aio.insecure_channel(job.address, options=options) for _ in range(CHANNELS_PER_CLIENT)]
    try:
        stubs = [pb_grpc.ApiKeyServiceStub(channel) for channel in channels]
        counting = False
        done = 0
        end = job.start_at + job.seconds

        async def caller(stub: pb_grpc.ApiKeyServiceStub) -> None:
            nonlocal done
            for _ in range(load.THROUGHPUT_MAX_CALLS):
                if time.time() >= end:
                    return
                load._expect_allowed(await stub.Authorize(request, timeout=CALL_TIMEOUT))
                if counting:
                    done += 1

        async def clock() -> float:
            nonlocal counting
            await asyncio.sleep(max(0.0, job.start_at - time.time()))
            counting, cpu_before = True, time.process_time()
            await asyncio.sleep(max(0.0, end - time.time()))
            return time.process_time() - cpu_before

        results = await asyncio.gather(clock(), *(caller(stub) for stub in stubs for _ in range(IN_FLIGHT_PER_CHANNEL)))
        return done, results[0]
    finally:
        for channel in channels:
            await channel.close()


def _client_process(job: _Load) -> tuple[int, float]:
    return asyncio.run(_client_load(job))


def _wait_for_workers(server: ServerProcess, workers: int) -> None:
    """With --workers the first answer comes from whichever worker bound first; wait for all of them."""
    if workers == 1:
        return
    deadline = time.monotonic() + WORKERS_STARTUP
    while time.monotonic() < deadline:
        serving = len(re.findall(r"worker.serving", server.log_path.read_text(errors="replace")))
        if serving >= workers:
            return
        time.sleep(0.1)
    raise RuntimeError(f"not all {workers} workers logged worker.serving within {WORKERS_STARTUP:.0f} s")


def _workers_throughput(workdir: Path, workers: int, pool: multiprocessing.pool.Pool) -> tuple[float, float]:
    """Calls/s summed over the client processes, and the client processes' CPU share of the window."""
    run_dir = workdir / f"workers-{workers}"
    with running_server(run_dir, extra_args=["--workers", str(workers)], name=f"workers-{workers}") as server:
        _wait_for_workers(server, workers)
        with grpc.insecure_channel(server.address) as channel:
            key = _create(pb_grpc.ApiKeyServiceStub(channel), server, "throughput").secret
        # The warm-up fills every worker's cache (each has its own) and opens every connection.
        job = _Load(server.address, key, time.time() + 2.0 + WARMUP_SECONDS, THROUGHPUT_SECONDS)
        pending = [pool.apply_async(_client_process, (job,)) for _ in range(CLIENT_PROCESSES)]
        results = [p.get(THROUGHPUT_SECONDS + 60.0) for p in pending]
    calls = sum(done for done, _ in results)
    client_cpu = sum(cpu for _, cpu in results)
    return calls / THROUGHPUT_SECONDS, client_cpu / THROUGHPUT_SECONDS


def worker_throughput(workdir: Path) -> Lines:
    cpus = os.cpu_count() or 1
    counts = sorted({1, 2, cpus})
    lines: Lines = []
    rates: dict[int, float] = {}
    with multiprocessing.get_context("spawn").Pool(CLIENT_PROCESSES) as pool:
        for workers in counts:
            rate, client_cores = _workers_throughput(workdir, workers, pool)
            rates[workers] = rate
            lines.append(
                (
                    f"--workers {workers}",
                    f"cached Authorize {rate:.0f} calls/s  x{rate / rates[1]:.2f} vs 1 worker   "
                    f"(clients used {client_cores:.2f} of {cpus} cores)",
                )
            )
    if cpus <= 2:
        lines.append(("", f"N = os.cpu_count() = {cpus}, so the N-worker run is one of the above"))
    lines.append(
        (
            "",
            f"load: {CLIENT_PROCESSES} client processes x {CHANNELS_PER_CLIENT} connections x "
            f"{IN_FLIGHT_PER_CHANNEL} calls in flight, {THROUGHPUT_SECONDS:g} s, SQLite",
        )
    )
    lines.append(
        (
            "",
            f"note: clients and server share these {cpus} cores, so the clients' CPU is taken from the "
            "workers; more workers than free cores cannot scale",
        )
    )
    return lines


# --- 3. the cost of a Redis rate-limit check -------------------------------------------------------

REDIS_URL = "redis://127.0.0.1:6379/0"
RATE_LIMIT = pb.RateLimit(limit=1_000_000, period=duration_pb2.Duration(seconds=60))  # never denies here
RATE_WARMUP_CALLS = 200
RATE_CALLS = 2000
RATE_ROUNDS = 4  # the two servers alternate; each figure is the median of the rounds


def _redis_problem() -> str:
    try:
        import redis

        client = redis.Redis.from_url(REDIS_URL, socket_timeout=2, socket_connect_timeout=2)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as error:  # any failure means: skip, and say why
        return f"{type(error).__name__}: {error}"
    return ""


def _clear_prefix(prefix: str) -> int:
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_timeout=2, socket_connect_timeout=2)
    try:
        names = list(client.scan_iter(match=f"{prefix}:*", count=1000))[:10_000]
        return client.delete(*names) if names else 0
    finally:
        client.close()


def _rate_limited_call(stub: pb_grpc.ApiKeyServiceStub, server: ServerProcess) -> Callable[[], None]:
    """A cached Authorize of a new key with RATE_LIMIT, checking that the limit was applied."""
    key = _create(stub, server, "rate limited", rate_limits=[RATE_LIMIT]).secret
    request = pb.AuthorizeRequest(key=key, required_scopes=REQUIRED_SCOPES)

    def call() -> None:
        reply = stub.Authorize(request, timeout=CALL_TIMEOUT)
        load._expect_allowed(reply)
        if reply.limit != RATE_LIMIT.limit:
            raise RuntimeError("Authorize answered without the key's rate limit: was the limit checked?")

    load._sequential(call, RATE_WARMUP_CALLS)  # the first call fills the cache
    return call


def rate_limit_cost(workdir: Path) -> Lines:
    if problem := _redis_problem():
        return [("rate limit (Redis)", f"skipped: Redis ({REDIS_URL}) does not answer: {problem}")]
    prefix = f"apikeyd-bench-{secrets.token_hex(4)}"
    names = ("in-process", "Redis")
    rounds: dict[str, list[load.Latency]] = {name: [] for name in names}
    try:
        with (
            running_server(workdir / "rate-local", name="rate-local") as local,
            running_server(
                workdir / "rate-redis",
                extra_args=["--rate-limit-url", REDIS_URL, "--rate-limit-prefix", prefix],
                name="rate-redis",
            ) as shared,
            grpc.insecure_channel(local.address) as local_channel,
            grpc.insecure_channel(shared.address) as shared_channel,
        ):
            calls = {
                "in-process": _rate_limited_call(pb_grpc.ApiKeyServiceStub(local_channel), local),
                "Redis": _rate_limited_call(pb_grpc.ApiKeyServiceStub(shared_channel), shared),
            }
            for round_number in range(RATE_ROUNDS):  # interleaved, so machine noise hits both alike
                for name in names if round_number % 2 == 0 else names[::-1]:
                    rounds[name].append(load.latency(load._sequential(calls[name], RATE_CALLS)))
    finally:
        removed = _clear_prefix(prefix)
    p50 = {name: statistics.median(r.p50_ms for r in rounds[name]) for name in names}
    p99 = {name: statistics.median(r.p99_ms for r in rounds[name]) for name in names}
    return [
        (
            f"rate limit {name}",
            f"cached Authorize sequential p50 {p50[name]:.3f} ms  p99 {p99[name]:.3f} ms",
        )
        for name in names
    ] + [
        (
            "Redis - in-process",
            f"p50 {(p50['Redis'] - p50['in-process']) * 1e3:+.0f} us  "
            f"p99 {(p99['Redis'] - p99['in-process']) * 1e3:+.0f} us   "
            f"(key limited to {RATE_LIMIT.limit}/{RATE_LIMIT.period.seconds} s, never denied; "
            f"median of {RATE_ROUNDS} interleaved rounds of {RATE_CALLS} calls; {removed} Redis keys removed)",
        ),
    ]
