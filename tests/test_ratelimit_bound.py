"""Rate limits are exact or refused: the largest limit accepted counts down one by one in Redis and in
process, and a larger one is refused at create and update, naming the bound."""

import grpc
import pytest
import redis
from google.protobuf.duration_pb2 import Duration
from google.protobuf.field_mask_pb2 import FieldMask

from apikeyd.authorizer.redis_ratelimits import GCRA_SCRIPT
from apikeyd.domain import ratelimit
from apikeyd.domain.model import MAX_LIMIT_TIMES_PERIOD, RateLimit
from apikeyd.v1 import api_keys_pb2 as pb
from tests.conftest import authorize, create_key, rpc_error
from tests.test_ratelimits_redis import SHARED_REDIS, redis_prefix  # noqa: F401  (a fixture)

R = pb.AuthorizeResponse
PERIODS = (1, 60, 3600, 86400)


def _limit(limit: int, period: int) -> list[pb.RateLimit]:
    return [pb.RateLimit(limit=limit, period=Duration(seconds=period))]


@pytest.mark.parametrize(("limit", "period"), [(2**63 - 1, 86400), (10**15, 86400), (104_167, 86400), (9 * 10**9 + 1, 1)])
def test_a_limit_past_the_bound_is_refused_at_create_and_update(server, account, limit, period) -> None:
    error = rpc_error(lambda: create_key(server.stub, account, rate_limits=_limit(limit, period)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "rate_limits" in error.details() and f"at most {MAX_LIMIT_TIMES_PERIOD // period} per {period} s" in error.details()
    created = create_key(server.stub, account)
    update = pb.UpdateApiKeyRequest(
        api_key=pb.ApiKey(name=created.api_key.name, rate_limits=_limit(limit, period)),
        update_mask=FieldMask(paths=["rate_limits"]),
    )
    assert rpc_error(lambda: server.stub.UpdateApiKey(update)).code() == grpc.StatusCode.INVALID_ARGUMENT


def _first_answers_are_exact(server, account: str) -> None:
    """A fresh limit's first answer is the whole budget less one, whatever time passes between calls."""
    for period in PERIODS:
        largest = MAX_LIMIT_TIMES_PERIOD // period
        created = create_key(server.stub, account, rate_limits=_limit(largest, period))
        answer = authorize(server.stub, created.secret, "messages:send")
        assert (answer.code, answer.limit, answer.remaining) == (R.OK, largest, largest - 1), f"{largest} per {period} s"


def test_the_largest_limits_answer_exactly_in_redis(make_server, account, redis_prefix) -> None:  # noqa: F811
    _first_answers_are_exact(make_server(rate_limit_url=SHARED_REDIS, rate_limit_prefix=redis_prefix), account)


def test_the_largest_limits_answer_exactly_in_process(server, account) -> None:
    _first_answers_are_exact(server, account)


def _script_at_given_time() -> str:
    clock_line = "local now = tonumber(t[1]) * 1000000 + tonumber(t[2])"
    assert clock_line in GCRA_SCRIPT
    return GCRA_SCRIPT.replace(clock_line, "local now = tonumber(ARGV[#ARGV])")


@pytest.mark.parametrize("period", PERIODS)
def test_at_the_bound_the_script_counts_as_the_in_process_gcra_and_past_it_would_not(redis_prefix, period) -> None:  # noqa: F811
    """Hits at one instant, so nothing refills: each takes exactly one from `remaining` at the bound, in the
    script as in domain/ratelimit.check. Far past the bound the script's doubles lose count, which is why
    such limits are refused."""
    client = redis.Redis.from_url(SHARED_REDIS)
    script = _script_at_given_time()
    now_us = 1_763_000_000_000_000
    try:
        for limit, exact in ((MAX_LIMIT_TIMES_PERIOD // period, True), (10**15 // period * 1000, False)):
            name = f"{redis_prefix}:rl:{{bound}}:{limit}:{period}"
            rates, tats, answers, expected = (RateLimit(limit, period),), [0], [], []
            for _ in range(4):
                outcome, tats = ratelimit.check(rates, tats, now_us * 1000)
                expected.append((outcome.allowed, outcome.limit, outcome.remaining))
                allowed, got_limit, remaining, _, _ = client.eval(script, 1, name, limit, period, now_us)
                answers.append((bool(allowed), got_limit, remaining))
            assert (answers == expected) is exact, (limit, period, answers, expected)
    finally:
        client.close()
