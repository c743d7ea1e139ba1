"""What both clients are made of: the connection and its stub, the management calls, the local cache and
the follower of the change stream that keeps it fresh."""

from collections.abc import Sequence
from typing import Any

import grpc

from apikeyd.client.errors import AuthorizeError
from apikeyd.client.follow import Follower
from apikeyd.client.local import LocalCache, Miss
from apikeyd.client.management import Keys
from apikeyd.client.settings import Connection
from apikeyd.domain.decision import Decision
from apikeyd.domain.echo import refuse_key
from apikeyd.domain.errors import InvalidArgument
from apikeyd.domain.limits import check_authorize
from apikeyd.domain.scopes import parse_required_scopes
from apikeyd.v1 import api_keys_pb2_grpc as pb_grpc


def required_scopes(scopes: str | Sequence[str]) -> tuple[str, ...]:
    """Required scopes as the library's callers give them: several, or one as a string (not its characters)."""
    return (scopes,) if isinstance(scopes, str) else tuple(scopes)


def configured_scopes(scopes: str | Sequence[str]) -> tuple[str, ...]:
    """The required scopes of an integration's rule, checked once, where it is configured: ValueError naming
    a wrong one, rather than an error on every call."""
    scopes = required_scopes(scopes)
    try:
        parse_required_scopes(scopes)
    except InvalidArgument as error:
        raise ValueError(str(error)) from None
    return scopes


class ClientParts:
    """Construction is the same for both clients; each adds its own state (`_prepare`) and follows the
    stream its own way (`_watch`)."""

    _aio = False

    def __init__(
        self,
        connection: Connection | None = None,
        *,
        watch: bool = True,
        lease: float = 1.0,
        max_entries: int = 10_000,
        ttl: float = 60.0,
        negative_ttl: float = 10.0,
    ) -> None:
        """`connection`: Connection.from_env() by default. `watch=False` follows no stream and so keeps no
        cache: every check is a call. `lease`: how long past a heartbeat the cache is trusted. `max_entries`,
        `ttl`, `negative_ttl`: the cache's bounds (local.py)."""
        self.connection = connection if connection is not None else Connection.from_env()
        self._channel: Any = self.connection.aio_channel() if self._aio else self.connection.channel()
        self._stub = pb_grpc.ApiKeyServiceStub(self._channel)
        self.keys = Keys(self._stub, self.connection)
        # Without a stream nothing may be cached: no change would ever reach it.
        self.cache = LocalCache(lease, max_entries if watch else 0, ttl, negative_ttl if watch else 0.0)
        self.follower = Follower(self.cache)
        self._prepare()
        if watch:
            self._watch()

    def _lookup(self, key: str, scopes: tuple[str, ...], resource: str, project_id: str) -> Decision | Miss:
        """The cache's answer, after the server's bounds on the request: a request the server would refuse
        with INVALID_ARGUMENT is refused here with the same message."""
        try:
            check_authorize(key, scopes, resource, project_id)
            refuse_key("project_id", project_id)
            return self.cache.lookup(key, scopes, resource, project_id)
        except InvalidArgument as error:
            raise AuthorizeError(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None

    def _prepare(self) -> None:
        """The client's own state: its calls in flight."""
        raise NotImplementedError

    def _watch(self) -> None:
        """Start following the change stream."""
        raise NotImplementedError
