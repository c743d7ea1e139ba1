"""The `apikeyd` command line."""

import asyncio
import dataclasses
import logging
import sys
from typing import Any

import click

from apikeyd.config import Settings
from apikeyd.server import StartupError, serve
from apikeyd.store import migrate as migrations
from apikeyd.store.repository import create_db_engine


def _settings_options(command: Any) -> Any:
    """One flag per setting, so that every APIKEYD_* variable has its flag and the two cannot drift."""
    for f in reversed(dataclasses.fields(Settings)):
        flag = "--" + f.name.replace("_", "-")
        command = click.option(
            flag,
            f.name,
            type=type(f.default),
            default=None,
            help=f"{f.metadata['help']} [{Settings.env_name(f.name)}; default {f.default}]",
        )(command)
    return command


def _load(**overrides: Any) -> Settings:
    try:
        settings = Settings.load(**overrides)
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    return settings


@click.group()
def main() -> None:
    """apikeyd: API keys with scopes, rate limits and a fast Authorize, over gRPC."""


@main.command()
@_settings_options
def serve_command(**overrides: Any) -> None:
    """Serve gRPC until SIGTERM or Ctrl-C, then drain and exit 0."""
    settings = _load(**overrides)
    try:
        asyncio.run(serve(settings))
    except StartupError as error:
        click.echo(f"apikeyd: {error}", err=True)
        sys.exit(2)


serve_command.name = "serve"


@main.command()
@click.option("--database-url", default=None, help="SQLAlchemy URL [APIKEYD_DATABASE_URL]")
def migrate(database_url: str | None) -> None:
    """Bring the database schema up to date."""
    settings = _load(database_url=database_url)
    engine = create_db_engine(settings.database_url)
    try:
        migrations.upgrade(engine)
    finally:
        engine.dispose()
    click.echo(f"database at {engine.url.render_as_string(hide_password=True)} is up to date", err=True)
