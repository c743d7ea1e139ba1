"""apikeyd's client library: Authorize answered in process from a cache that the server's change stream keeps
fresh, and the management calls. Needs only grpcio and protobuf (`pip install apikeyd`, no extras).

    from apikeyd.client import Client
    client = Client()  # APIKEYD_ADDRESS, APIKEYD_TOKEN (a key with apikeys:authorize), APIKEYD_CLIENT_TLS_*
    decision = client.authorize(presented, scopes=["messages:send"], resource="example.com")
    if decision.allowed: ...

See local.py for what is cached and the bound within which a change reaches the cache."""

import importlib
from typing import Any

# Loaded on first use, so that the CLI, which reads only apikeyd.client.settings, does not load the rest.
_EXPORTS = {
    "AsyncClient": "apikeyd.client.aio",
    "AuthorizeError": "apikeyd.client.errors",
    "ClientTls": "apikeyd.client.settings",
    "Connection": "apikeyd.client.settings",
    "Client": "apikeyd.client.sync",
    "AuthCode": "apikeyd.domain.decision",
    "Decision": "apikeyd.domain.decision",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'apikeyd.client' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
