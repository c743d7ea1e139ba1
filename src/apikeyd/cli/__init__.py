"""The `apikeyd` command line.

The client commands (keys, authorize, audit, health: client_commands.py, keys.py) talk to a running server
over gRPC, plaintext or TLS (connection.py), and import none of the server's modules (only the generated
stubs, grpc and grpc_health), so that they start fast: `apikeyd health` is a container's HEALTHCHECK. The
server commands (serve, migrate, admin-key: server_commands.py) import the server side (SQLAlchemy, alembic,
argon2) inside the commands.

Conventions of the client commands: readable output by default, `--json` for one proto3 JSON document on
stdout; errors are one line `error: <GRPC_CODE>: <message>` on stderr with exit status 1 (2 for usage errors,
as click does). A key's secret is printed only by `keys create` and `keys rotate`, and never logged.
"""

import os

# grpc's core logs to stderr, INFO lines included (a failed TLS handshake is one), unless GRPC_VERBOSITY says
# otherwise, and reads it only when grpc is imported, which is below. A client command's stderr is its one
# error line, and the server's is its JSON log lines (which its workers inherit), so every command runs with
# ERROR unless the variable is set. (A taken port is found before grpc tries it: server.py, ports.py.)
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import click

from apikeyd.cli.client_commands import register as register_client_commands
from apikeyd.cli.server_commands import SERVER_COMMANDS


@click.group()
@click.version_option(package_name="apikeyd", prog_name="apikeyd", message="%(prog)s %(version)s")
def main() -> None:
    """apikeyd: API keys with scopes, rate limits and a fast Authorize, over gRPC."""


register_client_commands(main)  # keys, authorize, audit, health
for _command in SERVER_COMMANDS:  # serve, migrate, admin-key
    main.add_command(_command)
