"""What both clients are made of: the connection and its stub, the management calls, the local cache and
the follower of the change stream that keeps it fresh."""

from typing import Any

from apikeyd.client.follow import Follower
from apikeyd.client.local import LocalCache
from apikeyd.client.management import Keys
from apikeyd.client.settings import Connection
from apikeyd.v1 import api_keys_pb2_grpc as pb_grpc


class ClientParts:
    def __init__(
        self,
        connection: Connection | None,
        aio: bool,
        watch: bool,
        lease: float,
        max_entries: int,
        ttl: float,
        negative_ttl: float,
    ) -> None:
        self.connection = connection if connection is not None else Connection.from_env()
        self._channel: Any = self.connection.aio_channel() if aio else self.connection.channel()
        self._stub = pb_grpc.ApiKeyServiceStub(self._channel)
        self.keys = Keys(self._stub, self.connection)
        # Without a stream nothing may be cached: no change would ever reach it.
        self.cache = LocalCache(lease, max_entries if watch else 0, ttl, negative_ttl if watch else 0.0)
        self.follower = Follower(self.cache)
