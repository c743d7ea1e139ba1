"""A real `apikeyd serve` in its own process, started and stopped the way an operator would."""

import contextlib
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from apikeyd.v1 import api_keys_pb2 as pb
from apikeyd.v1 import api_keys_pb2_grpc as pb_grpc

STARTUP_TIMEOUT = 30.0  # seconds: imports and the SQLite migration take a few on a slow machine
STOP_TIMEOUT = 20.0  # seconds: above the server's default 10 s shutdown grace


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    address: str
    log_path: Path
    ext_authz_address: str = ""  # host:port of its HTTP ext_authz endpoint
    operator_key: str = ""  # made with `apikeyd admin-key create`, as the README's quickstart does
    exit_code: int | None = None  # set once stopped

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def credential(self) -> list[tuple[str, str]]:
        """The metadata a call with its operator key sends."""
        return [("authorization", f"Bearer {self.operator_key}")]


def free_port() -> int:
    """A port nobody listens on right now; the server binds it a moment later."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _apikeyd() -> str:
    # The console script installed next to this interpreter, so the bench runs the venv's apikeyd.
    return str(Path(sys.executable).with_name("apikeyd"))


def _wait_until_serving(server: ServerProcess) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise RuntimeError(
                    f"apikeyd exited with {server.process.returncode} at start-up:\n{_tail(server)}"
                )
            with contextlib.suppress(grpc.RpcError):
                reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            time.sleep(0.1)
    raise RuntimeError(f"apikeyd was not SERVING after {STARTUP_TIMEOUT:.0f} s:\n{_tail(server)}")


def _tail(server: ServerProcess, lines: int = 20) -> str:
    return "\n".join(server.log_path.read_text(errors="replace").splitlines()[-lines:])


def _stop(server: ServerProcess) -> None:
    server.process.terminate()  # SIGTERM: the server drains and should exit 0
    try:
        server.exit_code = server.process.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()
        raise RuntimeError(
            f"apikeyd did not exit within {STOP_TIMEOUT:.0f} s of SIGTERM:\n{_tail(server)}"
        ) from None


def run_apikeyd(*args: str, timeout: float = 60.0) -> str:
    """One `apikeyd` command (migrate, admin-key create, ...) to completion; its stdout, stripped."""
    return subprocess.run(
        [_apikeyd(), *args], stdin=subprocess.DEVNULL, capture_output=True, text=True, check=True, timeout=timeout
    ).stdout.strip()


def create_keys(server: ServerProcess, count: int) -> list[str]:
    """Full key strings for `count` new keys in accounts/bench; only CreateApiKey ever shows them."""
    credential = server.credential
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ApiKeyServiceStub(channel)
        return [
            stub.CreateApiKey(
                pb.CreateApiKeyRequest(
                    parent="accounts/bench",
                    api_key=pb.ApiKey(display_name=f"bench {n}", scopes=["messages:send:all"]),
                ),
                timeout=30.0,
                metadata=credential,
            ).secret
            for n in range(count)
        ]


@contextlib.contextmanager
def running_server(
    workdir: Path,
    database_url: str = "",
    extra_args: Sequence[str] = (),
    name: str = "apikeyd",
    address: str = "",
    env: Mapping[str, str] | None = None,
) -> Iterator[ServerProcess]:
    """`apikeyd serve` on a free loopback port, or on `address` (a server started again where one was killed),
    by default with a fresh SQLite file in workdir (the same file again for the same workdir), or on
    `database_url`, already migrated; `extra_args` added, and `env` to this environment; SIGTERM on the way
    out."""
    workdir.mkdir(parents=True, exist_ok=True)
    address = address or f"127.0.0.1:{free_port()}"
    ext_authz_address = f"127.0.0.1:{free_port()}"  # never the fixed default, which `make run` may hold
    log_path = workdir / f"{name}.log"
    database_url = database_url or f"sqlite:///{workdir / 'bench.db'}"
    command = [
        _apikeyd(),
        "serve",
        "--listen",
        address,
        "--database-url",
        database_url,
        "--metrics-listen",
        "127.0.0.1:0",
        "--ext-authz-listen",
        ext_authz_address,
        *extra_args,
    ]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    server = ServerProcess(process, address, log_path, ext_authz_address)
    try:
        _wait_until_serving(server)
        server.operator_key = run_apikeyd(
            "admin-key", "create", "--display-name", "bench", "--database-url", database_url
        )
        yield server
    except BaseException:
        # A failed call is easier to explain with the server's side of the story next to it.
        print(f"apikeyd log, last lines:\n{_tail(server)}", file=sys.stderr)
        raise
    finally:
        if process.poll() is None:
            _stop(server)
        else:
            server.exit_code = process.returncode


FLOOR_START_TIMEOUT = 30.0


@contextlib.contextmanager
def spawned_server(target: Callable[..., None], *args: Any) -> Iterator[tuple[str, int]]:
    """(address, pid) of a server that `target(control, *args)` runs in a fresh process (spawned: the parent
    runs gRPC, whose threads do not survive a fork) and whose port it sends on `control`."""
    context = multiprocessing.get_context("spawn")
    control, child_end = context.Pipe()
    process = context.Process(target=target, args=(child_end, *args), daemon=True)
    process.start()
    child_end.close()
    try:
        if not control.poll(FLOOR_START_TIMEOUT):
            raise RuntimeError(f"the floor server did not start within {FLOOR_START_TIMEOUT:.0f} s")
        yield f"127.0.0.1:{control.recv()}", process.pid  # type: ignore[misc]
    finally:
        control.close()
        process.join(10.0)
        if process.is_alive():
            process.kill()
            process.join()
