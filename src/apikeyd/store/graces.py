"""The read behind ending rotation graces early (graces.py): keys whose previous secret has gone unused for
its end_grace_after_unused while its grace still runs."""

from datetime import datetime, timedelta

from sqlalchemy import func, select

from apikeyd.store.models import ApiKeyRow
from apikeyd.store.repository import Repository

BATCH = 100  # keys ended per sweep: a sweep is short, and the next one takes the rest


def idle_grace_candidates(repository: Repository, now: datetime) -> list[tuple[str, str, datetime, timedelta]]:
    """(account_id, key_id, last seen, end_grace_after_unused) of keys whose grace still runs and asked to
    end when unused, the longest unused first: last seen is the previous secret's last use or, unused since,
    the key's last change (a rotation is a change). The partial index ix_api_keys_idle_graces holds only keys
    with the option, and a grace lasts at most 7 days, so the rows read are few; graces.py decides which are
    due, in Python, the same on both backends."""
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
    # coalesce keeps the column type: aware UTC times
    return [(account_id, key_id, last_seen, timedelta(seconds=seconds or 0)) for account_id, key_id, last_seen, seconds in rows]
