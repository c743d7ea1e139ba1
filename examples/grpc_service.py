"""A gRPC service behind apikeyd.client.grpc_auth: `/example.Messages/Send` sends from a domain, with a key that
holds `messages:send` for that domain; grpc.health.v1 stays public. Its messages are plain UTF-8 bytes, so no
proto is needed: this script is its own client too.

Against `make run` (apikeyd on 127.0.0.1:50051), in another terminal, from the repository's root:

    export PATH=$PWD/.venv/bin:$PATH
    export APIKEYD_TOKEN=$(apikeyd admin-key create --display-name "ops laptop")
    # The service's own key: it follows apikeyd's change stream for the account's keys.
    WATCHER=$(apikeyd keys create --account acme --display-name "example service" --scope apikeys:authorize)
    # A tenant's key, to call the service with.
    KEY=$(apikeyd keys create --account acme --display-name "sender" --scope 'messages:send:{example.com}')
    APIKEYD_TOKEN=$WATCHER python examples/grpc_service.py serve &     # on 127.0.0.1:50061
    KEY=$KEY python examples/grpc_service.py send example.com          # sent from example.com by sender (...)
    KEY=$KEY python examples/grpc_service.py send other.com            # PERMISSION_DENIED: ...
    python examples/grpc_service.py send example.com                   # UNAUTHENTICATED: no key: ...

APIKEYD_ADDRESS names another apikeyd; EXAMPLE_ADDRESS, where this service listens (127.0.0.1:50061).
"""

import os
import sys
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from apikeyd.client import Client
from apikeyd.client.grpc_auth import ApiKeyInterceptor, Rule, current_key

SEND = "/example.Messages/Send"
DEFAULT_ADDRESS = "127.0.0.1:50061"


def send(request: bytes, context: grpc.ServicerContext) -> bytes:
    key = current_key()  # set by the interceptor: the caller's key, never its secret
    return f"sent from {request.decode()} by {key.display_name} ({key.account_id}/{key.key_id})".encode()


def serve(client: Client, address: str = DEFAULT_ADDRESS) -> tuple[grpc.Server, int]:
    """The server, started, and the port it listens on (address may end in :0)."""
    interceptor = ApiKeyInterceptor(
        client,
        # The domain a message is sent from is the request itself: the key needs messages:send for it.
        {SEND: Rule(["messages:send"], resource=lambda call: call.request.decode())},
        public={"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"},
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), interceptors=[interceptor])
    handler = grpc.method_handlers_generic_handler("example.Messages", {"Send": grpc.unary_unary_rpc_method_handler(send)})
    server.add_generic_rpc_handlers((handler,))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port(address)
    server.start()
    return server, port


def call_send(address: str, domain: str, key: str) -> str:
    with grpc.insecure_channel(address) as channel:
        metadata = [("authorization", f"Bearer {key}")] if key else []
        return channel.unary_unary(SEND)(domain.encode(), metadata=metadata, timeout=5).decode()


def check_health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def main(argv: list[str]) -> int:
    address = os.environ.get("EXAMPLE_ADDRESS", DEFAULT_ADDRESS)
    if argv[:1] == ["serve"]:
        with Client() as client:  # APIKEYD_ADDRESS, APIKEYD_TOKEN
            server, port = serve(client, address)
            print(f"serving on port {port}; Ctrl-C stops", file=sys.stderr)
            try:
                server.wait_for_termination()
            except KeyboardInterrupt:
                server.stop(1)
        return 0
    if len(argv) == 2 and argv[0] == "send":
        try:
            print(call_send(address, argv[1], os.environ.get("KEY", "")))
        except grpc.RpcError as error:
            print(f"{error.code().name}: {error.details()}", file=sys.stderr)
            return 1
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
