"""Section 3 of `python -m bench.client`: the lease's bound under faults, the client's stream cut or stalled.

(a) Stream cut: the server SIGKILLed while the client polls a cached key: the time to its first
non-allow, and the allows it gave after the kill (from the cache, before it saw the stream end); the key
revoked meanwhile through a second server on the same SQLite file, and the server started again on the
same port: from the revocation on, no check may allow (the cache is untrusted until the resumed stream
has replayed what it missed). (b) Stalled server (PostgreSQL): the client streams from A; A is
SIGSTOPped, the key revoked via B, and the client polled: the time from SIGSTOP to its first non-allow (a
check that was not answered allow: the cache no longer trusted, the stopped server not answering within
the client's deadline), and how long past the last heartbeat it received the client still allowed,
against the lease (1 s). Then SIGCONT, and the key must be refused, never allowed again.

Run by bench.client, whose helpers it uses. Linux only (signals); everything is on 127.0.0.1.
"""

import contextlib
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from apikeyd.client import AuthCode, AuthorizeError, Client
from apikeyd.v1 import api_keys_pb2_grpc as pb_grpc
from bench.client import (
    LEASE,
    MARGIN,
    RECOVER_WAIT,
    SCOPES,
    Lines,
    _connection,
    _cuts,
    _ensure_cached,
    _Key,
    _Receipts,
    _revoke,
)
from bench.server_process import ServerProcess, running_server

CUTS = 5  # SIGKILL and restart: each costs a server start
STALLS = 10  # SIGSTOP, revoke elsewhere, SIGCONT
STALL_TIMEOUT = 0.5  # the client's call deadline in the stall trials: how long a check waits on the stopped server


def _wait_trusted(client: Client, timeout: float = RECOVER_WAIT) -> float:
    """Seconds until the client's cache is trusted again (a heartbeat of its stream)."""
    start = time.monotonic()
    while not client.cache.trusted:
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"the client's cache was not trusted again within {timeout:g} s")
        time.sleep(0.005)
    return time.monotonic() - start


# --- 3a. the stream cut: SIGKILL, and the server started again on the same port -------------------


@dataclass(frozen=True)
class _Cut:
    to_non_allow: float  # seconds from SIGKILL to the first check not answered allow
    allows_after_kill: int  # from the cache, before the client saw its stream end
    back: float  # seconds from SIGKILL to the client's cache trusted again (the restart included)
    restart: float  # seconds the restart took, `apikeyd serve` to SERVING and an admin key made
    refused_after: float  # seconds from the revocation's return to the first REVOKED
    allows_after_revoke: int  # must be 0


def _poll_until_not_allowed(client: Client, key: str, limit: float) -> tuple[float, list[float], str]:
    """Back-to-back checks until one is not answered allow: (the start of that check, the end of each allow,
    what the non-allow was: a refusal's code or the AuthorizeError's status), monotonic."""
    deadline = time.monotonic() + limit
    allows: list[float] = []
    while time.monotonic() < deadline:
        start = time.monotonic()
        try:
            decision = client.authorize(key, SCOPES)
        except AuthorizeError as error:
            return start, allows, error.code.name
        if not decision.allowed:
            return start, allows, decision.code.name
        allows.append(time.monotonic())
    raise RuntimeError(f"the client still allowed the key {limit:g} s on")


class _Poller:
    """A thread checking a key back to back (1 ms apart while the server cannot be asked) until it has
    seen a REVOKED and the cache trusted again; it counts every allow."""

    def __init__(self, client: Client, key: str) -> None:
        self.allows = 0
        self.refused_at: float | None = None
        self.trusted_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, args=(client, key), name="bench-poller", daemon=True)
        self._thread.start()

    def _poll(self, client: Client, key: str) -> None:
        while not self._stop.is_set() and (self.refused_at is None or self.trusted_at is None):
            if self.trusted_at is None and client.cache.trusted:
                self.trusted_at = time.monotonic()
            try:
                decision = client.authorize(key, SCOPES)
            except AuthorizeError:
                time.sleep(0.001)  # the server cannot be asked: never an allow
                continue
            if decision.allowed:
                self.allows += 1
            elif decision.code is AuthCode.REVOKED and self.refused_at is None:
                self.refused_at = time.monotonic()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        self._stop.set()
        self._thread.join(5.0)
        if self.refused_at is None or self.trusted_at is None:
            raise RuntimeError(f"the client had not refused the key and trusted its cache {timeout:g} s on")


def stream_cuts(
    stack: contextlib.ExitStack, server: ServerProcess, revoker: ServerProcess, workdir: Path, keys: list[_Key]
) -> list[_Cut]:
    """`server` SIGKILLed under a client polling a cached key; the key revoked via `revoker` (the same SQLite
    file) while it is down; `server` started again on the same port and database. From the revocation on,
    the client must never allow the key: its cache is untrusted from the cut until its resumed stream has
    replayed what it missed."""
    client = Client(_connection(server))
    cuts = []
    try:
        with grpc.insecure_channel(revoker.address) as channel:
            stub = pb_grpc.ApiKeyServiceStub(channel)
            for number, key in enumerate(keys):
                _ensure_cached(lambda k=key: client.authorize(k.secret, SCOPES), client.cache.stats)
                killed: list[float] = []

                def kill(pid: int = server.pid, killed: list[float] = killed) -> None:
                    killed.append(time.monotonic())
                    os.kill(pid, signal.SIGKILL)

                timer = threading.Timer(0.2, kill)
                timer.start()
                first_not, allows, _ = _poll_until_not_allowed(client, key.secret, 5.0)
                timer.join()
                server.process.wait(10.0)
                if first_not < killed[0]:
                    raise RuntimeError(f"the client refused the key {killed[0] - first_not:.3f} s before the kill")
                _revoke(stub, revoker, key)
                revoked = time.monotonic()
                poller = _Poller(client, key.secret)
                started = time.monotonic()
                server = stack.enter_context(running_server(workdir, address=server.address, name=f"restart-{number}"))
                restart = time.monotonic() - started
                poller.join(RECOVER_WAIT)
                assert poller.refused_at is not None and poller.trusted_at is not None
                cuts.append(
                    _Cut(
                        first_not - killed[0],
                        sum(end > killed[0] for end in allows),
                        poller.trusted_at - killed[0],
                        restart,
                        poller.refused_at - revoked,
                        poller.allows,
                    )
                )
    finally:
        client.close()
    return cuts


# --- 3b. the stalled server: SIGSTOP A, revoke via B -------------------------------------------------


@dataclass(frozen=True)
class _Stall:
    to_non_allow: float  # seconds from SIGSTOP to the start of the first check not answered allow
    last_allow_past_heartbeat: float  # the last allow's end minus the last heartbeat's receipt
    last_allow_past_trust: float  # the last allow's end minus (the last heartbeat's sync + lease): <= 0
    non_allow: str  # what the first non-allow was
    refused_after_cont: float  # seconds from SIGCONT to the first REVOKED


def stalls(a: ServerProcess, b: ServerProcess, keys: list[_Key]) -> list[_Stall]:
    client = Client(_connection(a, timeout=STALL_TIMEOUT))
    beats = _Receipts(client)
    results = []
    try:
        with grpc.insecure_channel(b.address) as channel:
            stub_b = pb_grpc.ApiKeyServiceStub(channel)
            for key in keys:
                _ensure_cached(lambda k=key: client.authorize(k.secret, SCOPES), client.cache.stats)
                time.sleep(0.1 + 0.4 * (len(results) % 5) / 5)  # SIGSTOP at varied points between heartbeats
                stopped = time.monotonic()
                os.kill(a.pid, signal.SIGSTOP)
                try:
                    _revoke(stub_b, b, key)
                    first_not, allows, what = _poll_until_not_allowed(client, key.secret, 5.0)
                    last_allow = allows[-1] if allows else float("-inf")
                    synced = client.cache._cache.synced_at  # the last heartbeat's sync point (receipt - sync_age)
                    heartbeat = beats.heartbeat
                finally:
                    os.kill(a.pid, signal.SIGCONT)
                resumed = time.monotonic()
                while True:
                    with contextlib.suppress(AuthorizeError):
                        decision = client.authorize(key.secret, SCOPES)
                        if decision.allowed:
                            raise RuntimeError("the client allowed a revoked key after its stream resumed")
                        if decision.code is AuthCode.REVOKED:
                            break
                    if time.monotonic() - resumed > RECOVER_WAIT:
                        raise RuntimeError(f"the client did not refuse the key within {RECOVER_WAIT:g} s of SIGCONT")
                refused = time.monotonic() - resumed
                _wait_trusted(client)
                results.append(
                    _Stall(
                        first_not - stopped,
                        last_allow - heartbeat,
                        last_allow - (synced + LEASE),
                        what,
                        refused,
                    )
                )
    finally:
        client.close()
    return results


def fault_lines(cuts: list[_Cut], stall_results: list[_Stall]) -> Lines:
    if cuts:
        to = [c.to_non_allow * 1e3 for c in cuts]
        yield (
            "cut: SIGKILL",
            f"to the first non-allow max {max(to):.1f} ms  p99 {_cuts(to)[1]:.1f} ms  p50 {_cuts(to)[0]:.1f} ms; "
            f"allows after the kill (from the cache, before the stream's end was seen) max "
            f"{max(c.allows_after_kill for c in cuts)} ({len(cuts)} kills)",
        )
        refused = [c.refused_after * 1e3 for c in cuts]
        back = [c.back for c in cuts]
        yield (
            "  revoke while down",
            f"via a second server on the same SQLite file: allows after it {sum(c.allows_after_revoke for c in cuts)} "
            f"(must be 0), REVOKED after max {max(refused):.0f} ms (once the server is back); cached answers again "
            f"{min(back):.1f}-{max(back):.1f} s after the kill (restart {min(c.restart for c in cuts):.1f}-"
            f"{max(c.restart for c in cuts):.1f} s, then the client's reconnect backoff)",
        )
    if stall_results:
        to = [s.to_non_allow * 1e3 for s in stall_results]
        past = [s.last_allow_past_heartbeat * 1e3 for s in stall_results]
        trust = [s.last_allow_past_trust * 1e6 for s in stall_results]
        bound = (LEASE + MARGIN) * 1e3
        kinds = sorted({s.non_allow for s in stall_results})
        yield (
            "stall: SIGSTOP A",
            f"to the first non-allow max {max(to):.0f} ms  p99 {_cuts(to)[1]:.0f} ms  p50 {_cuts(to)[0]:.0f} ms "
            f"(lease {LEASE * 1e3:.0f} ms; {len(stall_results)} stops, revoked via B meanwhile; non-allows: "
            f"{', '.join(kinds)} after the {STALL_TIMEOUT:g} s call deadline)",
        )
        yield (
            "  last allow",
            f"after the last heartbeat's receipt max {max(past):.0f} ms  p99 {_cuts(past)[1]:.0f} ms "
            f"(bound lease + {MARGIN * 1e3:.0f} ms = {bound:.0f}: {'kept' if max(past) <= bound else 'EXCEEDED'}); "
            f"the last allow's end past the trust's end (sync + lease) max {max(trust):+.0f} us (<= one check's length)",
        )
        refused = [s.refused_after_cont * 1e3 for s in stall_results]
        yield ("  SIGCONT", f"the revoked key refused after max {max(refused):.0f} ms, never allowed again")
