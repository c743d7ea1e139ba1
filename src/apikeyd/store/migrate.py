"""Alembic, driven from code so that `apikeyd migrate` and `serve` need no alembic.ini on disk."""

from collections.abc import Sequence
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine

MIGRATIONS = Path(__file__).with_name("migrations")


def alembic_config(engine: Engine) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["engine"] = engine
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    command.upgrade(alembic_config(engine), revision)


def create_indexes(table: str, indexes: Sequence[tuple[str, list[str]]]) -> None:
    """For a migration that adds indexes to a table that may be large and busy. On PostgreSQL each is built
    CONCURRENTLY, outside a transaction, so writes go on meanwhile (a plain CREATE INDEX blocks them for the
    whole build); a build that failed half-way leaves an INVALID index and no alembic version, so a rerun
    drops what is there first. SQLite builds them in its batch mode."""
    from alembic import op  # only inside a migration

    context = op.get_context()
    if context.dialect.name == "postgresql":
        with context.autocommit_block():
            for name, columns in indexes:
                op.drop_index(name, table_name=table, postgresql_concurrently=True, if_exists=True)
                op.create_index(name, table, columns, postgresql_concurrently=True)
        return
    with op.batch_alter_table(table) as batch_op:
        for name, columns in indexes:
            batch_op.create_index(name, columns, unique=False)


def drop_indexes(table: str, indexes: Sequence[tuple[str, list[str]]]) -> None:
    from alembic import op

    with op.batch_alter_table(table) as batch_op:
        for name, _ in reversed(indexes):
            batch_op.drop_index(name)
