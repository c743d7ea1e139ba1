"""A flood of wrong secrets does not starve anyone (issue 9, section 3), over real channels on both backends.

A well-formed string (valid checksum) with a made-up secret for a real lookup id used to cost one argon2
verification each, queued in the pool's FIFO ahead of every other key's first check. The failure budget
(authorizer/budget.py) caps what one lookup id may cost; the fair queue (authorizer/fairqueue.py) gives
other keys their turn. Timing is left to `make bench` (bench/flood.py); these tests assert structure: counts
of argon2 verifications and database reads, and the order in which the pool runs verifications.
"""

import logging
import threading
import tracemalloc
from typing import Any

import grpc
import pytest

from apikeyd.authorizer.budget import ENTRY_BYTES, FailureBudget
from apikeyd.domain import keys
from apikeyd.metrics import FAILURE_BUDGET_REFUSALS
from apikeyd.v1 import api_keys_pb2 as pb
from tests.conftest import RunningServer, authorize, create_key, held_hasher
from tests.test_database_outage import _wait_for
from tests.test_observability import scrape, value

OK, NOT_FOUND = pb.AuthorizeResponse.OK, pb.AuthorizeResponse.NOT_FOUND


def _guess(key: str) -> str:
    """A well-formed string for the same lookup id with a made-up secret, as an attacker would send."""
    parsed = keys.parse(key)
    assert parsed is not None
    return keys.generate(parsed.prefix, parsed.lookup_id)[0]


def _unknown(prefix: str = "AK_") -> str:
    return keys.generate(prefix, keys.new_lookup_id())[0]


def _authorize_async(server: RunningServer, key: str) -> Any:
    return server.stub.Authorize.future(pb.AuthorizeRequest(key=key, required_scopes=["messages:send"]), timeout=60)


def test_a_flood_of_wrong_secrets_costs_at_most_the_budget_and_the_verified_secret_keeps_working(
    make_server, account, caplog
):
    server = make_server(failure_budget=3, failure_window=600.0)
    created = create_key(server.stub, account)
    assert authorize(server.stub, created.secret, "messages:send").code == OK  # verified before the flood
    other = create_key(server.stub, account, display_name="also attacked")
    before = server.app.hasher.verifications
    with caplog.at_level(logging.WARNING, logger="apikeyd.authorizer.budget"):
        # All at once, so that guesses still in flight must count against the budget too.
        flood = [_authorize_async(server, _guess(created.secret)) for _ in range(40)]
        assert all(call.result().code == NOT_FOUND for call in flood)
        assert server.app.hasher.verifications - before <= 3
        # The correct secret, verified before the flood, keeps answering, without another verification.
        assert authorize(server.stub, created.secret, "messages:send").code == OK
        assert server.app.hasher.verifications - before <= 3
        for _ in range(5):  # a second key locked within the same warning interval: no second line
            assert authorize(server.stub, _guess(other.secret)).code == NOT_FOUND
    _, samples = scrape(server)
    assert value(samples, FAILURE_BUDGET_REFUSALS) >= 40 - 3 + 5 - 3
    [line] = [record.getMessage() for record in caplog.records if record.name == "apikeyd.authorizer.budget"]
    parsed = keys.parse(created.secret)
    assert parsed is not None and created.api_key.name in line and parsed.lookup_id not in line


def test_a_correct_secret_first_presented_during_the_lockout_is_refused_until_the_window_passes(
    make_server, account
):
    """The chosen behaviour: this process cannot tell a first correct secret from a guess without the very
    verification the budget withholds, so it gets NOT_FOUND like the guesses, and works once the window has
    passed (a made-up clock stands for the window's 60 s)."""
    server = make_server(failure_budget=2, failure_window=60.0)
    budget = server.app.failure_budget
    now = [1000.0]
    server.call_soon(lambda: setattr(budget, "_clock", lambda: now[0]))
    created = create_key(server.stub, account)
    for _ in range(2):
        assert authorize(server.stub, _guess(created.secret)).code == NOT_FOUND
    before = server.app.hasher.verifications
    assert authorize(server.stub, created.secret).code == NOT_FOUND
    assert server.app.hasher.verifications == before  # refused without argon2
    now[0] += 59.0
    assert authorize(server.stub, created.secret).code == NOT_FOUND
    now[0] += 1.0
    assert authorize(server.stub, created.secret).code == OK


@pytest.mark.parametrize("threads", [1, 2])
def test_another_keys_first_check_is_verified_before_the_attacked_keys_queued_guesses(make_server, account, threads):
    """With the pool held by the attacked key's first guess, three more guesses for it and then another key's
    first check arrive. The pool's own FIFO would run all the guesses first (with two threads, the second
    guess takes the free one); in turn by lookup id, the other key is the second verification to run."""
    server = make_server(max_verifications=threads)
    attacked = create_key(server.stub, account, display_name="attacked")
    other = create_key(server.stub, account, display_name="other")
    other_secret = keys.parse(other.secret).secret  # type: ignore[union-attr]
    order: list[str] = []
    lock = threading.Lock()
    with held_hasher(server, "verify") as (reached, release):
        held = server.app.hasher.verify

        def recorded(secret_hash: str, secret: str) -> bool:
            with lock:
                order.append("other" if secret == other_secret else "attacked")
            return bool(held(secret_hash, secret))

        server.app.hasher.verify = recorded  # type: ignore[method-assign]
        queue = server.app.verify_queue
        guesses = [_authorize_async(server, _guess(attacked.secret)) for _ in range(4)]
        # Each call is either held in argon2 (and recorded) or waiting its turn, before the next one comes.
        _wait_for(lambda: len(order) == 1 and queue.queued() == 3, 20, "one guess held, three waiting their turn")
        first_check = _authorize_async(server, other.secret)
        _wait_for(lambda: len(order) + queue.queued() == 5, 20, "the other key held or waiting its turn")
        assert reached.is_set()
        release.set()
        assert first_check.result().code == OK
        assert all(guess.result().code == NOT_FOUND for guess in guesses)
    assert order[:2] == ["attacked", "other"], order


def test_a_full_verification_queue_answers_unavailable_at_once_and_the_waiting_keys_still_verify(
    make_server, account
):
    server = make_server(max_verifications=1, verification_queue=2)
    running, *waiting, refused = (create_key(server.stub, account, display_name=f"k{n}") for n in range(4))
    with held_hasher(server, "verify") as (reached, release):
        first = _authorize_async(server, running.secret)
        assert reached.wait(20)
        queued = [_authorize_async(server, key.secret) for key in waiting]
        _wait_for(lambda: server.app.verify_queue.queued() == 2, 20, "two checks queued")
        error = _authorize_async(server, refused.secret).exception(timeout=20)
        assert isinstance(error, grpc.RpcError) and error.code() == grpc.StatusCode.UNAVAILABLE
        assert "APIKEYD_VERIFICATION_QUEUE" in error.details() and "retry" in error.details()
        release.set()
        assert [call.result().code for call in (first, *queued)] == [OK, OK, OK]  # waited: never NOT_FOUND
    assert authorize(server.stub, refused.secret).code == OK


def test_distinct_secrets_for_one_unknown_lookup_id_cost_one_database_read(server):
    repository = server.app.repository
    real = repository.find_by_lookup_id
    reads: list[str] = []

    def counted(lookup_id: str) -> Any:
        reads.append(lookup_id)
        return real(lookup_id)

    repository.find_by_lookup_id = counted
    unknown = _unknown()
    for _ in range(20):
        assert authorize(server.stub, _guess(unknown)).code == NOT_FOUND
    # One, unless the change feed's lease lapsed on a busy machine (the negative cache is then not trusted).
    assert len(reads) <= 3, len(reads)


def test_the_budget_table_stays_bounded_in_entries_and_bytes(make_server, account):
    # Over the wire: unknown lookup ids and successes leave no entry; only real keys' wrong secrets do.
    server = make_server(failure_budget=2)
    attacked = [create_key(server.stub, account, display_name=f"a{n}") for n in range(3)]
    for n in range(60):
        assert authorize(server.stub, _unknown()).code == NOT_FOUND
        assert authorize(server.stub, _guess(attacked[n % 3].secret)).code == NOT_FOUND
    assert authorize(server.stub, create_key(server.stub, account).secret).code == OK
    assert server.call_soon(lambda: len(server.app.failure_budget)) == 3
    # The bound itself: a flood of lookup ids that all fail, far more than the table holds.
    budget = FailureBudget(budget=5, window=60.0, max_entries=2_000)
    tracemalloc.start()
    try:
        baseline = tracemalloc.take_snapshot()
        for _ in range(20_000):
            lookup_id = keys.new_lookup_id()
            assert budget.admit(lookup_id)
            budget.settle(lookup_id, None)  # a success leaves nothing behind
            assert budget.admit(lookup_id)
            budget.settle(lookup_id, "accounts/a/apiKeys/k")
        used = sum(stat.size_diff for stat in tracemalloc.take_snapshot().compare_to(baseline, "filename"))
    finally:
        tracemalloc.stop()
    assert len(budget) == 2_000
    assert used <= 2_000 * ENTRY_BYTES, used / 2_000
