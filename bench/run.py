"""`make bench`: how fast apikeyd answers, on this machine.

What it measures, in this order:

1. A real `apikeyd serve` in its own process (fresh SQLite file in a temporary directory, a free
   loopback port), once its gRPC health check answers SERVING.
2. From a load client in another process (bench.load): the empty health Check, the floor any RPC
   pays, and a cached Authorize. Each gets sequential p50/p99 latency over 2000 calls and throughput
   with 48 calls in flight for 1.5 s; the two alternate over 6 rounds and each figure is the median,
   so that noise does not favour one side (the slowest and fastest round's throughput are shown too).
   CPU time per call of server and client tells which side limited the throughput. The
   Authorize/health ratios, medians of the per-round ratios, are checked against targets
   (throughput >= 0.9, p50 <= 1.1); a miss is reported, not raised: this is a benchmark, not a test.
3. Cold Authorize: the first check of each of 80 fresh keys, a cache miss (one database read and one
   argon2id verification).
4. SIGTERM to the server, which must exit 0; any other exit fails the run.
5. Single-flight, against a Server in this process so that argon2 verifications can be counted: 100
   concurrent first checks of one fresh key should cost one verification.
6. Memory per cached key (bench.cache_memory): 100,000 keys verified through the Authorizer's real miss path
   in a fresh process, bytes per key by tracemalloc and by RSS (target <= 1 KB).
   Then the argon2id parameters and what one verification costs here.
7. Revocation propagation (bench.scaleout): two `apikeyd serve` replicas on a fresh PostgreSQL database;
   for 30 keys, create on A, authorize on B (B caches it), revoke on A, poll B until REVOKED; p50/p99/max
   of the delay from A's RevokeApiKey returning to B's first REVOKED. Skipped when PostgreSQL does not
   answer on 127.0.0.1:5432; the database is dropped at the end.
8. Cached Authorize throughput of `apikeyd serve --workers W` for W = 1, 2 and the CPU count, driven by
   two client processes over several connections each (SO_REUSEPORT spreads connections, not calls). The
   servers start once and take turns over short rounds (medians and ranges, the ratio to one worker per
   round), with the cores used by servers, clients and other programs, so that a reader sees when the
   machine, not apikeyd, set the figure. On a 2-core machine the clients take CPU from the workers.
9. The cost of a shared rate-limit check: cached Authorize p50/p99 of a rate-limited key (a limit it never
   reaches) with `--rate-limit-url` on the local Redis versus the in-process limiter. Skipped when Redis
   does not answer on 127.0.0.1:6379; the bench's Redis keys (their own random prefix) are removed.
10. Listing at scale (bench.listing): a fresh PostgreSQL database with 1,000 keys in one account and
   1,000,000 in another, written straight into the table (one fixed argon2 hash), then ListApiKeys with
   page_size 100 through `apikeyd serve`: the first page and one in the middle (reached by following page
   tokens), without and with a project filter, p50/p99 over 200 calls and the 1M/1k ratio; also each
   page's SQL under EXPLAIN ANALYZE (time, buffers) and the COUNT that total_size used to cost. Skipped
   when PostgreSQL does not answer; the database is dropped at the end. About 1.5 to 3 minutes, most of it
   loading the keys and following tokens.
11. Limits (bench.limits): health Check latency (p50/p99/max) of a real `apikeyd serve` on SQLite, idle and
   while two sender processes send the largest requests the input limits allow and the ones grpc's old
   4 MiB cap let in, with the ratio to idle and the slowest call against the 250 ms the tests allow.
12. Flood (bench.flood): one `apikeyd serve` on SQLite; an attacker process sends 250 well-formed Authorize
   calls a second, first with distinct wrong secrets for one real key, then with distinct unknown lookup
   ids, while this process measures other keys' first checks (p90, target <= 50 ms) and a cached check (p50,
   target <= 1.5x the figure without an attack, measured first in the same run), and the attack's argon2
   verifications per call (from the metrics endpoint; target <= 0.05). About 30 s.

13. Envoy (bench.envoy): Envoy 1.40 (--concurrency 1, routes answered by direct_response) with no auth,
   with its built-in api_key_auth filter, with deploy/envoy/envoy.yaml in front of `apikeyd serve` (HTTP
   ext_authz), with deploy/envoy/envoy-grpc.yaml (gRPC ext_authz) and with the shipped config in front of a
   trivial authorizer (the ceiling for any HTTP authorizer), interleaved over 5 rounds of wrk: req/s over 16
   connections, sequential p50/p99, the ratio to api_key_auth (target >= 0.5), the p50 added over no auth
   (target <= 0.3 ms), and apikeyd's CPU per check. Skipped without wrk or Envoy. About 90 s.

14. gRPC CPU (bench.grpc_cpu): server CPU per call of a cached Authorize and of the empty health Check
   against a bare grpc.aio servicer returning a constant AuthorizeResponse (the floor: what grpc itself
   costs), interleaved rounds, with the share that is apikeyd's.

15. Client library (bench.client): apikeyd.client's cached check in process (sync Client and AsyncClient,
   p50/p99 per call and checks/s in one thread) against the Authorize RPC to the same server (target p50 <=
   20 us and >= 30x faster); revocation reaching a client (200 keys, SQLite and PostgreSQL; p99 <= 250 ms);
   the bound under faults (the server SIGKILLed and started again on its port; a replica SIGSTOPped while
   another revokes: no allow past the lease after the last heartbeat); and 500 idle WatchApiKeyChanges
   streams: cached Authorize with and without them, their heartbeats' CPU and the server's RSS per stream,
   beside a bare grpc.aio floor. About 2 to 2.5 minutes.

16. Usage analytics (bench.usage): what counting adds to a check (UsageCounter.count against a no-op in
   the same loop) as a share of a cached Authorize's server CPU (target <= 3%), and cached checks/s in
   process with and without counting; then one ListApiKeyUsage call reading a month of daily buckets for
   100 keys (3,000 buckets) through `apikeyd serve`, p50/p99 and the ratio to a ListApiKeys page of the
   same 100 keys, on SQLite and (when it answers) PostgreSQL. About 1 minute.
17. Credits (bench.credits): a cached Authorize of a key with credits, which spends in the database (one
   conditional write per check, batched per key while a write is in flight), against a cached Authorize of
   a key without credits (the anchor) on the same server, SQLite and PostgreSQL: sequential p50/p99 and
   calls/s with 8 in flight, interleaved rounds. About 30 s.
18. Tracing (bench.tracing): a cached Authorize with APIKEYD_TRACING=otlp, exporting batched over OTLP/gRPC
   to a counting collector in this process, against the same server with tracing off (the anchor):
   sequential p50/p99, calls/s with 48 in flight and server CPU per call, interleaved rounds, as ratios to
   the anchor; `python -m bench.tracing --baseline SRC` adds the build at SRC (the one before tracing, say).
   About 1 minute.

Every loop is bounded in count and in time; everything listens on and connects to 127.0.0.1 only.
"""

import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from bench import (
    cache_memory,
    client,
    credits,
    envoy,
    flood,
    grpc_cpu,
    inprocess,
    limits,
    listing,
    load,
    plots,
    scaleout,
    tracing,
    usage,
)
from bench.server_process import ServerProcess, create_keys, running_server

RESULTS = Path(__file__).resolve().parent.parent / "bench-results"  # the PNG plots (bench/plots.py)
COLD_KEYS = 80
CLIENT_TIMEOUT = 180.0  # seconds for the whole load client; it needs about 40
THROUGHPUT_TARGET = 0.9  # cached Authorize calls/s over health calls/s, at least
LATENCY_TARGET = 1.1  # cached Authorize p50 over health p50, at most
LABEL = 22  # width of the first column


def _line(label: str, text: str) -> None:
    print(f"{label:<{LABEL}}{text}", flush=True)


def _header(server: ServerProcess) -> None:
    cpus = os.cpu_count()
    print(
        f"apikeyd benchmark: {cpus} CPUs ({platform.machine()}, {platform.system()} {platform.release()}), "
        f"Python {platform.python_version()}, grpcio {grpc.__version__}"
    )
    print(f"server: `apikeyd serve` pid {server.pid} on {server.address} (SQLite); client in its own process")
    print(
        f"figures: median of {load.ROUNDS} interleaved rounds of {load.SEQUENTIAL_CALLS} sequential calls "
        f"and {load.THROUGHPUT_SECONDS:g} s with {load.CONCURRENCY} calls in flight"
    )
    print(flush=True)


def _figures(label: str, figures: load.Figures) -> None:
    rate = figures.calls_per_s
    server_cpu = "n/a" if figures.server_cpu_us is None else f"{figures.server_cpu_us:.0f}"
    _line(
        label,
        f"sequential p50 {figures.latency.p50_ms:.3f} ms  p99 {figures.latency.p99_ms:.3f} ms   "
        f"concurrent {rate.median:.0f} calls/s ({rate.low:.0f}-{rate.high:.0f})   "
        f"CPU/call server {server_cpu} us, client {figures.client_cpu_us:.0f} us",
    )


def _ratio(label: str, name: str, ratio: load.Spread, target: float, at_least: bool) -> None:
    """The median ratio is judged; the rounds' range shows whether noise could have decided it."""
    met = ratio.median >= target if at_least else ratio.median <= target
    relation = ">=" if at_least else "<="
    _line(
        label,
        f"{name} {ratio.median:.2f} (rounds {ratio.low:.2f}-{ratio.high:.2f})  "
        f"target {relation} {target:.2f}  {'PASS' if met else 'MISS'}",
    )


def _report_load(results: load.Results) -> None:
    plots.distribution(
        "cached Authorize and the empty health Check, sequential calls",
        {name: [s * 1e3 for s in seconds] for name, seconds in results.samples.items()},
    )
    _figures("health Check", results.health)
    _figures("Authorize (cached)", results.authorize)
    _ratio(
        "Authorize / health", "throughput ratio", results.throughput_ratio, THROUGHPUT_TARGET, at_least=True
    )
    _ratio("", "p50 latency ratio", results.latency_ratio, LATENCY_TARGET, at_least=False)
    _line(
        "Authorize (cold)",
        f"p50 {results.cold.p50_ms:.3f} ms  p99 {results.cold.p99_ms:.3f} ms  "
        f"({results.cold_calls} fresh keys, first call each)",
    )


def _report_in_process(workdir: Path) -> None:
    flight = inprocess.single_flight(workdir)
    _line(
        "single-flight",
        f"argon2 verifications for {flight.calls} concurrent cold checks of one key: {flight.verifications} "
        f"(expected 1; {flight.misses} calls missed the cache, {flight.allowed} allowed)",
    )
    for label, text in cache_memory.measure().lines():
        _line(label, text)
    cost = inprocess.argon2_cost()
    params = cost.parameters
    _line(
        "argon2id",
        f"time_cost {params.time_cost}, memory {params.memory_cost_kib} KiB, "
        f"parallelism {params.parallelism}: one verification p50 {cost.verify_p50_ms:.2f} ms "
        f"({cost.runs} runs)",
    )


def _section(title: str) -> None:
    print(f"\n--- {title} ---", flush=True)


# Sections 7 on, by the name `make bench SECTION=...` (or `python -m bench.run NAME ...`) runs them by.
SECTIONS: dict[str, tuple[str, Callable[[Path], list[tuple[str, str]]]]] = {
    "propagation": ("revocation propagation: two replicas on PostgreSQL", scaleout.revocation_propagation),
    "workers": ("worker processes: `apikeyd serve --workers W` on SQLite", scaleout.worker_throughput),
    "ratelimit": ("rate-limit check cost: Redis vs in-process", scaleout.rate_limit_cost),
    "listing": ("listing: a page at 1,000 and at 1,000,000 keys in one account", listing.listing_at_scale),
    "limits": ("limits: health latency under the largest allowed requests", limits.health_under_largest_requests),
    "flood": ("flood: wrong secrets for one key, and unknown lookup ids", flood.flood_costs),
    "envoy": ("envoy: no auth, its api_key_auth filter, and apikeyd, under wrk", envoy.envoy_comparison),
    "grpc_cpu": ("gRPC CPU per cached Authorize: apikeyd against a bare grpc.aio floor", grpc_cpu.cpu_per_call),
    "client": ("client library: cached checks in process, revocation, faults, idle streams", client.client_library),
    "usage": ("usage analytics: counting on the hot path, a month of 100 keys' daily usage", usage.usage_costs),
    "credits": ("credits: a check that spends, against a cached check", credits.credit_cost),
    "tracing": ("tracing: a cached Authorize traced over OTLP, against tracing off", tracing.tracing_cost),
}


def _report_scaleout(workdir: Path, names: list[str]) -> None:
    """Sections 7-18 (those named, or all): each starts its own servers and stops them before the next."""
    for name in names:
        title, section = SECTIONS[name]
        _section(title)
        started = time.monotonic()
        for label, text in section(workdir):
            _line(label, text)
        _line("", f"({time.monotonic() - started:.1f} s)")


def main(argv: list[str]) -> int:
    """Everything, or with names (`core` for sections 1-6, then any of SECTIONS) only those, in that order."""
    unknown = [name for name in argv if name != "core" and name not in SECTIONS]
    if unknown:
        print(f"unknown section {', '.join(unknown)}; the sections are: core {' '.join(SECTIONS)}", file=sys.stderr)
        return 2
    exit_code = 0
    with tempfile.TemporaryDirectory(prefix="apikeyd-bench-") as tmp:
        workdir = Path(tmp)
        if not argv or "core" in argv:
            with running_server(workdir) as server:
                _header(server)
                warm_key, *cold_keys = create_keys(server, 1 + COLD_KEYS)
                target = load.Target(server.address, server.pid, warm_key, cold_keys)
                _report_load(load.measure_in_own_process(target, CLIENT_TIMEOUT))
            _line("server stop", f"SIGTERM -> exit code {server.exit_code}")
            exit_code = 0 if server.exit_code == 0 else 1
            _report_in_process(workdir)
        _report_scaleout(workdir, [name for name in SECTIONS if not argv or name in argv])
    for path in plots.write(RESULTS):
        _line("plot", str(path))
    return exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
