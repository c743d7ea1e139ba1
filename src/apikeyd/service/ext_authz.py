"""envoy.service.auth.v3.Authorization: Envoy's external authorization, so Envoy can put apikeyd's keys in
front of any HTTP service. Each Check asks the same Authorizer (and cache) as Authorize, so both give the
same decision for the same key.

The client sends its key in `authorization: Bearer <key>` or `x-api-key: <key>`, and its project in
`x-project-id`. A route says what it needs in the ext_authz filter's per-route `context_extensions`:

    required_scopes   `resource:action` scopes separated by commas, every one needed; unset: any usable key
    resource          a fixed value for `{value}` qualifiers, e.g. `example.com`
    resource_header   or the request header that carries that value, e.g. `x-sender-domain`
    keep_credential   `true` passes the credential header on to the service; by default it is removed

Any other key is a configuration error (a misspelt `required_scopes` must not let every key through): such a
route answers 500 until it is fixed.

Allowed: the service gets the key's identity in x-apikey-id, x-apikey-name, x-apikey-account and
x-apikey-project (only for a project key), and every other x-apikey-* header the client sent is removed.
Denied: 401 (no usable key), 403 (wrong project, missing scope) or 429 (rate limit), with a JSON body
`{"code": ..., "message": ...}`. The key itself never goes into a header, a body or a log.
"""

import json
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import attribute_context_pb2
from envoy.service.auth.v3 import external_auth_pb2 as ext
from envoy.service.auth.v3 import external_auth_pb2_grpc as ext_grpc
from envoy.type.v3 import http_status_pb2
from google.rpc import code_pb2, status_pb2

from apikeyd.authorizer.authorizer import Authorizer
from apikeyd.domain import limits
from apikeyd.domain.decision import AuthCode, Decision
from apikeyd.domain.echo import quote, refuse_key
from apikeyd.domain.errors import InvalidArgument, Unavailable
from apikeyd.domain.scopes import parse_required_scopes
from apikeyd.lifecycle import KeyManager
from apikeyd.logs import Throttle
from apikeyd.metrics import Metrics
from apikeyd.service.api_keys import authorizing_caller
from apikeyd.service.errors import grpc_errors
from apikeyd.service.request_limits import check_request

log = logging.getLogger(__name__)

SERVICE_NAME = ext.DESCRIPTOR.services_by_name["Authorization"].full_name

IDENTITY_PREFIX = "x-apikey-"
# Replaces every value the client sent. Envoy versions that read the deprecated `append` instead (unset:
# false) do the same.
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_ROUTE_KEYS = ("required_scopes", "resource", "resource_header", "keep_credential")

_UNAUTHORIZED = {
    AuthCode.MALFORMED,
    AuthCode.NOT_FOUND,
    AuthCode.REVOKED,
    AuthCode.DISABLED,
    AuthCode.EXPIRED,
}
# The gRPC code Envoy records (in its stats) for each HTTP answer.
_GRPC_CODES = {
    400: code_pb2.INVALID_ARGUMENT,
    401: code_pb2.UNAUTHENTICATED,
    403: code_pb2.PERMISSION_DENIED,
    429: code_pb2.RESOURCE_EXHAUSTED,
    500: code_pb2.INTERNAL,
    503: code_pb2.UNAVAILABLE,
}


@dataclass(frozen=True, slots=True)
class Route:
    """What one route needs, from its context_extensions."""

    required_scopes: tuple[str, ...] = ()
    resource: str = ""
    resource_header: str = ""
    keep_credential: bool = False


# Keyed by what the proxy (or whoever calls Check) sends, so bounded in bytes: only maps within the size
# limits reach it (request_limits, before Check does anything), and only valid ones stay, since lru_cache
# keeps no call that raised: at most the four known keys with values of MAX_CONTEXT_EXTENSION_VALUE_LENGTH,
# and a Route of at most MAX_REQUIRED_SCOPES scopes, under 12 KB an entry and 3 MB for the 256 entries,
# more than any proxy's routes.
@lru_cache(maxsize=256)
def parse_route(extensions: tuple[tuple[str, str], ...]) -> Route:
    """A route's settings; InvalidArgument naming the extension that is wrong. Cached: a proxy sends the
    same few maps again and again."""
    settings = dict(extensions)
    unknown = sorted(set(settings) - set(_ROUTE_KEYS))
    if unknown:
        raise InvalidArgument(
            "context_extensions", f"unknown key {quote(unknown[0])}; known: {', '.join(_ROUTE_KEYS)}"
        )
    scopes = tuple(s.strip() for s in settings.get("required_scopes", "").split(",") if s.strip())
    parse_required_scopes(scopes)  # a bad scope is the route's error, whatever the request carries
    resource, header = settings.get("resource", ""), settings.get("resource_header", "").strip().lower()
    if resource and header:
        raise InvalidArgument("context_extensions", "set resource or resource_header, not both")
    limits.check_length("resource", resource, limits.MAX_RESOURCE_LENGTH)
    keep = settings.get("keep_credential", "false").strip().lower()
    if keep not in ("true", "false"):
        raise InvalidArgument("context_extensions", f"keep_credential must be true or false, not {quote(keep)}")
    return Route(scopes, resource, header, keep == "true")


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


class Refusal(Exception):
    """A request answered before apikeyd looks at a key: no credential, or two different ones."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def credential(headers: Mapping[str, str]) -> tuple[str, tuple[str, ...]]:
    """The presented key and the headers it came in."""
    bearer = ""
    parts = headers.get("authorization", "").split(None, 1)
    if parts and parts[0].lower() == "bearer":
        bearer = parts[1].strip() if len(parts) > 1 else ""
        if not bearer:
            raise Refusal("MALFORMED", "the authorization header must be `Bearer <key>`")
    api_key = headers.get("x-api-key", "").strip()
    if bearer and api_key and bearer != api_key:
        raise Refusal("AMBIGUOUS_CREDENTIAL", "the request carries two different keys; send one")
    if not bearer and not api_key:
        raise Refusal(
            "MISSING_CREDENTIAL", "no key: send it in `authorization: Bearer <key>` or in `x-api-key: <key>`"
        )
    # Another scheme in authorization (Basic, say) belongs to the service; only a Bearer key is ours.
    return bearer or api_key, (("authorization",) if bearer else ()) + (("x-api-key",) if api_key else ())


def _header(name: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=name, value=value), append_action=_OVERWRITE
    )


def denied(
    status: int, code: str, message: str, headers: Iterable[tuple[str, str]] = ()
) -> ext.CheckResponse:
    body = json.dumps({"code": code, "message": message})
    return ext.CheckResponse(
        status=status_pb2.Status(code=_GRPC_CODES[status], message=message),
        denied_response=ext.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=status),
            headers=[
                _header(name, value) for name, value in (("content-type", "application/json"), *headers)
            ],
            body=body,
        ),
    )


def _rate_headers(decision: Decision) -> list[tuple[str, str]]:
    if decision.rate is None:
        return []
    return [
        ("x-ratelimit-limit", str(decision.rate.limit)),
        ("x-ratelimit-remaining", str(decision.rate.remaining)),
    ]


def refused(decision: Decision) -> ext.CheckResponse:
    """A denial as Envoy's HTTP answer: 401 for a key that is not usable, 403 for one that may not do
    this, 429 with retry-after (whole seconds, rounded up, so waiting that long is always enough)."""
    code, message = decision.code.name, decision.message
    if decision.code in _UNAUTHORIZED:
        return denied(401, code, message, [("www-authenticate", 'Bearer error="invalid_token"')])
    if decision.code is AuthCode.INSUFFICIENT_SCOPE:
        return denied(403, code, message, [("www-authenticate", 'Bearer error="insufficient_scope"')])
    if decision.code is AuthCode.RATE_LIMITED:
        assert decision.rate is not None  # a rate-limited decision always says by how much
        wait = str(max(1, math.ceil(decision.rate.retry_after)))
        return denied(429, code, message, [("retry-after", wait), *_rate_headers(decision)])
    return denied(403, code, message)


def allowed(
    decision: Decision, headers: Mapping[str, str], credential_headers: tuple[str, ...]
) -> ext.CheckResponse:
    key = decision.key
    assert key is not None  # an allowed decision always names its key
    identity = {
        "x-apikey-id": key.key_id,
        "x-apikey-name": key.name,
        "x-apikey-account": key.account_id,
    }
    if key.project_id:
        identity["x-apikey-project"] = key.project_id
    # Envoy applies the removals after the additions, so a name set here must not be removed too.
    forged = [name for name in headers if name.startswith(IDENTITY_PREFIX) and name not in identity]
    return ext.CheckResponse(
        status=status_pb2.Status(code=code_pb2.OK),
        ok_response=ext.OkHttpResponse(
            headers=[_header(name, value) for name, value in identity.items()],
            headers_to_remove=[*credential_headers, *forged],
            response_headers_to_add=[_header(name, value) for name, value in _rate_headers(decision)],
        ),
    )


def _check_client_values(
    presented: str, credential_headers: tuple[str, ...], resource: str, resource_header: str, project_id: str
) -> None:
    """The size limits on what Check takes from the client's headers, before the key is digested. The
    client, not the proxy, sent them, so an over-limit value is the client's 400, not a gRPC error."""
    limits.check_length(f"{credential_headers[0]} header's key", presented, limits.MAX_KEY_LENGTH)
    if resource_header:
        limits.check_length(f"{resource_header} header", resource, limits.MAX_RESOURCE_LENGTH)
    limits.check_length("x-project-id header", project_id, limits.MAX_PROJECT_ID_LENGTH)


class ExtAuthzService(ext_grpc.AuthorizationServicer):
    def __init__(
        self, manager: KeyManager, authorizer: Authorizer, metrics: Metrics, authorize_requires_key: bool = False
    ) -> None:
        self._manager = manager
        self._authorizer = authorizer
        # grpc_errors counts every call and times Check (apikeyd.metrics).
        self.rpc_counts = metrics.rpc_counts
        self.rpc_timers = {"Check": metrics.ext_authz_check_seconds}
        # As for Authorize: when set, the proxy itself must present a key with apikeys:authorize (in its
        # grpc_service initial_metadata), and a tenant's proxy can pass only its own account's keys.
        self._authorize_requires_key = authorize_requires_key
        # A route's settings arrive with every Check, and anyone may send a Check: one line a minute says enough.
        self._route_warnings = Throttle(log, 60.0)

    @grpc_errors
    async def Check(self, request: ext.CheckRequest, context: grpc.aio.ServicerContext) -> ext.CheckResponse:
        check_request(request, context)
        # A proxy that may not ask gets a gRPC error, which Envoy turns into its status_on_error: fail closed.
        caller = await authorizing_caller(self._manager, self._authorize_requires_key, context, "Check")
        attributes = request.attributes
        try:
            route = parse_route(tuple(sorted(attributes.context_extensions.items())))
        except InvalidArgument as error:
            self._route_warnings.warning("an Envoy route is misconfigured: %s", error, event="ext_authz.misconfigured_route")
            return denied(500, "MISCONFIGURED", f"the route's ext_authz settings are wrong: {error}")
        headers = request_headers(attributes.request.http)
        try:
            presented, credential_headers = credential(headers)
        except Refusal as refusal:
            return denied(401, refusal.code, str(refusal), [("www-authenticate", "Bearer")])
        resource = headers.get(route.resource_header, "").strip() if route.resource_header else route.resource
        try:
            project_id = refuse_key("x-project-id", headers.get("x-project-id", "").strip())
        except InvalidArgument as error:  # a client's mistake, answered like any other wrong project
            return denied(403, AuthCode.PROJECT_MISMATCH.name, str(error))
        try:
            _check_client_values(presented, credential_headers, resource, route.resource_header, project_id)
        except InvalidArgument as error:
            return denied(400, "INVALID_ARGUMENT", str(error))
        try:
            decision = await self._authorizer.authorize(
                presented, route.required_scopes, resource, project_id, caller
            )
        except Unavailable as error:
            return denied(503, "UNAVAILABLE", str(error))
        if not decision.allowed:
            return refused(decision)
        return allowed(decision, headers, () if route.keep_credential else credential_headers)


def add_to_server(service: ExtAuthzService, server: grpc.aio.Server) -> None:
    ext_grpc.add_AuthorizationServicer_to_server(service, server)
