"""Rate limits shared through Redis (APIKEYD_RATE_LIMIT_URL): one budget across processes, the same GCRA
as in-process limits, and what Authorize does while Redis is away.

Each test gets a key prefix of its own in the shared Redis at 127.0.0.1:6379 (db 0) and deletes its keys
afterwards, so parallel runs never meet. The tests that need that Redis are skipped without it; the ones
about an unreachable Redis use a port where nothing listens, or a redis-server of their own."""

import logging
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import redis
from google.protobuf.duration_pb2 import Duration
from prometheus_client import generate_latest

from apikeyd.app import App, StartupError
from apikeyd.authorizer.redis_ratelimits import RATE_LIMIT_ERRORS, RedisRateLimiter
from apikeyd.config import Settings
from apikeyd.domain.model import RateLimit
from apikeyd.v1 import api_keys_pb2 as pb
from apikeyd.v1 import api_keys_pb2_grpc as pb_grpc
from tests.conftest import BearerCredentials, authorize, create_key, free_port
from tests.test_server import APIKEYD, _admin_key

R = pb.AuthorizeResponse
SHARED_REDIS = "redis://127.0.0.1:6379/0"


def _redis_answers(url: str = SHARED_REDIS) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except redis.RedisError:
        return False


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A prefix of this test's own in the shared Redis; its keys are deleted afterwards."""
    if not _redis_answers():
        pytest.skip("skipped: no Redis at 127.0.0.1:6379")
    prefix = f"apikeyd-test-{uuid.uuid4().hex[:12]}"
    yield prefix
    client = redis.Redis.from_url(SHARED_REDIS)
    try:
        for name in client.scan_iter(match=f"{prefix}:*", count=1000):
            client.delete(name)
    finally:
        client.close()


def _limits(*pairs: tuple[int, int]) -> list[pb.RateLimit]:
    return [pb.RateLimit(limit=limit, period=Duration(seconds=period)) for limit, period in pairs]



# --- the same GCRA as in-process limits ------------------------------------------------------------


def test_shared_limits_all_hold_and_denials_spend_no_budget(make_server, account, redis_prefix):
    server = make_server(rate_limit_url=SHARED_REDIS, rate_limit_prefix=redis_prefix)
    created = create_key(server.stub, account, rate_limits=_limits((2, 3600), (3, 86400)))
    for _ in range(5):  # denied for scope: must not count
        assert authorize(server.stub, created.secret, "domains:read").code == R.INSUFFICIENT_SCOPE
    first = authorize(server.stub, created.secret, "messages:send")
    assert first.code == R.OK and first.limit == 2 and first.remaining == 1
    second = authorize(server.stub, created.secret, "messages:send")
    assert second.code == R.OK and second.remaining == 0
    limited = authorize(server.stub, created.secret, "messages:send")
    assert limited.code == R.RATE_LIMITED and not limited.allowed and limited.limit == 2 and limited.remaining == 0
    assert 1700 < limited.retry_after.ToTimedelta().total_seconds() <= 1800
    # One Redis key per limit, in the documented shape, expiring within its period.
    key_id = created.api_key.key_id
    client = redis.Redis.from_url(SHARED_REDIS)
    try:
        names = sorted(name.decode() for name in client.scan_iter(match=f"{redis_prefix}:*"))
        assert names == [f"{redis_prefix}:rl:{{{key_id}}}:2:3600", f"{redis_prefix}:rl:{{{key_id}}}:3:86400"]
        assert 0 < client.pttl(names[0]) <= 3600_000 and 3600_000 < client.pttl(names[1]) <= 86400_000
    finally:
        client.close()


def test_a_key_without_rate_limits_never_touches_redis(make_server, account):
    """The cached no-rate-limit path is unchanged: with Redis unreachable, such keys see nothing of it."""
    server = make_server(rate_limit_url=f"redis://127.0.0.1:{free_port()}/0", rate_limit_failure="deny")
    secret = create_key(server.stub, account).secret
    for _ in range(3):
        assert authorize(server.stub, secret).code == R.OK
    assert server.app.shared_limiter.errors == 0


async def _burst_and_refill(limiter: RedisRateLimiter, key_id: str) -> tuple[list[bool], float, bool]:
    limits = (RateLimit(5, 1),)
    outcomes = [await limiter.hit(key_id, limits) for _ in range(6)]
    assert [o.remaining for o in outcomes[:5]] == [4, 3, 2, 1, 0]
    wait = outcomes[5].retry_after
    time.sleep(wait + 0.005)
    after = await limiter.hit(key_id, limits)
    await limiter.close()
    return [o.allowed for o in outcomes], wait, after.allowed


def test_the_script_refills_evenly_and_says_how_long_to_wait(redis_prefix):
    import asyncio

    limiter = RedisRateLimiter(SHARED_REDIS, redis_prefix)
    allowed, wait, after = asyncio.run(_burst_and_refill(limiter, "k1"))
    assert allowed == [True] * 5 + [False]
    assert 0.15 < wait <= 0.2  # one request per 200 ms, minus the time the burst took
    assert after


# --- one budget across servers ----------------------------------------------------------------------


def _fire(stubs: list[pb_grpc.ApiKeyServiceStub], secret: str, calls: int) -> tuple[list[R], float]:
    started = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda i: authorize(stubs[i % len(stubs)], secret, "messages:send"), range(calls)))
    return answers, time.monotonic() - started


def _assert_fifty_of_eighty(answers: list[R], elapsed: float) -> None:
    allowed = sum(a.code == R.OK for a in answers)
    assert sum(a.code == R.RATE_LIMITED for a in answers) == len(answers) - allowed
    # 50 per minute is a burst of 50, then one more every 1.2 s: exactly 50 when the burst takes less.
    assert 50 <= allowed <= 50 + int(elapsed / 1.2), (allowed, elapsed)
    if elapsed < 1.2:
        assert allowed == 50


def test_two_servers_in_one_process_share_one_budget(make_server, account, redis_prefix):
    first = make_server(rate_limit_url=SHARED_REDIS, rate_limit_prefix=redis_prefix)
    second = make_server(rate_limit_url=SHARED_REDIS, rate_limit_prefix=redis_prefix)
    secret = create_key(first.stub, account, rate_limits=_limits((50, 60))).secret
    for server in (first, second):  # verified and cached on both; a scope denial spends nothing
        assert authorize(server.stub, secret, "domains:read").code == R.INSUFFICIENT_SCOPE
    _assert_fifty_of_eighty(*_fire([first.stub, second.stub], secret, 80))


def _serve(db: Path, port: int, prefix: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [APIKEYD, "serve", "--listen", f"127.0.0.1:{port}", "--database-url", f"sqlite:///{db}"],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "APIKEYD_RATE_LIMIT_URL": SHARED_REDIS, "APIKEYD_RATE_LIMIT_PREFIX": prefix},
    )


def test_two_server_processes_give_a_key_its_limit_in_total(tmp_path, redis_prefix):
    """The issue's case: 50 per minute, 80 calls split across two `apikeyd serve` processes: 50 allowed."""
    db = tmp_path / "apikeyd.db"
    token = _admin_key(tmp_path)  # in that file
    ports = [free_port(), free_port()]
    processes = [_serve(db, port, redis_prefix) for port in ports]
    channels: list[grpc.Channel] = []
    try:
        for port in ports:
            channel = grpc.insecure_channel(f"127.0.0.1:{port}")
            grpc.channel_ready_future(channel).result(timeout=30)
            channels.append(channel)
        stubs = [pb_grpc.ApiKeyServiceStub(grpc.intercept_channel(c, BearerCredentials(token))) for c in channels]
        secret = create_key(stubs[0], "acme", rate_limits=_limits((50, 60))).secret
        for stub in stubs:
            assert authorize(stub, secret, "domains:read").code == R.INSUFFICIENT_SCOPE
        answers, elapsed = _fire(stubs, secret, 80)
        _assert_fifty_of_eighty(answers, elapsed)
    finally:
        for channel in channels:
            channel.close()
        logs = []
        for process in processes:
            process.terminate()
            logs.append(process.communicate(timeout=60)[1])
    assert all(p.returncode == 0 for p in processes), logs
    assert all("rate limits shared through redis://127.0.0.1:6379/0" in log for log in logs), logs


# --- without Redis --------------------------------------------------------------------------------


def test_without_a_url_the_log_says_limits_are_per_process(database_url, caplog):
    with caplog.at_level(logging.INFO, logger="apikeyd"):
        App(Settings.load(environ={}, database_url=database_url)).close()
    assert any("rate limits are per process" in r.getMessage() and r.levelno == logging.INFO for r in caplog.records)


@pytest.mark.parametrize(
    ("setting", "value"), [("rate_limit_failure", "maybe"), ("rate_limit_url", "http://127.0.0.1:6379")]
)
def test_bad_rate_limit_settings_stop_the_start(database_url, setting, value):
    with pytest.raises(StartupError, match="APIKEYD_RATE_LIMIT"):
        App(Settings.load(environ={}, database_url=database_url, **{setting: value}))


def _errors_metric(server) -> float:
    for line in generate_latest(server.app.metrics.registry).decode().splitlines():
        if line.startswith(RATE_LIMIT_ERRORS + " "):
            return float(line.split()[1])
    raise AssertionError(f"{RATE_LIMIT_ERRORS} is not exported")


def test_unreachable_redis_allows_by_default_counts_and_warns_once(make_server, account, caplog):
    server = make_server(rate_limit_url=f"redis://127.0.0.1:{free_port()}/0")
    secret = create_key(server.stub, account, rate_limits=_limits((1, 3600))).secret
    with caplog.at_level(logging.WARNING, logger="apikeyd"):
        answers = [authorize(server.stub, secret, "messages:send") for _ in range(5)]
    assert [a.code for a in answers] == [R.OK] * 5  # allowed, beyond the limit of 1: Redis decides nothing
    assert _errors_metric(server) == 5
    warnings = [r for r in caplog.records if "unreachable" in r.getMessage() and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "allowing" in warnings[0].getMessage()


def test_unreachable_redis_denies_with_the_deny_policy(make_server, account):
    server = make_server(rate_limit_url=f"redis://127.0.0.1:{free_port()}/0", rate_limit_failure="deny")
    secret = create_key(server.stub, account, rate_limits=_limits((10, 60), (100, 3600))).secret
    answer = authorize(server.stub, secret, "messages:send")
    assert answer.code == R.RATE_LIMITED and not answer.allowed and answer.limit == 10 and answer.remaining == 0
    assert "cannot be checked" in answer.message and answer.retry_after.ToTimedelta().total_seconds() == 1.0
    assert _errors_metric(server) == 1


def _start_redis(port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while not _redis_answers(f"redis://127.0.0.1:{port}/0"):
        assert process.poll() is None and time.monotonic() < deadline, "redis-server did not start"
        time.sleep(0.05)
    return process


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.kill()
    process.wait(timeout=10)


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="skipped: no redis-server binary")
def test_authorize_recovers_by_itself_when_redis_returns(make_server, account, caplog):
    port = free_port()
    own_redis = _start_redis(port)
    try:
        server = make_server(rate_limit_url=f"redis://127.0.0.1:{port}/0")
        secret = create_key(server.stub, account, rate_limits=_limits((2, 3600))).secret
        assert authorize(server.stub, secret, "messages:send").remaining == 1
        _stop(own_redis)
        with caplog.at_level(logging.INFO, logger="apikeyd"):
            down = [authorize(server.stub, secret, "messages:send") for _ in range(3)]
            assert [a.code for a in down] == [R.OK] * 3 and all(a.limit == 0 for a in down)  # no rate answer
            assert server.app.shared_limiter.errors == 3
            own_redis = _start_redis(port)  # empty: it saved nothing
            deadline = time.monotonic() + 10
            answer = authorize(server.stub, secret, "messages:send")
            while answer.limit == 0:  # still answered by the policy until the retry pause ends
                assert time.monotonic() < deadline, "never recovered"
                time.sleep(0.1)
                answer = authorize(server.stub, secret, "messages:send")
        assert answer.code == R.OK and answer.limit == 2 and answer.remaining == 1
        assert authorize(server.stub, secret, "messages:send").remaining == 0
        assert authorize(server.stub, secret, "messages:send").code == R.RATE_LIMITED
        assert any("reachable again" in r.getMessage() for r in caplog.records)
    finally:
        _stop(own_redis)


def test_the_script_decides_as_the_in_process_gcra(redis_prefix):
    """The script with its clock replaced by a given time, against domain/ratelimit.check on the same
    random sequences: the same allowed, limit and remaining, and retry_after rounded up to whole us."""
    import random

    from apikeyd.authorizer.redis_ratelimits import GCRA_SCRIPT
    from apikeyd.domain import ratelimit

    clock_line = "local now = tonumber(t[1]) * 1000000 + tonumber(t[2])"
    assert clock_line in GCRA_SCRIPT
    expiry = ", 'PX', tonumber(ARGV[2 * i]) * 1000)"
    assert expiry in GCRA_SCRIPT  # real-time expiry would not follow the given clock: the fixture deletes
    script_at = GCRA_SCRIPT.replace(clock_line, "local now = tonumber(ARGV[#ARGV])").replace(expiry, ")")
    client = redis.Redis.from_url(SHARED_REDIS)
    rng = random.Random(5)
    try:
        for case in range(40):
            limits = tuple(
                sorted({RateLimit(rng.choice([1, 2, 3, 7, 50, 1000]), rng.choice([1, 2, 60, 3600, 86400]))
                        for _ in range(rng.randint(1, 3))}, key=lambda r: (r.period_seconds, r.limit))
            )  # fmt: skip
            names = [f"{redis_prefix}:rl:{{case{case}}}:{r.limit}:{r.period_seconds}" for r in limits]
            args = [v for r in limits for v in (r.limit, r.period_seconds)]
            tats = [0] * len(limits)
            now_us = 1_763_000_000_000_000 + rng.randint(0, 10**9)
            for _ in range(60):
                now_us += rng.choice([0, 1, 999, rng.randint(0, 3_000_000)])
                expected, new_tats = ratelimit.check(limits, tats, now_us * 1000)
                if new_tats is not None:
                    tats = new_tats
                allowed, limit, remaining, wait_us, period = client.eval(script_at, len(names), *names, *args, now_us)
                wait_ns = round(expected.retry_after * ratelimit.NANOS)
                assert (bool(allowed), limit, remaining, period) == (
                    expected.allowed, expected.limit, expected.remaining, expected.period_seconds
                )
                assert wait_us == -(-wait_ns // 1000)
    finally:
        client.close()
