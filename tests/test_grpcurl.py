"""What an operator types: the real grpcurl binary lists, describes and calls every method via reflection."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from apikeyd.v1 import api_keys_pb2 as pb

GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")
pytestmark = pytest.mark.skipif(GRPCURL is None, reason="skipped: no grpcurl (make test installs it)")
SERVICE = "apikeyd.v1.ApiKeyService"


def grpcurl(address: str, *args: str, data: dict | None = None, token: str = "") -> str:
    command = [GRPCURL, "-plaintext"]
    if token:
        command += ["-H", f"authorization: Bearer {token}"]
    if data is not None:
        command += ["-d", json.dumps(data)]
    result = subprocess.run([*command, address, *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_list_and_describe_every_method(server):
    services = grpcurl(server.address, "list").split()
    assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= set(services)
    methods = grpcurl(server.address, "list", SERVICE).split()
    expected = [f"{SERVICE}.{m.name}" for m in pb.DESCRIPTOR.services_by_name["ApiKeyService"].methods]
    assert sorted(methods) == sorted(expected)
    for method in methods:
        description = grpcurl(server.address, "describe", method)
        assert f"{method} is a method" in description
        request_type = description.split("(")[1].split(")")[0].strip().lstrip(".")
        assert "is a message" in grpcurl(server.address, "describe", request_type)


def test_call_every_method_with_json(server, account):
    def call(method: str, data: dict) -> dict:
        return json.loads(grpcurl(server.address, f"{SERVICE}/{method}", data=data, token=server.operator_key))

    created = call(
        "CreateApiKey",
        {
            "parent": f"accounts/{account}",
            "api_key": {
                "display_name": "Newsletter sender",
                "scopes": ["messages:send:{example.com}"],
                "labels": {"env": "prod"},
                "rate_limits": [{"limit": "50", "period": "60s"}],
                "expire_time": "2030-01-01T00:00:00Z",
            },
        },
    )
    name, secret = created["api_key"]["name"], created["secret"]
    assert call("GetApiKey", {"name": name})["masked_key"] == created["api_key"]["masked_key"]
    listed = call("ListApiKeys", {"parent": f"accounts/{account}", "filter": 'labels.env = "prod"'})
    assert [k["name"] for k in listed["api_keys"]] == [name] and not listed.get("next_page_token")
    allowed = call("Authorize", {"key": secret, "required_scopes": ["messages:send"], "resource": "example.com"})
    assert allowed["allowed"] is True and allowed["remaining"] == "49"
    updated = call("UpdateApiKey", {"api_key": {"name": name, "description": "weekly"}, "update_mask": {"paths": ["description"]}})
    assert updated["description"] == "weekly"
    rotated = call("RotateApiKey", {"name": name, "grace_period": "3600s"})
    assert rotated["secret"] != secret
    assert call("RevokeApiKey", {"name": name, "reason": "rotated out"})["state"] == "REVOKED"
    assert call("Authorize", {"key": rotated["secret"]})["code"] == "REVOKED"
    assert call("DeleteApiKey", {"name": name}) == {}
    health = json.loads(grpcurl(server.address, "grpc.health.v1.Health/Check"))
    assert health == {"status": "SERVING"}
