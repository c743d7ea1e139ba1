"""Authorize over a real channel: every code, the cache, and changes taking effect on cached keys."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.timestamp_pb2 import Timestamp

from apikeyd.domain import keys
from apikeyd.v1 import api_keys_pb2 as pb
from tests.conftest import authorize, create_key, held_hasher, rpc_error

R = pb.AuthorizeResponse


def _wrong_secret(key: str) -> str:
    """A well-formed key string for the same key id, with another secret."""
    parsed = keys.parse(key)
    return keys.generate(parsed.prefix, parsed.lookup_id)[0]


def _set_state(stub, name, state):
    return stub.UpdateApiKey(
        pb.UpdateApiKeyRequest(api_key=pb.ApiKey(name=name, state=state), update_mask=FieldMask(paths=["state"]))
    )


def test_ok_carries_the_keys_identity(stub, account):
    created = create_key(stub, account, scopes=("messages:send:all",), labels={"env": "prod"})
    response = authorize(stub, created.secret, "messages:send", resource="example.com")
    assert response.allowed and response.code == R.OK
    assert response.key_id == created.api_key.key_id and response.name == created.api_key.name
    assert response.account_id == account and list(response.scopes) == ["messages:send:all"]
    assert dict(response.labels) == {"env": "prod"}


@pytest.mark.parametrize("presented", ["", "nope", "AK_short", "x" * 256])
def test_malformed_strings_are_refused_without_database_or_argon2(server, stub, presented):
    response = authorize(stub, presented, "messages:send")
    assert not response.allowed and response.code == R.MALFORMED and not response.key_id
    assert server.app.hasher.verifications == 0


def test_a_mistyped_key_fails_its_checksum(server, stub, account):
    secret = create_key(stub, account).secret
    before = server.app.hasher.verifications
    position = len(secret) // 2
    typo = secret[:position] + ("a" if secret[position] != "a" else "b") + secret[position + 1 :]
    assert authorize(stub, typo).code == R.MALFORMED
    assert server.app.hasher.verifications == before


def test_unknown_key_and_wrong_secret_are_not_found_and_reveal_nothing(stub, account):
    created = create_key(stub, account)
    revoked = create_key(stub, account)
    stub.RevokeApiKey(pb.RevokeApiKeyRequest(name=revoked.api_key.name))
    unknown = keys.generate("AK_", keys.new_lookup_id())[0]
    for presented in (unknown, _wrong_secret(created.secret), _wrong_secret(revoked.secret)):
        response = authorize(stub, presented)
        assert response.code == R.NOT_FOUND and not response.allowed
        assert not response.key_id and not response.account_id and not response.scopes


def test_a_prefix_other_than_the_keys_own_is_not_found(stub, account):
    secret = create_key(stub, account).secret
    parsed = keys.parse(secret)
    body = f"XX_{parsed.lookup_id}_{parsed.secret}"
    relabelled = body + keys._checksum(body)
    assert authorize(stub, relabelled).code == R.NOT_FOUND


def test_checks_run_in_contract_order(stub, account):
    """revoked before disabled before expired before project before scope before rate limit."""
    created = create_key(
        stub,
        account,
        scopes=("messages:send:all",),
        project_id="p1",
        rate_limits=[pb.RateLimit(limit=1, period=Duration(seconds=3600))],
    )
    secret, name = created.secret, created.api_key.name
    assert authorize(stub, secret, "messages:send", project_id="p1").code == R.OK  # spends the only request
    assert authorize(stub, secret, "messages:send", project_id="p1").code == R.RATE_LIMITED
    assert authorize(stub, secret, "domains:read", project_id="p1").code == R.INSUFFICIENT_SCOPE
    assert authorize(stub, secret, "domains:read", project_id="p2").code == R.PROJECT_MISMATCH
    _set_state(stub, name, pb.ApiKey.DISABLED)
    assert authorize(stub, secret, "domains:read", project_id="p2").code == R.DISABLED
    stub.RevokeApiKey(pb.RevokeApiKeyRequest(name=name))
    response = authorize(stub, secret, "domains:read", project_id="p2")
    assert response.code == R.REVOKED and response.key_id == created.api_key.key_id


def test_project_keys_work_only_for_their_project_and_account_keys_for_any(stub, account):
    project_key = create_key(stub, account, project_id="p1").secret
    account_key = create_key(stub, account).secret
    assert authorize(stub, project_key, project_id="p1").code == R.OK
    assert authorize(stub, project_key, project_id="p2").code == R.PROJECT_MISMATCH
    assert authorize(stub, project_key).code == R.PROJECT_MISMATCH
    assert authorize(stub, account_key, project_id="p2").code == R.OK
    assert authorize(stub, account_key).code == R.OK


def test_scope_qualifiers_bind_to_the_requests_resource(stub, account):
    secret = create_key(stub, account, scopes=("messages:send:{example.com}", "domains:read")).secret
    assert authorize(stub, secret, "messages:send", resource="example.com").code == R.OK
    denied = authorize(stub, secret, "messages:send", "domains:read", resource="other.com")
    assert denied.code == R.INSUFFICIENT_SCOPE and list(denied.missing_scopes) == ["messages:send"]
    assert "messages:send" in denied.message
    wildcard = create_key(stub, account, scopes=("*",)).secret
    assert authorize(stub, wildcard, "anything:at-all", resource="x").code == R.OK


def test_a_bad_required_scope_is_the_callers_error(stub, account):
    secret = create_key(stub, account).secret
    error = rpc_error(lambda: authorize(stub, secret, "messages:send:all"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "required_scopes" in error.details()


def test_rate_limits_all_hold_and_denials_spend_no_budget(stub, account):
    created = create_key(
        stub,
        account,
        scopes=("messages:send:all",),
        rate_limits=[pb.RateLimit(limit=2, period=Duration(seconds=3600)), pb.RateLimit(limit=3, period=Duration(seconds=86400))],
    )
    for _ in range(5):  # denied for scope: must not count
        assert authorize(stub, created.secret, "domains:read").code == R.INSUFFICIENT_SCOPE
    first = authorize(stub, created.secret, "messages:send")
    assert first.code == R.OK and first.limit == 2 and first.remaining == 1
    second = authorize(stub, created.secret, "messages:send")
    assert second.code == R.OK and second.remaining == 0
    limited = authorize(stub, created.secret, "messages:send")
    assert limited.code == R.RATE_LIMITED and not limited.allowed and limited.limit == 2 and limited.remaining == 0
    assert 1700 < limited.retry_after.ToTimedelta().total_seconds() <= 1800
    assert limited.key_id == created.api_key.key_id


# --- the cache ------------------------------------------------------------------------------------


def test_a_cached_check_uses_neither_database_nor_argon2(server, stub, account):
    """A miss is the only path to the database and argon2, so counting misses and verifications is enough."""
    secret = create_key(stub, account).secret
    assert authorize(stub, secret).code == R.OK
    stats = server.app.cache.stats
    verifications, misses, hits = server.app.hasher.verifications, stats.misses, stats.hits
    for _ in range(20):
        assert authorize(stub, secret).code == R.OK
    assert server.app.hasher.verifications == verifications
    assert (stats.misses, stats.hits) == (misses, hits + 20)


@pytest.mark.parametrize(
    "change",
    [
        lambda stub, name: _set_state(stub, name, pb.ApiKey.DISABLED),
        lambda stub, name: stub.RevokeApiKey(pb.RevokeApiKeyRequest(name=name)),
        lambda stub, name: stub.DeleteApiKey(pb.DeleteApiKeyRequest(name=name)),
        lambda stub, name: stub.RotateApiKey(pb.RotateApiKeyRequest(name=name)),
        lambda stub, name: stub.UpdateApiKey(
            pb.UpdateApiKeyRequest(api_key=pb.ApiKey(name=name, scopes=["domains:read"]), update_mask=FieldMask(paths=["scopes"]))
        ),
    ],
    ids=["disable", "revoke", "delete", "rotate-no-grace", "narrow-scopes"],
)
def test_changes_take_effect_on_a_cached_key_before_the_rpc_returns(stub, account, change):
    created = create_key(stub, account, scopes=("messages:send:all",))
    assert authorize(stub, created.secret, "messages:send").code == R.OK  # now cached
    change(stub, created.api_key.name)
    assert authorize(stub, created.secret, "messages:send").code != R.OK


def test_expected_codes_after_each_change(stub, account):
    def fresh():
        created = create_key(stub, account)
        authorize(stub, created.secret)
        return created

    a = fresh()
    _set_state(stub, a.api_key.name, pb.ApiKey.DISABLED)
    assert authorize(stub, a.secret).code == R.DISABLED
    _set_state(stub, a.api_key.name, pb.ApiKey.ACTIVE)
    assert authorize(stub, a.secret).code == R.OK
    b = fresh()
    stub.RevokeApiKey(pb.RevokeApiKeyRequest(name=b.api_key.name))
    assert authorize(stub, b.secret).code == R.REVOKED
    c = fresh()
    stub.DeleteApiKey(pb.DeleteApiKeyRequest(name=c.api_key.name))
    assert authorize(stub, c.secret).code == R.NOT_FOUND
    d = fresh()
    rotated = stub.RotateApiKey(pb.RotateApiKeyRequest(name=d.api_key.name))
    old = authorize(stub, d.secret)
    assert old.code == R.EXPIRED and "rotated" in old.message
    assert authorize(stub, rotated.secret).code == R.OK


def test_rotation_grace_keeps_the_old_secret_working_until_it_ends(stub, account):
    created = create_key(stub, account)
    assert authorize(stub, created.secret).code == R.OK
    rotated = stub.RotateApiKey(pb.RotateApiKeyRequest(name=created.api_key.name, grace_period=Duration(seconds=2)))
    assert authorize(stub, created.secret).code == R.OK
    assert authorize(stub, rotated.secret).code == R.OK
    grace_end = rotated.api_key.previous_secret_expire_time.ToDatetime(tzinfo=UTC).timestamp()
    time.sleep(max(0.0, grace_end - time.time()) + 0.05)  # waiting for a deadline, not for a race
    assert authorize(stub, created.secret).code == R.EXPIRED
    assert authorize(stub, rotated.secret).code == R.OK


def test_a_key_that_expires_while_cached_is_denied_from_that_instant(stub, account):
    expire = datetime.now(UTC) + timedelta(seconds=1.5)
    stamp = Timestamp()
    stamp.FromDatetime(expire)
    secret = create_key(stub, account, expire_time=stamp).secret
    assert authorize(stub, secret).code == R.OK
    time.sleep(max(0.0, expire.timestamp() - time.time()) + 0.05)  # waiting for a deadline, not for a race
    response = authorize(stub, secret)
    assert response.code == R.EXPIRED and response.key_id


def test_concurrent_misses_of_one_key_share_one_verification(server, stub, account):
    secret = create_key(stub, account).secret
    before = server.app.hasher.verifications
    calls = [stub.Authorize.future(pb.AuthorizeRequest(key=secret)) for _ in range(100)]
    assert all(call.result().code == R.OK for call in calls)
    assert server.app.hasher.verifications - before == 1


def test_wrong_secrets_are_remembered_briefly(server, stub, account):
    wrong = _wrong_secret(create_key(stub, account).secret)
    before = server.app.hasher.verifications
    for _ in range(10):
        assert authorize(stub, wrong).code == R.NOT_FOUND
    assert server.app.hasher.verifications - before == 1
    assert server.app.cache.stats.negative_hits >= 9


def test_a_verification_in_flight_during_a_revoke_does_not_cache_the_old_state(server, stub, account):
    created = create_key(stub, account)
    with held_hasher(server, "verify") as (reached, release):
        in_flight = stub.Authorize.future(pb.AuthorizeRequest(key=created.secret))
        assert reached.wait(30)  # it has read the key as ACTIVE and waits before argon2
        stub.RevokeApiKey(pb.RevokeApiKeyRequest(name=created.api_key.name))
        release.set()
        assert in_flight.result().code == R.OK  # it began before the revoke and read the key as it was
    assert authorize(stub, created.secret).code == R.REVOKED


def test_cached_checks_keep_flowing_while_verifications_are_slow(make_server, account):
    server = make_server(max_verifications=1)
    stub = server.stub
    cached = create_key(stub, account).secret
    assert authorize(stub, cached).code == R.OK
    release = threading.Event()
    blocked = server.app.verify_executor.submit(release.wait, 30)  # the only verification slot is busy
    try:
        cold = stub.Authorize.future(pb.AuthorizeRequest(key=create_key(stub, account).secret))
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda _: authorize(stub, cached).code, range(40)))
        assert results == [R.OK] * 40
        assert not cold.done()
    finally:
        release.set()
        blocked.result()
    assert cold.result().code == R.OK


def test_last_used_times_are_written_in_batches(server, stub, account):
    created = create_key(stub, account)
    before = datetime.now(UTC)
    assert authorize(stub, created.secret).code == R.OK
    assert not stub.GetApiKey(pb.GetApiKeyRequest(name=created.api_key.name)).HasField("last_used_time")
    assert server.run(server.app.authorizer.flush_last_used()) == 1
    used = stub.GetApiKey(pb.GetApiKeyRequest(name=created.api_key.name)).last_used_time.ToDatetime(tzinfo=UTC)
    assert before - timedelta(seconds=1) <= used <= datetime.now(UTC)


def test_last_used_times_are_flushed_on_shutdown(make_server, account):
    first = make_server()
    created = create_key(first.stub, account)
    assert authorize(first.stub, created.secret).code == R.OK
    first.stop()
    second = make_server()
    assert second.stub.GetApiKey(pb.GetApiKeyRequest(name=created.api_key.name)).HasField("last_used_time")


def test_an_older_last_used_time_never_replaces_a_newer_one(server, stub, account):
    key = create_key(stub, account).api_key
    newer = datetime(2030, 1, 1, tzinfo=UTC)
    server.app.repository.record_last_used({key.key_id: newer})
    server.app.repository.record_last_used({key.key_id: newer - timedelta(days=1)})
    assert server.app.repository.get(account, key.key_id).last_used_time == newer
