"""The `apikeyd` command's entry point: a plain `pip install apikeyd` holds the client library only, and a
command line that needs the server's packages says how to get them instead of failing with a traceback."""

import sys


def main() -> None:
    try:
        from apikeyd.cli import main as cli
    except ModuleNotFoundError as missing:
        sys.exit(
            f"apikeyd: the command line needs the server's packages ({missing.name} is not installed): "
            "pip install 'apikeyd[server]'"
        )
    cli()
