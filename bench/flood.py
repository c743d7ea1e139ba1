"""The flood section of `make bench`: what a flood of well-formed but wrong key strings costs everyone else.

One `apikeyd serve` (SQLite). An attacker in a process of its own sends `ATTACK_RATE` Authorize calls a second
with valid checksums, either distinct wrong secrets for one real key's lookup id ("wrong secrets") or
distinct unknown lookup ids ("unknown ids"). Meanwhile this process measures, sequentially, the first check
of other fresh keys (a cache miss each: one database read and one argon2 verification) and a cached check.
The same figures without an attack, in the same run, are the anchors the attacked figures are divided by.
argon2 verifications are read from the server's Prometheus endpoint, as an operator would.

Every loop is bounded in count and in time; everything listens on and connects to 127.0.0.1 only.
"""

import asyncio
import multiprocessing
import multiprocessing.synchronize
import re
import statistics
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from apikeyd.domain import keys
from apikeyd.v1 import api_keys_pb2 as pb
from apikeyd.v1 import api_keys_pb2_grpc as pb_grpc
from bench.load import _server_cpu_seconds
from bench.server_process import free_port, running_server

Lines = list[tuple[str, str]]

ATTACK_RATE = 250  # calls/s the attacker aims for (the flood was ~200/s)
ATTACK_IN_FLIGHT = 256  # the attacker's calls in flight at most; a slower server lowers the achieved rate
ATTACK_WARMUP = 1.0  # seconds of attack before measuring
ATTACK_SECONDS = 5.0  # seconds of attack measured, at least: the budget's few verifications are then noise
COLD_KEYS = 40  # first checks per phase
CACHED_CALLS = 1000
PHASE_SECONDS = 8.0  # bound on each part of a measurement phase, whatever the latency
CALL_TIMEOUT = 10.0
REQUIRED = ["messages:send"]
COLD_P90_TARGET_MS = 50.0
CACHED_RATIO_TARGET = 1.5
ARGON2_PER_ATTACK_TARGET = 0.05


@dataclass(frozen=True)
class Phase:
    cold_p50_ms: float
    cold_p90_ms: float
    cached_p50_ms: float
    cold_failures: int  # first checks of real keys that were not OK (NOT_FOUND, UNAVAILABLE, ...)
    cold_calls: int  # each one argon2 verification, which the attack's count must leave out


@dataclass(frozen=True)
class Attack:
    sent: int
    seconds: float
    codes: dict[str, int]


def _attack(address: str, lookup_id: str, prefix: str, stop: multiprocessing.synchronize.Event) -> Attack:
    """In the attacker's process: well-formed strings at ATTACK_RATE until `stop`; the lookup id of a real
    key (distinct wrong secrets) or, when empty, a fresh random lookup id each time."""

    async def flood() -> Attack:
        codes: dict[str, int] = {}
        in_flight: set[asyncio.Task[None]] = set()
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.ApiKeyServiceStub(channel)

            async def one(key: str) -> None:
                try:
                    reply = await stub.Authorize(pb.AuthorizeRequest(key=key, required_scopes=REQUIRED), timeout=CALL_TIMEOUT)
                    code = pb.AuthorizeResponse.Code.Name(reply.code)
                except grpc.aio.AioRpcError as error:
                    code = error.code().name
                codes[code] = codes.get(code, 0) + 1

            started = time.monotonic()
            sent = 0
            while not stop.is_set() and time.monotonic() - started < 120:
                due = started + sent / ATTACK_RATE
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                if len(in_flight) >= ATTACK_IN_FLIGHT:
                    await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                key, _ = keys.generate(prefix, lookup_id or keys.new_lookup_id())
                task = asyncio.create_task(one(key))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                sent += 1
            seconds = time.monotonic() - started
            if in_flight:
                await asyncio.wait(in_flight, timeout=CALL_TIMEOUT + 1)
        return Attack(sent, seconds, codes)

    return asyncio.run(flood())


def _attacker(
    address: str, lookup_id: str, prefix: str, stop: multiprocessing.synchronize.Event,
    results: "multiprocessing.Queue[Attack]",
) -> None:
    results.put(_attack(address, lookup_id, prefix, stop))


def _percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] * 1e3


def _timed(call: Callable[[], pb.AuthorizeResponse], count: int, min_seconds: float = 0.0) -> tuple[list[float], int]:
    """`count` calls, or more until `min_seconds` have passed; never past PHASE_SECONDS."""
    samples, failures = [], 0
    started = time.monotonic()
    while len(samples) < count or time.monotonic() - started < min_seconds:
        start = time.perf_counter()
        try:
            ok = call().code == pb.AuthorizeResponse.OK
        except grpc.RpcError:
            ok = False
        samples.append(time.perf_counter() - start)
        failures += not ok
        if time.monotonic() - started > PHASE_SECONDS:
            break
    return samples, failures


def _phase(stub: pb_grpc.ApiKeyServiceStub, cold: list[str], warm: str, min_seconds: float = 0.0) -> Phase:
    """The first check of each key of `cold`, one after another, then cached checks of `warm`, until
    `min_seconds` have passed in all."""
    def authorize(key: str) -> Callable[[], pb.AuthorizeResponse]:
        return lambda: stub.Authorize(pb.AuthorizeRequest(key=key, required_scopes=REQUIRED), timeout=CALL_TIMEOUT)

    cold_samples: list[float] = []
    cold_failures = 0
    started = time.monotonic()
    deadline = started + PHASE_SECONDS
    for key in cold:
        samples, failures = _timed(authorize(key), 1)
        cold_samples += samples
        cold_failures += failures
        if time.monotonic() > deadline:
            break
    cached, _ = _timed(authorize(warm), CACHED_CALLS, min_seconds - (time.monotonic() - started))
    return Phase(
        statistics.median(cold_samples) * 1e3, _percentile(cold_samples, 0.9), statistics.median(cached) * 1e3,
        cold_failures, len(cold_samples),
    )


def _counter(metrics_url: str, name: str) -> float:
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def _attacked_phase(
    address: str, pid: int, metrics_url: str, stub: pb_grpc.ApiKeyServiceStub, cold: list[str], warm: str,
    lookup_id: str, prefix: str,
) -> tuple[Phase, Attack, float, float | None]:
    """The phase under attack; the attack's argon2 verifications, and the server's CPU seconds meanwhile."""
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    results: multiprocessing.Queue[Attack] = context.Queue()
    attacker = context.Process(target=_attacker, args=(address, lookup_id, prefix, stop, results), daemon=True)
    argon2_before = _counter(metrics_url, "apikeyd_argon2_verifications_total")
    cpu_before = _server_cpu_seconds(pid)
    attacker.start()
    try:
        time.sleep(ATTACK_WARMUP)  # the attacker's process starts and the flood reaches its rate
        try:
            phase = _phase(stub, cold, warm, ATTACK_SECONDS)
        finally:
            stop.set()
        attack = results.get(timeout=CALL_TIMEOUT + 130)
        cpu_after = _server_cpu_seconds(pid)
    finally:
        attacker.join(timeout=CALL_TIMEOUT)
        if attacker.is_alive():
            attacker.kill()
    # The measured first checks ran one verification each; the rest is the attack's.
    attack_verifications = _counter(metrics_url, "apikeyd_argon2_verifications_total") - argon2_before - phase.cold_calls
    cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
    return phase, attack, max(0.0, attack_verifications), cpu


def _create(stub: pb_grpc.ApiKeyServiceStub, operator_key: str, count: int) -> list[str]:
    metadata = [("authorization", f"Bearer {operator_key}")]
    return [
        stub.CreateApiKey(
            pb.CreateApiKeyRequest(
                parent="accounts/bench-flood",
                api_key=pb.ApiKey(display_name=f"flood {n}", scopes=["messages:send:all"]),
            ),
            timeout=CALL_TIMEOUT,
            metadata=metadata,
        ).secret
        for n in range(count)
    ]


def _judge(value: float, target: float) -> str:
    return f"target <= {target:g}  {'PASS' if value <= target else 'MISS'}"


def flood_costs(workdir: Path) -> Lines:
    metrics_port = free_port()
    lines: Lines = []
    with running_server(
        workdir / "flood", extra_args=("--metrics-listen", f"127.0.0.1:{metrics_port}"), name="apikeyd-flood"
    ) as server, grpc.insecure_channel(server.address) as channel:
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        stub = pb_grpc.ApiKeyServiceStub(channel)
        victim, warm, *cold = _create(stub, server.operator_key, 2 + 3 * COLD_KEYS)
        parsed = keys.parse(victim)
        assert parsed is not None
        for key in (victim, warm):  # verified before any flood: from now on they are cached checks
            stub.Authorize(pb.AuthorizeRequest(key=key, required_scopes=REQUIRED), timeout=CALL_TIMEOUT)
        anchor = _phase(stub, cold[:COLD_KEYS], warm)
        lines.append((
            "no attack (anchor)",
            f"other keys' first check p50 {anchor.cold_p50_ms:.1f} ms  p90 {anchor.cold_p90_ms:.1f} ms;  "
            f"cached p50 {anchor.cached_p50_ms:.3f} ms",
        ))
        for title, lookup_id, batch in (
            ("wrong secrets", parsed.lookup_id, cold[COLD_KEYS : 2 * COLD_KEYS]),
            ("unknown ids", "", cold[2 * COLD_KEYS :]),
        ):
            phase, attack, verifications, cpu = _attacked_phase(
                server.address, server.pid, metrics_url, stub, batch, warm, lookup_id, parsed.prefix
            )
            rate = attack.sent / attack.seconds
            codes = ", ".join(f"{code} {count}" for code, count in sorted(attack.codes.items()))
            victim_ok = stub.Authorize(pb.AuthorizeRequest(key=victim, required_scopes=REQUIRED), timeout=CALL_TIMEOUT)
            ratio = phase.cached_p50_ms / anchor.cached_p50_ms
            lines += [
                (
                    title,
                    f"{attack.sent} calls at {rate:.0f}/s ({codes}); server CPU "
                    + ("n/a" if cpu is None else f"{cpu / attack.seconds:.0%} of a core"),
                ),
                (
                    "",
                    f"other keys' first check p90 {phase.cold_p90_ms:.1f} ms "
                    f"({phase.cold_p90_ms / anchor.cold_p90_ms:.2f}x anchor; p50 {phase.cold_p50_ms:.1f} ms; "
                    f"{phase.cold_failures} not OK)  {_judge(phase.cold_p90_ms, COLD_P90_TARGET_MS)}",
                ),
                (
                    "",
                    f"cached p50 {phase.cached_p50_ms:.3f} ms = {ratio:.2f}x anchor  {_judge(ratio, CACHED_RATIO_TARGET)}",
                ),
                (
                    "",
                    f"argon2 verifications per attack call {verifications / max(1, attack.sent):.4f} "
                    f"({verifications:.0f})  {_judge(verifications / max(1, attack.sent), ARGON2_PER_ATTACK_TARGET)}; "
                    f"attacked key's own (cached) check afterwards: {pb.AuthorizeResponse.Code.Name(victim_ok.code)}",
                ),
            ]
    return lines


def main() -> None:
    """`python -m bench.flood`: this section alone, as `make bench` prints it."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="apikeyd-bench-flood-") as tmp:
        for label, text in flood_costs(Path(tmp)):
            print(f"{label:<22}{text}", flush=True)


if __name__ == "__main__":
    main()
