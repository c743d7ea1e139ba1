"""Every input limit (domain/limits.py, and the field rules it lists) through real channels: at the limit a
request gets its normal answer, one over it INVALID_ARGUMENT naming the field and the limit. Then what
grpc itself refuses (message and metadata size), and the largest allowed requests against health latency."""

import functools
import gc
import threading
import time
import tracemalloc
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from envoy.service.auth.v3 import attribute_context_pb2 as attributes_pb2
from envoy.service.auth.v3 import external_auth_pb2 as ext
from envoy.service.auth.v3 import external_auth_pb2_grpc as ext_grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc

from apikeyd.config import Settings
from apikeyd.domain import limits as L
from apikeyd.domain.errors import InvalidArgument
from apikeyd.domain.listing import Filter
from apikeyd.domain.model import MAX_LIMIT_TIMES_PERIOD
from apikeyd.domain.scopes import parse_required_scopes
from apikeyd.server import App, StartupError
from apikeyd.store.repository import Repository
from apikeyd.v1 import api_keys_pb2 as pb
from apikeyd.v1 import api_keys_pb2_grpc as pb_grpc
from bench.limits import label_filter, largest_requests
from tests.conftest import RunningServer, create_key, rpc_error

Code = grpc.StatusCode
WIDE = "\U0001f600"  # four bytes of UTF-8: the longest strings are the widest


@dataclass
class Target:
    """What a row's request may refer to: a fresh account with one key."""

    account: str
    name: str
    secret: str


def _id(n: int) -> str:
    return "a" * n


def _name(n: int, account: str = "") -> str:
    """A key name of n characters: a valid one (of an unknown key) at L.MAX_NAME_LENGTH."""
    account = account or _id(L.MAX_ID_LENGTH)
    return f"accounts/{account}/apiKeys/{uuid.uuid4()}" + "x" * (n - L.MAX_NAME_LENGTH)


def _key(**fields: Any) -> pb.ApiKey:
    fields.setdefault("display_name", "limits")
    fields.setdefault("scopes", ["messages:send"])
    return pb.ApiKey(**fields)


def _usage(target: Target | None = None, **fields: Any) -> pb.ListApiKeyUsageRequest:
    """A day of an account's usage; `parent` or the target's account."""
    if target is not None:
        fields.setdefault("parent", f"accounts/{target.account}/apiKeys/-")
    return pb.ListApiKeyUsageRequest(granularity=pb.DAY, start_time=Timestamp(seconds=int(time.time()) - 86400), **fields)


def _labels(count: int) -> dict[str, str]:
    return {f"k{i}": "v" for i in range(count)}


# (row id, method, request for a size n, the limit, the field the error names, what the limit answers)
Row = tuple[str, str, Callable[[Target, int], Any], int, str, set[Code]]
OK, NOT_FOUND, ABORTED, INVALID = Code.OK, Code.NOT_FOUND, Code.ABORTED, Code.INVALID_ARGUMENT

ROWS: list[Row] = [
    ("create.parent", "CreateApiKey", lambda t, n: pb.CreateApiKeyRequest(parent=f"accounts/{_id(n - 9)}", api_key=_key()),
     L.MAX_PARENT_LENGTH, "parent", {OK}),
    ("create.request_id", "CreateApiKey",
     lambda t, n: pb.CreateApiKeyRequest(parent=f"accounts/{t.account}", api_key=_key(), request_id=str(uuid.uuid4()) + "x" * (n - 36)),
     L.MAX_REQUEST_ID_LENGTH, "request_id", {OK}),
    ("create.project_id", "CreateApiKey",
     lambda t, n: pb.CreateApiKeyRequest(parent=f"accounts/{t.account}", api_key=_key(project_id=_id(n))),
     L.MAX_PROJECT_ID_LENGTH, "project_id", {OK}),
    ("create.display_name", "CreateApiKey",
     lambda t, n: pb.CreateApiKeyRequest(parent=f"accounts/{t.account}", api_key=_key(display_name=WIDE * n)),
     255, "display_name", {OK}),
    ("create.description", "CreateApiKey",
     lambda t, n: pb.CreateApiKeyRequest(parent=f"accounts/{t.account}", api_key=_key(description=WIDE * n)),
     1024, "description", {OK}),
    ("create.scopes", "CreateApiKey",
     lambda t, n: pb.CreateApiKeyRequest(parent=f"accounts/{t.account}", api_key=_key(scopes=[f"s{i}:read" for i in range(n)])),
     L.MAX_SCOPES, "scopes", {OK}),
    ("create.scope_length", "CreateApiKey",
     lambda t, n: pb.CreateApiKeyRequest(parent=f"accounts/{t.account}", api_key=_key(scopes=["m:s:{" + WIDE * (n - 6) + "}"])),
     L.MAX_SCOPE_LENGTH, "scopes", {OK, INVALID}),  # 320 characters hold no valid qualifier: refused by shape
    ("create.labels", "CreateApiKey",
     lambda t, n: pb.CreateApiKeyRequest(parent=f"accounts/{t.account}", api_key=_key(labels=_labels(n))),
     L.MAX_LABELS, "labels", {OK}),
    ("create.label_key", "CreateApiKey",
     lambda t, n: pb.CreateApiKeyRequest(parent=f"accounts/{t.account}", api_key=_key(labels={"k" * n: "v"})),
     L.MAX_LABEL_VALUE, "labels", {OK}),
    ("create.label_value", "CreateApiKey",
     lambda t, n: pb.CreateApiKeyRequest(parent=f"accounts/{t.account}", api_key=_key(labels={"k": "v" * n})),
     L.MAX_LABEL_VALUE, "labels", {OK}),
    ("create.rate_limits", "CreateApiKey",
     lambda t, n: pb.CreateApiKeyRequest(
         parent=f"accounts/{t.account}",
         api_key=_key(rate_limits=[pb.RateLimit(limit=10, period=Duration(seconds=i + 1)) for i in range(n)]),
     ),
     L.MAX_RATE_LIMITS, "rate_limits", {OK}),
    ("create.allowed_ip_ranges", "CreateApiKey",
     lambda t, n: pb.CreateApiKeyRequest(
         parent=f"accounts/{t.account}", api_key=_key(allowed_ip_ranges=[f"10.0.{i // 256}.{i % 256}/32" for i in range(n)])
     ),
     L.MAX_IP_RANGES, "allowed_ip_ranges", {OK}),
    ("create.ip_range_length", "CreateApiKey",
     lambda t, n: pb.CreateApiKeyRequest(parent=f"accounts/{t.account}", api_key=_key(allowed_ip_ranges=["1" * n])),
     L.MAX_IP_LENGTH, "allowed_ip_ranges", {INVALID}),  # no range is that long: refused as no range
    ("get.name", "GetApiKey", lambda t, n: pb.GetApiKeyRequest(name=_name(n)), L.MAX_NAME_LENGTH, "name", {NOT_FOUND}),
    ("list.parent", "ListApiKeys", lambda t, n: pb.ListApiKeysRequest(parent=f"accounts/{_id(n - 9)}"),
     L.MAX_PARENT_LENGTH, "parent", {OK}),
    ("list.filter_length", "ListApiKeys",
     lambda t, n: pb.ListApiKeysRequest(parent=f"accounts/{t.account}", filter="state = ACTIVE".ljust(n)),
     L.MAX_FILTER_LENGTH, "filter", {OK}),
    ("list.filter_terms", "ListApiKeys",
     lambda t, n: pb.ListApiKeysRequest(parent=f"accounts/{t.account}", filter=label_filter(n)),
     L.MAX_FILTER_TERMS, "filter", {OK}),
    ("list.filter_value", "ListApiKeys",
     lambda t, n: pb.ListApiKeysRequest(parent=f"accounts/{t.account}", filter=f'labels.k = "{"v" * n}"'),
     L.MAX_FILTER_VALUE_LENGTH, "filter", {OK}),
    ("list.page_token", "ListApiKeys",
     lambda t, n: pb.ListApiKeysRequest(parent=f"accounts/{t.account}", page_token="t" * n),
     L.MAX_PAGE_TOKEN_LENGTH, "page_token", {INVALID}),  # not a token: refused as such, not for its size
    ("update.name", "UpdateApiKey",
     lambda t, n: pb.UpdateApiKeyRequest(api_key=pb.ApiKey(name=_name(n), display_name="x")),
     L.MAX_NAME_LENGTH, "api_key.name", {NOT_FOUND}),
    ("update.etag", "UpdateApiKey",
     lambda t, n: pb.UpdateApiKeyRequest(api_key=pb.ApiKey(name=t.name, display_name="x", etag="r" * n)),
     L.MAX_ETAG_LENGTH, "etag", {ABORTED}),
    ("update.mask_paths", "UpdateApiKey",
     lambda t, n: pb.UpdateApiKeyRequest(
         api_key=pb.ApiKey(name=t.name, display_name="x"), update_mask=FieldMask(paths=["display_name"] * n)
     ),
     L.MAX_UPDATE_MASK_PATHS, "update_mask.paths", {OK}),
    ("update.mask_path_length", "UpdateApiKey",
     lambda t, n: pb.UpdateApiKeyRequest(api_key=pb.ApiKey(name=t.name), update_mask=FieldMask(paths=["p" * n])),
     L.MAX_UPDATE_MASK_PATH_LENGTH, "update_mask.paths", {INVALID}),  # no such field: refused as such
    ("update.scopes", "UpdateApiKey",
     lambda t, n: pb.UpdateApiKeyRequest(
         api_key=pb.ApiKey(name=t.name, scopes=[f"s{i}:read" for i in range(n)]), update_mask=FieldMask(paths=["scopes"])
     ),
     L.MAX_SCOPES, "scopes", {OK}),
    ("revoke.name", "RevokeApiKey", lambda t, n: pb.RevokeApiKeyRequest(name=_name(n)), L.MAX_NAME_LENGTH, "name", {NOT_FOUND}),
    ("revoke.reason", "RevokeApiKey", lambda t, n: pb.RevokeApiKeyRequest(name=t.name, reason=WIDE * n), 1024, "reason", {OK}),
    ("revoke.etag", "RevokeApiKey", lambda t, n: pb.RevokeApiKeyRequest(name=t.name, etag="r" * n),
     L.MAX_ETAG_LENGTH, "etag", {ABORTED}),
    ("delete.name", "DeleteApiKey", lambda t, n: pb.DeleteApiKeyRequest(name=_name(n)), L.MAX_NAME_LENGTH, "name", {NOT_FOUND}),
    ("delete.etag", "DeleteApiKey", lambda t, n: pb.DeleteApiKeyRequest(name=t.name, etag="r" * n),
     L.MAX_ETAG_LENGTH, "etag", {ABORTED}),
    ("rotate.name", "RotateApiKey", lambda t, n: pb.RotateApiKeyRequest(name=_name(n)), L.MAX_NAME_LENGTH, "name", {NOT_FOUND}),
    ("rotate.etag", "RotateApiKey", lambda t, n: pb.RotateApiKeyRequest(name=t.name, etag="r" * n),
     L.MAX_ETAG_LENGTH, "etag", {ABORTED}),
    ("rotate.request_id", "RotateApiKey",
     lambda t, n: pb.RotateApiKeyRequest(name=t.name, request_id=str(uuid.uuid4()) + "x" * (n - 36)),
     L.MAX_REQUEST_ID_LENGTH, "request_id", {OK}),
    ("rotate.grace_period", "RotateApiKey",
     lambda t, n: pb.RotateApiKeyRequest(name=t.name, grace_period=Duration(seconds=n)), 7 * 86_400, "grace_period", {OK}),
    ("audit.parent", "ListAuditEvents", lambda t, n: pb.ListAuditEventsRequest(parent=f"accounts/{_id(n - 9)}"),
     L.MAX_PARENT_LENGTH, "parent", {OK}),
    ("audit.filter_length", "ListAuditEvents",
     lambda t, n: pb.ListAuditEventsRequest(parent=f"accounts/{t.account}", filter="kind = CREATED".ljust(n)),
     L.MAX_FILTER_LENGTH, "filter", {OK}),
    ("audit.filter_value", "ListAuditEvents",
     lambda t, n: pb.ListAuditEventsRequest(parent=f"accounts/{t.account}", filter=f'key_id = "{"k" * n}"'),
     L.MAX_FILTER_VALUE_LENGTH, "filter", {OK}),
    ("audit.page_token", "ListAuditEvents",
     lambda t, n: pb.ListAuditEventsRequest(parent=f"accounts/{t.account}", page_token="t" * n),
     L.MAX_PAGE_TOKEN_LENGTH, "page_token", {INVALID}),
    ("usage.parent", "ListApiKeyUsage", lambda t, n: _usage(parent=_name(n)), L.MAX_NAME_LENGTH, "parent", {OK}),
    ("usage.key_ids", "ListApiKeyUsage", lambda t, n: _usage(t, key_ids=[str(uuid.uuid4()) for _ in range(n)]),
     L.MAX_USAGE_KEY_IDS, "key_ids", {OK}),
    ("usage.key_id_length", "ListApiKeyUsage", lambda t, n: _usage(t, key_ids=["k" * n]),
     L.MAX_KEY_ID_LENGTH, "key_ids", {INVALID}),  # 36 characters that are no UUID: refused by shape
    ("usage.page_token", "ListApiKeyUsage", lambda t, n: _usage(t, page_token="t" * n),
     L.MAX_PAGE_TOKEN_LENGTH, "page_token", {INVALID}),
    ("authorize.key", "Authorize", lambda t, n: pb.AuthorizeRequest(key="k" * n), L.MAX_KEY_LENGTH, "key", {OK}),
    ("authorize.required_scopes", "Authorize",
     lambda t, n: pb.AuthorizeRequest(key=t.secret, required_scopes=[f"s{i}:read" for i in range(n)]),
     L.MAX_REQUIRED_SCOPES, "required_scopes", {OK}),
    ("authorize.required_scope_length", "Authorize",
     lambda t, n: pb.AuthorizeRequest(key=t.secret, required_scopes=["s:" + "r" * (n - 2)]),
     L.MAX_REQUIRED_SCOPE_LENGTH, "required_scopes", {OK}),
    ("authorize.resource", "Authorize", lambda t, n: pb.AuthorizeRequest(key=t.secret, resource=WIDE * n),
     L.MAX_RESOURCE_LENGTH, "resource", {OK}),
    ("authorize.project_id", "Authorize", lambda t, n: pb.AuthorizeRequest(key=t.secret, project_id=_id(n)),
     L.MAX_PROJECT_ID_LENGTH, "project_id", {OK}),
    ("authorize.client_ip", "Authorize", lambda t, n: pb.AuthorizeRequest(key=t.secret, client_ip="1" * n),
     L.MAX_IP_LENGTH, "client_ip", {INVALID}),  # no address is that long: refused as no address
]


SHOWN = {"rotate.grace_period": "7 days"}  # how a message states a limit, where not as the number


@pytest.fixture
def target(server: RunningServer, account: str) -> Target:
    created = create_key(server.stub, account, scopes=("messages:send:all",))
    return Target(account, created.api_key.name, created.secret)


def _outcome(call: Callable[[], Any]) -> tuple[Code, str]:
    try:
        call()
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return Code.OK, ""


@pytest.mark.parametrize("row", ROWS, ids=[row[0] for row in ROWS])
def test_at_the_limit_a_normal_answer_one_over_invalid_argument_naming_field_and_limit(server, target, row):
    _, method, build, limit, field, at_limit = row
    call = getattr(server.stub, method)
    code, details = _outcome(lambda: call(build(target, limit)))
    assert code in at_limit, f"at the limit: {code.name} {details}"
    if code is INVALID:
        assert f"at most {limit}" not in details, details  # refused for another reason than its size
    code, details = _outcome(lambda: call(build(target, limit + 1)))
    assert code is INVALID, f"one over: {code.name} {details}"
    assert field.split(".")[-1] in details and SHOWN.get(row[0], str(limit)) in details, details


# --- metadata -------------------------------------------------------------------------------------


def _get_with(server: RunningServer, metadata: list[tuple[str, str]]) -> tuple[Code, str]:
    stub = pb_grpc.ApiKeyServiceStub(server.channel)
    request = pb.GetApiKeyRequest(name=_name(L.MAX_NAME_LENGTH))
    return _outcome(lambda: stub.GetApiKey(request, metadata=metadata))


def test_metadata_limits_answer_invalid_argument_below_grpcs_own(server):
    bearer = [("authorization", f"Bearer {server.operator_key}")]
    over_key = "Bearer " + "k" * (L.MAX_KEY_LENGTH + 1)
    assert _get_with(server, [("authorization", over_key[:-1])])[0] is Code.UNAUTHENTICATED
    code, details = _get_with(server, [("authorization", over_key)])
    assert code is INVALID and "authorization" in details and str(L.MAX_AUTHORIZATION_LENGTH) in details
    assert _get_with(server, [*bearer, ("x-request-id", "r" * L.MAX_X_REQUEST_ID_LENGTH)])[0] is NOT_FOUND
    code, details = _get_with(server, [*bearer, ("x-request-id", "r" * (L.MAX_X_REQUEST_ID_LENGTH + 1))])
    assert code is INVALID and "x-request-id" in details and str(L.MAX_X_REQUEST_ID_LENGTH) in details
    # The total counts every entry, user-agent included; a kilobyte below the limit leaves room for them.
    assert _get_with(server, [*bearer, ("x-pad", "p" * (L.MAX_METADATA_BYTES - 1024))])[0] is NOT_FOUND
    code, details = _get_with(server, [*bearer, ("x-pad", "p" * L.MAX_METADATA_BYTES)])
    assert code is INVALID and "metadata" in details and str(L.MAX_METADATA_BYTES) in details
    # Beyond grpc's own limit grpc answers before apikeyd can: RESOURCE_EXHAUSTED, as README says.
    assert _get_with(server, [*bearer, ("x-pad", "p" * L.GRPC_METADATA_BYTES)])[0] is Code.RESOURCE_EXHAUSTED


# --- message size ---------------------------------------------------------------------------------


def _largest_valid_create(account: str) -> pb.CreateApiKeyRequest:
    """The largest CreateApiKey the field rules allow: four-byte characters wherever they are allowed."""
    scope_head = "r%02d:" + "a" * (L.MAX_SCOPE_LENGTH - 4 - 255 - 3 - 1) + ":{"
    return pb.CreateApiKeyRequest(
        parent=f"accounts/{account}",
        request_id=str(uuid.uuid4()),
        api_key=pb.ApiKey(
            display_name=WIDE * 255,
            description=WIDE * 1024,
            scopes=[scope_head % i + WIDE * 255 + "}" for i in range(L.MAX_SCOPES)],
            labels={f"k{i:02d}" + "x" * 60: "v" * L.MAX_LABEL_VALUE for i in range(L.MAX_LABELS)},
            project_id=_id(L.MAX_PROJECT_ID_LENGTH),
            rate_limits=[
                pb.RateLimit(limit=MAX_LIMIT_TIMES_PERIOD // (i + 1), period=Duration(seconds=i + 1))
                for i in range(L.MAX_RATE_LIMITS)
            ],
        ),
    )


def test_the_largest_valid_request_fits_and_a_larger_message_is_refused_by_grpc(server, account):
    largest = _largest_valid_create(account)
    assert largest.ByteSize() <= L.DEFAULT_MAX_REQUEST_BYTES
    assert server.stub.CreateApiKey(largest).api_key.project_id == largest.api_key.project_id
    too_big = pb.AuthorizeRequest(key="k", resource="r" * L.DEFAULT_MAX_REQUEST_BYTES)
    error = rpc_error(lambda: server.stub.Authorize(too_big))
    assert error.code() is Code.RESOURCE_EXHAUSTED  # grpc's answer, before apikeyd sees the call


def test_the_request_size_is_a_setting_with_a_floor(make_server, database_url):
    server = make_server(max_request_bytes=L.MIN_MAX_REQUEST_BYTES)
    request = pb.AuthorizeRequest(key="k", resource="r" * 500)
    assert server.stub.Authorize(request).code == pb.AuthorizeResponse.MALFORMED
    padded = pb.AuthorizeRequest(key="k", required_scopes=["a:b"] * (L.MIN_MAX_REQUEST_BYTES // 4))
    assert rpc_error(lambda: server.stub.Authorize(padded)).code() is Code.RESOURCE_EXHAUSTED
    with pytest.raises(StartupError, match="APIKEYD_MAX_REQUEST_BYTES"):
        App(Settings.load(environ={}, database_url=database_url, max_request_bytes=1024))


# --- Envoy's Check --------------------------------------------------------------------------------


def _check_request(extensions: dict[str, str], headers: dict[str, str]) -> ext.CheckRequest:
    http = attributes_pb2.AttributeContext.HttpRequest(headers=headers)
    return ext.CheckRequest(
        attributes=attributes_pb2.AttributeContext(
            request=attributes_pb2.AttributeContext.Request(http=http), context_extensions=extensions
        )
    )


def _scope_list(count: int, width: int = 0) -> str:
    return ",".join(f"s{i}:r" + "r" * width for i in range(count))


# (row id, extensions and headers for a size n, the limit, the field named, answer at the limit as
# (gRPC code, HTTP status), answer one over)
CHECK_ROWS: list[tuple[str, Callable[[Target, int], tuple[dict[str, str], dict[str, str]]], int, str, tuple[Code, int], tuple[Code, int]]] = [
    ("context_extensions", lambda t, n: ({f"k{i}": "v" for i in range(n)}, {}), L.MAX_CONTEXT_EXTENSIONS,
     "context_extensions", (OK, 500), (INVALID, 0)),
    ("context_extension_key", lambda t, n: ({"k" * n: "v"}, {}), L.MAX_CONTEXT_EXTENSION_KEY_LENGTH,
     "context_extensions", (OK, 500), (INVALID, 0)),
    ("context_extension_value", lambda t, n: ({"required_scopes": _scope_list(64, 10).ljust(n, ",")}, {}),
     L.MAX_CONTEXT_EXTENSION_VALUE_LENGTH, "context_extensions", (OK, 401), (INVALID, 0)),
    ("route_required_scopes", lambda t, n: ({"required_scopes": _scope_list(n)}, {}), L.MAX_REQUIRED_SCOPES,
     "required_scopes", (OK, 401), (OK, 500)),
    ("route_resource", lambda t, n: ({"resource": "r" * n}, {}), L.MAX_RESOURCE_LENGTH, "resource", (OK, 401), (OK, 500)),
    ("bearer_key", lambda t, n: ({}, {"authorization": "Bearer " + "k" * n}), L.MAX_KEY_LENGTH, "authorization",
     (OK, 401), (OK, 400)),
    ("x_api_key", lambda t, n: ({}, {"x-api-key": "k" * n}), L.MAX_KEY_LENGTH, "x-api-key", (OK, 401), (OK, 400)),
    ("x_project_id", lambda t, n: ({}, {"x-api-key": t.secret, "x-project-id": _id(n)}), L.MAX_PROJECT_ID_LENGTH,
     "x-project-id", (OK, 200), (OK, 400)),
    ("resource_header", lambda t, n: ({"resource_header": "x-res"}, {"x-api-key": t.secret, "x-res": "r" * n}),
     L.MAX_RESOURCE_LENGTH, "x-res", (OK, 200), (OK, 400)),
]


def _check_outcome(server: RunningServer, request: ext.CheckRequest) -> tuple[Code, int, str]:
    stub = ext_grpc.AuthorizationStub(server.channel)
    try:
        response = stub.Check(request)
    except grpc.RpcError as error:
        return error.code(), 0, error.details() or ""
    if response.WhichOneof("http_response") == "denied_response":
        return OK, response.denied_response.status.code, response.denied_response.body
    return OK, 200, ""


@pytest.mark.parametrize("row", CHECK_ROWS, ids=[row[0] for row in CHECK_ROWS])
def test_envoy_check_limits(server, target, row):
    """The proxy's own over-limit input is its gRPC INVALID_ARGUMENT (Envoy then applies status_on_error: it
    fails closed); a route over a limit is a misconfigured route (500), and a client's header over one is that
    client's 400 with the limit in the body, as Envoy passes it on."""
    _, build, limit, field, at_limit, over = row
    code, status, text = _check_outcome(server, _check_request(*build(target, limit)))
    assert (code, status) == at_limit, text
    assert f"at most {limit}" not in text
    code, status, text = _check_outcome(server, _check_request(*build(target, limit + 1)))
    assert (code, status) == over, text
    assert field in text and f"at most {limit}" in text, text


# --- the largest allowed requests do not stall anyone ----------------------------------------------


HEALTH_BOUND = 0.25  # seconds: generous on a busy 2-core machine; `make bench` gives the ratio to idle


def test_the_largest_allowed_requests_do_not_stall_health(server, target):
    stub = server.stub
    requests = largest_requests(target.secret, target.account, target.name)
    health = health_pb2_grpc.HealthStub(server.channel)
    stop = threading.Event()
    answered: list[Code] = []

    def send() -> None:
        while not stop.is_set():
            for method, request in requests:
                answered.append(_outcome(functools.partial(getattr(stub, method), request, timeout=30))[0])

    senders = [threading.Thread(target=send) for _ in range(4)]
    # The server shares this process's heap with everything the suite made before this test; a full
    # collection of that (seen: a 705 ms pause late in a full run) is the suite's, not the server's.
    gc.collect()
    gc.freeze()
    for sender in senders:
        sender.start()
    latencies = []
    try:
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline:
            started = time.perf_counter()
            health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            latencies.append(time.perf_counter() - started)
            time.sleep(0.005)
    finally:
        stop.set()
        for sender in senders:
            sender.join(timeout=60)
        gc.unfreeze()
    assert len(answered) >= len(requests), "the senders did not get through one round"
    assert max(latencies) < HEALTH_BOUND, f"health took up to {max(latencies) * 1000:.0f} ms under load"
    assert set(answered) <= {OK, INVALID, Code.RESOURCE_EXHAUSTED, ABORTED}, set(answered)


# --- what the limits guard below the servicers -----------------------------------------------------


def test_a_statement_too_large_for_the_database_is_the_requests_fault_not_unavailable(database_url):
    """Past the filter limits, SQLite refuses the statement ("Expression tree is too large"): that is
    INVALID_ARGUMENT, never UNAVAILABLE ("retry later")."""
    if not database_url.startswith("sqlite"):
        pytest.skip("PostgreSQL runs such a filter; only libpq's cap of 65,535 parameters refuses one, at "
                    "32,768 terms, which SQLAlchemy takes 40 s to compile")
    repository = Repository.from_url(database_url)
    try:
        huge = Filter(labels=tuple((f"k{i}", "v") for i in range(1500)))
        with pytest.raises(InvalidArgument, match="too large"):
            repository.list_keys("acct", huge, 50, None)
    finally:
        repository.close()


def test_the_scope_memo_caches_stay_small_whatever_lists_callers_send():
    """Distinct lists at the largest allowed size: before, each stayed in a 4096-entry cache (~40 KB each)."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(1500):
            parse_required_scopes(tuple(f"s{n}x{i}:" + "r" * (L.MAX_REQUIRED_SCOPE_LENGTH - 12) for i in range(L.MAX_REQUIRED_SCOPES)))
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 16 * 1024 * 1024, f"the caches grew by {grown / 2**20:.0f} MiB"


def test_calls_at_once_are_bounded_so_open_watch_streams_cannot_pile_up(make_server, database_url):
    """Anyone may open health Watch streams and keep them open; past APIKEYD_MAX_CONCURRENT_RPCS grpc refuses
    further calls instead of keeping state for every one, and serves again once they are gone."""
    server = make_server(max_concurrent_rpcs=L.MIN_CONCURRENT_RPCS, max_change_streams=0)  # which grpc's bound adds
    health = health_pb2_grpc.HealthStub(server.channel)
    watches = [health.Watch(health_pb2.HealthCheckRequest(service="")) for _ in range(L.MIN_CONCURRENT_RPCS)]
    try:
        for watch in watches:
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING  # each one is being served
        refused = rpc_error(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=10))
        assert refused.code() is Code.RESOURCE_EXHAUSTED
    finally:
        for watch in watches:
            watch.cancel()
    deadline = time.monotonic() + 30
    while True:  # grpc frees the cancelled calls' slots as it notices them
        try:
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
            break
        except grpc.RpcError as error:
            assert error.code() is Code.RESOURCE_EXHAUSTED and time.monotonic() < deadline, error
            time.sleep(0.05)
    with pytest.raises(StartupError, match="APIKEYD_MAX_CONCURRENT_RPCS"):
        App(Settings.load(environ={}, database_url=database_url, max_concurrent_rpcs=L.MIN_CONCURRENT_RPCS - 1))
