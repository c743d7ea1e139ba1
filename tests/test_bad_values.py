"""Values past what the store or the calendar can hold get INVALID_ARGUMENT naming the field, the same on
SQLite and PostgreSQL, where they used to answer INTERNAL with a traceback (found by tests/test_wire_fuzz.py):
durations near ±2^63, event_time filters that leave years 1-9999 in UTC, forged page tokens, and NUL or
other control characters, which PostgreSQL refuses and SQLite stores."""

from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.timestamp_pb2 import Timestamp

from apikeyd.v1 import api_keys_pb2 as pb
from tests.conftest import RunningServer, create_key, rpc_error
from tests.test_wire_fuzz import forged_page_token

INT64 = 2**63


def _cases(account: str, name: str) -> dict[str, tuple[str, Callable[[Any], Any]]]:
    parent = f"accounts/{account}"

    def update(**fields: Any) -> Callable[[Any], Any]:
        request = pb.UpdateApiKeyRequest(api_key=pb.ApiKey(name=name, **fields), update_mask=FieldMask(paths=list(fields)))
        return lambda stub: stub.UpdateApiKey(request)

    def events(**fields: Any) -> Callable[[Any], Any]:
        return lambda stub: stub.ListAuditEvents(pb.ListAuditEventsRequest(parent=parent, **fields))

    return {
        "grace +2^63": ("grace_period", lambda stub: stub.RotateApiKey(pb.RotateApiKeyRequest(name=name, grace_period=Duration(seconds=INT64 - 1)))),
        "grace -2^63": ("grace_period", lambda stub: stub.RotateApiKey(pb.RotateApiKeyRequest(name=name, grace_period=Duration(seconds=-INT64)))),
        "expire_time past 9999": ("expire_time", update(expire_time=Timestamp(seconds=INT64 - 1))),
        "event_time year 1": ("filter", events(filter='event_time >= "0001-01-01T00:00:00+01:00"')),
        "event_time year 9999": ("filter", events(filter='event_time < "9999-12-31T23:59:59-01:00"')),
        "forged event id 2^63": ("page_token", events(page_token=forged_page_token([INT64], "events", account))),
        "forged key position": ("page_token", lambda stub: stub.ListApiKeys(pb.ListApiKeysRequest(parent=parent, page_token=forged_page_token(["2026-01-01T00:00:00+00:00", "a\x00"], "keys", account)))),
        "NUL in display_name": ("display_name", lambda stub: create_key(stub, account, display_name="a\x00b")),
        "NUL in description": ("description", update(description="a\x00b")),
        "ESC in display_name": ("display_name", update(display_name="\x1b[31mred")),
        "NUL in allowed_ip_ranges": ("allowed_ip_ranges", update(allowed_ip_ranges=["10.0.0.0/8\x00"])),
        "NUL in client_ip": ("client_ip", lambda stub: stub.Authorize(pb.AuthorizeRequest(key="k", client_ip="10.0.0.1\x00"))),
        "NUL in revoke reason": ("reason", lambda stub: stub.RevokeApiKey(pb.RevokeApiKeyRequest(name=name, reason="a\x00b"))),
        "NUL in a label filter": ("filter", lambda stub: stub.ListApiKeys(pb.ListApiKeysRequest(parent=parent, filter='labels.env = "a\x00"'))),
        "NUL in an audit key_id filter": ("filter", events(filter='key_id = "\x00"')),
        "NUL in an audit actor filter": ("filter", events(filter='actor_key_id = "a\x00"')),
    }


CASES = sorted(_cases("a", "n"))


@pytest.mark.parametrize("case", CASES)
def test_a_value_the_store_cannot_hold_gets_invalid_argument_naming_the_field(server: RunningServer, account: str, case: str) -> None:
    name = create_key(server.stub, account).api_key.name
    field, call = _cases(account, name)[case]
    error = rpc_error(lambda: call(server.stub))
    assert (error.code(), error.details().split(":")[0]) == (grpc.StatusCode.INVALID_ARGUMENT, field), error.details()
    assert server.stub.GetApiKey(pb.GetApiKeyRequest(name=name)).state == pb.ApiKey.ACTIVE  # nothing changed
