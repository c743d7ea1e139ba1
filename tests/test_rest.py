"""The REST/JSON API: a real Envoy on deploy/envoy/rest.yaml, its gRPC-JSON transcoder in front of a real
server, called with plain HTTP.

The config runs as shipped but for its ports (apikeyd's for this test's, the listener's and the admin's
for 0) and the descriptor set's path, made absolute so that Envoy need not run from the repository's top.
"""

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import google.api
import grpc_tools
import httpx
import pytest
from google.protobuf import descriptor_pb2
from grpc_tools import protoc

from bench.envoy import with_ports
from tests.conftest import ISSUED_SECRETS, RunningServer, wait_for
from tests.test_envoy import Envoy, require_envoy

ROOT = Path(__file__).resolve().parent.parent
REST_CONFIG = ROOT / "deploy" / "envoy" / "rest.yaml"
DESCRIPTOR = ROOT / "deploy" / "envoy" / "apikeyd.pb"
PROTO = "apikeyd/v1/api_keys.proto"
SEND = ["messages:send:all"]


class Rest:
    """Plain HTTP to Envoy's listener, with `authorization: Bearer <key>` when a key is given."""

    def __init__(self, port: int, key: str) -> None:
        self.key = key
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
        self.bodies: list[str] = []  # every response body but those of create and rotate

    def call(self, method: str, path: str, body: Any = None, key: str | None = "", **params: Any) -> httpx.Response:
        """`key` "" is the operator key, None no credential at all."""
        bearer = self.key if key == "" else key
        headers = {"authorization": f"Bearer {bearer}"} if bearer is not None else {}
        response = self.http.request(method, path, json=body, params=params or None, headers=headers)
        if not path.endswith(":rotate") and not (method == "POST" and path.endswith("/apiKeys")):
            self.bodies.append(response.text)
        return response

    def ok(self, method: str, path: str, body: Any = None, **params: Any) -> Any:
        response = self.call(method, path, body, **params)
        assert response.status_code == 200, (response.status_code, response.text)
        assert response.headers["content-type"] == "application/json"
        return response.json()

    def create(self, account: str, **fields: Any) -> dict[str, Any]:
        fields.setdefault("displayName", "rest key")
        fields.setdefault("scopes", SEND)
        created: dict[str, Any] = self.ok("POST", f"/v1/accounts/{account}/apiKeys", fields)
        ISSUED_SECRETS.add(created["secret"])
        return created


@contextlib.contextmanager
def rest_for(server: RunningServer, workdir: Path) -> Iterator[Rest]:
    text = REST_CONFIG.read_text()
    relative = "proto_descriptor: deploy/envoy/apikeyd.pb"
    assert text.count(relative) == 1, f"{REST_CONFIG} should name {relative!r} once"
    text = with_ports(
        text.replace(relative, f"proto_descriptor: {DESCRIPTOR}"),
        str(REST_CONFIG),
        {50051: server.port, 10001: 0, 9902: 0},
    )
    envoy = Envoy(require_envoy(), text, workdir)
    rest = Rest(envoy.port, server.operator_key)
    try:
        yield rest
    finally:
        rest.http.close()
        envoy.stop()


@pytest.fixture
def rest(make_server: Callable[..., RunningServer], tmp_path: Path) -> Iterator[Rest]:
    # Usage counts reach the database within a tenth of a second rather than half a minute.
    with rest_for(make_server(last_used_flush_interval=0.1), tmp_path) as running:
        yield running


def error_of(response: httpx.Response, http: int, status: str) -> str:
    """AIP-193's body: {"error": {"code": <HTTP status>, "status": <gRPC code name>, "message", ...}}."""
    assert response.status_code == http, (response.status_code, response.text)
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}, body
    assert body["error"]["code"] == http and body["error"]["status"] == status, body
    message: str = body["error"]["message"]
    assert message, body
    return message


# --- the committed descriptor set --------------------------------------------------------------------


def test_committed_descriptor_set_is_what_the_protos_build(tmp_path: Path) -> None:
    """Envoy reads deploy/envoy/apikeyd.pb, not the protos: a proto edited without `make protos` would
    leave REST serving the old contract."""
    built = tmp_path / "apikeyd.pb"
    includes = [
        f"-I{ROOT / 'protos'}",
        f"-I{Path(grpc_tools.__file__).parent / '_proto'}",
        f"-I{Path(google.api.__path__[0]).parent.parent}",
    ]
    argv = ["protoc", *includes, "--include_imports", f"--descriptor_set_out={built}", PROTO]
    assert protoc.main(argv) == 0
    fresh, committed = descriptor_pb2.FileDescriptorSet(), descriptor_pb2.FileDescriptorSet()
    fresh.ParseFromString(built.read_bytes())
    committed.ParseFromString(DESCRIPTOR.read_bytes())
    assert committed == fresh, "deploy/envoy/apikeyd.pb is stale: run `make protos`"


# --- every method ------------------------------------------------------------------------------------


def test_a_key_through_its_whole_life(rest: Rest, account: str) -> None:
    created = rest.create(account, labels={"env": "prod"}, description="for CI")
    key, secret = created["apiKey"], created["secret"]
    name = key["name"]
    assert name.startswith(f"accounts/{account}/apiKeys/") and key["state"] == "ACTIVE"
    assert secret.startswith("AK_") and created["secretAlreadyDelivered"] is False

    assert rest.ok("GET", f"/v1/{name}") == key
    listed = rest.ok("GET", f"/v1/accounts/{account}/apiKeys", filter='labels.env = "prod"', pageSize=10)
    assert [k["name"] for k in listed["apiKeys"]] == [name] and listed["nextPageToken"] == ""

    rotated = rest.ok("POST", f"/v1/{name}:rotate", {"gracePeriod": "3600s", "etag": key["etag"]})
    ISSUED_SECRETS.add(rotated["secret"])
    assert rotated["secret"] not in ("", secret) and rotated["apiKey"]["previousSecretExpireTime"]
    # Authorize needs no bearer key; the old secret still works in its grace, as the new one does.
    for presented in (secret, rotated["secret"]):
        answer = rest.ok("POST", "/v1/apiKeys:authorize", {"key": presented, "requiredScopes": ["messages:send"]})
        assert answer["allowed"] is True and answer["code"] == "OK" and answer["name"] == name

    revoked = rest.ok("POST", f"/v1/{name}:revoke", {"reason": "leaked in a log"})
    assert revoked["state"] == "REVOKED" and revoked["revokeReason"] == "leaked in a log"
    kinds = [e["kind"] for e in rest.ok("GET", f"/v1/accounts/{account}/auditEvents")["auditEvents"]]
    assert kinds == ["REVOKED", "ROTATED", "CREATED"]

    assert rest.ok("DELETE", f"/v1/{name}", etag=revoked["etag"]) == {}
    error_of(rest.call("GET", f"/v1/{name}"), 404, "NOT_FOUND")

    # The secrets went out in the create and rotate responses only: no other body has them.
    for body in rest.bodies:
        assert secret not in body and rotated["secret"] not in body


def test_authorize_denials_are_answers_not_errors(rest: Rest, account: str) -> None:
    secret = rest.create(account)["secret"]
    answer = rest.ok("POST", "/v1/apiKeys:authorize", {"key": secret, "requiredScopes": ["domains:read"]}, key=None)
    assert answer["allowed"] is False and answer["code"] == "INSUFFICIENT_SCOPE"
    assert answer["missingScopes"] == ["domains:read"]
    assert rest.ok("POST", "/v1/apiKeys:authorize", {"key": "AK_nonsense"})["code"] == "MALFORMED"


def test_usage_by_key_and_across_keys(rest: Rest, account: str) -> None:
    """Timestamps and enums in the query string, and a repeated field as a repeated parameter."""
    first, second = rest.create(account), rest.create(account)
    for created, checks in ((first, 2), (second, 1)):
        for _ in range(checks):
            rest.ok("POST", "/v1/apiKeys:authorize", {"key": created["secret"]})
    since = time.strftime("%Y-%m-%dT00:00:00Z", time.gmtime(time.time() - 86400))
    one = f"/v1/{first['apiKey']['name']}/usage"

    def totals(path: str, **params: Any) -> dict[str, int]:
        page = rest.ok("GET", path, granularity="DAY", startTime=since, **params)
        return {u["keyId"]: int(u["total"]) for u in page["usage"]}

    first_id, second_id = first["apiKey"]["keyId"], second["apiKey"]["keyId"]
    wait_for(lambda: totals(one) == {first_id: 2}, "the first key's usage")
    everyone = f"/v1/accounts/{account}/apiKeys/-/usage"
    assert wait_for(lambda: totals(everyone) == {first_id: 2, second_id: 1}, "the account's usage")
    assert totals(everyone, keyIds=[second_id]) == {second_id: 1}


def test_watch_streams_one_json_object_a_line(rest: Rest, account: str) -> None:
    with rest.http.stream("GET", "/v1/apiKeys:watchChanges", headers={"authorization": f"Bearer {rest.key}"}) as stream:
        assert stream.status_code == 200
        lines = stream.iter_lines()
        first = json.loads(next(lines))
        assert first["reach"]["allAccounts"] is True
        name = rest.create(account)["apiKey"]["name"]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # heartbeats come between; each line is a whole response
            changes = json.loads(next(lines))["changes"]
            if any(change["apiKey"] == name for change in changes):
                assert [change["kind"] for change in changes if change["apiKey"] == name] == ["CREATED"]
                return
        raise AssertionError(f"no change for {name} within 10 s")


# --- field masks -------------------------------------------------------------------------------------


def test_patch_changes_only_what_update_mask_names(rest: Rest, account: str) -> None:
    key = rest.create(account, description="kept", labels={"env": "prod"})["apiKey"]
    path = f"/v1/{key['name']}"
    # The body may carry more than the mask names: only the named fields change, and a named field the
    # body leaves out is cleared (labels).
    body = {"displayName": "renamed", "description": "ignored", "scopes": ["domains:read"]}
    updated = rest.ok("PATCH", path, body, updateMask="displayName,labels")
    assert updated["displayName"] == "renamed" and updated["labels"] == {}
    assert updated["description"] == "kept" and updated["scopes"] == SEND
    # Proto field names work as well as JSON ones, and a nested path reaches into a message.
    again = rest.ok("PATCH", path, {"description": "changed"}, update_mask="description")
    assert again["description"] == "changed"
    rest.ok("PATCH", path, {"credits": {"remaining": "5"}}, updateMask="credits")
    assert rest.ok("PATCH", path, {"credits": {"remaining": "7"}}, updateMask="credits.remaining")["credits"] == {
        "remaining": "7"
    }
    # No mask: the fields the body sets (AIP-134), and a body that sets none is refused.
    unmasked = rest.ok("PATCH", path, {"displayName": "no mask"})
    assert unmasked["displayName"] == "no mask" and unmasked["description"] == "changed"
    assert "update_mask" in error_of(rest.call("PATCH", path, {}), 400, "INVALID_ARGUMENT")
    error_of(rest.call("PATCH", path, {"displayName": "x"}, updateMask="keyId"), 400, "INVALID_ARGUMENT")


# --- errors ------------------------------------------------------------------------------------------


def test_errors_are_aip_193_with_the_http_status_of_their_code(
    make_server: Callable[..., RunningServer], tmp_path: Path, account: str
) -> None:
    server = make_server(max_keys_per_account=1)
    with rest_for(server, tmp_path) as rest:
        created = rest.create(account)
        name, etag = created["apiKey"]["name"], created["apiKey"]["etag"]
        keys = f"/v1/accounts/{account}/apiKeys"
        missing = f"{keys}/00000000-0000-4000-8000-000000000000"

        error_of(rest.call("POST", keys, {"displayName": "", "scopes": SEND}), 400, "INVALID_ARGUMENT")
        error_of(rest.call("GET", missing), 404, "NOT_FOUND")
        error_of(rest.call("GET", f"/v1/{name}", key=None), 401, "UNAUTHENTICATED")
        error_of(rest.call("GET", f"/v1/{name}", key="AK_not_a_key"), 401, "UNAUTHENTICATED")
        # A working key without apikeys:read.
        error_of(rest.call("GET", f"/v1/{name}", key=created["secret"]), 403, "PERMISSION_DENIED")
        error_of(rest.call("POST", keys, {"displayName": "second", "scopes": SEND}), 429, "RESOURCE_EXHAUSTED")
        rest.ok("PATCH", f"/v1/{name}", {"description": "moves the etag on"}, updateMask="description")
        error_of(rest.call("POST", f"/v1/{name}:revoke", {"etag": etag}), 409, "ABORTED")
        rest.ok("POST", f"/v1/{name}:revoke", {})
        error_of(rest.call("POST", f"/v1/{name}:rotate", {}), 400, "FAILED_PRECONDITION")
        with rest.http.stream(
            "GET", "/v1/apiKeys:watchChanges", params={"resumeAfter": "999999999"},
            headers={"authorization": f"Bearer {rest.key}"},
        ) as stream:  # fmt: skip
            stream.read()
            error_of(stream, 400, "OUT_OF_RANGE")

        # Envoy's own refusals take the same shape.
        error_of(rest.call("GET", "/v1/nothing/here"), 404, "NOT_FOUND")
        error_of(rest.call("GET", keys, misspelt="1"), 400, "INVALID_ARGUMENT")
        bad_json = rest.http.post(keys, content=b"{nope", headers={"authorization": f"Bearer {rest.key}"})
        error_of(bad_json, 400, "INVALID_ARGUMENT")
        server.stop()
        error_of(rest.call("GET", f"/v1/{name}"), 503, "UNAVAILABLE")
