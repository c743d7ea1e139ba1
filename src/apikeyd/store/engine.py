"""The database engine and what its errors mean: one engine per process, configured for each backend, and
the mapping of a database that does not answer (or refuses a statement for its size) to the domain's
errors, which every store module uses around its transactions."""

import contextlib
import sqlite3
from collections.abc import Iterator
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from apikeyd.domain.errors import InvalidArgument, Unavailable

WRITE = "apikeyd_write"  # the execution option of write transactions: SQLite then begins IMMEDIATE


def normalize_url(url: str) -> str:
    """Accept the URLs people paste: `postgresql://` and `postgres://` mean psycopg 3 here."""
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme) :]
    return url


_CONNECT_TIMEOUT = 5  # seconds (libpq's connect_timeout), unless the URL says otherwise
_POOL_TIMEOUT = 10.0  # seconds a call waits for a free connection before it is UNAVAILABLE


def create_db_engine(url: str, pool_size: int = 5) -> Engine:
    url = normalize_url(url)
    if make_url(url).get_backend_name() != "sqlite":
        # A database host that drops packets must fail a connection in seconds, not after TCP's minutes.
        return create_engine(
            url,
            hide_parameters=True,  # an error or an echoed statement must not carry a row's values or its hash
            pool_pre_ping=True,
            pool_size=pool_size,
            max_overflow=pool_size,
            pool_timeout=_POOL_TIMEOUT,
            connect_args={} if "connect_timeout" in url else {"connect_timeout": _CONNECT_TIMEOUT},
        )
    engine = create_engine(url, pool_pre_ping=True, hide_parameters=True)

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control from pysqlite so that writers can BEGIN IMMEDIATE: a write then waits
        # for the lock (busy_timeout) instead of failing when it upgrades from a read.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=10000")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        write = connection.get_execution_options().get(WRITE, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


def _refused_for_its_size(error: DBAPIError) -> bool:
    """The database refused the statement for its size or complexity (SQLite's "Expression tree is too large",
    "too many SQL variables", "string or blob too big"; PostgreSQL's class 54, program limit exceeded, and
    libpq's at most 65535 parameters). The input limits (domain/limits.py) keep requests far below these;
    this is the mapping if one got through."""
    cause = error.orig
    sqlstate = getattr(cause, "sqlstate", None)
    if isinstance(sqlstate, str):
        return sqlstate.startswith("54")
    if "number of parameters must be between" in str(cause):
        return True
    code = getattr(cause, "sqlite_errorcode", None)
    message = str(cause)
    return code == sqlite3.SQLITE_TOOBIG or (
        code == sqlite3.SQLITE_ERROR and ("too large" in message or "too many" in message or "too big" in message)
    )


@contextlib.contextmanager
def database_errors() -> Iterator[None]:
    """A database that does not answer as Unavailable, and a statement it refuses for its size as
    InvalidArgument: what every store read and write raises instead of SQLAlchemy's errors."""
    try:
        yield
    except (OperationalError, InterfaceError, PoolTimeout) as error:
        if isinstance(error, DBAPIError) and _refused_for_its_size(error):
            # The request's doing: retrying it later fails the same way, so not UNAVAILABLE.
            raise InvalidArgument("request", "is too large or complex for the database; send a smaller one") from error
        raise Unavailable("the database is unavailable; retry later") from error
    except DBAPIError as error:
        if error.connection_invalidated:
            raise Unavailable("the database connection was lost; retry later") from error
        raise
