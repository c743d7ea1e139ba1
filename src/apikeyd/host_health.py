"""Health for the host under `apikeyd serve --workers N`: the board the supervisor and its workers share (one
state byte and one heartbeat per worker) and a worker's HostHealth, which answers for the whole. The design,
and why the heartbeat is what it is, is in the docstring of src/apikeyd/workers.py."""

import asyncio
import logging
import mmap
import os
import struct
import tempfile
import time
from typing import TYPE_CHECKING

from grpc_health.v1 import health_pb2

from apikeyd.logs import fields

if TYPE_CHECKING:
    from apikeyd.server import Server

log = logging.getLogger("apikeyd.workers")  # the supervisor's and workers' lines, under one name

_HEALTH_REFRESH = 0.1  # seconds between a worker's reads of the health board


class HealthBoard:
    """A file mapping the supervisor and its workers share: one byte per worker, NOT_LISTENING, SERVING or
    NOT_SERVING, then (from the next multiple of 8) one heartbeat per worker, the time.monotonic() of its event
    loop's last beat as an 8-byte double. The file has no name (a memfd, or an unlinked temporary file where
    there is none): it goes away with the last process that maps it."""

    # EXITING: its event loop has ended (serve() returned) and the interpreter is exiting; it beats no more.
    NOT_LISTENING, SERVING, NOT_SERVING, EXITING = 0, 1, 2, 3
    _BEAT = struct.Struct("d")  # native: aligned, written by one 8-byte store

    def __init__(self, fd: int, size: int) -> None:
        self.size = size
        self._beats_at = -(-size // 8) * 8
        self._map = mmap.mmap(fd, self.length(size))  # MAP_SHARED, read and write

    @staticmethod
    def length(size: int) -> int:
        return -(-size // 8) * 8 + size * HealthBoard._BEAT.size

    @classmethod
    def create(cls, size: int) -> tuple["HealthBoard", int]:
        """A zeroed board and the descriptor of its file, for the workers to inherit."""
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create("apikeyd-health")
        else:  # pragma: no cover - not Linux
            with tempfile.TemporaryFile(prefix="apikeyd-health-") as file:
                fd = os.dup(file.fileno())
        os.ftruncate(fd, cls.length(size))
        return cls(fd, size), fd

    def __setitem__(self, index: int, state: int) -> None:
        self._map[index] = state

    def states(self) -> bytes:
        return self._map[: self.size]

    def beat(self, index: int) -> None:
        """Worker `index`'s event loop is alive now. CLOCK_MONOTONIC is one clock for every process on the
        host, so the supervisor can compare it with its own time.monotonic()."""
        self._BEAT.pack_into(self._map, self._beats_at + index * self._BEAT.size, time.monotonic())

    def last_beat(self, index: int) -> float:
        """The time of worker `index`'s last beat; 0.0 if none yet."""
        return float(self._BEAT.unpack_from(self._map, self._beats_at + index * self._BEAT.size)[0])

    def close(self) -> None:
        self._map.close()


class HostHealth:
    """A worker's health service answers for the host (module docstring): its own health goes on the board,
    the board's verdict goes to the health service. Its follower task also beats the worker's heartbeat on the
    board, every 0.1 s from the worker's first report until its event loop ends (through a drain too)."""

    _SERVING, _NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING

    def __init__(self, board: HealthBoard, index: int) -> None:
        self.board = board
        self.index = index
        self._answer: int | None = None
        self._follower: asyncio.Task[None] | None = None
        self._listening = True

    async def report(self, server: "Server", status: int) -> None:
        """Server.report_health: this worker's own health changed to `status` (a health_pb2 ServingStatus)."""
        if status == self._SERVING:
            self.board[self.index] = HealthBoard.SERVING
        elif status == self._NOT_SERVING:
            self.board[self.index] = HealthBoard.NOT_SERVING
        else:  # UNKNOWN: the listener is closing; this worker drains and answers NOT_SERVING to the end
            self.board[self.index] = HealthBoard.NOT_LISTENING
            self._listening = False  # the follower stops reading the board, and beats on until the loop ends
            return
        self.board.beat(self.index)
        if self._follower is None:
            self._follower = asyncio.get_running_loop().create_task(self._follow(server))
        await self._refresh(server)

    def verdict(self) -> tuple[int, list[int]]:
        """The host's health (SERVING or NOT_SERVING) and the workers that are NOT_SERVING."""
        down = [index for index, state in enumerate(self.board.states()) if state == HealthBoard.NOT_SERVING]
        return (self._NOT_SERVING if down else self._SERVING), down

    async def _refresh(self, server: "Server") -> None:
        answer, down = self.verdict()
        if answer == self._answer:
            return
        self._answer = answer
        for service in server.health_services:
            await server.health.set(service, answer)  # ignored once this worker drains: it says NOT_SERVING
        if answer == self._SERVING:
            log.info("worker %d: every listening worker is SERVING: health SERVING", self.index,
                     extra=fields(event="health.host_serving", worker=self.index))
        else:
            log.info("worker %d: worker %s NOT_SERVING: health NOT_SERVING", self.index, " and ".join(map(str, down)),
                     extra=fields(event="health.host_not_serving", worker=self.index, not_serving=down))

    async def _follow(self, server: "Server") -> None:
        try:
            while True:
                await asyncio.sleep(_HEALTH_REFRESH)
                self.board.beat(self.index)
                if self._listening:
                    await self._refresh(server)
        except asyncio.CancelledError:
            # asyncio.run cancels this task once serve() has returned: the loop ends, and the beats with it,
            # while the process still exits (executor joins, grpc's and the interpreter's shutdown: 0.8 s idle,
            # more on a busy machine). The supervisor must not take that for a hung loop.
            self.board[self.index] = HealthBoard.EXITING
            raise
