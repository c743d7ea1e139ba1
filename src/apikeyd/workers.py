"""`apikeyd serve --workers N` (N > 1): N server processes on the one port, under a supervisor.

The supervisor (the process `apikeyd serve` started as) serves nothing itself. It

1. checks that the gRPC port is free by binding it without SO_REUSEPORT and letting it go, so that a port
   held by another program is still a clear error (exit 2), as it is with one process; the workers then
   bind it with SO_REUSEPORT and the kernel spreads new connections over them;
2. checks the TLS files and key prefixes, and migrates an SQLite database once;
3. starts the N workers, each a whole `serve()` with its own App: its own cache, database pool, argon2
   threads, rate-limit counters and health;
4. restarts a worker that dies, after a short backoff (0.5 s, doubling up to 30 s while it keeps dying
   within 30 s of starting), logging why it died;
5. kills (SIGKILL) a worker that serves but whose event loop has stopped beating its heartbeat for
   worker_hang_timeout seconds (below), logging `worker.hung`; step 4 then restarts it;
6. on SIGTERM or SIGINT sends SIGTERM to every worker, waits while each drains as a single server does
   (drain delay, then shutdown grace), and exits 0.

Metrics: worker i (from 0) serves them on the metrics port + i (`127.0.0.1:9464` gives 9464, 9465, ...),
each with its own process's counters, so Prometheus scrapes N targets and sums them. With port 0 each worker
takes an ephemeral port, which its "worker serving" log line names. (The other choice, metrics from worker 0
alone, needs one target but shows 1/N of the traffic and goes blank while worker 0 restarts.)

Health answers for the host, whichever worker the kernel hands a health check to: SERVING if and only if
every worker that is listening is SERVING. A dead worker, or one still starting, is not in the port's
SO_REUSEPORT group, takes no traffic and does not count; a worker that listens but is NOT_SERVING (its
database pings fail, or it is draining) makes the whole NOT_SERVING, since about 1/N of the new connections
reach it. The supervisor shares a small file mapping (a memfd, passed as APIKEYD_WORKER_HEALTH_FD) with one
byte per worker: 0 not listening, 1 SERVING, 2 NOT_SERVING. A worker writes its own byte whenever its own
health changes (Server.report_health: set at start, by the database watcher, and by a drain, which writes 2
and, as the listener closes, 0); the supervisor zeroes the byte of a worker it reaps, so a worker killed
while NOT_SERVING does not hold the rest down. Every worker reads all the bytes every 0.1 s (and at once on
its own change) and answers "" and apikeyd.v1.ApiKeyService with the result. A single byte written is seen
whole, so no lock is needed.

What the bytes cannot show is a worker that is alive but stuck (SIGSTOP, an event loop blocked by a bug): it
keeps its SERVING byte and its place in the port's group, and the connections the kernel hands it hang. So
the same mapping holds, after the bytes (from the next multiple of 8), one heartbeat per worker: an 8-byte
time.monotonic() that the worker's HostHealth follower task writes every 0.1 s, from its first health
report until its event loop ends, through a drain too (the follower stops reading the board when the listener
closes, but beats on). When the loop ends (serve() has returned) the follower's last act is to write its byte
EXITING: the process has no loop left to beat and still takes a while to exit (0.8 s idle, well over a
second on a busy machine), so the supervisor gives an EXITING worker _KILL_MARGIN, as it gives a worker it
stops, instead of the hang timeout. CLOCK_MONOTONIC is one clock for the whole host, so the supervisor compares the beat
with its own time. In its poll loop (every 0.2 s) it kills with SIGKILL a worker that has said it serves and
whose last beat (or, if later, the moment it said so: the beat may be its predecessor's) is older than
worker_hang_timeout (default 10 s, 0 disables), logs `worker.hung` with the worker, pid and staleness, and
reaps and restarts it as any dead worker, zeroing its byte. A worker still starting is not watched (its
start-up may block the loop: database pool, metrics port), nor one the supervisor has sent SIGTERM to (it
no longer polls then; _stop_all has its own deadline). A beat is an aligned 8-byte double, which struct
copies with an 8-byte memcpy, in practice one load or store, and x86-64 and arm64 do not tear an aligned
8-byte access; no lock, then. (A torn read would be a wrong time, not a crash: the supervisor reads a stale
looking beat twice and takes the later.)

A worker is a new interpreter running `python -m apikeyd.workers`, given its settings as JSON in
APIKEYD_WORKER_SETTINGS (the marker that makes it a worker). Not fork: grpc's threads do not survive a fork,
and a worker should build its App from nothing. Not multiprocessing's "spawn", which would also work, but
adds machinery that only gets in the way here (re-importing the console script as __mp_main__, pickling
over a pipe, a resource tracker, atexit joins that fight our own signal handling); a plain subprocess is an
ordinary process whose pid, exit status and signals are what `ps` and the supervisor see. The settings go as
resolved values, not flags, so that a worker gets exactly the supervisor's settings (an empty
`--metrics-listen ""` stays empty) and nothing (the database URL) shows in `ps`.
"""

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from typing import Any

from apikeyd import logs, tls
from apikeyd.config import Settings
from apikeyd.host_health import HealthBoard, HostHealth
from apikeyd.logs import fields
from apikeyd.metrics import split_listen
from apikeyd.ports import port_problem

log = logging.getLogger("apikeyd.workers")  # not __name__: a worker runs this module as __main__

SETTINGS_ENV = "APIKEYD_WORKER_SETTINGS"  # the worker's settings, as JSON; its presence marks a worker
INDEX_ENV = "APIKEYD_WORKER_INDEX"
READY_FD_ENV = "APIKEYD_WORKER_READY_FD"  # a pipe the worker writes "index pid\n" to once it serves
PARENT_ENV = "APIKEYD_WORKER_PARENT"  # the supervisor's pid: a worker whose parent is gone drains and exits
HEALTH_FD_ENV = "APIKEYD_WORKER_HEALTH_FD"  # the shared health board (see HealthBoard)

_POLL = 0.2  # seconds between the supervisor's looks at its workers
_BACKOFF_FIRST, _BACKOFF_MAX = 0.5, 30.0
_STABLE_AFTER = 30.0  # seconds up after which a worker's death no longer counts as a crash loop
_KILL_MARGIN = 30.0  # seconds past drain_delay + shutdown_grace before a worker that has not exited is killed


# --- the supervisor -------------------------------------------------------------------------------


def metrics_listen_of(settings: Settings, index: int) -> str:
    """Worker `index`'s metrics address: the port + index, or an ephemeral port for port 0, or none."""
    if not settings.metrics_listen:
        return ""
    port = split_listen(settings.metrics_listen)[1]
    if port == 0:
        return settings.metrics_listen
    return settings.metrics_listen.rpartition(":")[0] + f":{port + index}"


def _check_shared_port(listen: str, where: str, hint: str = "") -> None:
    """A port every worker binds with SO_REUSEPORT: fixed, and free before any of them starts."""
    from apikeyd.server import StartupError

    try:
        _, port = split_listen(listen)
    except ValueError as error:
        raise StartupError(f"{where}: {error}") from None
    if port == 0:
        raise StartupError(f"{where}: --workers needs a fixed port, not 0")
    if problem := port_problem(listen):
        raise StartupError(f"{where}: {problem}{hint}")


def _check_ext_authz_listen(settings: Settings) -> None:
    from apikeyd.server import StartupError
    from apikeyd.service.ext_authz_http import UNIX_PREFIX

    listen = settings.ext_authz_listen
    if not listen:
        return
    where = f"cannot answer ext_authz on {listen}"
    if listen.startswith(UNIX_PREFIX):
        raise StartupError(f"{where}: workers cannot share a unix socket; use host:port with --workers N")
    _check_shared_port(listen, where)


def _check_before_start(settings: Settings) -> None:
    """What would stop every worker alike is found once, here, with a clear message (exit 2)."""
    from apikeyd.app import StartupError, check_key_prefixes
    from apikeyd.server import prepare_database
    from apikeyd.store.engine import create_db_engine

    _check_shared_port(
        settings.listen, f"cannot listen on {settings.listen}", "; --workers shares a port only among its own workers"
    )
    for index in range(settings.workers):
        try:
            listen = metrics_listen_of(settings, index)
        except ValueError as error:
            raise StartupError(f"cannot serve metrics on {settings.metrics_listen}: {error}") from None
        if listen and split_listen(listen)[1] != 0 and (problem := port_problem(listen)):
            raise StartupError(f"cannot serve metrics of worker {index} on {listen}: {problem}")
    _check_ext_authz_listen(settings)
    try:
        tls.server_credentials(settings)
    except tls.TlsSettingsError as error:
        raise StartupError(str(error)) from None
    check_key_prefixes(settings)
    # No App here (its pools, rate-limit store, ...): the supervisor only migrates an SQLite database, once,
    # before any worker runs, as `serve` does (other databases are migrated with `apikeyd migrate`).
    engine = create_db_engine(settings.database_url)
    try:
        prepare_database(engine)
    finally:
        engine.dispose()


def _warn_about_rate_limits(settings: Settings) -> None:
    if settings.rate_limit_url:
        return
    log.warning(
        "rate limits are enforced per worker process: with %d workers and no shared rate-limit store "
        "(rate_limit_url) a key can get up to %d times its limits",
        settings.workers,
        settings.workers,
        extra=fields(event="workers.rate_limits_per_process", workers=settings.workers),
    )


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


@dataclasses.dataclass
class _Slot:
    index: int
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    ready: bool = False
    ready_at: float = 0.0  # when the supervisor heard that it serves: its heartbeat is watched from then on
    hung: bool = False  # killed for a stale heartbeat, not reaped yet
    crashes: int = 0  # deaths in a row, each within _STABLE_AFTER of its start
    restart_at: float | None = None


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.slots = [_Slot(i) for i in range(settings.workers)]
        self._stopping: int | None = None  # the signal that asked us to stop
        self._ready_read, self._ready_write = os.pipe()
        os.set_blocking(self._ready_read, False)
        self._buffer = b""
        self.health, self._health_fd = HealthBoard.create(settings.workers)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self._stopping is None:
            self._stopping = signum

    def _start(self, slot: _Slot) -> None:
        settings = dataclasses.replace(self.settings, metrics_listen=metrics_listen_of(self.settings, slot.index))
        env = {
            **os.environ,
            SETTINGS_ENV: json.dumps(dataclasses.asdict(settings)),
            INDEX_ENV: str(slot.index),
            READY_FD_ENV: str(self._ready_write),
            PARENT_ENV: str(os.getpid()),
            HEALTH_FD_ENV: str(self._health_fd),
        }
        # A process group of its own: a Ctrl-C in the terminal reaches the supervisor alone, which then sends
        # each worker one SIGTERM. A worker whose supervisor is killed notices and drains (see _watch_parent).
        slot.process = subprocess.Popen(
            [sys.executable, "-m", "apikeyd.workers"], env=env, pass_fds=(self._ready_write, self._health_fd),
            process_group=0,
        )
        slot.started_at = time.monotonic()
        slot.ready = False
        slot.hung = False
        slot.restart_at = None
        log.info(
            "started worker %d (pid %d)", slot.index, slot.process.pid,
            extra=fields(event="worker.started", worker=slot.index, pid=slot.process.pid),
        )

    def _read_ready(self, timeout: float) -> None:
        try:
            readable, _, _ = select.select([self._ready_read], [], [], timeout)
        except InterruptedError:
            return
        if not readable:
            return
        try:
            self._buffer += os.read(self._ready_read, 4096)
        except BlockingIOError:
            return
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            index, pid = (int(part) for part in line.split())
            slot = self.slots[index]
            if slot.process is not None and slot.process.pid == pid and slot.process.poll() is None:
                slot.ready = True
                slot.ready_at = time.monotonic()

    def _reap(self, starting: bool) -> int | None:
        """Notes dead workers and schedules their restart. While starting, a worker that dies before it
        serves stops everything: returns the exit status for `apikeyd serve`."""
        now = time.monotonic()
        for slot in self.slots:
            if slot.process is None or (code := slot.process.poll()) is None:
                continue
            pid = slot.process.pid
            slot.process = None
            self.health[slot.index] = HealthBoard.NOT_LISTENING  # whatever it last said, it no longer listens
            if starting and not slot.ready:
                log.error(
                    "worker %d (pid %d) could not start (%s): stopping", slot.index, pid, _describe_exit(code),
                    extra=fields(event="worker.failed", worker=slot.index, pid=pid, status=code),
                )
                return 2
            slot.crashes = slot.crashes + 1 if now - slot.started_at < _STABLE_AFTER else 1
            delay = min(_BACKOFF_FIRST * 2 ** (slot.crashes - 1), _BACKOFF_MAX)
            slot.restart_at = now + delay
            log.warning(
                "worker %d (pid %d) died (%s); restarting it in %.1f s", slot.index, pid, _describe_exit(code), delay,
                extra=fields(event="worker.died", worker=slot.index, pid=pid, status=code, restart_in=delay),
            )
        return None

    def _kill_hung(self) -> None:
        """SIGKILL for a worker that serves (has said so) but whose event loop has not beaten its heartbeat for
        worker_hang_timeout seconds: stopped, or its loop blocked. _reap then restarts it as any dead worker.
        Not called once the supervisor stops: a worker it has sent SIGTERM to is left to drain."""
        timeout = self.settings.worker_hang_timeout
        if timeout <= 0:
            return
        now = time.monotonic()
        for slot in self.slots:
            if slot.process is None or not slot.ready or slot.hung:
                continue
            # Read twice (see the module docstring on torn reads); a beat of its predecessor is older than ready_at.
            beat = max(self.health.last_beat(slot.index), self.health.last_beat(slot.index))
            stale = now - max(beat, slot.ready_at)
            # A worker whose loop has ended is exiting: its exit has the bound a stopping worker's has instead.
            exiting = self.health.states()[slot.index] == HealthBoard.EXITING
            if stale <= (_KILL_MARGIN if exiting else timeout):
                continue
            pid = slot.process.pid
            log.error(
                "worker %d (pid %d) is hung: %s for %.1f s; killing it", slot.index, pid,
                "exiting, its event loop ended," if exiting else "no heartbeat from its event loop", stale,
                extra=fields(event="worker.hung", worker=slot.index, pid=pid, stale=round(stale, 3)),
            )
            slot.hung = True
            with contextlib.suppress(ProcessLookupError):
                slot.process.kill()

    def run(self) -> int:
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            status = self._run()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            os.close(self._ready_read)
            os.close(self._ready_write)
            os.close(self._health_fd)
            self.health.close()
        return status

    def _run(self) -> int:
        for slot in self.slots:
            self._start(slot)
        starting = True
        while self._stopping is None:
            self._read_ready(_POLL)
            failed = self._reap(starting)
            if failed is not None:
                self._stop_all(signal.SIGTERM)
                return failed
            self._kill_hung()
            if starting and all(slot.ready for slot in self.slots):
                starting = False
                log.info(
                    "all %d workers serving on %s", len(self.slots), self.settings.listen,
                    extra=fields(event="workers.serving", workers=len(self.slots)),
                )
            now = time.monotonic()
            for slot in self.slots:
                if slot.process is None and slot.restart_at is not None and now >= slot.restart_at:
                    self._start(slot)
        return self._stop_all(self._stopping)

    def _stop_all(self, signum: int) -> int:
        running = [slot.process for slot in self.slots if slot.process is not None]
        log.info(
            "%s: stopping %d workers; each drains (NOT_SERVING for %.1f s, then in-flight calls get up to %.0f s)",
            signal.Signals(signum).name, len(running), self.settings.drain_delay, self.settings.shutdown_grace,
            extra=fields(event="workers.stopping", workers=len(running)),
        )
        for process in running:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.drain_delay + self.settings.shutdown_grace + _KILL_MARGIN
        status = 0
        for process in running:
            try:
                code = process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                log.error("worker pid %d did not stop in time: killing it", process.pid,
                          extra=fields(event="worker.killed", pid=process.pid))
                process.kill()
                process.wait()
                status = 1
                continue
            if code not in (0, -signal.SIGTERM):
                log.warning("worker pid %d stopped with %s", process.pid, _describe_exit(code),
                            extra=fields(event="worker.stopped", pid=process.pid, status=code))
        log.info("stopped", extra=fields(event="workers.stopped"))
        return status


def supervise(settings: Settings) -> int:
    """Runs `settings.workers` worker processes until SIGTERM or SIGINT; the exit status for `apikeyd serve`.
    Raises StartupError for what would stop every worker (a taken port, bad TLS files, ...)."""
    _check_before_start(settings)
    log.info(
        "apikeyd supervisor (pid %d) starting %d workers on %s", os.getpid(), settings.workers, settings.listen,
        extra=fields(event="workers.starting", workers=settings.workers, pid=os.getpid()),
    )
    _warn_about_rate_limits(settings)
    return Supervisor(settings).run()


# --- a worker -------------------------------------------------------------------------------------


def _worker_main() -> int:
    import uvloop

    from apikeyd.server import Server, StartupError, serve

    settings = Settings(**json.loads(os.environ[SETTINGS_ENV]))
    index = int(os.environ[INDEX_ENV])
    ready_fd = int(os.environ[READY_FD_ENV])
    parent = int(os.environ[PARENT_ENV])
    health_fd = int(os.environ[HEALTH_FD_ENV])
    host_health = HostHealth(HealthBoard(health_fd, settings.workers), index)
    os.close(health_fd)  # the mapping stays
    logging.basicConfig(
        level=settings.log_level.upper(), handlers=[logs.stream_handler(settings.log_format, sys.stderr)]
    )
    tasks: set[asyncio.Task[None]] = set()

    async def watch_parent(stop: asyncio.Event) -> None:
        while os.getppid() == parent:
            await asyncio.sleep(1.0)
        log.warning("worker %d: the supervisor (pid %d) is gone: draining", index, parent,
                    extra=fields(event="worker.orphaned", worker=index))
        stop.set()

    def started(server: Server, stop: asyncio.Event) -> None:
        metrics_port = server.metrics_endpoint.port if server.metrics_endpoint is not None else None
        log.info(
            "worker %d (pid %d) serving on %s, metrics port %s", index, os.getpid(), settings.listen, metrics_port,
            extra=fields(event="worker.serving", worker=index, pid=os.getpid(), port=server.port,
                         metrics_port=metrics_port),
        )
        os.write(ready_fd, f"{index} {os.getpid()}\n".encode())
        os.close(ready_fd)
        task = asyncio.get_running_loop().create_task(watch_parent(stop))
        tasks.add(task)

    try:
        uvloop.run(serve(settings, prepare=False, started=started, report_health=host_health.report))
    except StartupError as error:
        print(f"apikeyd: worker {index}: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    if SETTINGS_ENV not in os.environ:
        sys.exit("apikeyd.workers is started by `apikeyd serve --workers N`")
    sys.exit(_worker_main())
