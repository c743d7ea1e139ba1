"""Alembic, driven from code so that `apikeyd migrate` and `serve` need no alembic.ini on disk."""

import functools
from collections.abc import Sequence
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect, text

MIGRATIONS = Path(__file__).with_name("migrations")


def alembic_config(engine: Engine | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["engine"] = engine
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    command.upgrade(alembic_config(engine), revision)


class SchemaNotCurrent(Exception):
    """The database's schema is not the one this apikeyd needs; the message says what to run."""


@functools.cache
def _revisions() -> tuple[str, frozenset[str]]:
    """This apikeyd's head revision and every revision it knows, from its migrations (read once)."""
    script = ScriptDirectory.from_config(alembic_config())
    head = script.get_current_head()
    assert head is not None, "the migrations have one head"
    return head, frozenset(revision.revision for revision in script.walk_revisions())


def check_schema(engine: Engine) -> str:
    """Raises SchemaNotCurrent when the database has no apikeyd schema or an older one than this apikeyd's,
    since every call would then fail. A revision this apikeyd does not know is a newer one: `apikeyd migrate`
    runs before a rollout while the old servers still serve, and migrations keep those working, so that is
    not refused: the answer is then a note to log, else "". One short read; connection errors propagate."""
    head, known = _revisions()
    # Read directly: alembic's MigrationContext logs two INFO lines each time, and the health watcher asks often.
    with engine.connect() as connection:
        current = None
        if inspect(connection).has_table("alembic_version"):
            current = connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
    where = f"the database at {engine.url.render_as_string(hide_password=True)}"
    if current is None:
        raise SchemaNotCurrent(f"{where} has no apikeyd schema (this apikeyd needs revision {head}): run `apikeyd migrate`")
    if current not in known:
        return f"{where} is at schema revision {current}, newer than this apikeyd's {head}: upgrade this apikeyd"
    if current != head:
        raise SchemaNotCurrent(
            f"{where} is at schema revision {current}, older than this apikeyd's {head}: run `apikeyd migrate`"
        )
    return ""


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
