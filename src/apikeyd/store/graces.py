"""The read behind ending rotation graces early (graces.py): keys whose previous secret has gone unused for
its end_grace_after_unused while its grace still runs."""

from datetime import datetime, timedelta

from sqlalchemy import func, select

from apikeyd.store.models import ApiKeyRow
from apikeyd.store.repository import Repository

BATCH = 100  # keys ended per sweep: a sweep is short, and the next one takes the rest


def idle_graces(repository: Repository, now: datetime, margin: timedelta) -> list[tuple[str, str]]:
    """(account_id, key_id) of keys in a grace whose previous secret was last used (or, unused since, the key
    last changed: a rotation is a change) at least end_grace_after_unused plus `margin` before `now`. The
    partial index ix_api_keys_idle_graces holds only keys with the option, and a grace lasts at most 7 days,
    so the rows read are few; the per-row arithmetic is done here, the same on both backends."""
    with repository.session(write=False) as session:
        rows = session.execute(
            select(
                ApiKeyRow.account_id,
                ApiKeyRow.key_id,
                func.coalesce(ApiKeyRow.previous_secret_last_used_time, ApiKeyRow.update_time),
                ApiKeyRow.end_grace_after_unused_seconds,
            )
            .where(
                ApiKeyRow.end_grace_after_unused_seconds.is_not(None),
                ApiKeyRow.previous_secret_hash.is_not(None),
                ApiKeyRow.previous_secret_expire_time > now,
            )
            # The longest unused first, so that keys still in use cannot crowd out those that are due.
            .order_by(func.coalesce(ApiKeyRow.previous_secret_last_used_time, ApiKeyRow.update_time))
            .limit(BATCH * 10)
        ).all()
    due = []
    for account_id, key_id, last_seen, seconds in rows:  # coalesce keeps the column type: aware UTC times
        if last_seen + timedelta(seconds=seconds or 0) + margin <= now:
            due.append((account_id, key_id))
    return due[:BATCH]
