"""Rotation you can see finish: a rotation may ask that its grace end early, once the previous secret has
gone unused for `end_grace_after_unused`. Every flush of last-used times (server.py) then sweeps: a key whose
previous secret's last use is that long past has its grace ended, as an audited change like any other, which
the cache and the change feed put in force everywhere.

Last uses reach the database in batches, every APIKEYD_LAST_USED_FLUSH_INTERVAL on each process, so a use
on another replica may not be written yet. A key's grace is ended only when its last use is older than the
option plus two flush intervals (`margin`): a secret in use keeps working. Every process sweeps; the change
is decided again on the row the write locks and clears the option, so two sweeps end a grace once."""

import logging
from datetime import UTC, datetime, timedelta

from apikeyd.domain.errors import Aborted, FailedPrecondition, NotFound, Unavailable
from apikeyd.domain.model import ApiKey, Credentials, EventKind
from apikeyd.lifecycle import KeyManager
from apikeyd.store.graces import BATCH, idle_grace_candidates
from apikeyd.store.repository import Change, Repository

log = logging.getLogger(__name__)


class _Nothing(FailedPrecondition):
    """The row no longer needs its grace ended: another sweep or a rotation came first."""


def _due(last_seen: datetime, idle: timedelta, margin: timedelta, now: datetime) -> bool:
    return last_seen + idle + margin <= now


async def end_idle_graces(manager: KeyManager, repository: Repository, margin: timedelta) -> int:
    """End the graces that are due; how many were ended."""
    now = datetime.now(UTC)
    try:
        candidates = await manager.run(lambda: idle_grace_candidates(repository, now))
    except Unavailable:
        return 0
    due = [(account, key) for account, key, last_seen, idle in candidates if _due(last_seen, idle, margin, now)][:BATCH]
    ended = 0
    for account_id, key_id in due:

        def decide(current: ApiKey, credentials: Credentials) -> Change:
            idle = current.end_grace_after_unused
            expire = current.previous_secret_expire_time
            if credentials.previous_secret_hash is None or idle is None or expire is None or expire <= now:
                raise _Nothing("nothing to end")
            last = current.previous_secret_last_used_time or current.update_time
            if not _due(last, idle, margin, now):
                raise _Nothing("used meanwhile")
            unused = (now - last).total_seconds()
            # The option goes with the grace it ended: a sweep on a replica whose clock is behind, or that
            # began earlier, must not end it a second time.
            return Change(
                EventKind.UPDATED,
                {"previous_secret_expire_time": now, "end_grace_after_unused": None},
                ("previous_secret_expire_time",),
                {"reason": f"the previous secret went unused for {unused:.0f} s (end_grace_after_unused)"},
            )

        try:
            await manager.mutate(manager.operator("EndIdleGrace"), account_id, key_id, "", decide, now)
        except (_Nothing, NotFound, Aborted, Unavailable):
            continue
        ended += 1
    return ended
