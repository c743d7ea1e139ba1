"""The blocking client: `Client.authorize` from any thread, the change stream on a thread of its own."""

import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from types import TracebackType

import grpc

from apikeyd.client.errors import AuthorizeError, from_rpc_error
from apikeyd.client.local import Miss
from apikeyd.client.parts import ClientParts, authorize_request, required_scopes
from apikeyd.domain.decision import Decision
from apikeyd.v1 import api_keys_pb2 as pb


class Client(ClientParts):
    """Authorize with a local cache that the server's change stream keeps fresh (apikeyd.client.local).

    `keys` holds the management calls; the arguments are ClientParts'."""

    _flights: dict[bytes, tuple[int, "Future[None]"]]
    _thread: threading.Thread | None = None
    _stream: grpc.Future | None = None

    def _prepare(self) -> None:
        self._flights = {}
        self._flights_lock = threading.Lock()
        self._closed = threading.Event()

    def _watch(self) -> None:
        self._thread = threading.Thread(target=self._follow, name="apikeyd-change-stream", daemon=True)
        self._thread.start()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *_: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._closed.set()
        stream = self._stream
        if stream is not None:
            stream.cancel()
        if self._thread is not None:
            self._thread.join(5.0)
        self._channel.close()

    def authorize(
        self,
        key: str,
        scopes: str | Sequence[str] = (),
        resource: str = "",
        project_id: str = "",
        *,
        client_ip: str = "",
        cost: int = 1,
    ) -> Decision:
        """The server's decision for a presented key, from the cache when it can be trusted; AuthorizeError
        when the server cannot be asked (never an allow). `scopes`: the required ones, or one as a string;
        `client_ip`: the address the key comes from, which a key with allowed_ip_ranges needs; `cost`: the
        credits an allowed check spends from a key with credits."""
        scopes = required_scopes(scopes)
        found = self._lookup(key, scopes, resource, project_id, client_ip, cost)
        if isinstance(found, Decision):
            return found
        request = authorize_request(key, scopes, resource, project_id, client_ip, cost)
        with self._flights_lock:
            flight = self._flights.get(found.digest)
            joined = flight is not None and flight[0] == found.generation
            if not joined:
                mine: Future[None] = Future()
                self._flights[found.digest] = (found.generation, mine)
        if joined:
            assert flight is not None
            try:
                flight[1].result()
            except AuthorizeError:
                pass  # its caller's failure; this check makes its own call
            found = self._lookup(key, scopes, resource, project_id, client_ip, cost)
            return found if isinstance(found, Decision) else self._ask(found, request)
        try:
            return self._ask(found, request)
        except AuthorizeError as error:
            mine.set_exception(error)
            raise
        finally:
            if not mine.done():
                mine.set_result(None)
            with self._flights_lock:
                if self._flights.get(found.digest, (0, None))[1] is mine:
                    del self._flights[found.digest]

    def _ask(self, miss: Miss, request: pb.AuthorizeRequest) -> Decision:
        try:
            response = self._stub.Authorize(request, timeout=self.connection.timeout, metadata=self.connection.metadata)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        return self.cache.learn(miss, response)

    # --- the change stream --------------------------------------------------------------------------

    def _follow(self) -> None:
        while not self._closed.is_set():
            code, details = None, ""
            stream = self._stub.WatchApiKeyChanges(self.follower.request(), metadata=self.connection.metadata)
            self._stream = stream
            watchdog = _Watchdog(stream, self.follower.stall_after)
            try:
                for response in stream:
                    received = time.monotonic()
                    watchdog.fed(received)
                    self.follower.receive(response, received)
            except grpc.RpcError as error:
                if not watchdog.fired:
                    failure = from_rpc_error(error)
                    code, details = failure.code, failure.details
            finally:
                watchdog.stop()
            delay = self.follower.ended(code, details)
            self._closed.wait(delay)


class _Watchdog:
    """Cancels a stream that has been silent for `after` seconds: a stalled server or a dead connection."""

    def __init__(self, stream: grpc.Future, after: float) -> None:
        self._stream = stream
        self._after = after
        self._last = time.monotonic()
        self._stopped = threading.Event()
        self.fired = False
        self._thread = threading.Thread(target=self._watch, name="apikeyd-stream-watchdog", daemon=True)
        self._thread.start()

    def fed(self, at: float) -> None:
        self._last = at

    def stop(self) -> None:
        self._stopped.set()

    def _watch(self) -> None:
        while not self._stopped.wait(self._after / 4):
            if time.monotonic() - self._last > self._after:
                self.fired = True
                self._stream.cancel()
                return
