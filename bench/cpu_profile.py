"""What bench/grpc_cpu.py's samplers saw, split into parts: py-spy's stacks of the event loop thread into
apikeyd's code and the rest, and perf's on-CPU samples of every thread by shared object. Only commands and
parsing; grpc_cpu.py runs them while its client drives the server."""

import collections
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

PROFILE_RATE = 250  # py-spy samples a second
PERF_RATE = 999  # perf samples a second

# A sample of the event loop thread goes to its innermost apikeyd frame's part (with whatever that
# called; domain/ is pure code that both the servicer and the authorizer call, so its frames count for
# their caller), else to its innermost frame's. The cygrpc extension is stripped, so its Cython layer and
# grpc's C core show as one. The loop runner's own apikeyd frames (cli, server.py) decide nothing.
_OURS = (
    # Not per call: these run a few times a second whatever the load (the change feed polls 4 times a
    # second on SQLite), so their us/call falls as the call rate rises.
    ("apikeyd: background tasks (change feed, last-used flusher, database watch)", ("apikeyd/authorizer/feed.py", "apikeyd/server.py")),
    ("apikeyd: WireErrors, the handler wrapper", ("apikeyd/service/wire.py",)),
    ("apikeyd: grpc_errors, metrics, log context", ("apikeyd/service/errors.py", "apikeyd/metrics.py", "apikeyd/logs.py")),
    ("apikeyd: health servicer", ("apikeyd/service/health.py", "grpc_health/")),
    ("apikeyd: authorizer", ("apikeyd/authorizer/",)),
    ("apikeyd: servicer (api_keys, convert, request_limits)", ("apikeyd/service/",)),
)
_SYSCALLS = ("sendmsg (", "recvmsg (", "write (", "read (", "send (", "recv (", "getpid (")
_GRPCS = (
    ("grpc: cygrpc (its Cython layer and C core)", ("grpc/_cython/cygrpc",)),
    ("grpc: grpc.aio Python", ("grpc/",)),
    ("protobuf (upb)", ("google/protobuf", "_message.abi3")),
    ("the event loop (uvloop, and asyncio's Python: tasks, futures, wait)", ("(loop.c:", "uvloop/", "asyncio/", "selectors.py", "_asynciomodule")),
)
_WAITS = ("epoll_wait (", "epoll_pwait (", "pthread_cond_wait (", "pthread_cond_timedwait (", "sem_wait (", "poll (")
IDLE = "idle (epoll_wait, waits for the GIL)"
SYSCALLS = "in a syscall"


def _matching(frames: list[str], categories: tuple[tuple[str, tuple[str, ...]], ...]) -> str | None:
    for frame in reversed(frames):
        for category, marks in categories:
            if any(mark in frame for mark in marks):
                return category
    return None


def _sample_category(frames: list[str]) -> str:
    if any(frame.startswith(_WAITS) for frame in frames[-3:]):
        return IDLE
    if (ours := _matching(frames, _OURS)) is not None:
        return ours
    if frames[-1].startswith(_SYSCALLS):
        return SYSCALLS
    return _matching(frames, _GRPCS) or "other (interpreter)"


def split_profile(raw: Path, pid: int) -> tuple[dict[str, int], collections.Counter[str]]:
    """Samples of thread `pid` (the main one) by part, and the innermost frames of "other", from py-spy's
    raw format with --threads: one `thread (tid): name;frame;...;frame count` line per stack, outermost
    first."""
    by_category: collections.Counter[str] = collections.Counter()
    others: collections.Counter[str] = collections.Counter()
    thread = f"thread ({pid}):"
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if not frames[0].startswith(thread):
            continue
        category = _sample_category(frames)
        by_category[category] += int(count)
        if category.startswith("other"):
            others[frames[-1]] += int(count)
    return dict(by_category.most_common()), others


def py_spy_command(pid: int, seconds: float, out: Path) -> list[str]:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        raise RuntimeError("--profile needs py-spy: pip install py-spy")
    return [
        found, "record", "--native", "--threads", "--format", "raw", "--rate", str(PROFILE_RATE),
        "--duration", str(round(seconds)), "--pid", str(pid), "--output", str(out),
    ]


def perf_command(pid: int, seconds: float, out: Path) -> list[str]:
    """`perf record -e cpu-clock`: CPU time, where py-spy samples wall-clock time and so counts a thread
    waiting for a core as busy wherever it was."""
    return ["perf", "record", "-e", "cpu-clock", "-F", str(PERF_RATE), "-p", str(pid), "-o", str(out), "--", "sleep", str(seconds)]


# Shared objects by what runs in them; the interpreter runs all Python code, apikeyd's and grpc.aio's alike.
_LIBRARIES = (
    ("cygrpc", "grpc's cygrpc (Cython layer and C core)"),
    ("libpython", "the interpreter (all Python code)"),
    ("[kernel", "kernel (sockets, eventfd, scheduling)"),
    ("libc", "libc (malloc, memcpy, locks)"),
    ("loop.cpython", "uvloop"),
    ("_message", "protobuf (upb)"),
)


def perf_split(out: Path) -> dict[str, float]:
    """Shares of the samples in `out` (all threads) by the parts of _LIBRARIES."""
    report = subprocess.run(
        ["perf", "report", "-i", str(out), "--sort", "dso", "--stdio", "-g", "none", "-n"],
        check=True, capture_output=True, text=True, timeout=120.0,
    ).stdout
    samples: dict[str, float] = collections.defaultdict(float)
    for line in report.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[0].endswith("%") and fields[1].isdigit():
            part = next((name for mark, name in _LIBRARIES if fields[2].startswith(mark)), "other")
            samples[part] += int(fields[1])
    total = sum(samples.values())
    return {part: count / total for part, count in samples.items()}


def report_profile(raw: Path, pid: int, user_us: float, kernel_us: float) -> Iterator[tuple[str, str]]:
    """The event loop's kernel time from /proc; its user time split by py-spy's samples outside syscalls,
    which are wall-clock samples and overcount syscalls on a busy machine (see the module's note)."""
    by_category, others = split_profile(raw, pid)
    idle = by_category.pop(IDLE, 0)
    in_syscalls = by_category.pop(SYSCALLS, 0)
    user = sum(by_category.values())
    yield "profile", f"{user + in_syscalls} busy samples of the event loop ({in_syscalls} in syscalls, {idle} idle), {raw}"
    yield "", f"event loop thread, us/call: kernel time from /proc, user time ({user_us:.0f}) split by py-spy"
    yield f"{kernel_us:8.0f} us", "kernel (/proc stime): grpc's sendmsg and eventfd writes, scheduling"
    for category, count in by_category.items():
        yield f"{count / user * user_us:8.0f} us {count / user:6.1%}", category
    if others:
        yield "", "innermost frames of 'other': " + "; ".join(f"{f} {n}" for f, n in others.most_common(6))


def report_perf(ours: dict[str, float], floor: dict[str, float], ours_us: float, floor_us: float) -> Iterator[tuple[str, str]]:
    yield "perf (CPU time)", "us/call by shared object: Authorize on apikeyd, on the floor, and the difference"
    for _, part in (*_LIBRARIES, ("", "other")):
        mine, theirs = ours.get(part, 0.0) * ours_us, floor.get(part, 0.0) * floor_us
        yield f"{mine:6.0f} {theirs:6.0f} {mine - theirs:+5.0f}", part
