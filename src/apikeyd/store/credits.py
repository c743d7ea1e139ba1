"""Spending credits: the one write on Authorize's path. The database is the record of every balance, and
each spend is a conditional write there, committed before the check is answered: two processes (or
replicas) spending one balance take turns on its row, so together they never spend more than it holds, and
no restart, of apikeyd or of Redis, can hand out or take away a credit. (A check whose caller went away
after its spend committed has still spent: it was allowed, and only its answer was lost.)

A lone spend is one statement, `UPDATE ... SET remaining = remaining - cost WHERE remaining >= cost AND
no refill is due RETURNING remaining`. When it changes nothing, or when several spends of one key come as a
batch (authorizer/credits.py gathers those that arrive while the key's previous write is in flight), the
row is read under the write lock, due refills are applied (domain/credits.py), each spend is decided in
order, and the balance is written once: one commit for the whole batch.
"""

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import or_, select, update

from apikeyd.store.models import ApiKeyRow, credits_from_columns
from apikeyd.store.repository import Repository


@dataclass(frozen=True, slots=True)
class Spent:
    allowed: bool
    remaining: int | None  # what is left; None: the key is gone


def spend(repository: Repository, key_id: str, costs: list[int], now: datetime) -> list[Spent]:
    """Take each cost in turn from the key's balance, or nothing for one the balance cannot cover. A key whose
    credits were removed since it was cached spends nothing and is allowed, with remaining -1 (unlimited)."""
    with repository.session(write=True) as session:
        if len(costs) == 1:
            taken = session.execute(
                update(ApiKeyRow)
                .where(
                    ApiKeyRow.key_id == key_id,
                    ApiKeyRow.credits_remaining >= costs[0],
                    or_(ApiKeyRow.credits_next_refill.is_(None), ApiKeyRow.credits_next_refill > now),
                )
                .values(credits_remaining=ApiKeyRow.credits_remaining - costs[0])
                .returning(ApiKeyRow.credits_remaining)
                .execution_options(synchronize_session=False)
            ).one_or_none()
            if taken is not None:
                return [Spent(True, int(taken[0] or 0))]  # never NULL: `>= cost` held
        row = session.execute(
            select(ApiKeyRow.credits_remaining, ApiKeyRow.credits_refill, ApiKeyRow.credits_next_refill)
            .where(ApiKeyRow.key_id == key_id)
            .with_for_update()
        ).one_or_none()
        if row is None:
            return [Spent(False, None)] * len(costs)
        credits = credits_from_columns(*row)
        if credits is None:
            return [Spent(True, -1)] * len(costs)
        credits = credits.refilled(now)
        remaining, spent = credits.remaining, []
        for cost in costs:
            allowed = remaining >= cost
            remaining -= cost if allowed else 0
            spent.append(Spent(allowed, remaining))
        if remaining != row.credits_remaining or credits.next_refill != row.credits_next_refill:
            session.execute(
                update(ApiKeyRow)
                .where(ApiKeyRow.key_id == key_id)
                .values(credits_remaining=remaining, credits_next_refill=credits.next_refill)
                .execution_options(synchronize_session=False)
            )
        return spent
