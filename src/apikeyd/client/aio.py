"""The asyncio client: `await AsyncClient.authorize(...)`, the change stream as a task on the same loop."""

import asyncio
import contextlib
import time
from collections.abc import Sequence
from types import TracebackType

import grpc

from apikeyd.client.errors import AuthorizeError, from_rpc_error
from apikeyd.client.local import Miss
from apikeyd.client.parts import ClientParts, authorize_request, required_scopes
from apikeyd.domain.decision import Decision
from apikeyd.v1 import api_keys_pb2 as pb


class AsyncClient(ClientParts):
    """Client's twin for asyncio: the same cache, decisions and errors. Create it, and call `close`, on the
    loop it is used from; `keys` holds the management calls, to await. The arguments are ClientParts'."""

    _aio = True
    _task: "asyncio.Task[None] | None" = None

    _flights: dict[bytes, tuple[int, "asyncio.Future[None]"]]

    def _prepare(self) -> None:
        self._flights = {}

    def _watch(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._follow(), name="apikeyd-change-stream")

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *_: type[BaseException] | BaseException | TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._channel.close()

    async def authorize(
        self,
        key: str,
        scopes: str | Sequence[str] = (),
        resource: str = "",
        project_id: str = "",
        *,
        client_ip: str = "",
        cost: int = 1,
    ) -> Decision:
        """As Client.authorize; a cached answer costs no await of anything."""
        scopes = required_scopes(scopes)
        found = self._lookup(key, scopes, resource, project_id, client_ip, cost)
        if isinstance(found, Decision):
            return found
        request = authorize_request(key, scopes, resource, project_id, client_ip, cost)
        flight = self._flights.get(found.digest)
        if flight is not None and flight[0] == found.generation:
            with contextlib.suppress(AuthorizeError):
                await asyncio.shield(flight[1])
            found = self._lookup(key, scopes, resource, project_id, client_ip, cost)
            return found if isinstance(found, Decision) else await self._ask(found, request)
        mine: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._flights[found.digest] = (found.generation, mine)
        try:
            return await self._ask(found, request)
        except AuthorizeError as error:
            mine.set_exception(error)
            mine.exception()  # retrieved: joiners make their own call
            raise
        finally:
            if not mine.done():
                mine.set_result(None)
            if self._flights.get(found.digest, (0, None))[1] is mine:
                del self._flights[found.digest]

    async def _ask(self, miss: Miss, request: pb.AuthorizeRequest) -> Decision:
        try:
            response = await self._stub.Authorize(
                request, timeout=self.connection.timeout, metadata=self.connection.metadata
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        return self.cache.learn(miss, response)

    async def _follow(self) -> None:
        while True:
            code, details = None, ""
            stream = self._stub.WatchApiKeyChanges(self.follower.request(), metadata=self.connection.metadata)
            try:
                while True:
                    response = await asyncio.wait_for(stream.read(), self.follower.stall_after)
                    if response is grpc.aio.EOF:
                        break
                    self.follower.receive(response, time.monotonic())
            except TimeoutError:
                pass  # stalled: given up, and replaced
            except grpc.RpcError as error:
                failure = from_rpc_error(error)
                code, details = failure.code, failure.details
            finally:
                stream.cancel()
            await asyncio.sleep(self.follower.ended(code, details))
