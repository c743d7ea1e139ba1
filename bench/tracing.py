"""Tracing (issue 13): what a cached Authorize pays with APIKEYD_TRACING=otlp, against the same server with
tracing off (the anchor), in one run. The traced server exports for real, batched over OTLP/gRPC, to a
collector in this process that counts what it receives (so the figure includes the export's CPU in the
server, which shares its GIL with the calls). Sequential p50/p99 from the blocking stub, calls/s with calls
in flight from a grpc.aio channel and the server's CPU per call; interleaved rounds, each figure the median,
and the ratios to the anchor medians of the per-round ratios.

`--baseline SRC` adds a third server run from another source tree (`PYTHONPATH=SRC`), for instance a
`git worktree` of the commit before tracing at SRC/../: tracing off must match it within noise.

Run alone: `python -m bench.tracing [--baseline /path/to/other/src]`."""

import argparse
import asyncio
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import AsyncExitStack, ExitStack, contextmanager
from pathlib import Path

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from apikeyd.v1 import api_keys_pb2 as pb
from apikeyd.v1 import api_keys_pb2_grpc as pb_grpc
from bench import load
from bench.scaleout import _create
from bench.server_process import ServerProcess, running_server

Lines = list[tuple[str, str]]
ROUNDS = 6
CALLS = 1000  # sequential, per round
THROUGHPUT_SECONDS = 1.5


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP collector that only counts the spans it is sent."""

    def __init__(self) -> None:
        self.spans = 0

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext) -> trace_service_pb2.ExportTraceServiceResponse:
        self.spans += sum(len(scope.spans) for resource in request.resource_spans for scope in resource.scope_spans)
        return trace_service_pb2.ExportTraceServiceResponse()


@contextmanager
def _collector() -> Iterator[tuple[str, _Collector]]:
    collector = _Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"http://127.0.0.1:{port}", collector
    finally:
        server.stop(0)


def _authorize(channel: grpc.Channel, aio_channel: grpc.aio.Channel, key: str) -> tuple[Callable[[], None], Callable[[], object]]:
    request = pb.AuthorizeRequest(key=key, required_scopes=load.REQUIRED_SCOPES)
    blocking, aio = pb_grpc.ApiKeyServiceStub(channel), pb_grpc.ApiKeyServiceStub(aio_channel)

    async def call_aio() -> None:
        load._expect_allowed(await aio.Authorize(request, timeout=load.CALL_TIMEOUT))

    return lambda: load._expect_allowed(blocking.Authorize(request, timeout=load.CALL_TIMEOUT)), call_aio


Round = tuple[load.Latency, load.Throughput]


async def _rounds(servers: dict[str, ServerProcess]) -> dict[str, list[Round]]:
    async with AsyncExitStack() as stack:
        calls = {}
        for name, server in servers.items():
            channel = stack.enter_context(grpc.insecure_channel(server.address))
            aio_channel = await stack.enter_async_context(grpc.aio.insecure_channel(server.address))
            key = _create(pb_grpc.ApiKeyServiceStub(channel), server, name).secret
            calls[name] = _authorize(channel, aio_channel, key)
        for name, (blocking, aio) in calls.items():  # the first call fills the cache; the rest warm up
            load._sequential(blocking, load.WARMUP_CALLS)
            await load._throughput(aio, load.WARMUP_SECONDS, servers[name].pid)
        rounds: dict[str, list[Round]] = {name: [] for name in servers}
        names = list(servers)
        for number in range(ROUNDS):  # interleaved, each server first in turn, so noise hits all alike
            for name in names[number % len(names):] + names[: number % len(names)]:
                blocking, aio = calls[name]
                latency = load.latency(load._sequential(blocking, CALLS))
                rounds[name].append((latency, await load._throughput(aio, THROUGHPUT_SECONDS, servers[name].pid)))
        return rounds


def _ratio(anchor: list[Round], other: list[Round], figure: Callable[[Round], float | None]) -> str:
    """The median of the per-round ratios other/anchor: each pairs runs next to each other in time."""
    ratios = [b / a for a, b in ((figure(x), figure(y)) for x, y in zip(anchor, other, strict=True)) if a and b]
    return f"x{statistics.median(ratios):.3f}" if ratios else "n/a"


def tracing_cost(workdir: Path, baseline: str = "") -> Lines:
    with ExitStack() as stack:
        endpoint, collector = stack.enter_context(_collector())
        servers = {"off": stack.enter_context(running_server(workdir / "tracing-off", name="tracing-off"))}
        servers["otlp"] = stack.enter_context(
            running_server(
                workdir / "tracing-otlp",
                name="tracing-otlp",
                extra_args=["--tracing", "otlp"],
                env={"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_INSECURE": "true"},
            )
        )
        if baseline:
            servers["baseline"] = stack.enter_context(
                running_server(workdir / "tracing-baseline", name="tracing-baseline", env={"PYTHONPATH": baseline})
            )
        rounds = asyncio.run(_rounds(servers))
        stack.close()  # SIGTERM: the traced server exports what it still holds before it exits
        received = collector.spans
    lines: Lines = []
    for name, figures in rounds.items():
        cpu = [t.server_cpu_us for _, t in figures if t.server_cpu_us is not None]
        lines.append((
            f"tracing {name}",
            f"cached Authorize sequential p50 {statistics.median(lat.p50_ms for lat, _ in figures):.3f} ms  "
            f"p99 {statistics.median(lat.p99_ms for lat, _ in figures):.3f} ms   "
            f"{statistics.median(t.calls_per_s for _, t in figures):.0f} calls/s with {load.CONCURRENCY} in flight   "
            f"server CPU/call {statistics.median(cpu) if cpu else float('nan'):.0f} us",
        ))
    for name, other in rounds.items():
        if name != "off":
            anchor = rounds["off"]
            lines.append((
                f"{name} / off",
                f"p50 {_ratio(anchor, other, lambda r: r[0].p50_ms)}  p99 {_ratio(anchor, other, lambda r: r[0].p99_ms)}  "
                f"throughput {_ratio(anchor, other, lambda r: r[1].calls_per_s)}  "
                f"server CPU/call {_ratio(anchor, other, lambda r: r[1].server_cpu_us)}  "
                f"(median of {ROUNDS} interleaved rounds)",
            ))
    lines.append(("spans exported", f"{received} received by the collector from the otlp server"))
    return lines


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="", help="a source tree (its src/) to run a third server from")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="apikeyd-bench-") as tmp:
        for label, text in tracing_cost(Path(tmp), arguments.baseline):
            print(f"{label:<22}{text}", flush=True)
    sys.exit(0)
