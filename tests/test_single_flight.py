"""The cache and single-flight under every interleaving hypothesis can find (issue 9, section 1).

One key in a real SQLite database, one Authorizer, and a verification pool whose work runs only when the
test says so: a check arrives, a verification reads the database, a change is made here or by another
process (whose change feed then applies it), in any order. The property: every check is answered as the key
was at some moment between its arrival and its answer, never as it was before a change that had returned
before it arrived. It fails without the generation check in `Authorizer._verify`.
"""

import asyncio
import tempfile
import uuid
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from datetime import timedelta
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from apikeyd.authorizer.authorizer import Authorizer
from apikeyd.authorizer.cache import CachedKey, VerifiedKeyCache
from apikeyd.authorizer.hashing import Argon2Parameters, SecretHasher
from apikeyd.domain.decision import Decision
from apikeyd.domain.model import KeyState
from apikeyd.lifecycle import KeyManager, NewKey
from apikeyd.store import migrate
from apikeyd.store.engine import create_db_engine
from apikeyd.store.repository import Repository

FAST = Argon2Parameters(time_cost=1, memory_cost_kib=8, parallelism=1)


_REPOSITORY: list[Repository] = []


def _repository() -> Repository:
    """One migrated SQLite database for every example (each uses an account of its own)."""
    if not _REPOSITORY:
        folder = tempfile.mkdtemp(prefix="apikeyd-flight-")
        url = f"sqlite:///{folder}/flight.db"
        migrate.upgrade(create_db_engine(url))
        _REPOSITORY.append(Repository.from_url(url))
    return _REPOSITORY[0]


class HeldPool(Executor):
    """Runs nothing until the test says so, in two steps: `read(i)` does the work (the database read and
    argon2), `finish(i)` hands its result back to the loop, so a change can fall between the two."""

    def __init__(self) -> None:
        self.waiting: list[tuple[Any, tuple[Any, ...], Future[Any]]] = []
        self.read_done: list[tuple[Future[Any], Any, BaseException | None]] = []

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        self.waiting.append((fn, args, future))
        return future

    def read(self, index: int) -> None:
        fn, args, future = self.waiting.pop(index)
        try:
            self.read_done.append((future, fn(*args), None))
        except BaseException as error:
            self.read_done.append((future, None, error))

    def finish(self, index: int) -> None:
        future, result, error = self.read_done.pop(index)
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


def _answer(result: CachedKey | Decision) -> str:
    return "OK" if isinstance(result, CachedKey) else result.code.name


class Interleavings(RuleBasedStateMachine):
    @initialize()
    def start(self) -> None:
        self.account = f"acct-{uuid.uuid4().hex[:10]}"
        self.loop = asyncio.new_event_loop()
        self.repository = _repository()
        self.hasher = SecretHasher(FAST)
        self.pool = HeldPool()
        self.store = ThreadPoolExecutor(1)
        self.cache = VerifiedKeyCache()
        self.authorizer = Authorizer(self.repository, self.hasher, self.cache, self.pool)
        self.manager = KeyManager(self.repository, self.hasher, self.authorizer, self.store)
        # Another process on the same database: its changes reach this one only through `apply_remote_changes`.
        self.elsewhere = KeyManager(
            self.repository,
            self.hasher,
            Authorizer(self.repository, self.hasher, VerifiedKeyCache(), self.store),
            self.store,
        )
        issued = self._run(self.manager.create(self.manager.operator("t"), self.account, NewKey("k", ("a:b",))))
        self.key = issued.key
        self.secrets = [issued.secret]
        # What each secret gets at each version of the key, oldest first.
        self.versions: list[dict[str, str]] = [{issued.secret: "OK"}]
        self.checks: list[tuple[asyncio.Task[Any], int, str]] = []  # task, version at arrival, secret
        self.state = KeyState.ACTIVE
        self.previous: str | None = None

    def teardown(self) -> None:
        if hasattr(self, "loop"):
            while self.pool.waiting or self.pool.read_done:  # let every verification finish: no task left pending
                if self.pool.waiting:
                    self.pool.read(0)
                self.pool.finish(0)
                self._settle()
            self.every_answer_is_the_key_as_it_was_since_the_check_arrived()
            assert not self.checks, "a check is still waiting with nothing left to run"
            self.loop.close()
            self.store.shutdown()

    def _run(self, coroutine: Any) -> Any:
        return self.loop.run_until_complete(coroutine)

    def _settle(self) -> None:
        for _ in range(5):
            self._run(asyncio.sleep(0))

    def _answers(self) -> dict[str, str]:
        """What each secret gets now. The secret rotated out last still verifies (with no grace, as EXPIRED);
        a revoked or disabled key says so to both; any other secret is unknown."""
        usable = {KeyState.ACTIVE: "OK", KeyState.DISABLED: "DISABLED", KeyState.REVOKED: "REVOKED"}[self.state]
        answers = dict.fromkeys(self.secrets, "NOT_FOUND")
        if self.previous is not None:
            answers[self.previous] = "EXPIRED" if self.state is KeyState.ACTIVE else usable
        answers[self.secrets[-1]] = usable
        return answers

    def _changed(self, manager: KeyManager, change: Any, remote: bool) -> None:
        result = self._run(change(manager, manager.operator("t")))
        if remote:  # what the change feed does on reading the other process's event
            self.cache.apply_remote_changes([self.key.key_id], created=False)
        self.key = getattr(result, "key", result)
        if hasattr(result, "secret"):
            self.previous = self.secrets[-1]
            self.secrets.append(result.secret)
        self.versions.append(self._answers())
        self._settle()

    # --- what can happen, in any order ---------------------------------------------------------------

    @rule(which=st.integers(0, 5))
    def a_check_arrives(self, which: int) -> None:
        secret = self.secrets[which % len(self.secrets)]
        task = self.loop.create_task(self.authorizer.identify(secret))
        self.checks.append((task, len(self.versions) - 1, secret))
        self._settle()

    @precondition(lambda self: self.pool.waiting)
    @rule(which=st.integers(0, 5))
    def a_verification_reads_the_database(self, which: int) -> None:
        self.pool.read(which % len(self.pool.waiting))
        self._settle()

    @precondition(lambda self: self.pool.read_done)
    @rule(which=st.integers(0, 5))
    def a_verification_finishes(self, which: int) -> None:
        self.pool.finish(which % len(self.pool.read_done))
        self._settle()

    @precondition(lambda self: self.state is KeyState.ACTIVE)
    @rule(remote=st.booleans())
    def disable(self, remote: bool) -> None:
        self.state = KeyState.DISABLED
        manager = self.elsewhere if remote else self.manager
        self._changed(manager, lambda m, c: m.update(c, self.account, self.key.key_id, {"state": KeyState.DISABLED}, ""), remote)

    @precondition(lambda self: self.state is KeyState.DISABLED)
    @rule(remote=st.booleans())
    def enable(self, remote: bool) -> None:
        self.state = KeyState.ACTIVE
        manager = self.elsewhere if remote else self.manager
        self._changed(manager, lambda m, c: m.update(c, self.account, self.key.key_id, {"state": KeyState.ACTIVE}, ""), remote)

    @precondition(lambda self: self.state is not KeyState.REVOKED)
    @rule(remote=st.booleans())
    def rotate_with_no_grace(self, remote: bool) -> None:
        manager = self.elsewhere if remote else self.manager
        self._changed(manager, lambda m, c: m.rotate(c, self.account, self.key.key_id, timedelta(0), ""), remote)

    @precondition(lambda self: self.state is not KeyState.REVOKED)
    @rule(remote=st.booleans())
    def revoke(self, remote: bool) -> None:
        self.state = KeyState.REVOKED
        manager = self.elsewhere if remote else self.manager
        self._changed(manager, lambda m, c: m.revoke(c, self.account, self.key.key_id, "", ""), remote)

    # --- the property --------------------------------------------------------------------------------

    @invariant()
    def every_answer_is_the_key_as_it_was_since_the_check_arrived(self) -> None:
        if not hasattr(self, "checks"):
            return
        still: list[tuple[asyncio.Task[Any], int, str]] = []
        for task, arrived, secret in self.checks:
            if not task.done():
                still.append((task, arrived, secret))
                continue
            answer = _answer(task.result())
            possible = {version.get(secret, "NOT_FOUND") for version in self.versions[arrived:]}
            assert answer in possible, (
                f"a check that arrived at version {arrived} got {answer}; since then it could only be {possible}"
            )
        self.checks = still


Interleavings.TestCase.settings = settings(
    max_examples=80, stateful_step_count=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_single_flight_and_cache_under_interleavings = Interleavings.TestCase
