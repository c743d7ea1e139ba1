"""The limits section of `make bench`: health latency of a real `apikeyd serve` while other clients send the
largest requests the input limits allow (domain/limits.py), and what grpc's old 4 MiB cap let through
(100k required scopes, 300k mask paths, 5,000 label terms, now refused before any work), as a ratio to
idle health latency.

The load comes from SENDERS processes of its own, so that it does not share this process's interpreter
lock with the health client that measures; each sends the requests one after the other for LOAD_SECONDS.
Health is called sequentially, HEALTH_CALLS times idle and as often as fits in LOAD_SECONDS under load.
Everything connects to 127.0.0.1 only; the server is stopped at the end.
"""

import multiprocessing
import statistics
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.field_mask_pb2 import FieldMask
from grpc_health.v1 import health_pb2, health_pb2_grpc

from apikeyd.domain import limits as L
from apikeyd.v1 import api_keys_pb2 as pb
from apikeyd.v1 import api_keys_pb2_grpc as pb_grpc
from bench.server_process import running_server

SENDERS = 2
LOAD_SECONDS = 6.0
HEALTH_CALLS = 500
KEYS = 50  # in the listed account, so that the 20-term filter walks rows
HEALTH_TARGET = 250.0  # ms: the bound tests/test_limits.py asserts for the slowest health call under load


def label_filter(terms: int) -> str:
    return " AND ".join(f'labels.k{i} = "v"' for i in range(terms))


def largest_requests(secret: str, account: str, name: str) -> list[tuple[str, Any]]:
    """(method, request): the largest of each kind that does work, then what grpc's old 4 MiB cap let in."""
    return [
        ("Authorize", pb.AuthorizeRequest(
            key=secret, resource="r" * L.MAX_RESOURCE_LENGTH,
            required_scopes=[f"s{i}:" + "r" * (L.MAX_REQUIRED_SCOPE_LENGTH - 6) for i in range(L.MAX_REQUIRED_SCOPES)],
        )),
        ("ListApiKeys", pb.ListApiKeysRequest(
            parent=f"accounts/{account}", filter=label_filter(L.MAX_FILTER_TERMS), page_size=1000,
        )),
        ("UpdateApiKey", pb.UpdateApiKeyRequest(
            api_key=pb.ApiKey(name=name, display_name="x"),
            update_mask=FieldMask(paths=["display_name"] * L.MAX_UPDATE_MASK_PATHS),
        )),
        ("Authorize", pb.AuthorizeRequest(key=secret, required_scopes=[f"s{i}:r" for i in range(100_000)])),
        ("UpdateApiKey", pb.UpdateApiKeyRequest(
            api_key=pb.ApiKey(name=name, display_name="x"), update_mask=FieldMask(paths=["x"] * 300_000),
        )),
        ("ListApiKeys", pb.ListApiKeysRequest(parent=f"accounts/{account}", filter=label_filter(5000))),
    ]


def _send(address: str, token: str, secret: str, account: str, name: str, seconds: float, codes: Any) -> None:
    """In a sender process: the requests, round after round, for `seconds` once started; says "ready" on
    `codes` first, and the status counts last."""
    requests = largest_requests(secret, account, name)
    seen: Counter[str] = Counter()
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.ApiKeyServiceStub(channel)
        grpc.channel_ready_future(channel).result(timeout=30)
        codes.put("ready")
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for method, request in requests:
                try:
                    getattr(stub, method)(request, timeout=30, metadata=[("authorization", f"Bearer {token}")])
                    seen["OK"] += 1
                except grpc.RpcError as error:
                    seen[error.code().name] += 1
    codes.put(dict(seen))


def _health_latencies(health: Any, calls: int, seconds: float) -> list[float]:
    latencies: list[float] = []
    deadline = time.monotonic() + seconds
    while len(latencies) < calls and time.monotonic() < deadline:
        started = time.perf_counter()
        health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        latencies.append((time.perf_counter() - started) * 1000)
    return latencies


def _figures(latencies: list[float]) -> tuple[float, float, float]:
    ordered = sorted(latencies)
    return statistics.median(ordered), ordered[int(len(ordered) * 0.99) - 1], ordered[-1]


def health_under_largest_requests(workdir: Path) -> Iterator[tuple[str, str]]:
    with running_server(workdir / "limits", name="apikeyd-limits") as server:
        credential = server.credential
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.ApiKeyServiceStub(channel)
            created = [
                stub.CreateApiKey(
                    pb.CreateApiKeyRequest(
                        parent="accounts/limits",
                        api_key=pb.ApiKey(display_name=f"k{n}", scopes=["messages:send:all"], labels={"k0": "v"}),
                    ),
                    metadata=credential, timeout=30,
                )
                for n in range(KEYS)
            ]
            health = health_pb2_grpc.HealthStub(channel)
            _health_latencies(health, 100, 10)  # warm-up
            idle = _health_latencies(health, HEALTH_CALLS, 30)
            context = multiprocessing.get_context("spawn")
            codes = context.Queue()
            target = created[0]
            senders = [
                context.Process(
                    target=_send,
                    args=(server.address, server.operator_key, target.secret, "limits", target.api_key.name,
                          LOAD_SECONDS, codes),
                )
                for _ in range(SENDERS)
            ]
            for sender in senders:
                sender.start()
            for _ in senders:  # their start-up (imports) is not load
                assert codes.get(timeout=60) == "ready"
            loaded = _health_latencies(health, 1_000_000, LOAD_SECONDS - 0.5)
            answered: Counter[str] = Counter()
            for sender in senders:
                answered.update(codes.get(timeout=60))
                sender.join(timeout=60)
    idle_p50, idle_p99, idle_max = _figures(idle)
    p50, p99, worst = _figures(loaded)
    yield "health idle", f"p50 {idle_p50:.2f} ms  p99 {idle_p99:.2f} ms  max {idle_max:.2f} ms ({len(idle)} calls)"
    yield "health under load", f"p50 {p50:.2f} ms  p99 {p99:.2f} ms  max {worst:.2f} ms ({len(loaded)} calls)"
    yield "ratio to idle", f"p50 {p50 / idle_p50:.2f}x  p99 {p99 / idle_p99:.2f}x  max {worst / idle_max:.2f}x"
    verdict = "meets" if worst < HEALTH_TARGET else "MISSES"
    yield "slowest health call", f"{worst:.1f} ms: {verdict} the target of < {HEALTH_TARGET:.0f} ms"
    yield "load answered", ", ".join(f"{code} {count}" for code, count in sorted(answered.items()))
