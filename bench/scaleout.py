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
from bench import load, plots
from bench.server_process import ServerProcess, run_apikeyd, running_server

Lines = list[tuple[str, str]]

CALL_TIMEOUT = 10.0
REQUIRED_SCOPES = ["messages:send"]

# --- 1. revocation propagation on PostgreSQL -------------------------------------------------------

POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"
REVOKES = 30
REVOKE_WAIT = 5.0  # seconds B may take to refuse a revoked key before the run counts it as a failure


def _create(
    stub: pb_grpc.ApiKeyServiceStub, server: ServerProcess, name: str, **fields: object
) -> pb.CreateApiKeyResponse:
    return stub.CreateApiKey(
        pb.CreateApiKeyRequest(
            parent="accounts/bench",
            api_key=pb.ApiKey(display_name=name, scopes=["messages:send:all"], **fields),
        ),
        timeout=CALL_TIMEOUT,
        metadata=server.credential,
    )


@contextlib.contextmanager
def postgres_database(prefix: str = "apikeyd_bench") -> Iterator[str]:
    """A fresh database on the local PostgreSQL, dropped on the way out; its URL."""
    import psycopg

    name = f"{prefix}_{secrets.token_hex(4)}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=3) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=3) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def postgres_problem() -> str:
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
    if problem := postgres_problem():
        return [("revoke A -> B", f"skipped: PostgreSQL ({POSTGRES_ADMIN_URL}) does not answer: {problem}")]
    delays: list[float] = []
    polls: list[int] = []
    with postgres_database() as url:
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
                    metadata=a.credential,
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
    plots.distribution("revocation propagation, replica A to B", {"revoke on A -> REVOKED on B": [d * 1e3 for d in delays]})
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
# The servers take turns, one counted window each per round, over WORKER_WINDOWS // (number of servers)
# rounds: 12 on two cores, 8 with a third server. Short windows, so that each pair compared in a round sits
# close in time and load from other programs that comes and goes hits both alike; each figure is a median.
WORKER_WINDOWS = 24
ROUND_SECONDS = 1.0  # counted, per server and round
ROUND_WARMUP = 0.4  # uncounted, before each window: every round opens new connections
ROUND_LEAD = 0.2  # from handing the job to the client processes to the start of their warm-up
FIRST_LEAD = 3.0  # the same for the uncounted first round, in which the client processes import gRPC
WORKERS_STARTUP = 30.0
WORKERS_CACHE_TTL = 3600.0  # longer than the section, so that every counted call is a cache hit
# Of the cores: other programs' median use above which the output warns, and under which a window is quiet.
OTHER_LOAD_WARNING = 0.1


@dataclass(frozen=True)
class _Load:
    address: str
    key: str
    start_at: float  # time.time() at which every client process starts counting, so their windows overlap
    seconds: float


@dataclass(frozen=True)
class _ClientResult:
    calls: int  # completed within the window
    cpu_seconds: float  # this process's CPU time over the window
    late: bool  # the job began with less than half of the warm-up left


async def _client_load(job: _Load) -> _ClientResult:
    late = time.time() > job.start_at - ROUND_WARMUP / 2
    request = pb.AuthorizeRequest(key=job.key, required_scopes=REQUIRED_SCOPES)
    options = [("grpc.use_local_subchannel_pool", 1)]  # one connection per channel, not one shared
    channels = [grpc.aio.insecure_channel(job.address, options=options) for _ in range(CHANNELS_PER_CLIENT)]
    try:
        stubs = [pb_grpc.ApiKeyServiceStub(channel) for channel in channels]
        counting = False
        done = 0
        cpu_seconds = 0.0
        end = job.start_at + job.seconds

        async def caller(stub: pb_grpc.ApiKeyServiceStub) -> None:
            nonlocal done
            for _ in range(load.THROUGHPUT_MAX_CALLS):
                if time.time() >= end:
                    return
                load._expect_allowed(await stub.Authorize(request, timeout=CALL_TIMEOUT))
                if counting:
                    done += 1

        async def clock() -> None:
            nonlocal counting, cpu_seconds
            await asyncio.sleep(max(0.0, job.start_at - time.time()))
            counting, cpu_before = True, time.process_time()
            await asyncio.sleep(max(0.0, end - time.time()))
            cpu_seconds = time.process_time() - cpu_before

        await asyncio.gather(clock(), *(caller(stub) for stub in stubs for _ in range(IN_FLIGHT_PER_CHANNEL)))
        return _ClientResult(done, cpu_seconds, late)
    finally:
        for channel in channels:
            await channel.close()


def _client_process(job: _Load) -> _ClientResult:
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


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid`, from /proc (Linux); empty elsewhere."""
    children = []
    for entry in Path("/proc").iterdir() if Path("/proc/self/stat").exists() else ():
        if not entry.name.isdigit():
            continue
        try:
            # The command name (field 2) may hold spaces, so count fields from after its ')'.
            parent = int(entry.joinpath("stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        if parent == pid:
            children.append(int(entry.name))
    return children


def _busy_cores_seconds() -> float | None:
    """CPU seconds all cores spent busy since boot, from /proc/stat (Linux); None elsewhere."""
    try:
        with open("/proc/stat") as stat:
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in stat.readline().split()[1:9])
    except (OSError, ValueError):
        return None
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


@dataclass
class _WorkersServer:
    workers: int
    server: ServerProcess
    key: str
    worker_pids: list[int]  # the processes that answer calls: the server itself for one worker


@dataclass(frozen=True)
class _Round:
    calls_per_s: float
    client_cores: float  # CPU seconds per second of the window, summed over the client processes
    server_cores: float | None  # the same for the server: supervisor and workers (None without /proc)
    busiest_worker: float | None  # the busiest worker's share of the workers' CPU time
    machine_cores: float | None  # every process on the machine, this one and the other servers included
    late: int  # client jobs that began with less than half of the warm-up left


def _start_workers_server(stack: contextlib.ExitStack, workdir: Path, workers: int) -> _WorkersServer:
    server = stack.enter_context(
        running_server(
            workdir / f"workers-{workers}",
            extra_args=["--workers", str(workers), "--cache-ttl", f"{WORKERS_CACHE_TTL:g}"],
            name=f"workers-{workers}",
        )
    )
    _wait_for_workers(server, workers)
    with grpc.insecure_channel(server.address) as channel:
        key = _create(pb_grpc.ApiKeyServiceStub(channel), server, "throughput").secret
    pids = [server.pid] if workers == 1 else _children(server.pid)
    if pids and len(pids) != workers:
        raise RuntimeError(f"--workers {workers}: the supervisor (pid {server.pid}) has {len(pids)} child processes")
    return _WorkersServer(workers, server, key, pids)


def _workers_round(target: _WorkersServer, pool: multiprocessing.pool.Pool, lead: float) -> _Round:
    """One window of load on one server; CPU times are read from /proc at the window's edges."""
    cpu = load._server_cpu_seconds
    job = _Load(target.server.address, target.key, time.time() + lead + ROUND_WARMUP, ROUND_SECONDS)
    pending = [pool.apply_async(_client_process, (job,)) for _ in range(CLIENT_PROCESSES)]
    pids = [target.server.pid, *target.worker_pids] if target.workers > 1 else target.worker_pids
    time.sleep(max(0.0, job.start_at - time.time()))
    before = [cpu(pid) for pid in pids], _busy_cores_seconds()
    time.sleep(max(0.0, job.start_at + job.seconds - time.time()))
    after = [cpu(pid) for pid in pids], _busy_cores_seconds()
    results: list[_ClientResult] = [p.get(job.seconds + lead + ROUND_WARMUP + 60.0) for p in pending]
    spent: list[float] | None = [
        b - a for a, b in zip(before[0], after[0], strict=True) if a is not None and b is not None
    ]
    if not pids or len(spent or ()) != len(pids):
        spent = None  # no /proc, or a process gone
    per_worker = spent[-target.workers :] if spent else None  # the supervisor, if any, comes first
    machine = None if before[1] is None or after[1] is None else (after[1] - before[1]) / job.seconds
    return _Round(
        calls_per_s=sum(r.calls for r in results) / job.seconds,
        client_cores=sum(r.cpu_seconds for r in results) / job.seconds,
        server_cores=None if spent is None else sum(spent) / job.seconds,
        busiest_worker=max(per_worker) / sum(per_worker) if per_worker and sum(per_worker) > 0 else None,
        machine_cores=machine,
        late=sum(r.late for r in results),
    )


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _other_cores(r: _Round) -> float | None:
    """What the rest of the machine used in the window: other programs, this process, the idle servers."""
    if r.machine_cores is None or r.server_cores is None:
        return None
    return max(0.0, r.machine_cores - r.server_cores - r.client_cores)  # /proc counts 10 ms ticks


def _cores_text(rounds: list[_Round], workers: int, cpus: int) -> str:
    server, clients = _median([r.server_cores for r in rounds]), statistics.median(r.client_cores for r in rounds)
    if server is None:
        return f"cores: clients {clients:.2f} of {cpus} (server: no /proc)"
    busiest = _median([r.busiest_worker for r in rounds]) if workers > 1 else None
    text = f"cores: server {server:.2f}" + (f" (busiest worker {busiest:.0%})" if busiest is not None else "")
    text += f", clients {clients:.2f}"
    others = [o for r in rounds if (o := _other_cores(r)) is not None]
    if others:
        text += f", other {statistics.median(others):.2f} (max {max(others):.2f})"
    per_cpu = _median([r.calls_per_s / r.server_cores if r.server_cores else None for r in rounds])
    return text + f" of {cpus}" + (f";  {per_cpu:.0f} calls per server CPU-second" if per_cpu is not None else "")


def _other_load_lines(rounds: dict[int, list[_Round]], cpus: int) -> Lines:
    """When other programs take CPU, the scheduler gives a server of more processes a larger share, so the
    ratios measure the scheduler as much as the server: then the ratios of the quiet rounds alone, if any."""
    quiet = OTHER_LOAD_WARNING * cpus
    other = _median([_other_cores(r) for rs in rounds.values() for r in rs])
    indices = [
        i
        for i in range(len(rounds[1]))
        if all((o := _other_cores(rs[i])) is not None and o < quiet for rs in rounds.values())
    ]
    if other is None or len(indices) == len(rounds[1]):
        return []
    lines: Lines = []
    if other > quiet:
        lines.append(
            (
                "",
                f"warning: other programs used {other:.2f} cores (median): the scheduler then gives a server of "
                "more processes a larger share of the cores, which flatters more workers",
            )
        )
    if not indices:
        return [*lines, ("", f"no round had other programs under {quiet:.2f} cores in every window")]
    ratios = []
    for workers, rs in rounds.items():
        if workers != 1:
            per_round = [rs[i].calls_per_s / rounds[1][i].calls_per_s for i in indices]
            ratios.append(
                f"--workers {workers} x{statistics.median(per_round):.2f} ({min(per_round):.2f}-{max(per_round):.2f})"
            )
    where = f"in the {len(indices)} of {len(rounds[1])} rounds with other programs under {quiet:.2f} cores"
    return [*lines, ("", f"{where} in every window: {', '.join(ratios)} vs 1 worker")]


def worker_throughput(workdir: Path) -> Lines:
    """Each `--workers W` server is started once; then they take turns, one short window each per round,
    under the same load. Figures are medians over the rounds (with the lowest and highest round), the ratio
    to one worker the median of per-round ratios: neighbours in time, so that load from other programs that
    comes and goes cancels out better. CPU times come from /proc at each window's edges."""
    cpus = os.cpu_count() or 1
    counts = sorted({1, 2, cpus})
    round_count = WORKER_WINDOWS // len(counts)
    rounds: dict[int, list[_Round]] = {workers: [] for workers in counts}
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(CLIENT_PROCESSES))
        servers = [_start_workers_server(stack, workdir, workers) for workers in counts]
        lead = FIRST_LEAD
        for target in servers:  # uncounted: imports, connections, and every worker's cache filled
            _workers_round(target, pool, lead)
            lead = ROUND_LEAD
        for round_number in range(round_count):
            # Alternate the order, so that no server always runs first (or right after another).
            for target in servers if round_number % 2 == 0 else servers[::-1]:
                rounds[target.workers].append(_workers_round(target, pool, ROUND_LEAD))
    lines: Lines = []
    for workers in counts:
        rates = [r.calls_per_s for r in rounds[workers]]
        text = f"cached Authorize {statistics.median(rates):.0f} calls/s ({min(rates):.0f}-{max(rates):.0f})"
        if workers != 1:
            ratios = [w.calls_per_s / one.calls_per_s for w, one in zip(rounds[workers], rounds[1], strict=True)]
            text += f"  x{statistics.median(ratios):.2f} vs 1 worker (rounds {min(ratios):.2f}-{max(ratios):.2f})"
        lines.append((f"--workers {workers}", text))
        lines.append(("", _cores_text(rounds[workers], workers, cpus)))
    if cpus <= 2:
        lines.append(("", f"N = os.cpu_count() = {cpus}, so the N-worker run is one of the above"))
    lines.append(
        (
            "",
            f"load: {CLIENT_PROCESSES} client processes x {CHANNELS_PER_CLIENT} new connections x "
            f"{IN_FLIGHT_PER_CHANNEL} calls in flight, {ROUND_WARMUP:g} s warm-up then {ROUND_SECONDS:g} s counted; "
            f"the servers take turns over {round_count} rounds; median (lowest-highest round); SQLite",
        )
    )
    lines.append(
        (
            "",
            "cores: CPU seconds per second of the counted windows (/proc), medians: server = its supervisor and "
            "workers, other = the rest of the machine",
        )
    )
    every = [r for rs in rounds.values() for r in rs]
    busy = _median([None if r.machine_cores is None else r.machine_cores / cpus for r in every])
    saturation = "" if busy is None else f"the cores were {busy:.0%} busy in the counted windows (median); "
    lines.append(
        (
            "",
            f"note: {saturation}clients and server share these {cpus} cores, so the clients' CPU is taken from the "
            "workers; more workers than free cores cannot scale",
        )
    )
    lines += _other_load_lines(rounds, cpus)
    late = sum(r.late for r in every)
    if late:
        lines.append(("", f"warning: {late} client jobs began with under half their warm-up left (slow machine?)"))
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
