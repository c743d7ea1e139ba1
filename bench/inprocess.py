"""Figures that need the server's insides: the argon2 verification counter and the hasher itself.

`apikeyd serve` exposes no counter over gRPC, so single-flight is measured against a Server built in
this process, whose App's hasher counts every verification it runs.
"""

import asyncio
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from apikeyd.app import App
from apikeyd.authorizer.hashing import Argon2Parameters, SecretHasher
from apikeyd.config import Settings
from apikeyd.lifecycle import NewKey
from apikeyd.server import Server
from apikeyd.store import migrate
from apikeyd.v1 import api_keys_pb2 as pb
from apikeyd.v1 import api_keys_pb2_grpc as pb_grpc

CONCURRENT_COLD_CALLS = 100
ARGON2_RUNS = 50
CALL_TIMEOUT = 30.0  # seconds; generous because 100 calls queue behind one argon2 check


@dataclass(frozen=True)
class SingleFlight:
    calls: int
    allowed: int
    misses: int  # calls that found no cache entry, so waited on a verification: the ones that test sharing
    verifications: int


@dataclass(frozen=True)
class Argon2Cost:
    parameters: Argon2Parameters
    verify_p50_ms: float
    runs: int


async def _single_flight(workdir: Path) -> SingleFlight:
    settings = Settings.load(
        environ={}, database_url=f"sqlite:///{workdir / 'single-flight.db'}", listen="127.0.0.1:0", metrics_listen=""
    )
    app = App(settings)
    migrate.upgrade(app.repository.engine)
    server = Server(app)  # grpc.aio wants the running loop, so it is built here and not before
    port = await server.start(settings.listen)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.ApiKeyServiceStub(channel)
            created = await app.manager.create(
                app.manager.operator("bench"), "bench", NewKey("single-flight", ("messages:send:all",))
            )
            request = pb.AuthorizeRequest(key=created.secret, required_scopes=["messages:send"])
            verifications_before, misses_before = app.hasher.verifications, app.cache.stats.misses
            replies = await asyncio.gather(
                *(stub.Authorize(request, timeout=CALL_TIMEOUT) for _ in range(CONCURRENT_COLD_CALLS))
            )
            verifications = app.hasher.verifications - verifications_before
            misses = app.cache.stats.misses - misses_before
    finally:
        await server.stop(1)
    return SingleFlight(len(replies), sum(reply.allowed for reply in replies), misses, verifications)


def single_flight(workdir: Path) -> SingleFlight:
    """How many argon2 verifications 100 concurrent first checks of one fresh key cost (1 is right)."""
    return asyncio.run(_single_flight(workdir))


def argon2_cost() -> Argon2Cost:
    """One argon2id verification with the server's default parameters, timed on this machine."""
    defaults = Settings()
    parameters = Argon2Parameters(
        defaults.argon2_time_cost, defaults.argon2_memory_kib, defaults.argon2_parallelism
    )
    hasher = SecretHasher(parameters)
    secret = "bench-secret"
    secret_hash = hasher.hash(secret)
    samples = []
    for _ in range(ARGON2_RUNS):
        start = time.perf_counter()
        if not hasher.verify(secret_hash, secret):
            raise RuntimeError("argon2 rejected the secret it just hashed")
        samples.append(time.perf_counter() - start)
    return Argon2Cost(parameters, statistics.median(samples) * 1e3, ARGON2_RUNS)
