"""`python -m bench.grpc_cpu`: the server CPU one cached Authorize costs, and how much of it is grpc's own.

1. A real `apikeyd serve` (fresh SQLite file, free loopback port), one key, its cache warmed.
2. The floor, in a child process: a bare grpc.aio server whose Authorize returns a constant, the very
   response apikeyd answers the bench key with, on the event loop `apikeyd serve` runs (uvloop). Any
   grpc.aio servicer pays that much per call, so apikeyd's Authorize minus the floor is the part that is
   ours. With --asyncio-floor, a second floor on asyncio's own loop shows what the loop choice is worth.
3. From a client process: ROUNDS interleaved rounds of CALLS calls each (CONCURRENCY in flight on one
   grpc.aio channel, as bench.load's throughput runs do) of health Check and cached Authorize on
   apikeyd, and Authorize on the floor(s). Server CPU per call is the utime+stime delta of the server
   process (/proc) over the calls, also split by thread (the event loop's and grpc core's own); each
   figure is the median of the rounds, the lowest and highest round beside it. Ours/floor is the median
   of the per-round ratios, which pair runs next to each other in time.
4. With --profile SECONDS: `py-spy record --native` samples apikeyd's event loop thread while the client
   drives cached Authorize, and the samples are split into apikeyd's parts (the WireErrors wrapper,
   grpc_errors and metrics, the servicer, the authorizer; each with what it calls) and the rest (grpc's
   cygrpc extension, grpc.aio's Python, the syscalls grpc makes, protobuf, the event loop). py-spy samples
   wall-clock time: on a busy machine a thread waiting for a core counts where it was preempted, mostly
   in syscalls, so the event loop's kernel time is taken from /proc instead, and py-spy's samples outside
   syscalls split its user time. Needs py-spy (PyPI) and the right to ptrace the server (root, or
   kernel.yama.ptrace_scope 0).
5. With --perf SECONDS: `perf record -e cpu-clock` (on-CPU time, every thread) of apikeyd and then of the
   floor under the same load, split by shared object (cygrpc, the interpreter, kernel, libc, uvloop,
   protobuf) in us/call side by side: the interpreter's difference is apikeyd's Python. Needs perf.

Linux only (/proc). Every loop is bounded in count and in time; everything is on 127.0.0.1.
"""

import argparse
import asyncio
import collections
import contextlib
import multiprocessing
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import grpc
import uvloop
from grpc_health.v1 import health_pb2, health_pb2_grpc

from apikeyd.v1 import api_keys_pb2 as pb
from apikeyd.v1 import api_keys_pb2_grpc as pb_grpc
from bench import cpu_profile
from bench.load import REQUIRED_SCOPES, Spread
from bench.server_process import create_keys, running_server, spawned_server

ROUNDS = 7
CALLS = 4000  # per RPC and round
CONCURRENCY = 48
WARMUP_CALLS = 2000
CALL_TIMEOUT = 10.0  # seconds; a stuck call fails the run instead of hanging it
CLIENT_TIMEOUT = 900.0  # seconds for the whole client process
LABEL = 28

EVENT_LOOP, EVENT_LOOP_KERNEL = "event loop", "of which kernel"
HEALTH, AUTHORIZE, FLOOR, ASYNCIO_FLOOR = "health Check", "Authorize (cached)", "floor Authorize", "floor on asyncio's loop"


# --- the floor: a bare grpc.aio servicer ------------------------------------------------------------


class _ConstantAuthorize(pb_grpc.ApiKeyServiceServicer):
    def __init__(self, response: pb.AuthorizeResponse) -> None:
        self._response = response

    async def Authorize(self, request: pb.AuthorizeRequest, context: grpc.aio.ServicerContext) -> pb.AuthorizeResponse:
        return self._response


async def _serve_floor(response: bytes, control: Connection) -> None:
    server = grpc.aio.server()
    pb_grpc.add_ApiKeyServiceServicer_to_server(_ConstantAuthorize(pb.AuthorizeResponse.FromString(response)), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    control.send(port)
    # The parent closing its end stops the floor; the blocking read waits in a thread, off the loop.
    with contextlib.suppress(EOFError):
        await asyncio.get_running_loop().run_in_executor(None, control.recv)
    await server.stop(0)


def _floor_main(control: Connection, response: bytes, on_uvloop: bool) -> None:
    (uvloop.run if on_uvloop else asyncio.run)(_serve_floor(response, control))


def floor_server(response: bytes, on_uvloop: bool = True) -> contextlib.AbstractContextManager[tuple[str, int]]:
    """(address, pid) of a floor server answering every Authorize with `response` (serialized)."""
    return spawned_server(_floor_main, response, on_uvloop)


# --- CPU time from /proc ----------------------------------------------------------------------------


def _stat_cpu(path: str) -> tuple[str, float, float] | None:
    """(command name, utime, stime) in seconds from a /proc stat file; None once the task is gone."""
    try:
        with open(path) as stat:
            text = stat.read()
    except OSError:
        return None
    name = text[text.index("(") + 1 : text.rindex(")")]
    fields = text.rsplit(")", 1)[1].split()  # the name may hold spaces and parentheses
    ticks = os.sysconf("SC_CLK_TCK")
    return name, int(fields[11]) / ticks, int(fields[12]) / ticks


def process_cpu(pid: int) -> float:
    stat = _stat_cpu(f"/proc/{pid}/stat")
    if stat is None:
        raise RuntimeError(f"no /proc/{pid}/stat: this bench needs Linux and a live server")
    return stat[1] + stat[2]


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds by thread group: the main thread (the event loop) as EVENT_LOOP, with its time in the
    kernel again as EVENT_LOOP_KERNEL; the others by their name with any trailing number dropped, so a
    pool's threads add up. Threads gone by now are missing here, but not from process_cpu."""
    groups: dict[str, float] = collections.defaultdict(float)
    for tid in os.listdir(f"/proc/{pid}/task"):
        stat = _stat_cpu(f"/proc/{pid}/task/{tid}/stat")
        if stat is None:
            continue
        if int(tid) == pid:
            groups[EVENT_LOOP] += stat[1] + stat[2]
            groups[EVENT_LOOP_KERNEL] += stat[2]
        else:
            groups[re.sub(r"[-_]?\d+$", "", stat[0]) or stat[0]] += stat[1] + stat[2]
    return groups


# --- the client -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    name: str
    address: str
    pid: int
    rpc: str  # "health" or "authorize"


@dataclass(frozen=True)
class Run:
    server_cpu_us: float
    threads_us: dict[str, float]
    calls_per_s: float
    client_cpu_us: float


def _expect_allowed(reply: pb.AuthorizeResponse) -> None:
    # A denial is an answer with status OK, so without this check the bench could time the wrong path.
    if not reply.allowed:
        raise RuntimeError(f"Authorize denied the bench key: {pb.AuthorizeResponse.Code.Name(reply.code)}")


def _caller(channel: grpc.aio.Channel, rpc: str, key: str) -> Callable[[], Awaitable[None]]:
    if rpc == "health":
        check = health_pb2_grpc.HealthStub(channel).Check
        request = health_pb2.HealthCheckRequest(service="")

        async def health() -> None:
            await check(request, timeout=CALL_TIMEOUT)

        return health
    authorize = pb_grpc.ApiKeyServiceStub(channel).Authorize
    authorize_request = pb.AuthorizeRequest(key=key, required_scopes=REQUIRED_SCOPES)

    async def cached() -> None:
        _expect_allowed(await authorize(authorize_request, timeout=CALL_TIMEOUT))

    return cached


async def _drive(call: Callable[[], Awaitable[None]], calls: int, concurrency: int, seconds: float) -> int:
    """`calls` calls, `concurrency` at a time, or as many as fit in `seconds`; how many were made."""
    left, deadline = calls, time.monotonic() + seconds

    async def caller() -> None:
        nonlocal left
        while left > 0 and time.monotonic() < deadline:
            left -= 1
            await call()

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return calls - left


async def _measure(call: Callable[[], Awaitable[None]], pid: int, calls: int, concurrency: int) -> Run:
    threads_before, cpu_before, client_before = thread_cpu(pid), process_cpu(pid), time.process_time()
    start = time.perf_counter()
    done = await _drive(call, calls, concurrency, CLIENT_TIMEOUT)
    elapsed = time.perf_counter() - start
    cpu_after, threads_after, client_after = process_cpu(pid), thread_cpu(pid), time.process_time()
    per_call = 1e6 / done
    return Run(
        (cpu_after - cpu_before) * per_call,
        {name: (threads_after[name] - threads_before.get(name, 0.0)) * per_call for name in threads_after},
        done / elapsed,
        (client_after - client_before) * per_call,
    )


async def _rounds(targets: list[Target], key: str, rounds: int, calls: int, concurrency: int) -> dict[str, list[Run]]:
    channels = {address: grpc.aio.insecure_channel(address) for address in {t.address for t in targets}}
    try:
        callers = {t.name: _caller(channels[t.address], t.rpc, key) for t in targets}
        for target in targets:  # a first Authorize fills the cache; the rest warm channels and code paths
            await _drive(callers[target.name], WARMUP_CALLS, concurrency, CLIENT_TIMEOUT)
        runs: dict[str, list[Run]] = {t.name: [] for t in targets}
        for number in range(rounds):
            # Each round starts with another RPC, so none always runs first on a just-disturbed machine.
            shift = number % len(targets)
            for target in targets[shift:] + targets[:shift]:
                runs[target.name].append(await _measure(callers[target.name], target.pid, calls, concurrency))
        return runs
    finally:
        for channel in channels.values():
            await channel.close()


def measure(targets: list[Target], key: str, rounds: int, calls: int, concurrency: int) -> dict[str, list[Run]]:
    return asyncio.run(_rounds(targets, key, rounds, calls, concurrency))


def load_for(target: Target, key: str, seconds: float, concurrency: int) -> int:
    """Cached calls for `seconds` (at most 10 million), for the profiler to watch."""
    async def run() -> int:
        async with grpc.aio.insecure_channel(target.address) as channel:
            return await _drive(_caller(channel, target.rpc, key), 10_000_000, concurrency, seconds)

    return asyncio.run(run())


def _authorize_response(address: str, key: str) -> bytes:
    with grpc.insecure_channel(address) as channel:
        reply = pb_grpc.ApiKeyServiceStub(channel).Authorize(
            pb.AuthorizeRequest(key=key, required_scopes=REQUIRED_SCOPES), timeout=CALL_TIMEOUT
        )
    _expect_allowed(reply)
    return reply.SerializeToString()


# --- the samplers (bench/cpu_profile.py) ------------------------------------------------------------


def _sampled(target: Target, key: str, seconds: float, concurrency: int, command: list[str]) -> None:
    """`command` (a sampler that stops by itself after `seconds`) while a client process drives `target`."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        load = pool.apply_async(load_for, (target, key, seconds + 4.0, concurrency))
        time.sleep(2.0)  # the client's channel is up and calls flow before sampling starts
        subprocess.run(command, check=True, capture_output=True, timeout=seconds + 60.0)
        load.get(seconds + 60.0)


# --- the report -------------------------------------------------------------------------------------


def _threads(runs: list[Run]) -> str:
    first = {EVENT_LOOP: 0, EVENT_LOOP_KERNEL: 1}
    names = sorted({name for run in runs for name in run.threads_us}, key=lambda n: (first.get(n, 2), n))
    medians = {name: statistics.median(run.threads_us.get(name, 0.0) for run in runs) for name in names}
    return ", ".join(f"{name} {value:.0f}" for name, value in medians.items() if value >= 1.0)


def report(runs: dict[str, list[Run]]) -> Iterator[tuple[str, str]]:
    for name, target_runs in runs.items():
        cpu = Spread.of([run.server_cpu_us for run in target_runs])
        rate = statistics.median(run.calls_per_s for run in target_runs)
        client = statistics.median(run.client_cpu_us for run in target_runs)
        yield (
            name,
            f"server {cpu.median:.0f} us/call ({cpu.low:.0f}-{cpu.high:.0f})  [{_threads(target_runs)}]  "
            f"{rate:.0f} calls/s, client {client:.0f} us/call",
        )
    for name in (AUTHORIZE, HEALTH):
        pairs = list(zip(runs[name], runs[FLOOR], strict=True))
        ratio = Spread.of([ours.server_cpu_us / floor.server_cpu_us for ours, floor in pairs])
        extra = Spread.of([ours.server_cpu_us - floor.server_cpu_us for ours, floor in pairs])
        yield (
            f"{name.split()[0]} - floor",
            f"{extra.median:.0f} us/call (rounds {extra.low:.0f} to {extra.high:.0f}); "
            f"ratio {ratio.median:.2f} (rounds {ratio.low:.2f}-{ratio.high:.2f})",
        )


def cpu_per_call(
    workdir: Path,
    rounds: int = ROUNDS,
    calls: int = CALLS,
    concurrency: int = CONCURRENCY,
    asyncio_floor: bool = False,
    profile_seconds: float = 0.0,
    profile_out: Path | None = None,
    perf_seconds: float = 0.0,
) -> Iterator[tuple[str, str]]:
    """The section, as (label, text) lines; `apikeyd serve` and the floors are stopped at the end."""
    with running_server(workdir / "grpc-cpu") as server, contextlib.ExitStack() as floors:
        (key,) = create_keys(server, 1)
        response = _authorize_response(server.address, key)  # also the miss that fills the cache
        floor_address, floor_pid = floors.enter_context(floor_server(response))
        targets = [
            Target(HEALTH, server.address, server.pid, "health"),
            Target(AUTHORIZE, server.address, server.pid, "authorize"),
            Target(FLOOR, floor_address, floor_pid, "authorize"),
        ]
        if asyncio_floor:
            address, pid = floors.enter_context(floor_server(response, on_uvloop=False))
            targets.append(Target(ASYNCIO_FLOOR, address, pid, "authorize"))
        yield (
            "",
            f"grpcio {grpc.__version__}, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs; median of "
            f"{rounds} interleaved rounds of {calls} calls, {concurrency} in flight",
        )
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            runs = pool.apply_async(measure, (targets, key, rounds, calls, concurrency)).get(CLIENT_TIMEOUT)
        yield from report(runs)
        if profile_seconds > 0:
            raw = profile_out or workdir / "profile.txt"
            _sampled(targets[1], key, profile_seconds, concurrency, cpu_profile.py_spy_command(server.pid, profile_seconds, raw))
            loop, kernel = (
                statistics.median(run.threads_us[name] for run in runs[AUTHORIZE]) for name in (EVENT_LOOP, EVENT_LOOP_KERNEL)
            )
            yield from cpu_profile.report_profile(raw, server.pid, loop - kernel, kernel)
        if perf_seconds > 0:
            shares = []
            for target in targets[1:3]:  # apikeyd's Authorize, then the floor's
                out = workdir / f"perf-{target.pid}.data"
                _sampled(target, key, perf_seconds, concurrency, cpu_profile.perf_command(target.pid, perf_seconds, out))
                shares.append(cpu_profile.perf_split(out))
            ours_us, floor_us = (statistics.median(run.server_cpu_us for run in runs[name]) for name in (AUTHORIZE, FLOOR))
            yield from cpu_profile.report_perf(shares[0], shares[1], ours_us, floor_us)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.grpc_cpu", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--calls", type=int, default=CALLS, help="calls per RPC and round")
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY)
    parser.add_argument("--asyncio-floor", action="store_true", help="a second floor, on asyncio's own loop")
    parser.add_argument("--profile", type=float, default=0.0, metavar="SECONDS", help="py-spy the event loop too")
    parser.add_argument("--profile-out", type=Path, help="where to keep py-spy's raw output")
    parser.add_argument("--perf", type=float, default=0.0, metavar="SECONDS", help="perf record apikeyd and the floor")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="apikeyd-grpc-cpu-") as tmp:
        lines = cpu_per_call(
            Path(tmp), args.rounds, args.calls, args.concurrency, args.asyncio_floor, args.profile, args.profile_out,
            args.perf,
        )
        for label, text in lines:
            print(f"{label:<{LABEL}}{text}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
