"""A Starlette app behind apikeyd.client.asgi: `POST /messages/{domain}` needs a key with `messages:send` for
that domain, `GET /whoami` any usable key, and `GET /health` none.

Against `make run` (apikeyd on 127.0.0.1:50051), with keys made as in examples/grpc_service.py's docstring
(WATCHER: apikeys:authorize; KEY: messages:send:{example.com}, both in account acme), from the repository's root:

    APIKEYD_TOKEN=$WATCHER python examples/asgi_app.py &        # uvicorn on 127.0.0.1:8061
    # or: APIKEYD_TOKEN=$WATCHER uvicorn examples.asgi_app:app --port 8061
    curl -X POST -H "authorization: Bearer $KEY" 127.0.0.1:8061/messages/example.com   # 200 {"sent_from": ...}
    curl -X POST -H "authorization: Bearer $KEY" 127.0.0.1:8061/messages/other.com     # 403 INSUFFICIENT_SCOPE
    curl -i 127.0.0.1:8061/whoami                                                       # 401 MISSING_CREDENTIAL

starlette and uvicorn come with the dev extra (`make run` installs them); elsewhere `pip install starlette
uvicorn`. APIKEYD_ADDRESS names another apikeyd; EXAMPLE_PORT, the port (8061).
"""

import os
from collections.abc import Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from apikeyd.client import AsyncClient
from apikeyd.client.asgi import PUBLIC, ApiKeyMiddleware, Requirement, RouteAnswer, Scope


def needs(scope: Scope) -> RouteAnswer:
    """Each route's requirement; None (refused) for anything not named, such as a route added later."""
    path, method = scope["path"], scope.get("method", "GET")
    if path == "/health":
        return PUBLIC
    if path == "/whoami" and method == "GET":
        return Requirement()
    if path.startswith("/messages/") and method == "POST":
        return Requirement(["messages:send"], resource=path.removeprefix("/messages/"))
    return None


async def send(request: Request) -> JSONResponse:
    key = request.state.apikey  # set by the middleware: the caller's key, never its secret
    return JSONResponse({"sent_from": request.path_params["domain"], "by": key.display_name, "key_id": key.key_id})


async def whoami(request: Request) -> JSONResponse:
    key = request.state.apikey
    return JSONResponse({"key_id": key.key_id, "account_id": key.account_id, "scopes": list(key.scopes)})


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


def make_app(client: Callable[[], AsyncClient] = AsyncClient) -> ApiKeyMiddleware:
    """`client` makes the AsyncClient once the app's loop runs; by default from APIKEYD_ADDRESS and APIKEYD_TOKEN."""
    routes = [
        Route("/messages/{domain}", send, methods=["POST"]),
        Route("/whoami", whoami),
        Route("/health", health),
    ]
    return ApiKeyMiddleware(Starlette(routes=routes), needs, client=client)


app = make_app()

if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("EXAMPLE_PORT", "8061")))
