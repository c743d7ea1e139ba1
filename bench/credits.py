"""Credits (issue 12): what a check that spends costs, against a cached check of a key without credits (the
anchor) on the same server. A key with credits is answered after one conditional write in the database,
so the figure is the database's commit: SQLite (WAL, no fsync per commit) and PostgreSQL. Sequential
p50/p99 over interleaved rounds, and throughput with calls in flight from threads of this process.

Run alone: `python -m bench.credits`."""

import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from apikeyd.v1 import api_keys_pb2 as pb
from apikeyd.v1 import api_keys_pb2_grpc as pb_grpc
from bench import load, plots
from bench.scaleout import CALL_TIMEOUT, _create, postgres_database, postgres_problem
from bench.server_process import ServerProcess, run_apikeyd, running_server

Lines = list[tuple[str, str]]
ROUNDS = 4
CALLS = 500
IN_FLIGHT = 8  # threads, each with one call in flight
THROUGHPUT_SECONDS = 1.5


def _call(stub: pb_grpc.ApiKeyServiceStub, key: str, credits: bool) -> Callable[[], None]:
    request = pb.AuthorizeRequest(key=key, required_scopes=["messages:send"])

    def call() -> None:
        reply = stub.Authorize(request, timeout=CALL_TIMEOUT)
        load._expect_allowed(reply)
        if reply.HasField("credits_remaining") != credits:
            raise RuntimeError("Authorize answered without spending: were the credits checked?")

    return call


def _throughput(call: Callable[[], None]) -> float:
    done = [0]
    deadline = time.perf_counter() + THROUGHPUT_SECONDS

    def run() -> None:
        count = 0
        while time.perf_counter() < deadline:
            call()
            count += 1
        done.append(count)

    threads = [threading.Thread(target=run) for _ in range(IN_FLIGHT)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(done) / (time.perf_counter() - start)


def _measure(server: ServerProcess, backend: str) -> Lines:
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ApiKeyServiceStub(channel)
        calls = {
            "cached": _call(stub, _create(stub, server, "anchor").secret, credits=False),
            "credits": _call(stub, _create(stub, server, "metered", credits=pb.Credits(remaining=10**12)).secret, credits=True),
        }
        for call in calls.values():
            load._sequential(call, 50)  # fills the cache
        latencies: dict[str, list[load.Latency]] = {name: [] for name in calls}
        samples: dict[str, list[float]] = {name: [] for name in calls}
        rates: dict[str, list[float]] = {name: [] for name in calls}
        for round_number in range(ROUNDS):  # interleaved, so machine noise hits both alike
            for name in calls if round_number % 2 == 0 else list(calls)[::-1]:
                taken = load._sequential(calls[name], CALLS)
                samples[name] += [s * 1e3 for s in taken]
                latencies[name].append(load.latency(taken))
                rates[name].append(_throughput(calls[name]))
    plots.distribution(f"Authorize latency on {backend}: a check that spends credits, and a cached one", samples)
    p50 = {name: statistics.median(r.p50_ms for r in latencies[name]) for name in calls}
    p99 = {name: statistics.median(r.p99_ms for r in latencies[name]) for name in calls}
    rate = {name: statistics.median(rates[name]) for name in calls}
    return [
        (
            f"{backend} {name}",
            f"Authorize sequential p50 {p50[name]:.3f} ms  p99 {p99[name]:.3f} ms   "
            f"{rate[name]:.0f} calls/s with {IN_FLIGHT} in flight",
        )
        for name in calls
    ] + [
        (
            f"{backend} ratio",
            f"credits / cached: p50 x{p50['credits'] / p50['cached']:.2f}, throughput x{rate['credits'] / rate['cached']:.2f}"
            f" (median of {ROUNDS} interleaved rounds)",
        )
    ]


def credit_cost(workdir: Path) -> Lines:
    lines: Lines = []
    with running_server(workdir / "credits-sqlite", name="credits-sqlite") as server:
        lines += _measure(server, "SQLite")
    if problem := postgres_problem():
        return [*lines, ("PostgreSQL", f"skipped: {problem}")]
    with postgres_database("apikeyd_bench_credits") as url:
        run_apikeyd("migrate", "--database-url", url)
        with running_server(workdir / "credits-pg", database_url=url, name="credits-pg") as server:
            lines += _measure(server, "PostgreSQL")
    return lines


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="apikeyd-bench-") as tmp:
        for label, text in credit_cost(Path(tmp)):
            print(f"{label:<22}{text}", flush=True)
    sys.exit(0)
