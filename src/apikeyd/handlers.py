"""A grpc method handler's one behaviour, whichever of the four kinds it is (unary or streamed request and
response): what code that wraps handlers reads and replaces, the server's undecodable-request guard
(service/wire.py) and the client library's interceptors (client/grpc_auth.py)."""

from collections.abc import Callable
from typing import Any

import grpc

_FIELDS = {
    (False, False): "unary_unary",
    (False, True): "unary_stream",
    (True, False): "stream_unary",
    (True, True): "stream_stream",
}


def behavior(handler: grpc.RpcMethodHandler) -> Callable[..., Any]:
    return getattr(handler, _FIELDS[handler.request_streaming, handler.response_streaming])


def with_behavior(handler: grpc.RpcMethodHandler, replacement: Callable[..., Any], **fields: Any) -> grpc.RpcMethodHandler:
    """The same handler (a grpc RpcMethodHandler tuple) with `replacement` as its behaviour, and `fields`."""
    field = _FIELDS[handler.request_streaming, handler.response_streaming]
    return handler._replace(**{field: replacement}, **fields)
