"""A wire fuzzer: every method of every service the server hosts, sent bytes an attacker could send.

Hypothesis builds valid messages for each method's request type (with values near the edges: ±2^63
durations, year 1 and 9999, NUL and control characters, forged page tokens, real key names), then sends
them whole, bit-flipped, truncated, spliced with another message, or replaced by random bytes, as raw bytes
over a real channel, once with the operator's key and once with no key. Whatever arrives, the server answers
with a documented status (never UNKNOWN, INTERNAL or UNAVAILABLE while it is healthy), writes no ERROR
line, and still answers afterwards.
"""

import base64
import hashlib
import json
import logging
import time
from typing import Any

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2 as ext
from google.protobuf import descriptor as d
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apikeyd.v1 import api_keys_pb2 as pb
from tests.conftest import RunningServer, create_key

DOCUMENTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.OUT_OF_RANGE,  # WatchApiKeyChanges from a position the server cannot replay from
}
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"]
REFLECTION = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]
SERVICES = [
    pb.DESCRIPTOR.services_by_name["ApiKeyService"],
    ext.DESCRIPTOR.services_by_name["Authorization"],
    HEALTH,
    REFLECTION,
]
METHODS = [(f"/{service.full_name}/{method.name}", method) for service in SERVICES for method in service.methods]
INT64 = 2**63

# Values an attacker reaches for first, mixed into every field of their type.
EDGE_INTS = [0, 1, -1, INT64 - 1, -INT64, 2**31, 2**53 + 1, 10**15]
EDGE_TEXT = [
    "",
    "\x00",
    "a\x00b",
    "\x1b[31m",
    "accounts/",
    "accounts/a\x00",
    "0001-01-01T00:00:00+01:00",
    "9999-12-31T23:59:59-01:00",
    'event_time >= "0001-01-01T00:00:00+01:00"',
    'event_time < "9999-12-31T23:59:59-01:00"',
    'labels.env = "a\x00"',
    'key_id = "\x00"',
    "state = ACTIVE",
    "*",
    "apikeyd.v1.ApiKeyService",
]


def forged_page_token(position: list[Any], kind: str, account: str, filter_text: str = "") -> str:
    """A token as a forger who read the old token format could make: the position they like, with a
    fingerprint computed from public inputs."""
    fingerprint = hashlib.sha256(f"{kind}\n{account}\n{filter_text}".encode()).hexdigest()[:16]
    payload = json.dumps({"p": position, "r": fingerprint}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(payload).decode().rstrip("=")


class Targets:
    """Names that exist on the server under test, so fuzzed requests reach past the name checks."""

    def __init__(self, account: str, key_names: list[str]) -> None:
        self.account = account
        self.now = int(time.time())  # fixed for the run: hypothesis replays must draw the same
        self.parents = [f"accounts/{account}", f"accounts/{account}/apiKeys/-"]
        self.names = key_names
        self.tokens = [
            forged_page_token([INT64], "events", account),
            forged_page_token([INT64 + 5], "events", account),
            forged_page_token([-INT64 - 1], "events", account),
            forged_page_token(["9999-12-31T23:59:59+00:00", "x"], "keys", account),
            forged_page_token(["0001-01-01T00:00:00+01:00", "x"], "keys", account),
            forged_page_token(["x", "9999-12-31T23:59:59+00:00", "0001-01-01T00:00:00+00:00"], "usage", account),
        ]


FILTERS = [text for text in EDGE_TEXT if "=" in text or "<" in text]


REQUIRED = {"name", "parent", "api_key"}  # the fields without which a request stops at its first check


def _plausible_text(field: d.FieldDescriptor, targets: Targets) -> st.SearchStrategy[str]:
    likely = {
        "name": targets.names,
        "parent": targets.parents,
        "filter": ["", "state = ACTIVE"],
        "scopes": ["messages:send:all"],
        "display_name": ["k"],
        "paths": ["display_name", "description", "labels", "expire_time", "rate_limits", "state", "allowed_ip_ranges"],
        "allowed_ip_ranges": ["192.0.2.0/24", "2001:db8::/32", "::ffff:198.51.100.0/120"],
        "client_ip": ["", "192.0.2.1", "::ffff:192.0.2.1", "2001:db8::1"],
    }
    return st.sampled_from(likely.get(field.name, [""]))


def _wild_text(targets: Targets) -> st.SearchStrategy[str]:
    edges = st.sampled_from(EDGE_TEXT + targets.tokens)
    return st.one_of(
        edges, edges, st.text(max_size=40), st.text(alphabet=st.characters(max_codepoint=0x1F), min_size=1, max_size=4)
    )


def _mostly(plausible: st.SearchStrategy[Any], wild: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Two times in three a value that passes the usual checks, so that a request gets far enough for the
    odd wild value among its fields to reach the code behind them."""
    return st.integers(0, 2).flatmap(lambda n: plausible if n else wild)


def _value(field: d.FieldDescriptor, targets: Targets, depth: int) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind == d.FieldDescriptor.TYPE_MESSAGE:
        return _message(field.message_type, targets, depth + 1)
    if kind == d.FieldDescriptor.TYPE_ENUM:
        return st.sampled_from([value.number for value in field.enum_type.values])
    if kind == d.FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == d.FieldDescriptor.TYPE_STRING:
        return _mostly(_plausible_text(field, targets), _wild_text(targets))
    if kind == d.FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=16)
    if kind in (d.FieldDescriptor.TYPE_DOUBLE, d.FieldDescriptor.TYPE_FLOAT):
        return st.floats(width=32 if kind == d.FieldDescriptor.TYPE_FLOAT else 64)
    bits = 32 if kind in (d.FieldDescriptor.TYPE_INT32, d.FieldDescriptor.TYPE_SINT32, d.FieldDescriptor.TYPE_SFIXED32) else 64
    unsigned = kind in (d.FieldDescriptor.TYPE_UINT32, d.FieldDescriptor.TYPE_UINT64, d.FieldDescriptor.TYPE_FIXED32, d.FieldDescriptor.TYPE_FIXED64)
    low, high = (0, 2**bits - 1) if unsigned else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    edges = st.sampled_from([value for value in EDGE_INTS if low <= value <= high])
    if field.name == "nanos":
        plausible = st.just(0)
    elif field.containing_type.full_name == "google.protobuf.Timestamp":
        plausible = st.integers(targets.now + 3600, targets.now + 10**8)  # in the future, as expire_time needs
    else:
        plausible = st.integers(1, 100)
    return _mostly(plausible, st.one_of(edges, edges, st.integers(low, high)))


def _message(descriptor: d.Descriptor, targets: Targets, depth: int = 0) -> st.SearchStrategy[Any]:
    """Messages of `descriptor` with a random subset of fields set; nesting stops after a few levels."""
    cls = message_factory.GetMessageClass(descriptor)
    fields = [] if depth > 3 else list(descriptor.fields)

    @st.composite
    def build(draw: st.DrawFn) -> Any:
        message = cls()
        for field in fields:
            if field.name not in REQUIRED and draw(st.booleans()):
                continue
            try:
                _set(message, field, draw, targets, depth)
            except (TypeError, ValueError):  # a value protobuf itself refuses (e.g. a oneof clash, bad UTF-8)
                continue
        return message

    return build()


def _set(message: Any, field: d.FieldDescriptor, draw: st.DrawFn, targets: Targets, depth: int) -> None:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        key_field, value_field = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
        for _ in range(draw(st.integers(0, 3))):
            key = draw(_value(key_field, targets, depth))
            value = draw(_value(value_field, targets, depth))
            if value_field.message_type is not None:
                getattr(message, field.name)[key].CopyFrom(value)
            else:
                getattr(message, field.name)[key] = value
        return
    if field.is_repeated:
        getattr(message, field.name).extend(draw(st.lists(_value(field, targets, depth), max_size=3)))
        return
    value = draw(_value(field, targets, depth))
    if field.message_type is not None:
        getattr(message, field.name).CopyFrom(value)
    else:
        setattr(message, field.name, value)


@st.composite
def wire_bytes(draw: st.DrawFn, descriptor: d.Descriptor, targets: Targets) -> bytes:
    """A valid message's bytes, then maybe broken: flipped bits, cut short, spliced, or plain noise."""
    data = draw(_message(descriptor, targets)).SerializeToString()
    how = draw(st.sampled_from(["whole"] * 5 + ["flip", "truncate", "splice", "noise"]))
    if how == "flip" and data:
        broken = bytearray(data)
        for _ in range(draw(st.integers(1, 4))):
            position = draw(st.integers(0, len(broken) - 1))
            broken[position] ^= 1 << draw(st.integers(0, 7))
        return bytes(broken)
    if how == "truncate" and data:
        return data[: draw(st.integers(0, len(data) - 1))]
    if how == "splice":
        other = draw(_message(descriptor, targets)).SerializeToString()
        return data[: draw(st.integers(0, len(data)))] + other[draw(st.integers(0, len(other))) :]
    if how == "noise":
        return draw(st.binary(min_size=1, max_size=64))
    return data


def send(
    channel: grpc.Channel, path: str, method: d.MethodDescriptor, data: bytes, metadata: list[tuple[str, str]]
) -> tuple[grpc.StatusCode, str]:
    """One call with raw bytes: its code and details. A stream is read for its first answer only (Watch
    never ends by itself)."""
    timeout = 10
    try:
        if not method.client_streaming and not method.server_streaming:
            channel.unary_unary(path)(data, metadata=metadata, timeout=timeout)
            return grpc.StatusCode.OK, ""
        if method.client_streaming:
            responses = channel.stream_stream(path)(iter([data]), metadata=metadata, timeout=timeout)
        else:
            responses = channel.unary_stream(path)(data, metadata=metadata, timeout=timeout)
        try:
            next(responses, None)
        finally:
            responses.cancel()
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


def test_undecodable_bytes_get_invalid_argument_on_every_method_and_one_warning(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    channel = grpc.insecure_channel(server.address)
    try:
        with caplog.at_level(logging.WARNING):
            for path, method in METHODS:
                for metadata in ([("authorization", f"Bearer {server.operator_key}")], []):
                    for garbage in (b"\xff", b"\x0a\x05ab", b"\x08"):  # a bad tag, a string cut short, no varint
                        code, details = send(channel, path, method, garbage, metadata)
                        assert (code, details) == (
                            grpc.StatusCode.INVALID_ARGUMENT,
                            f"the request is not a valid {method.input_type.full_name}",
                        ), path
    finally:
        channel.close()
    lines = [record for record in caplog.records if record.levelno >= logging.WARNING]
    assert len(lines) == 1 and "undecodable" in lines[0].getMessage(), [line.getMessage() for line in lines]
    assert server.server.wire_errors.refused == len(METHODS) * 6


def test_the_fuzzer_covers_every_service_the_server_hosts(server: RunningServer) -> None:
    stub = channel_reflection(server)
    hosted = {service.name for service in stub.list_services_response.service}
    assert hosted == {service.full_name for service in SERVICES}


def channel_reflection(server: RunningServer) -> Any:
    channel = grpc.insecure_channel(server.address)
    try:
        call = channel.stream_stream(
            f"/{REFLECTION.full_name}/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        return next(call(iter([reflection_pb2.ServerReflectionRequest(list_services="*")]), timeout=10))
    finally:
        channel.close()


FUZZ_SECONDS = 20.0  # per backend, whatever hypothesis would still like to try


def test_wire_fuzz_gets_only_documented_codes_and_no_error_log(server: RunningServer, account: str, caplog: pytest.LogCaptureFixture) -> None:
    names = [create_key(server.stub, account).api_key.name for _ in range(16)]
    targets = Targets(account, names)
    channel = grpc.insecure_channel(server.address)
    callers = {"operator": [("authorization", f"Bearer {server.operator_key}")], "nobody": []}
    started = time.monotonic()
    failures: list[bool] = []

    @settings(
        max_examples=2000,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
    )
    @given(data=st.data())
    def fuzz(data: st.DataObject) -> None:
        # Out of time, new examples pass at once; once one failed, every replay while shrinking runs it whole.
        if time.monotonic() - started > FUZZ_SECONDS and not failures:
            return
        try:
            path, method = data.draw(st.sampled_from(METHODS))
            caller = data.draw(st.sampled_from(["operator", "operator", "nobody"]))
            payload = data.draw(wire_bytes(method.input_type, targets))
            code, _ = send(channel, path, method, payload, callers[caller])
            assert code in DOCUMENTED, f"{path} as {caller} with {payload!r}: {code.name}"
        except BaseException:
            failures.append(True)
            raise

    try:
        with caplog.at_level(logging.WARNING):
            fuzz()
        errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
        assert not errors, f"ERROR lines: {[record.getMessage()[:200] for record in errors[:3]]}"
        health = channel.unary_unary(
            f"/{HEALTH.full_name}/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        server.stub.ListApiKeys(pb.ListApiKeysRequest(parent=f"accounts/{account}"), timeout=10)
    finally:
        channel.close()
