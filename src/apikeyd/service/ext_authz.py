"""envoy.service.auth.v3.Authorization: Envoy's external authorization over gRPC, for configs that use a
grpc_service (deploy/envoy/envoy-grpc.yaml). The example config asks over HTTP instead, which costs Envoy
much less per check (service/ext_authz_http.py); both answer alike (service/envoy_checks.py), and a route's
settings come here in the filter's per-route `context_extensions`, and the downstream address in the
request's source address: the peer of Envoy's connection, whatever x-forwarded-for says (Envoy 1.40 fills
it from the connection even where its use_remote_address and xff_num_trusted_hops pick another address)."""

from collections.abc import Mapping

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import attribute_context_pb2
from envoy.service.auth.v3 import external_auth_pb2 as ext
from envoy.service.auth.v3 import external_auth_pb2_grpc as ext_grpc
from envoy.type.v3 import http_status_pb2
from google.rpc import code_pb2, status_pb2

from apikeyd.lifecycle import KeyManager
from apikeyd.metrics import Metrics
from apikeyd.service.api_keys import authorizing_caller
from apikeyd.service.envoy_checks import Answer, EnvoyChecks
from apikeyd.service.errors import grpc_errors
from apikeyd.service.request_limits import check_request
from apikeyd.tracing import Tracing

SERVICE_NAME = ext.DESCRIPTOR.services_by_name["Authorization"].full_name

# Replaces every value the client sent. Envoy versions that read the deprecated `append` instead (unset:
# false) do the same.
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
# The gRPC code Envoy records (in its stats) for each HTTP answer.
_GRPC_CODES = {
    400: code_pb2.INVALID_ARGUMENT,
    401: code_pb2.UNAUTHENTICATED,
    403: code_pb2.PERMISSION_DENIED,
    429: code_pb2.RESOURCE_EXHAUSTED,
    500: code_pb2.INTERNAL,
    503: code_pb2.UNAVAILABLE,
}


def request_headers(http: attribute_context_pb2.AttributeContext.HttpRequest) -> Mapping[str, str]:
    """The request's headers by lower-case name. Envoy sends them in `headers`, or in `header_map` when the
    filter sets encode_raw_headers; repeated headers are joined with commas, as Envoy joins them itself."""
    if not http.HasField("header_map"):
        return http.headers
    joined: dict[str, str] = {}
    for header in http.header_map.headers:
        value = header.raw_value.decode("utf-8", "replace") if header.raw_value else header.value
        name = header.key.lower()
        joined[name] = f"{joined[name]},{value}" if name in joined else value
    return joined


def _header(name: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=name, value=value), append_action=_OVERWRITE
    )


def check_response(answer: Answer) -> ext.CheckResponse:
    if answer.allowed:
        return ext.CheckResponse(
            status=status_pb2.Status(code=code_pb2.OK),
            ok_response=ext.OkHttpResponse(
                headers=[_header(name, value) for name, value in answer.headers],
                headers_to_remove=answer.remove,
                response_headers_to_add=[_header(name, value) for name, value in answer.client_headers],
            ),
        )
    return ext.CheckResponse(
        status=status_pb2.Status(code=_GRPC_CODES[answer.status], message=answer.message),
        denied_response=ext.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=answer.status),
            headers=[_header(name, value) for name, value in answer.headers],
            body=answer.body(),
        ),
    )


class ExtAuthzService(ext_grpc.AuthorizationServicer):
    def __init__(
        self,
        manager: KeyManager,
        checks: EnvoyChecks,
        metrics: Metrics,
        authorize_requires_key: bool = False,
        tracing: Tracing | None = None,
    ) -> None:
        self._manager = manager
        self._tracing = tracing
        self._checks = checks
        # grpc_errors counts every call and times Check (apikeyd.metrics).
        self.rpc_counts = metrics.rpc_counts
        self.rpc_timers = {"Check": metrics.ext_authz_check_seconds}
        # As for Authorize: when set, the proxy itself must present a key with apikeys:authorize (in its
        # grpc_service initial_metadata), and a tenant's proxy can pass only its own account's keys.
        self._authorize_requires_key = authorize_requires_key

    @grpc_errors
    async def Check(self, request: ext.CheckRequest, context: grpc.aio.ServicerContext) -> ext.CheckResponse:
        check_request(request, context)
        # A proxy that may not ask gets a gRPC error, which Envoy turns into its status_on_error: fail closed.
        caller = await authorizing_caller(self._manager, self._authorize_requires_key, context, "Check")
        attributes = request.attributes
        settings = tuple(sorted(attributes.context_extensions.items()))
        downstream = attributes.source.address.socket_address.address
        headers = request_headers(attributes.request.http)
        answer = self._checks.answer(settings, headers, caller, downstream)
        if not isinstance(answer, Answer):
            answer = await answer
        if self._tracing is not None:
            self._tracing.checked(answer, headers)
        return check_response(answer)


def add_to_server(service: ExtAuthzService, server: grpc.aio.Server) -> None:
    ext_grpc.add_AuthorizationServicer_to_server(service, server)
