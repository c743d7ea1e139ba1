"""`apikeyd serve`, `apikeyd migrate` and `apikeyd admin-key create`: the commands that run the server side."""

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import click

from apikeyd import logs
from apikeyd.config import Settings

# The server side (SQLAlchemy, alembic, argon2) is imported inside the commands that need it, so that the
# client commands, `apikeyd health` above all (the container's HEALTHCHECK), start quickly.
if TYPE_CHECKING:
    from apikeyd.lifecycle import IssuedKey


def _settings_options(command: Any) -> Any:
    """One flag per setting, so that every APIKEYD_* variable has its flag and the two cannot drift."""
    for f in reversed(dataclasses.fields(Settings)):
        flag = "--" + f.name.replace("_", "-")
        command = click.option(
            flag,
            f.name,
            type=type(f.default),
            default=None,
            help=f"{f.metadata['help']} [{Settings.env_name(f.name)}; default {f.default if f.default != '' else 'unset'}]",
        )(command)
    return command


EXIT_INTERRUPTED = 130  # 128 + SIGINT


def _load(admin: bool = False, **overrides: Any) -> Settings:
    """The settings, checked as far as a mistake in them is a usage error (exit 2) naming the setting. An
    `admin` command (migrate, admin-key) at a terminal logs only warnings unless a level is set: its one
    line of outcome is what a person there needs, not the INFO lines a log collector keeps."""
    from sqlalchemy import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from apikeyd.store.engine import normalize_url

    try:
        settings = Settings.load(**overrides)
        handler = logs.stream_handler(settings.log_format, sys.stderr)
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    level = settings.log_level.upper()
    if admin and sys.stderr.isatty() and overrides.get("log_level") is None and Settings.env_name("log_level") not in os.environ:
        level = "WARNING"
    try:
        logging.basicConfig(level=level, handlers=[handler])
    except ValueError:
        raise click.UsageError(
            f"--log-level ({Settings.env_name('log_level')}) must be DEBUG, INFO, WARNING or ERROR"
        ) from None
    try:
        make_url(normalize_url(settings.database_url)).get_dialect().import_dbapi()  # a driver apikeyd has
    except (SQLAlchemyError, ImportError):  # the URL is never repeated: it may hold a password
        raise click.UsageError(
            f"--database-url ({Settings.env_name('database_url')}) is not a database URL apikeyd can use, like "
            "postgresql://user@host:5432/apikeyd or sqlite:///apikeyd.db"
        ) from None
    return settings


def _quiet_interrupt(command: Callable[..., None]) -> Callable[..., None]:
    """Ctrl-C before the server serves (it then drains and exits 0), or during migrate or admin-key create,
    exits 130 without click's "Aborted!" (and its exit 1): interrupted, as shells report it."""

    @functools.wraps(command)
    def quiet(*args: Any, **kwargs: Any) -> None:
        try:
            command(*args, **kwargs)
        except KeyboardInterrupt:
            sys.exit(EXIT_INTERRUPTED)

    return quiet


@contextlib.contextmanager
def _one_line_errors(settings: Settings) -> Iterator[None]:
    """Whatever stops a server command ends it with one line on stderr, never a traceback (which may hold row
    values, a new key's hash among them): exit 2 for what keeps the server from starting (a taken port, a
    schema to migrate), 1 for any other failure."""
    from sqlalchemy import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from apikeyd.exception_text import describe
    from apikeyd.server import StartupError
    from apikeyd.store.engine import normalize_url

    try:
        yield
    except StartupError as error:
        click.echo(f"apikeyd: {error}", err=True)
        sys.exit(2)
    except (click.ClickException, click.exceptions.Exit, click.Abort):
        raise
    except SQLAlchemyError as error:
        where = make_url(normalize_url(settings.database_url)).render_as_string(hide_password=True)
        click.echo(f"apikeyd: cannot use the database at {where}: {describe(error)}", err=True)
        sys.exit(1)
    except Exception as error:
        click.echo(f"apikeyd: {describe(error)}", err=True)
        sys.exit(1)


@click.command("serve")
@_settings_options
@_quiet_interrupt
def serve_command(**overrides: Any) -> None:
    """Serve gRPC until SIGTERM or Ctrl-C, then drain and exit 0."""
    import uvloop

    from apikeyd.server import serve

    settings = _load(**overrides)
    if settings.workers < 1:
        raise click.UsageError(f"--workers ({Settings.env_name('workers')}) must be 1 or more, not {settings.workers}")
    with _one_line_errors(settings):
        if settings.workers > 1:
            from apikeyd.workers import supervise  # N processes on the one port: src/apikeyd/workers.py

            sys.exit(supervise(settings))
        uvloop.run(serve(settings))  # as workers do (workers.py); see pyproject.toml


@click.command()
@click.option("--database-url", default=None, help="SQLAlchemy URL [APIKEYD_DATABASE_URL]")
@_quiet_interrupt
def migrate(database_url: str | None) -> None:
    """Bring the database schema up to date."""
    from apikeyd.store import migrate as migrations
    from apikeyd.store.engine import create_db_engine

    settings = _load(admin=True, database_url=database_url)
    engine = create_db_engine(settings.database_url)
    try:
        with _one_line_errors(settings):
            migrations.upgrade(engine)
    finally:
        engine.dispose()
    click.echo(f"database at {engine.url.render_as_string(hide_password=True)} is up to date", err=True)


@click.group("admin-key")
def admin_key() -> None:
    """Operator keys, written straight to the database: how a new installation gets its first credential."""


@admin_key.command("create")
@click.option("--display-name", required=True, help="what the key is for, e.g. 'ops laptop'")
@click.option(
    "--scope", "scopes", multiple=True, default=("*",), show_default=True, help="a scope to grant; repeatable"
)
@click.option("--database-url", default=None, help="SQLAlchemy URL [APIKEYD_DATABASE_URL]")
@_quiet_interrupt
def admin_key_create(display_name: str, scopes: tuple[str, ...], database_url: str | None) -> None:
    """Create a key of the operator account and print it alone on stdout (notes go to stderr), so that
    `export APIKEYD_TOKEN=$(apikeyd admin-key create --display-name ops)` works."""
    from apikeyd.domain.errors import ApiKeyError

    settings = _load(admin=True, database_url=database_url)
    with _one_line_errors(settings):
        try:
            issued = asyncio.run(_create_operator_key(settings, display_name, scopes))
        except ApiKeyError as error:
            raise click.ClickException(str(error)) from None
    click.echo(issued.secret)
    click.echo(
        f"created {issued.key.name} ({issued.key.masked_key}) with scopes {', '.join(issued.key.scopes)}; "
        "the key above is shown only now",
        err=True,
    )


async def _create_operator_key(settings: Settings, display_name: str, scopes: tuple[str, ...]) -> "IssuedKey":
    from apikeyd.app import App
    from apikeyd.lifecycle import NewKey
    from apikeyd.server import prepare_database

    app = App(settings)
    try:
        prepare_database(app.repository.engine)
        caller = app.manager.operator("admin-key create")
        return await app.manager.create(caller, settings.operator_account, NewKey(display_name, scopes))
    finally:
        app.close()


SERVER_COMMANDS = (serve_command, migrate, admin_key)
