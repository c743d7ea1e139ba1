"""The client library installs and runs without the server's packages: `pip install apikeyd` (no extras)
pulls grpcio, protobuf and googleapis' common protos only, and apikeyd.client never imports anything else."""

import importlib.metadata
import os
import subprocess
import sys
import textwrap

from packaging.requirements import Requirement

from tests.conftest import create_key

SERVER_ONLY = [
    "sqlalchemy", "alembic", "argon2", "psycopg", "redis", "uvloop", "httptools", "envoy", "xds", "udpa",
    "validate", "click", "prometheus_client", "grpc_health", "grpc_reflection",
]

# Run first in a fresh interpreter: any import of a server-only package fails as if it were not installed.
BLOCKER = textwrap.dedent(
    f"""
    import importlib.abc, sys
    BLOCKED = {SERVER_ONLY!r}
    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
    sys.meta_path.insert(0, Blocker())
    """
)


def _run(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + textwrap.dedent(code)],
        capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})},
    )


def test_a_plain_install_requires_only_grpc_and_protobuf():
    plain = {
        Requirement(line).name.lower()
        for line in importlib.metadata.requires("apikeyd") or []
        if Requirement(line).marker is None
    }
    assert plain == {"grpcio", "protobuf", "googleapis-common-protos"}


def test_the_client_works_with_no_server_package_importable(server, account):
    token = create_key(server.stub, account, ("apikeys:authorize",)).secret
    key = create_key(server.stub, account).secret
    result = _run(
        """
        import asyncio, os, sys
        from apikeyd.client import AsyncClient, Client, Connection
        import apikeyd.client.asgi, apikeyd.client.grpc_auth  # the integrations too
        connection = Connection.from_env()
        with Client(connection) as client:
            assert client.authorize(os.environ["KEY"]).allowed
            assert not client.authorize(os.environ["KEY"], ["billing:write"]).allowed
        async def main():
            async with AsyncClient(connection) as client:
                assert (await client.authorize(os.environ["KEY"])).allowed
        asyncio.run(main())
        loaded = sorted(name for name in sys.modules if name.split(".")[0] in BLOCKED)
        assert not loaded, loaded
        """,
        {"APIKEYD_ADDRESS": server.address, "APIKEYD_TOKEN": token, "KEY": key},
    )
    assert result.returncode == 0, result.stderr
    assert key not in result.stderr and token not in result.stderr


def test_the_command_line_without_the_server_extra_says_what_to_install():
    result = _run("from apikeyd.command import main; main()")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "apikeyd: the command line needs the server's packages (click is not installed): pip install 'apikeyd[server]'"
    )
