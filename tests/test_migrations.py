"""The Alembic migrations: they build exactly the schema the models describe, go down and up again, and on
PostgreSQL add indexes to a table that is taking writes without stopping them."""

import threading
import time
import uuid
from datetime import UTC, datetime

import psycopg
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from apikeyd.store import migrate
from apikeyd.store.engine import create_db_engine
from apikeyd.store.models import Base
from tests.conftest import scratch_postgres_database

LISTING_INDEXES = {"ix_api_keys_project_page", "ix_api_keys_state_page", "ix_api_keys_project_state_page"}


def test_the_migrations_build_the_models_schema_and_go_down_and_up_again(database_url):
    engine = create_db_engine(database_url)  # the session's database: migrated to head by conftest
    try:
        with engine.connect() as connection:
            differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
        assert differences == []
        command.downgrade(migrate.alembic_config(engine), "0002")
        indexes = {index["name"] for index in inspect(engine).get_indexes("api_keys")}
        assert not indexes & LISTING_INDEXES
    finally:
        migrate.upgrade(engine)  # the rest of the session needs head
        indexes = {index["name"] for index in inspect(engine).get_indexes("api_keys")}
        engine.dispose()
    assert LISTING_INDEXES <= indexes


def _insert_key(connection: psycopg.Connection, account: str) -> None:
    now = datetime.now(UTC)
    key_id = str(uuid.uuid4())
    connection.execute(
        "INSERT INTO api_keys (key_id, account_id, project_id, display_name, description, scopes, labels, state,"
        " prefix, lookup_id, masked_key, secret_hash, create_time, update_time, revision, rate_limits, revoke_reason)"
        " VALUES (%s, %s, '', 'k', '', '[]', '{}', 'ACTIVE', 'AK_', %s, 'AK_...', 'x', %s, %s, 1, '[]', '')",
        (key_id, account, uuid.uuid4().hex[:16], now, now),
    )


def test_the_listing_indexes_build_on_postgresql_without_blocking_writes():
    with scratch_postgres_database("apikeyd_migrations") as (name, url):
        engine = create_db_engine(url)
        command.downgrade(migrate.alembic_config(engine), "0002")
        conninfo = f"postgresql://postgres@127.0.0.1:5432/{name}"
        with psycopg.connect(conninfo) as open_writer, psycopg.connect(conninfo, autocommit=True) as observer:
            _insert_key(open_writer, "busy")  # a write transaction still open when the migration starts
            failure: list[BaseException] = []

            def upgrade() -> None:
                try:
                    migrate.upgrade(engine)
                except BaseException as error:  # reported by the test below
                    failure.append(error)

            migration = threading.Thread(target=upgrade)
            migration.start()
            # An index build waits for the open transaction; a plain CREATE INDEX would make every later write
            # queue behind it, CONCURRENTLY does not.
            deadline = time.monotonic() + 30
            while not observer.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'"
                " AND query ILIKE 'CREATE INDEX%%'",
                (name,),
            ).fetchone()[0]:
                assert time.monotonic() < deadline, "the migration never started building an index"
                assert migration.is_alive(), failure
                time.sleep(0.01)  # polling for a state of another session, not papering over a race
            with psycopg.connect(conninfo, autocommit=True) as writer:
                writer.execute("SET lock_timeout = '2s'")
                _insert_key(writer, "other")  # a lock wait here raises LockNotAvailable after 2 s
            open_writer.commit()
            migration.join(timeout=60)
            assert not migration.is_alive() and not failure, failure
        assert LISTING_INDEXES <= {index["name"] for index in inspect(engine).get_indexes("api_keys")}
        with engine.connect() as connection:
            invalid = connection.exec_driver_sql("SELECT count(*) FROM pg_index WHERE NOT indisvalid").scalar()
        engine.dispose()
        assert invalid == 0

