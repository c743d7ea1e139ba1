"""All of usage's SQL (table key_usage): the flush's additive upserts, retention's bounded deletes, and the
keyset page ListApiKeyUsage reads.

Every process and replica adds its own counts (`ok = ok + excluded.ok`), never a total it computed, so
their flushes commute: two workers writing the same key and bucket end with the sum, in either order.
"""

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, select, tuple_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from apikeyd.domain.usage import COUNTED, Granularity, KeyCounts, Usage
from apikeyd.store.models import KeyUsageRow
from apikeyd.store.repository import Repository

_TABLE = KeyUsageRow.__table__
_COLUMNS = tuple((code, code.name.lower()) for code in COUNTED)  # the count columns, named after the codes
_COUNT_COLUMNS = tuple(getattr(KeyUsageRow, name) for _, name in _COLUMNS)
_PRIMARY_KEY = ("key_id", "granularity", "bucket")


def _upsert(session: Session) -> Any:
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    statement = dialect.insert(_TABLE)
    added = {name: _TABLE.c[name] + statement.excluded[name] for _, name in _COLUMNS}
    return statement.on_conflict_do_update(index_elements=list(_PRIMARY_KEY), set_=added)


def add(repository: Repository, minute_start: float, counted: Mapping[str, KeyCounts]) -> int:
    """Add one minute's counts to the keys' minute, hour and day buckets, in one transaction (the flusher
    keeps it to KEYS_PER_TRANSACTION keys); the number of rows written."""
    minute = datetime.fromtimestamp(minute_start, UTC)
    buckets = [(granularity.value, granularity.start_of(minute)) for granularity in Granularity]
    rows = [
        {
            "key_id": key_id,
            "granularity": granularity,
            "bucket": bucket,
            "account_id": entry.account_id,
            "project_id": entry.project_id,
            **{name: entry.counts[code] for code, name in _COLUMNS},
        }
        # In key order: the hour and day rows are shared by every replica's flush, and transactions that lock
        # them in different orders deadlock (50 of 60 did on PostgreSQL, two replicas flushing 300 keys).
        for key_id, entry in sorted(counted.items())
        for granularity, bucket in buckets
    ]
    if not rows:
        return 0
    with repository.session(write=True) as session:
        session.execute(_upsert(session), rows)  # executemany: psycopg pipelines it, SQLite steps it in C
    return len(rows)


def delete_before(repository: Repository, granularity: Granularity, before: datetime, limit: int) -> int:
    """Delete at most `limit` of the oldest rows of `granularity` whose bucket starts before `before`, in one
    short transaction (ix_key_usage_retention walks them oldest first); the number deleted."""
    with repository.session(write=True) as session:
        oldest = (
            select(KeyUsageRow.key_id, KeyUsageRow.granularity, KeyUsageRow.bucket)
            .where(KeyUsageRow.granularity == granularity.value, KeyUsageRow.bucket < before)
            .order_by(KeyUsageRow.bucket)
            .limit(limit)
        )
        primary_key = tuple_(KeyUsageRow.key_id, KeyUsageRow.granularity, KeyUsageRow.bucket)
        result = session.execute(
            delete(KeyUsageRow).where(primary_key.in_(oldest)).execution_options(synchronize_session=False)
        )
        return int(result.rowcount)  # type: ignore[attr-defined]


def page(
    repository: Repository,
    account_id: str,
    project_id: str,
    key_ids: tuple[str, ...],
    granularity: Granularity,
    start: datetime,
    end: datetime,
    size: int,
    after: tuple[str, datetime] | None,
) -> tuple[list[Usage], tuple[str, datetime] | None]:
    """One page of buckets in (key_id, bucket) order, keyset on ix_key_usage_account (ix_key_usage_project
    with a project), never OFFSET; and the position the next page starts after, None on the last page.
    `key_ids` empty: every key of the account (or project); `project_id` empty: any project."""
    # Columns, not ORM entities: a dashboard's 3,000 buckets would spend most of the call building objects.
    query = select(
        KeyUsageRow.key_id, KeyUsageRow.account_id, KeyUsageRow.project_id, KeyUsageRow.bucket, *_COUNT_COLUMNS
    ).where(
        KeyUsageRow.account_id == account_id,
        KeyUsageRow.granularity == granularity.value,
        KeyUsageRow.bucket >= start,
        KeyUsageRow.bucket < end,
    )
    if project_id:
        query = query.where(KeyUsageRow.project_id == project_id)
    if key_ids:
        query = query.where(KeyUsageRow.key_id.in_(key_ids))
    if after is not None:
        query = query.where(tuple_(KeyUsageRow.key_id, KeyUsageRow.bucket) > tuple_(*after))
    query = query.order_by(KeyUsageRow.key_id, KeyUsageRow.bucket).limit(size + 1)
    with repository.session(write=False) as session:
        rows = session.execute(query).all()
    codes = [code for code, _ in _COLUMNS]
    found = [
        Usage(key_id, account, project, granularity, bucket, {code: n for code, n in zip(codes, counts) if n})
        for key_id, account, project, bucket, *counts in rows[:size]
    ]
    more = len(rows) > size
    return found, (found[-1].key_id, found[-1].start) if more else None
