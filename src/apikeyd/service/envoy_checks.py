"""What apikeyd answers Envoy's external authorization, whichever way Envoy asks: over gRPC (`Check`,
service/ext_authz.py) or over HTTP (service/ext_authz_http.py, the example config's path). Both ask the same
Authorizer (and cache) as the Authorize RPC, so all three give the same decision for the same key.

The client sends its key in `authorization: Bearer <key>` or `x-api-key: <key>`, and its project in
`x-project-id`. A route says what it needs (gRPC: the filter's per-route `context_extensions`; HTTP:
`x-apikeyd-<setting>` headers the route's http_service adds, `_` written `-`):

    required_scopes   `resource:action` scopes separated by commas, every one needed; unset: any usable key
    resource          a fixed value for `{value}` qualifiers, e.g. `example.com`
    resource_header   or the request header that carries that value, e.g. `x-sender-domain`
    keep_credential   `true` passes the credential header on to the service; by default it is removed

Any other setting is a configuration error (a misspelt `required_scopes` must not let every key through):
such a route answers 500 until it is fixed.

Allowed: the service gets the key's identity in x-apikey-id, x-apikey-name, x-apikey-account and
x-apikey-project (only for a project key), and every other x-apikey-* header the client sent is removed.
Denied: 401 (no usable key), 403 (wrong project, missing scope) or 429 (rate limit), with a JSON body
`{"code": ..., "message": ...}`. The key itself never goes into a header, a body or a log.
"""

import json
import logging
from collections.abc import Coroutine, Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from apikeyd.authorizer.authorizer import Authorizer
from apikeyd.domain import limits
from apikeyd.domain.access import Caller
from apikeyd.domain.decision import AuthCode, Decision
from apikeyd.domain.echo import quote, refuse_key
from apikeyd.domain.errors import InvalidArgument, Unavailable
from apikeyd.domain.refusals import RESOURCE_EXHAUSTED, UNAUTHENTICATED, bearer_key, refusal, retry_after
from apikeyd.domain.scopes import parse_required_scopes
from apikeyd.logs import Throttle

log = logging.getLogger(__name__)

IDENTITY_PREFIX = "x-apikey-"
ROUTE_SETTINGS = ("required_scopes", "resource", "resource_header", "keep_credential")

_ACCOUNT_KEY_IDENTITY = frozenset(("x-apikey-id", "x-apikey-name", "x-apikey-account"))
_PROJECT_KEY_IDENTITY = _ACCOUNT_KEY_IDENTITY | {"x-apikey-project"}


@dataclass(frozen=True, slots=True)
class Route:
    """What one route needs, from its settings."""

    required_scopes: tuple[str, ...] = ()
    resource: str = ""
    resource_header: str = ""
    keep_credential: bool = False


@dataclass(frozen=True, slots=True)
class Answer:
    """Envoy's answer in its own terms. Allowed (status 200): `headers` go to the service, replacing any the
    client sent, `remove` are taken off the request, `client_headers` go back to the client. Denied: the
    status, `headers` and the JSON body go back to the client; nothing reaches the service."""

    status: int
    code: str = "OK"
    message: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()
    client_headers: tuple[tuple[str, str], ...] = ()

    @property
    def allowed(self) -> bool:
        return self.status == 200

    def body(self) -> str:
        return json.dumps({"code": self.code, "message": self.message})


# Keyed by what the proxy (or whoever asks) sends, so bounded in bytes: only settings within the size limits
# reach it (the transports check them first), and only valid ones stay, since lru_cache keeps no call that
# raised: at most the four known settings with values of MAX_CONTEXT_EXTENSION_VALUE_LENGTH, and a Route of
# at most MAX_REQUIRED_SCOPES scopes, under 12 KB an entry and 3 MB for the 256 entries, more than any
# proxy's routes.
@lru_cache(maxsize=256)
def parse_route(settings: tuple[tuple[str, str], ...]) -> Route:
    """A route's settings; InvalidArgument naming the setting that is wrong. Cached: a proxy sends the
    same few again and again."""
    values = dict(settings)
    unknown = sorted(set(values) - set(ROUTE_SETTINGS))
    if unknown:
        raise InvalidArgument(
            "context_extensions", f"unknown key {quote(unknown[0])}; known: {', '.join(ROUTE_SETTINGS)}"
        )
    scopes = tuple(s.strip() for s in values.get("required_scopes", "").split(",") if s.strip())
    parse_required_scopes(scopes)  # a bad scope is the route's error, whatever the request carries
    resource, header = values.get("resource", ""), values.get("resource_header", "").strip().lower()
    if resource and header:
        raise InvalidArgument("context_extensions", "set resource or resource_header, not both")
    limits.check_length("resource", resource, limits.MAX_RESOURCE_LENGTH)
    keep = values.get("keep_credential", "false").strip().lower()
    if keep not in ("true", "false"):
        raise InvalidArgument("context_extensions", f"keep_credential must be true or false, not {quote(keep)}")
    return Route(scopes, resource, header, keep == "true")


class Refusal(Exception):
    """A request answered before apikeyd looks at a key: no credential, or two different ones."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def credential(headers: Mapping[str, str]) -> tuple[str, tuple[str, ...]]:
    """The presented key and the headers it came in."""
    found = bearer_key(headers.get("authorization", ""))
    if found == "":
        raise Refusal("MALFORMED", "the authorization header must be `Bearer <key>`")
    bearer = found or ""
    api_key = headers.get("x-api-key", "").strip()
    if bearer and api_key and bearer != api_key:
        raise Refusal("AMBIGUOUS_CREDENTIAL", "the request carries two different keys; send one")
    if not bearer and not api_key:
        raise Refusal(
            "MISSING_CREDENTIAL", "no key: send it in `authorization: Bearer <key>` or in `x-api-key: <key>`"
        )
    # Another scheme in authorization (Basic, say) belongs to the service; only a Bearer key is ours.
    return bearer or api_key, (("authorization",) if bearer else ()) + (("x-api-key",) if api_key else ())


def denied(status: int, code: str, message: str, headers: Iterable[tuple[str, str]] = ()) -> Answer:
    return Answer(status, code, message, (("content-type", "application/json"), *headers))


def _rate_headers(decision: Decision) -> tuple[tuple[str, str], ...]:
    if decision.rate is None:
        return ()
    return (
        ("x-ratelimit-limit", str(decision.rate.limit)),
        ("x-ratelimit-remaining", str(decision.rate.remaining)),
    )


def refused(decision: Decision) -> Answer:
    """A denial as Envoy's HTTP answer: 401 for a key that is not usable, 403 for one that may not do
    this, 429 with retry-after (whole seconds, rounded up, so waiting that long is always enough)."""
    code, message, answer = decision.code.name, decision.message, refusal(decision.code)
    if answer is UNAUTHENTICATED:
        return denied(answer.http_status, code, message, [("www-authenticate", 'Bearer error="invalid_token"')])
    if decision.code is AuthCode.INSUFFICIENT_SCOPE:
        return denied(answer.http_status, code, message, [("www-authenticate", 'Bearer error="insufficient_scope"')])
    if answer is RESOURCE_EXHAUSTED:
        assert decision.rate is not None  # a rate-limited decision always says by how much
        return denied(answer.http_status, code, message, [("retry-after", str(retry_after(decision))), *_rate_headers(decision)])
    return denied(answer.http_status, code, message)


def allowed(decision: Decision, headers: Mapping[str, str], credential_headers: tuple[str, ...]) -> Answer:
    key = decision.key
    assert key is not None  # an allowed decision always names its key
    identity: tuple[tuple[str, str], ...] = (
        ("x-apikey-id", key.key_id), ("x-apikey-name", key.name), ("x-apikey-account", key.account_id)
    )
    names = _ACCOUNT_KEY_IDENTITY
    if key.project_id:
        identity += (("x-apikey-project", key.project_id),)
        names = _PROJECT_KEY_IDENTITY
    # Envoy applies the removals after the additions, so a name set here must not be removed too.
    forged = tuple(name for name in headers if name.startswith(IDENTITY_PREFIX) and name not in names)
    return Answer(200, headers=identity, remove=credential_headers + forged, client_headers=_rate_headers(decision))


def _check_client_values(
    presented: str, credential_headers: tuple[str, ...], resource: str, resource_header: str, project_id: str
) -> None:
    """The size limits on what a check takes from the client's headers, before the key is digested. The
    client, not the proxy, sent them, so an over-limit value is the client's 400, not the proxy's error."""
    limits.check_length(f"{credential_headers[0]} header's key", presented, limits.MAX_KEY_LENGTH)
    if resource_header:
        limits.check_length(f"{resource_header} header", resource, limits.MAX_RESOURCE_LENGTH)
    limits.check_length("x-project-id header", project_id, limits.MAX_PROJECT_ID_LENGTH)


class EnvoyChecks:
    """One Envoy check: route settings and request headers in, an Answer out."""

    def __init__(self, authorizer: Authorizer) -> None:
        self._authorizer = authorizer
        # A route's settings arrive with every check, and anyone may send one: one line a minute says enough.
        self._route_warnings = Throttle(log, 60.0)

    def misconfigured(self, error: InvalidArgument) -> Answer:
        """A route whose settings are wrong: 500 until the config is fixed, never an open route."""
        self._route_warnings.warning("an Envoy route is misconfigured: %s", error, event="ext_authz.misconfigured_route")
        return denied(500, "MISCONFIGURED", f"the route's ext_authz settings are wrong: {error}")

    def answer(
        self, settings: tuple[tuple[str, str], ...], headers: Mapping[str, str], caller: Caller | None
    ) -> Answer | Coroutine[Any, Any, Answer]:
        """The Answer, or a coroutine that gives it when the decision needs an await (a cache miss, a shared
        rate limit): a cached check is answered without one (Authorizer.check). `settings` sorted by name."""
        try:
            route = parse_route(settings)
        except InvalidArgument as error:
            return self.misconfigured(error)
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
        removed = () if route.keep_credential else credential_headers
        decision = self._authorizer.check(presented, route.required_scopes, resource, project_id, caller)
        if isinstance(decision, Decision):
            return _answer(decision, headers, removed)
        return _awaited(decision, headers, removed)


def _answer(decision: Decision, headers: Mapping[str, str], removed: tuple[str, ...]) -> Answer:
    return allowed(decision, headers, removed) if decision.allowed else refused(decision)


async def _awaited(
    decision: Coroutine[Any, Any, Decision], headers: Mapping[str, str], removed: tuple[str, ...]
) -> Answer:
    try:
        return _answer(await decision, headers, removed)
    except Unavailable as error:
        return denied(503, "UNAVAILABLE", str(error))
