"""apikeyd's client library: Authorize answered in process from a cache that the server's change stream keeps
fresh, and the management calls. Needs only grpcio and protobuf (`pip install apikeyd`, no extras).

    from apikeyd.client import Client
    client = Client()  # APIKEYD_ADDRESS, APIKEYD_TOKEN (a key with apikeys:authorize), APIKEYD_CLIENT_TLS_*
    decision = client.authorize(presented, scopes=["messages:send"], resource="example.com")
    if decision.allowed: ...

See local.py for what is cached and the bound within which a change reaches the cache."""

from apikeyd.client.aio import AsyncClient
from apikeyd.client.errors import AuthorizeError
from apikeyd.client.settings import ClientTls, Connection
from apikeyd.client.sync import Client
from apikeyd.domain.decision import AuthCode, Decision

__all__ = ["AsyncClient", "AuthCode", "AuthorizeError", "Client", "ClientTls", "Connection", "Decision"]
