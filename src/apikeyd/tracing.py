"""OpenTelemetry traces, off by default (docs/tracing.md). `APIKEYD_TRACING=otlp` sends a span per RPC to an
OTLP collector over gRPC; everything else (endpoint, headers, sampler, service name, propagators) comes from
the SDK's own OTEL_* variables, which it reads itself.

With tracing off nothing of OpenTelemetry is imported, so a server installed without the `tracing` extra
runs as before, and the servicers hold `None` where a Tracing would be: the only cost a call pays is that one
`is not None`. Everything below that imports OpenTelemetry does so inside Tracing, made only when on.

Spans carry the decision code (DECISION_CODE) and the key's resource name (KEY_NAME) when a key was found;
never the presented key, a secret or a hash. The grpc instrumentation adds the method, status code, peer
and user agent, and no other metadata. The HTTP ext_authz span records neither the checked request's path
(a client may put its key in a query string) nor its headers.
"""

import importlib.metadata
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from envoy.service.auth.v3 import external_auth_pb2

from apikeyd.app import StartupError
from apikeyd.config import Settings
from apikeyd.v1 import api_keys_pb2

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import SpanProcessor

    from apikeyd.domain.decision import Decision
    from apikeyd.service.envoy_checks import Answer

MODES = ("off", "otlp")
DECISION_CODE = "apikeyd.decision.code"
KEY_NAME = "apikeyd.key.name"
HTTP_CHECK_SPAN = "envoy.ext_authz HTTP check"
_SERVICES = (
    api_keys_pb2.DESCRIPTOR.services_by_name["ApiKeyService"],
    external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"],
)
# Unary-answer methods only. A stream's span would last as long as the stream (hours, for a client cache's
# WatchApiKeyChanges) and tell nothing; and the instrumentation's stream wrapper iterates the handler, which
# here writes with context.write() instead of yielding. Health and reflection are left out too: a probe
# every few seconds is noise in a trace store, and its count is in /metrics.
TRACED_METHODS = frozenset(
    f"/{service.full_name}/{method.name}"
    for service in _SERVICES
    for method in service.methods
    if not method.server_streaming
)
_MISSING = (
    "APIKEYD_TRACING={mode} needs OpenTelemetry, which this install lacks ({error}): "
    "pip install 'apikeyd[server,tracing]'"
)


def from_settings(settings: Settings, processor: "SpanProcessor | None" = None) -> "Tracing | None":
    """None with APIKEYD_TRACING=off (the default); StartupError for an unknown mode or a missing extra.
    `processor` replaces the OTLP exporter (tests give an in-memory one) and turns tracing on."""
    if settings.tracing not in MODES:
        raise StartupError(f"{Settings.env_name('tracing')}={settings.tracing!r} must be one of {', '.join(MODES)}")
    if processor is None and settings.tracing == "off":
        return None
    try:
        if processor is None:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            # Batched on the SDK's own thread (OTEL_BSP_* tune it): a call only queues its ended span.
            processor = BatchSpanProcessor(OTLPSpanExporter())
        return Tracing(processor)
    except ImportError as error:
        raise StartupError(_MISSING.format(mode=settings.tracing, error=error)) from None


class Tracing:
    """The tracer provider of one server, with the interceptor that starts a span per traced RPC and what
    the servicers add to it. Its own provider, not the global one: servers side by side in one process (the
    tests) keep their spans apart."""

    def __init__(self, processor: "SpanProcessor") -> None:
        from opentelemetry import propagate, trace
        from opentelemetry.instrumentation.grpc import aio_server_interceptor
        from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
        from opentelemetry.sdk.trace import TracerProvider

        # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES are read by Resource.create; OTEL_TRACES_SAMPLER by
        # TracerProvider (parent-based, always on, by default: a caller's unsampled traceparent is obeyed).
        # Not shut down at exit by the SDK (30 s on an unreachable collector): Server.stop bounds it.
        self.provider = TracerProvider(
            resource=Resource.create({SERVICE_NAME: "apikeyd", SERVICE_VERSION: importlib.metadata.version("apikeyd")}), shutdown_on_exit=False
        )
        self.provider.add_span_processor(processor)
        self._tracer = self.provider.get_tracer(__name__)
        self._current_span = trace.get_current_span
        self._extract = propagate.extract  # OTEL_PROPAGATORS: W3C tracecontext and baggage by default
        self._trace = trace
        # The instrumentation's: it takes the caller's traceparent from the call's metadata as the parent.
        self.interceptor = aio_server_interceptor(
            tracer_provider=self.provider, filter_=lambda details: details.method in TRACED_METHODS
        )

    def decided(self, decision: "Decision") -> None:
        """Authorize's decision, on the call's span."""
        span = self._current_span()
        span.set_attribute(DECISION_CODE, decision.code.name)
        if decision.key is not None:
            span.set_attribute(KEY_NAME, decision.key.name)

    def checked(self, answer: "Answer", headers: Mapping[str, str]) -> None:
        """Envoy's gRPC Check, on the call's span. Its parent is what Envoy sent in the call's metadata (its
        own ext_authz span when Envoy traces); the checked request's own traceparent, when it names another
        trace (Envoy not tracing, the client's header passed on), is linked."""
        span = self._current_span()
        self._record(span, answer)
        checked = self._trace.get_current_span(self._extract(headers)).get_span_context()
        if checked.is_valid and checked.trace_id != span.get_span_context().trace_id:
            span.add_link(checked)

    def http_check(self, answer: "Answer", headers: Mapping[str, str], started: float) -> None:
        """A span for a check over HTTP, made once it is answered (the cached ones are answered inside a
        protocol callback, with no task to hold a current span), timed from `started` (perf_counter) as the
        check's metric is; its parent is the check request's traceparent, which Envoy sets when it traces."""
        now = time.time_ns()
        span = self._tracer.start_span(
            HTTP_CHECK_SPAN,
            context=self._extract(headers),
            kind=self._trace.SpanKind.SERVER,
            start_time=now - int((time.perf_counter() - started) * 1e9),
            attributes={"http.response.status_code": answer.status},
        )
        self._record(span, answer)
        span.end(end_time=now)

    @staticmethod
    def _record(span: Any, answer: "Answer") -> None:
        span.set_attribute(DECISION_CODE, answer.code)
        if answer.key_name:
            span.set_attribute(KEY_NAME, answer.key_name)

    def shutdown(self, timeout: float) -> None:
        """Export what is queued, waiting at most `timeout` seconds: a collector that does not answer must
        not hold the exit. A daemon thread, so one still exporting then does not hold the interpreter."""
        done = threading.Thread(target=self.provider.shutdown, name="tracing-shutdown", daemon=True)
        done.start()
        done.join(timeout)
