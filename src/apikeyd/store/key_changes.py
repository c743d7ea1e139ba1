"""The reads of `key_events` that follow changes: the change feed's (authorizer/feed.py) and a resumed
change stream's replay (change_stream.py). Only ids, keys, accounts and kinds: never what a change set."""

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from sqlalchemy import Engine, func, or_, select, text
from sqlalchemy.orm import Session

from apikeyd.domain.model import EventKind, KeyChange
from apikeyd.store.engine import database_errors
from apikeyd.store.models import KeyEventRow

_COLUMNS = (KeyEventRow.id, KeyEventRow.key_id, KeyEventRow.account_id, KeyEventRow.project_id, KeyEventRow.kind)


@contextlib.contextmanager
def _reading(engine: Engine) -> Iterator[Session]:
    with database_errors(), Session(engine) as session, session.begin():
        yield session


def _changes(rows: list[Any]) -> list[KeyChange]:
    return [KeyChange(int(r.id), r.key_id, r.account_id, r.project_id or "", EventKind(r.kind)) for r in rows]


# PostgreSQL's transaction ids around a read (None on SQLite, whose writers take turns and leave no gaps):
# every transaction below the first had ended before the read began; any transaction holding an id the read
# did not see (a gap: a later id had committed) is below the second, taken after the read. Once a later
# read's first is past a gap's second, the gap's transaction is over, and an id that read does not find
# was rolled back and will never appear. READ COMMITTED: each statement has a snapshot of its own.
Horizon = tuple[int, int] | None
_XMIN = text("SELECT pg_snapshot_xmin(pg_current_snapshot())")
_XMAX = text("SELECT pg_snapshot_xmax(pg_current_snapshot())")
T = TypeVar("T")


def _with_horizon(session: Session, read: Callable[[], T]) -> tuple[T, Horizon]:
    """`read()` in `session`, between the two ids of its Horizon on PostgreSQL."""
    if session.get_bind().dialect.name != "postgresql":
        return read(), None
    ended_below = int(session.execute(_XMIN).scalar_one())
    result = read()
    return result, (ended_below, int(session.execute(_XMAX).scalar_one()))


def start_position(engine: Engine, window: int) -> tuple[int, list[int], Horizon]:
    """The largest event id, the ids present among the `window` below it (what is missing may be a
    transaction that has not committed yet), and the read's horizon."""
    with _reading(engine) as session:

        def read() -> tuple[int, list[int]]:
            top = session.execute(select(func.max(KeyEventRow.id))).scalar_one_or_none() or 0
            present = session.scalars(
                select(KeyEventRow.id).where(KeyEventRow.id > top - window, KeyEventRow.id <= top)
            ).all()
            return int(top), [int(i) for i in present]

        (top, present), horizon = _with_horizon(session, read)
        return top, present, horizon


def changes_since(
    engine: Engine, position: int, gaps: tuple[int, ...], limit: int
) -> tuple[list[KeyChange], Horizon]:
    """The events after `position` or with an id in `gaps`, oldest first, at most `limit`, and the read's
    horizon."""
    condition = KeyEventRow.id > position
    if gaps:
        condition = or_(condition, KeyEventRow.id.in_(gaps))
    query = select(*_COLUMNS).where(condition).order_by(KeyEventRow.id).limit(limit)
    with _reading(engine) as session:
        return _with_horizon(session, lambda: _changes(list(session.execute(query).all())))


def changes_after(
    engine: Engine, after_id: int, limit: int, account_id: str | None = None, project_id: str = ""
) -> tuple[list[KeyChange], int]:
    """At most `limit` events after `after_id` (of one account, or one project of it, unless account_id is
    None), oldest first, DENIED ones left out, and the largest event id of all."""
    # DENIED rows change no key: tenants' refused calls must not make an operator's stream too far behind.
    query = select(*_COLUMNS).where(KeyEventRow.id > after_id, KeyEventRow.kind != EventKind.DENIED.value)
    if account_id is not None:
        query = query.where(KeyEventRow.account_id == account_id)
        if project_id:
            query = query.where(KeyEventRow.project_id == project_id)
    with _reading(engine) as session:
        top = session.execute(select(func.max(KeyEventRow.id))).scalar_one_or_none() or 0
        rows = session.execute(query.order_by(KeyEventRow.id).limit(limit)).all()
        return _changes(list(rows)), int(top)
