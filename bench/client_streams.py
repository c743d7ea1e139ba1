"""Section 4 of `python -m bench.client`: idle change streams, what they cost the server.

A child process opens STREAMS WatchApiKeyChanges streams, one connection each (as STREAMS client
processes would), each read from its first response on. The server's cached Authorize latency (blocking
stub) and throughput (48 in flight) with and without them, in interleaved rounds (the streams are opened
and closed between), with the server's CPU per call and at rest (the heartbeats), and its VmRSS growth
per open stream; then the same streams over MUX_CONNECTIONS connections on a fresh server (what is per
connection, what per stream), and both against a floor: a bare grpc.aio servicer writing the same
heartbeats on uvloop, as `apikeyd serve` runs.

Run by bench.client, whose helpers it uses. Linux only (/proc); everything is on 127.0.0.1.
"""

import asyncio
import contextlib
import math
import multiprocessing
import statistics
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection as Pipe
from pathlib import Path
from typing import Any

import grpc

from apikeyd.authorizer.feed import SQLITE_POLL_INTERVAL
from apikeyd.change_stream import HEARTBEAT_INTERVAL
from apikeyd.v1 import api_keys_pb2 as pb
from apikeyd.v1 import api_keys_pb2_grpc as pb_grpc
from bench import load
from bench.client import CALL_TIMEOUT, SCOPES, Lines, _create_keys, _LoopThread
from bench.server_process import ServerProcess, running_server, spawned_server

STREAMS = 500
STREAM_ROUNDS = 4
STREAM_SEQUENTIAL = 1_000
STREAM_THROUGHPUT = 1.0  # seconds, 48 in flight
STREAM_SETTLE = 1.0  # seconds after the streams are open or closed before anything is measured
STREAM_REST = 1.0  # seconds of the server at rest measured each round: two heartbeats per stream
FLOOR_SECONDS = 2.0  # the floor's heartbeats counted over this long: four per stream
STREAM_OPEN_TIMEOUT = 60.0
MUX_CONNECTIONS = 5  # the same streams over few connections: what is per connection, what per stream


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


# --- the floor for streams: a bare grpc.aio servicer that writes a heartbeat as often as apikeyd does --------

# apikeyd serve reads its feed on SQLite every SQLITE_POLL_INTERVAL and heartbeats a stream after a read at most
# every HEARTBEAT_INTERVAL (change_stream.py): after every other read, so one per stream every 0.5 s.
HEARTBEAT_PERIOD = math.ceil(HEARTBEAT_INTERVAL / SQLITE_POLL_INTERVAL) * SQLITE_POLL_INTERVAL


class _HeartbeatFloor(pb_grpc.ApiKeyServiceServicer):
    """WatchApiKeyChanges as little as grpc.aio allows: one response at once, then a constant heartbeat to
    every stream every HEARTBEAT_PERIOD, all woken by one event as apikeyd's publish wakes its subscriptions."""

    def __init__(self) -> None:
        self._tick = asyncio.Event()
        self._first = pb.WatchApiKeyChangesResponse(position=1)
        self._beat = pb.WatchApiKeyChangesResponse(position=1, heartbeat=True)

    async def ticker(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_PERIOD)
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




@dataclass(frozen=True)
class _FloorFigures:
    kb_per_stream: float  # one connection each
    kb_per_stream_mux: float  # MUX_CONNECTIONS connections
    cpu_us_per_heartbeat: float


def floor_streams() -> _FloorFigures:
    """The same opens against fresh floor servers: what grpc.aio itself costs per stream and per heartbeat."""
    figures = []
    for connections in (STREAMS, MUX_CONNECTIONS):
        with spawned_server(_floor_main) as (address, pid):
            holder = _StreamHolder(address, "")
            try:
                before = _rss_kb(pid)
                holder.open(STREAMS, connections)
                time.sleep(STREAM_SETTLE)
                kb = (_rss_kb(pid) - before) / STREAMS
                beats, cpu = holder.heartbeats(), _cpu(pid)
                time.sleep(FLOOR_SECONDS)
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
    time.sleep(STREAM_REST)
    rest = (_cpu(pid) - before) / STREAM_REST
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
        f"{rate:,.0f}/s reached the streams (expected {STREAMS / HEARTBEAT_PERIOD:,.0f}: each stream one every "
        f"{HEARTBEAT_PERIOD:g} s, every {HEARTBEAT_PERIOD / SQLITE_POLL_INTERVAL:g} feed reads on SQLite); "
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
