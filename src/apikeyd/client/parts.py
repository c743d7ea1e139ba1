"""What both clients are made of: the connection and its stub, the management calls, the local cache and
the follower of the change stream that keeps it fresh."""

import functools
from collections.abc import Sequence
from typing import Any

import grpc

from apikeyd.client.errors import AuthorizeError
from apikeyd.client.follow import Follower
from apikeyd.client.local import LocalCache, Miss
from apikeyd.client.management import Keys
from apikeyd.client.settings import Connection
from apikeyd.domain.credits import validate_cost
from apikeyd.domain.decision import Decision
from apikeyd.domain.echo import refuse_key
from apikeyd.domain.errors import InvalidArgument
from apikeyd.domain.ip_ranges import parse_address
from apikeyd.domain.limits import check_authorize
from apikeyd.domain.scopes import parse_required_scopes
from apikeyd.v1 import api_keys_pb2 as pb
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


# Parsing an address costs about as much as a whole cached check (4 to 7 us): the addresses a process sees
# again and again are checked once. Only valid ones are kept (lru_cache keeps no call that raised).
@functools.lru_cache(maxsize=4096)
def _valid_address(value: str) -> None:
    parse_address(value)


def peer_ip(host: str) -> str:
    """A peer's host as the client_ip of a check: "" when it is no IP address (a unix socket, a test
    client's made-up name), which a key with allowed_ip_ranges refuses and every other key ignores."""
    try:
        _valid_address(host)
    except InvalidArgument:
        return ""
    return host


def authorize_request(
    key: str, scopes: tuple[str, ...], resource: str, project_id: str, client_ip: str, cost: int
) -> pb.AuthorizeRequest:
    request = pb.AuthorizeRequest(
        key=key, required_scopes=scopes, resource=resource, project_id=project_id, client_ip=client_ip
    )
    if cost != 1:  # unset is 1
        request.cost = cost
    return request


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

    def _lookup(
        self, key: str, scopes: tuple[str, ...], resource: str, project_id: str, client_ip: str, cost: int
    ) -> Decision | Miss:
        """The cache's answer, after the server's bounds on the request: a request the server would refuse
        with INVALID_ARGUMENT is refused here with the same message. A key whose answers depend on the
        client's address or spend credits is never cached (has_limits), so a hit needs neither."""
        try:
            check_authorize(key, scopes, resource, project_id)
            refuse_key("project_id", project_id)
            if client_ip:
                _valid_address(client_ip)
            if cost != 1:
                validate_cost(cost)
            return self.cache.lookup(key, scopes, resource, project_id)
        except InvalidArgument as error:
            raise AuthorizeError(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None

    def _prepare(self) -> None:
        """The client's own state: its calls in flight."""
        raise NotImplementedError

    def _watch(self) -> None:
        """Start following the change stream."""
        raise NotImplementedError
