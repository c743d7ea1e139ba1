"""The reads of `key_events` that follow changes: the change feed's (authorizer/feed.py) and a resumed
change stream's replay (change_stream.py). Only ids, keys, accounts and kinds: never what a change set."""

from typing import Any

from sqlalchemy import Engine, func, or_, select
from sqlalchemy.orm import Session

from apikeyd.domain.model import EventKind, KeyChange
from apikeyd.store.models import KeyEventRow

_COLUMNS = (KeyEventRow.id, KeyEventRow.key_id, KeyEventRow.account_id, KeyEventRow.project_id, KeyEventRow.kind)


def _changes(rows: list[Any]) -> list[KeyChange]:
    return [KeyChange(int(r.id), r.key_id, r.account_id, r.project_id or "", EventKind(r.kind)) for r in rows]


def start_position(engine: Engine, window: int) -> tuple[int, list[int]]:
    """The largest event id, and the ids present among the `window` below it (what is missing may be a
    transaction that has not committed yet)."""
    with Session(engine) as session, session.begin():
        top = session.execute(select(func.max(KeyEventRow.id))).scalar_one_or_none() or 0
        present = session.scalars(
            select(KeyEventRow.id).where(KeyEventRow.id > top - window, KeyEventRow.id <= top)
        ).all()
        return int(top), [int(i) for i in present]


def changes_since(engine: Engine, position: int, gaps: tuple[int, ...], limit: int) -> list[KeyChange]:
    """The events after `position` or with an id in `gaps`, oldest first, at most `limit`."""
    condition = KeyEventRow.id > position
    if gaps:
        condition = or_(condition, KeyEventRow.id.in_(gaps))
    with Session(engine) as session, session.begin():
        rows = session.execute(select(*_COLUMNS).where(condition).order_by(KeyEventRow.id).limit(limit)).all()
        return _changes(list(rows))


def changes_after(
    engine: Engine, after_id: int, limit: int, account_id: str | None = None, project_id: str = ""
) -> tuple[list[KeyChange], int]:
    """At most `limit` events after `after_id` (of one account, or one project of it, unless account_id is
    None), oldest first, DENIED ones included, and the largest event id of all."""
    query = select(*_COLUMNS).where(KeyEventRow.id > after_id)
    if account_id is not None:
        query = query.where(KeyEventRow.account_id == account_id)
        if project_id:
            query = query.where(KeyEventRow.project_id == project_id)
    with Session(engine) as session, session.begin():
        top = session.execute(select(func.max(KeyEventRow.id))).scalar_one_or_none() or 0
        rows = session.execute(query.order_by(KeyEventRow.id).limit(limit)).all()
        return _changes(list(rows)), int(top)
