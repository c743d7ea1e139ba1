"""A fair, bounded queue in front of the verification pool.

The pool's own queue is FIFO: a flood of cold checks for one key (distinct wrong secrets, say) queued ahead
of another key's first check makes that check wait for all of them. Here each lane (a lookup id) has at most
one verification running, and a free thread goes to the lanes in turn (round robin), so another key's first
check waits for at most one verification per lane ahead of it, however many the flood has queued.

The queue is bounded: with `max_queued` calls already waiting, a call is refused at once with Unavailable
("retry later") rather than queued. A real key is never refused as unknown merely for having waited.

Everything but the pool's work runs on the event loop thread.
"""

import asyncio
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Executor
from typing import TypeVar

from apikeyd.domain.errors import Unavailable

T = TypeVar("T")


class QueueFull(Unavailable):
    """More cold checks are waiting for the verification pool than it may queue."""


class FairQueue:
    def __init__(self, executor: Executor, threads: int = 4, max_queued: int = 256) -> None:
        self._executor = executor
        self._threads = threads  # the pool's size: no more run at once, so none waits in the pool's FIFO
        self.max_queued = max_queued
        self._running = 0
        self._busy: set[str] = set()  # lanes with a call running
        self._lanes: OrderedDict[str, deque[asyncio.Future[None]]] = OrderedDict()  # in turn order
        self._queued = 0
        self.refusals = 0  # calls refused because the queue was full: read when Prometheus scrapes

    def queued(self) -> int:
        return self._queued

    async def run(self, lane: str, function: Callable[..., T], *args: object) -> T:
        """`function(*args)` on the pool once it is this lane's turn."""
        if self._running >= self._threads or lane in self._busy:
            await self._wait_turn(lane)
        else:
            self._start(lane)
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)
        finally:
            self._finish(lane)

    async def _wait_turn(self, lane: str) -> None:
        if self._queued >= self.max_queued:
            self.refusals += 1
            raise QueueFull(
                f"{self._queued} cold checks are already waiting for verification (APIKEYD_VERIFICATION_QUEUE); "
                "retry later"
            )
        turn = asyncio.get_running_loop().create_future()
        self._lanes.setdefault(lane, deque()).append(turn)
        self._queued += 1
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():  # its turn came as it was cancelled: pass it on
                self._finish(lane)
            else:
                self._forget(lane, turn)
            raise

    def _forget(self, lane: str, turn: "asyncio.Future[None]") -> None:
        waiting = self._lanes.get(lane)
        if waiting is not None and turn in waiting:
            waiting.remove(turn)
            self._queued -= 1
            if not waiting:
                del self._lanes[lane]

    def _start(self, lane: str) -> None:
        self._running += 1
        self._busy.add(lane)

    def _finish(self, lane: str) -> None:
        self._running -= 1
        self._busy.discard(lane)
        if lane in self._lanes:  # it has had its turn: the lanes that waited meanwhile go first
            self._lanes.move_to_end(lane)
        self._hand_out()

    def _hand_out(self) -> None:
        """Free threads to the first lanes in turn order that have nothing running; a lane served goes to the
        back of the line. Lanes skipped for being busy number at most `threads`, so this is O(threads)."""
        while self._running < self._threads:
            lane = next((lane for lane in self._lanes if lane not in self._busy), None)
            if lane is None:
                return
            waiting = self._lanes[lane]
            turn = waiting.popleft()
            self._queued -= 1
            if waiting:
                self._lanes.move_to_end(lane)
            else:
                del self._lanes[lane]
            if turn.cancelled():  # its task is on its way out; _forget will find it gone
                continue
            self._start(lane)
            turn.set_result(None)
