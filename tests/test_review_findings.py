"""Adversarial review of issue 9's promises: each test here is a bypass found over real channels."""

import logging
import threading
from typing import Any

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc
from google.protobuf import field_mask_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from apikeyd.server import SERVICE_NAME
from apikeyd.v1 import api_keys_pb2 as pb
from tests.conftest import RunningServer, authorize, create_key, rpc_error
from tests.test_envoy import check_request
from tests.test_flood import _guess

OK, NOT_FOUND = pb.AuthorizeResponse.OK, pb.AuthorizeResponse.NOT_FOUND


def _hold_after_commit(server: RunningServer, method: str) -> tuple[threading.Event, threading.Event]:
    """The repository's `method` commits as usual, then its thread waits for `release`: the caller's
    deadline passes while the committed change is on its way back to the event loop."""
    repository = server.app.repository
    real = getattr(repository, method)
    committed, release = threading.Event(), threading.Event()

    def held(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        committed.set()
        assert release.wait(30)
        return result

    setattr(repository, method, held)
    return committed, release


@pytest.mark.parametrize("kind", ["revoke", "delete", "disable", "rotate"])
def test_a_change_whose_caller_gave_up_after_the_commit_is_still_in_force(server, account, kind):
    """Promise 1: a revoke that committed but whose client's deadline passed before it returned left this
    process's cache serving the old row (the feed skips this process's own events) until the cache TTL."""
    created = create_key(server.stub, account)
    assert authorize(server.stub, created.secret).code == OK  # cached
    name = created.api_key.name
    committed, release = _hold_after_commit(server, "delete" if kind == "delete" else "modify")
    calls = {
        "revoke": lambda: server.stub.RevokeApiKey(pb.RevokeApiKeyRequest(name=name), timeout=0.5),
        "delete": lambda: server.stub.DeleteApiKey(pb.DeleteApiKeyRequest(name=name), timeout=0.5),
        "rotate": lambda: server.stub.RotateApiKey(pb.RotateApiKeyRequest(name=name), timeout=0.5),  # grace 0
        "disable": lambda: server.stub.UpdateApiKey(
            pb.UpdateApiKeyRequest(
                api_key=pb.ApiKey(name=name, state=pb.ApiKey.DISABLED),
                update_mask=field_mask_pb2.FieldMask(paths=["state"]),
            ),
            timeout=0.5,
        ),
    }
    try:
        error = rpc_error(calls[kind])
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert committed.wait(10)
    finally:
        release.set()
    # The change is in the database: another read says so.
    if kind == "delete":
        assert rpc_error(lambda: server.stub.GetApiKey(pb.GetApiKeyRequest(name=name))).code() == grpc.StatusCode.NOT_FOUND
    elif kind == "rotate":
        assert server.stub.GetApiKey(pb.GetApiKeyRequest(name=name)).masked_key != created.api_key.masked_key
    else:
        assert server.stub.GetApiKey(pb.GetApiKeyRequest(name=name)).state != pb.ApiKey.ACTIVE
    assert authorize(server.stub, created.secret).code != OK


def test_a_key_verified_before_the_flood_keeps_working_after_its_own_update(make_server, account):
    """Promise 3: "a secret verified before the flood keeps working" (README, Floods). Five guesses a minute
    lock the lookup id; any change to the key (here its own display name) drops its cache entry, and its
    correct secret is then refused NOT_FOUND until the window passes; an attacker who repeats the five
    guesses every window keeps it out for good (the TTL expiry of the entry does the same without a change)."""
    server = make_server(failure_budget=3, failure_window=600.0)
    created = create_key(server.stub, account)
    assert authorize(server.stub, created.secret).code == OK  # verified before the flood
    for _ in range(5):
        assert authorize(server.stub, _guess(created.secret)).code == NOT_FOUND
    assert authorize(server.stub, created.secret).code == OK  # still cached: holds
    server.stub.UpdateApiKey(
        pb.UpdateApiKeyRequest(
            api_key=pb.ApiKey(name=created.api_key.name, display_name="renamed"),
            update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
        )
    )
    assert authorize(server.stub, created.secret).code == OK


@pytest.mark.parametrize("method", ["Check", "Watch"])
def test_a_health_service_name_over_its_limit_is_invalid_argument(server, method):
    """Promise 2: Health is unauthenticated and skips request_limits; a Watch keeps its request, service
    name and all (up to the 128 KiB message), for as long as the stream stays open, however many are open."""
    health = health_pb2_grpc.HealthStub(server.channel)
    request = health_pb2.HealthCheckRequest(service="x" * 100_000)

    def call() -> Any:
        if method == "Check":
            return health.Check(request, timeout=10)
        return next(health.Watch(request, timeout=10))

    error = rpc_error(call)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "service" in (error.details() or "")
    # The names this server answers for still work.
    assert health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10).status == (
        health_pb2.HealthCheckResponse.SERVING
    )


def test_misconfigured_checks_from_anyone_do_not_write_a_warning_each(server, caplog):
    """Promise 4's log bound: Check takes calls from anyone (APIKEYD_AUTHORIZE_REQUIRES_KEY is off by
    default) and its context_extensions come from the caller, so each misconfigured request was a line."""
    check = external_auth_pb2_grpc.AuthorizationStub(server.channel).Check
    with caplog.at_level(logging.WARNING, logger="apikeyd.service.envoy_checks"):
        for _ in range(50):
            response = check(check_request({"x-api-key": "AK_whatever"}, required_scope="messages:send"), timeout=10)
            assert response.denied_response.status.code == 500
    lines = [record for record in caplog.records if record.name == "apikeyd.service.envoy_checks"]
    assert len(lines) <= 1


@pytest.mark.parametrize("form", ["headers", "header_map"])
def test_a_check_with_thousands_of_headers_is_refused_before_they_are_read(server, form):
    """Promise 2: only the message size bounded the headers of a Check, and reading 26,000 of them (128 KiB)
    held the event loop for about 20 ms (joined one by one, quadratically, in request_headers); Envoy itself
    forwards at most max_headers_count (100 by default)."""
    check = external_auth_pb2_grpc.AuthorizationStub(server.channel).Check
    if form == "headers":
        request = check_request({f"h{i}": "" for i in range(5000)})
    else:
        request = check_request(raw=[("a", b"") for _ in range(20000)])
    error = rpc_error(lambda: check(request, timeout=10))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "headers" in (error.details() or "")
