"""OpenTelemetry traces (apikeyd.tracing): a real server traced into the SDK's in-memory exporter, called over
real channels and sockets, and a server with tracing off that never imports the tracing packages."""

import json
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from apikeyd import tracing
from apikeyd.app import StartupError
from apikeyd.config import Settings
from apikeyd.v1 import api_keys_pb2 as pb
from tests.conftest import ISSUED_HASHES, ISSUED_SECRETS, RunningServer, authorize, create_key, leaked_secrets, wait_for
from tests.test_change_stream import Watch
from tests.test_envoy import check_request
from tests.test_ext_authz_http import ANY, ask

AUTHORIZE = "/apikeyd.v1.ApiKeyService/Authorize"
CHECK = "/envoy.service.auth.v3.Authorization/Check"
CALLER_TRACE = 0x4BF92F3577B34DA6A3CE929D0E0E4736
CALLER_SPAN = 0x00F067AA0BA902B7


def traceparent(trace_id: int = CALLER_TRACE, span_id: int = CALLER_SPAN) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-01"


class Traced:
    """A server traced into memory, and its spans."""

    def __init__(self, server: RunningServer, exporter: InMemorySpanExporter) -> None:
        self.server = server
        self.exporter = exporter

    def spans(self, name: str) -> list[ReadableSpan]:
        return [span for span in self.exporter.get_finished_spans() if span.name == name]

    def span(self, name: str) -> ReadableSpan:
        """The one span of that name ended since the last clear(), waited for: grpc may answer the client
        before the interceptor's span has ended."""
        return wait_for(lambda: (found := self.spans(name)) and found[-1], f"a span {name}")


@pytest.fixture
def traced(database_url: str) -> Iterator[Traced]:
    exporter = InMemorySpanExporter()
    server = RunningServer(Settings.load(environ={}, database_url=database_url), span_processor=SimpleSpanProcessor(exporter))
    try:
        yield Traced(server, exporter)
    finally:
        server.stop()
    # As conftest checks every log line: nothing a span carries (attributes, events, links, status, resource)
    # gives away a key string or a hash the suite saw.
    exported = "\n".join(span.to_json() for span in exporter.get_finished_spans())
    assert exported, "no span was exported: the check below would pass for nothing"
    assert not leaked_secrets(exported, ISSUED_SECRETS, ISSUED_HASHES), "a secret in an exported span"


def test_a_span_per_authorize_with_the_callers_parent_the_decision_and_the_key_name(traced, account):
    stub = traced.server.stub
    created = create_key(stub, account)
    traced.exporter.clear()
    reply = stub.Authorize(
        pb.AuthorizeRequest(key=created.secret, required_scopes=["messages:send"]),
        metadata=[("traceparent", traceparent())],
    )
    assert reply.allowed
    span = traced.span(AUTHORIZE)
    assert span.context.trace_id == CALLER_TRACE
    assert span.parent is not None and span.parent.span_id == CALLER_SPAN and span.parent.is_remote
    assert span.kind.name == "SERVER"
    assert span.attributes[tracing.DECISION_CODE] == "OK"
    assert span.attributes[tracing.KEY_NAME] == created.api_key.name
    assert span.attributes["rpc.method"] == "Authorize"


def test_a_denial_names_its_code_and_the_key_only_when_one_was_found(traced, account):
    stub = traced.server.stub
    created = create_key(stub, account)
    traced.exporter.clear()
    assert authorize(stub, created.secret, "billing:write").code == pb.AuthorizeResponse.INSUFFICIENT_SCOPE
    span = traced.span(AUTHORIZE)
    assert span.attributes[tracing.DECISION_CODE] == "INSUFFICIENT_SCOPE"
    assert span.attributes[tracing.KEY_NAME] == created.api_key.name
    traced.exporter.clear()
    assert authorize(stub, "not a key").code == pb.AuthorizeResponse.MALFORMED
    span = traced.span(AUTHORIZE)
    assert span.attributes[tracing.DECISION_CODE] == "MALFORMED"
    assert tracing.KEY_NAME not in span.attributes
    assert span.parent is None  # no traceparent: a trace of its own


def test_management_calls_are_spans_with_their_status_code(traced, account):
    stub = traced.server.stub
    create_key(stub, account)  # its response carries the secret; the fixture checks no span does
    assert traced.span("/apikeyd.v1.ApiKeyService/CreateApiKey").status.is_ok
    with pytest.raises(grpc.RpcError):
        stub.GetApiKey(pb.GetApiKeyRequest(name=f"accounts/{account}/apiKeys/{uuid.uuid4()}"))
    span = traced.span("/apikeyd.v1.ApiKeyService/GetApiKey")
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    # OpenTelemetry's gRPC conventions: a caller's mistake is not the server's error, so the status stays unset.
    assert span.status.status_code.name == "UNSET"


def test_streams_and_health_are_served_but_not_traced(traced, account):
    """The instrumentation's stream wrapper would break WatchApiKeyChanges (it writes, it does not yield),
    and a span per probe is noise: both are left out, and still work under the interceptor."""
    watch = Watch(traced.server.stub)
    try:
        watch.until(lambda response: True)  # the stream's first message: it is served
    finally:
        watch.close()
    health = health_pb2_grpc.HealthStub(traced.server.channel)
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    create_key(traced.server.stub, account)
    traced.span("/apikeyd.v1.ApiKeyService/CreateApiKey")  # spans are exported, and none of those two
    names = {span.name for span in traced.exporter.get_finished_spans()}
    assert not {"/apikeyd.v1.ApiKeyService/WatchApiKeyChanges", "/grpc.health.v1.Health/Check"} & names


def test_envoys_grpc_check_takes_envoys_parent_and_links_the_checked_requests_trace(traced, account):
    created = create_key(traced.server.stub, account)
    client_trace = 0x0AF7651916CD43DD8448EB211C80319C
    check = external_auth_pb2_grpc.AuthorizationStub(traced.server.channel).Check
    traced.exporter.clear()
    response = check(
        check_request({"x-api-key": created.secret, "traceparent": traceparent(client_trace, 0xB7AD6B7169203331)}),
        metadata=[("traceparent", traceparent())],  # Envoy's own span, when Envoy traces
    )
    assert response.status.code == 0
    span = traced.span(CHECK)
    assert span.context.trace_id == CALLER_TRACE and span.parent is not None
    assert span.parent.span_id == CALLER_SPAN
    assert [(link.context.trace_id, link.context.span_id) for link in span.links] == [(client_trace, 0xB7AD6B7169203331)]
    assert span.attributes[tracing.DECISION_CODE] == "OK"
    assert span.attributes[tracing.KEY_NAME] == created.api_key.name


def test_an_http_check_is_a_span_under_the_check_requests_traceparent(traced, account):
    created = create_key(traced.server.stub, account)
    traced.exporter.clear()
    answer = ask(traced.server, ANY, ("x-api-key", created.secret), ("traceparent", traceparent()))
    assert answer.status == 200
    span = traced.span(tracing.HTTP_CHECK_SPAN)
    assert span.context.trace_id == CALLER_TRACE and span.parent is not None
    assert span.parent.span_id == CALLER_SPAN
    assert span.attributes[tracing.DECISION_CODE] == "OK"
    assert span.attributes[tracing.KEY_NAME] == created.api_key.name
    assert span.attributes["http.response.status_code"] == 200
    assert span.start_time is not None and span.end_time is not None and span.start_time <= span.end_time
    answer = ask(traced.server, ANY)
    assert answer.status == 401
    assert traced.spans(tracing.HTTP_CHECK_SPAN)[-1].attributes[tracing.DECISION_CODE] == "MISSING_CREDENTIAL"


def test_tracing_off_is_the_default_and_an_unknown_mode_is_refused():
    assert Settings().tracing == "off"
    assert tracing.from_settings(Settings()) is None
    with pytest.raises(StartupError, match="APIKEYD_TRACING='jaeger' must be one of off, otlp"):
        tracing.from_settings(Settings(tracing="jaeger"))


# Run in a fresh interpreter: OpenTelemetry cannot be imported, as when the tracing extra is not installed.
_WITHOUT_OPENTELEMETRY = textwrap.dedent(
    """
    import importlib.abc, sys
    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "opentelemetry":
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    sys.meta_path.insert(0, Blocker())
    """
)


def test_a_server_without_opentelemetry_serves_with_tracing_off_and_names_the_extra_when_on(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_OPENTELEMETRY + textwrap.dedent(
            f"""
            import asyncio, json
            import grpc
            from apikeyd.app import App, StartupError
            from apikeyd.config import Settings
            from apikeyd.server import Server, prepare_database
            from apikeyd.v1 import api_keys_pb2 as pb, api_keys_pb2_grpc as pb_grpc

            async def main():
                settings = Settings.load(
                    environ={{}}, database_url="sqlite:///{tmp_path / 'db'}", metrics_listen="", ext_authz_listen=""
                )
                app = App(settings)
                prepare_database(app.repository.engine)
                server = Server(app)
                port = await server.start("127.0.0.1:0")
                async with grpc.aio.insecure_channel(f"127.0.0.1:{{port}}") as channel:
                    reply = await pb_grpc.ApiKeyServiceStub(channel).Authorize(pb.AuthorizeRequest(key="not a key"))
                await server.stop(0)
                try:
                    Server(App(Settings.load(environ={{}}, database_url=settings.database_url, tracing="otlp")))
                except StartupError as error:
                    refused = str(error)
                print(json.dumps({{"code": reply.code, "refused": refused}}))

            asyncio.run(main())
            """
        )],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout.splitlines()[-1])
    assert outcome["code"] == pb.AuthorizeResponse.MALFORMED
    assert "APIKEYD_TRACING=otlp needs OpenTelemetry" in outcome["refused"]
    assert "pip install 'apikeyd[server,tracing]'" in outcome["refused"]


def test_tracing_off_imports_none_of_the_tracing_packages():
    """With the extra installed, a fresh interpreter's server code and tracing off import neither the SDK's
    tracing, the grpc instrumentation, the exporter nor the propagators. (redis imports the SDK's metrics by
    itself when they are installed: not ours to avoid.)"""
    code = textwrap.dedent(
        """
        import sys, json
        import apikeyd.server, apikeyd.command
        from apikeyd.config import Settings
        from apikeyd import tracing
        assert tracing.from_settings(Settings()) is None
        print(json.dumps(sorted(m for m in sys.modules if m.startswith(
            ("opentelemetry.sdk.trace", "opentelemetry.instrumentation", "opentelemetry.exporter", "opentelemetry.propagate")
        ))))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []
