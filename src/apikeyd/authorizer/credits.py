"""Spends of credits on their way to the database (store/credits.py), one key at a time.

Every spend of a key waits for its commit, and a hot key's commits would otherwise queue one behind the
other on its row lock, each paying a full commit (an fsync on PostgreSQL). Instead, spends of a key that
arrive while its previous write is in flight wait for the next one and go in it together: one transaction,
one commit, each spend decided in order of arrival. A spend that finds no write in flight starts one at
once, so a quiet key waits for nothing but its own commit. Every answer still follows the commit that holds
its spend, so nothing is allowed that is not durable.

Runs on the event loop; the writes run on the store's pool. The table holds one entry per key with a write
in flight (real keys only, found by a verified secret), so it is bounded by the pool's work.
"""

import asyncio
import contextvars
from concurrent.futures import Executor
from datetime import UTC, datetime

from apikeyd.store.credits import Spent, spend
from apikeyd.store.repository import Repository

MAX_BATCH = 1000  # spends in one transaction; the rest wait for the next


class CreditSpender:
    def __init__(self, repository: Repository, executor: Executor) -> None:
        self._repository = repository
        self._executor = executor
        # Per key with a write in flight: the spends waiting for the next write.
        self._waiting: dict[str, list[tuple[int, asyncio.Future[Spent]]]] = {}
        self._writers: set[asyncio.Task[None]] = set()  # held, so that a running write is never collected

    async def spend(self, key_id: str, cost: int) -> Spent:
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Spent] = loop.create_future()
        waiting = self._waiting.get(key_id)
        if waiting is not None:
            waiting.append((cost, answer))
        else:
            self._waiting[key_id] = []
            # In a context of its own: the write serves later callers too, and may outlive this one's call.
            writer = loop.create_task(self._write(key_id, [(cost, answer)]), context=contextvars.Context())
            self._writers.add(writer)
            writer.add_done_callback(self._writers.discard)
        return await answer

    async def _write(self, key_id: str, batch: list[tuple[int, "asyncio.Future[Spent]"]]) -> None:
        loop = asyncio.get_running_loop()
        while batch:
            costs = [cost for cost, _ in batch]
            try:
                spent = await loop.run_in_executor(self._executor, spend, self._repository, key_id, costs, datetime.now(UTC))
            except asyncio.CancelledError:  # the loop is closing: nobody is left to answer
                for _, answer in batch + self._waiting.pop(key_id):
                    answer.cancel()
                raise
            except Exception as error:  # Unavailable, mostly: every waiter of this write gets it
                for _, answer in batch:
                    if not answer.done():
                        answer.set_exception(error)
            else:
                for (_, answer), outcome in zip(batch, spent):
                    if not answer.done():  # a caller that went away still spent: its answer was lost
                        answer.set_result(outcome)
            waiting = self._waiting[key_id]
            batch, self._waiting[key_id] = waiting[:MAX_BATCH], waiting[MAX_BATCH:]
        del self._waiting[key_id]
