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
    cost              the credits an allowed request spends from a key with credits: 0 to 10^9, default 1

Any other setting is a configuration error (a misspelt `required_scopes` must not let every key through):
such a route answers 500 until it is fixed.

The client's address, for keys with allowed_ip_ranges, is Envoy's downstream address: the peer of its
connection (gRPC: the CheckRequest's source address; HTTP: the `x-apikeyd-downstream-address` header the
http_service adds). With APIKEYD_XFF_TRUSTED_HOPS=N behind N proxies of your own, it is the N-th address
from the right of x-forwarded-for, as Envoy's own xff_num_trusted_hops counts (`client_address`).

Allowed: the service gets the key's identity in x-apikey-id, x-apikey-name, x-apikey-account and
x-apikey-project (only for a project key), and every other x-apikey-* header the client sent is removed.
Denied: 401 (no usable key), 403 (wrong project, missing scope, an address outside the key's ranges) or 429
(rate limit, credits), with a JSON body `{"code": ..., "message": ...}`. A key with credits tells what is
left in x-apikeyd-credits-remaining to the client (allowed and denied) and x-apikey-credits-remaining to
the service. The key itself never goes into a header, a body or a log.
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
from apikeyd.domain.credits import validate_cost
from apikeyd.domain.decision import AuthCode, Decision
from apikeyd.domain.echo import quote, refuse_key
from apikeyd.domain.errors import InvalidArgument, Unavailable
from apikeyd.domain.refusals import (
    CREDITS_HEADER,
    OUT_OF_CREDITS,
    RESOURCE_EXHAUSTED,
    UNAUTHENTICATED,
    bearer_key,
    refusal,
    retry_after,
)
from apikeyd.domain.scopes import parse_required_scopes
from apikeyd.logs import Throttle

log = logging.getLogger(__name__)

IDENTITY_PREFIX = "x-apikey-"
ROUTE_SETTINGS = ("required_scopes", "resource", "resource_header", "keep_credential", "cost")
FORWARDED_FOR = "x-forwarded-for"
_FROM_FORWARDED_FOR, _FROM_DOWNSTREAM = f"{FORWARDED_FOR} header", "the downstream address"  # for a 400's message
CREDITS_TO_SERVICE = "x-apikey-credits-remaining"
_MAX_COST_DIGITS = 10  # validate_cost bounds the value; this bounds what int() is given

_ACCOUNT_KEY_IDENTITY = frozenset(("x-apikey-id", "x-apikey-name", "x-apikey-account"))
_PROJECT_KEY_IDENTITY = _ACCOUNT_KEY_IDENTITY | {"x-apikey-project"}


@dataclass(frozen=True, slots=True)
class Route:
    """What one route needs, from its settings."""

    required_scopes: tuple[str, ...] = ()
    resource: str = ""
    resource_header: str = ""
    keep_credential: bool = False
    cost: int = 1


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
    key_name: str = ""  # the key's resource name when one was found, for a trace's span (apikeyd.tracing)

    @property
    def allowed(self) -> bool:
        return self.status == 200

    def body(self) -> str:
        return json.dumps({"code": self.code, "message": self.message})


# Keyed by what the proxy (or whoever asks) sends, so bounded in bytes: only settings within the size limits
# reach it (the transports check them first), and only valid ones stay, since lru_cache keeps no call that
# raised: at most the five known settings with values of MAX_CONTEXT_EXTENSION_VALUE_LENGTH, and a Route of
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
    cost = values.get("cost", "1").strip()
    if not (cost.isascii() and cost.isdigit() and len(cost) <= _MAX_COST_DIGITS):
        raise InvalidArgument("context_extensions", f"cost must be a whole number of credits, not {quote(cost)}")
    return Route(scopes, resource, header, keep == "true", validate_cost(int(cost)))


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


def denied(
    status: int, code: str, message: str, headers: Iterable[tuple[str, str]] = (), key_name: str = ""
) -> Answer:
    return Answer(status, code, message, (("content-type", "application/json"), *headers), key_name=key_name)


def _client_headers(decision: Decision) -> tuple[tuple[str, str], ...]:
    """What is left of the key's rate limit and credits, for the client."""
    headers: tuple[tuple[str, str], ...] = ()
    if decision.rate is not None:
        headers = (
            ("x-ratelimit-limit", str(decision.rate.limit)),
            ("x-ratelimit-remaining", str(decision.rate.remaining)),
        )
    if decision.credits_remaining is not None:
        headers += ((CREDITS_HEADER, str(decision.credits_remaining)),)
    return headers


def refused(decision: Decision) -> Answer:
    """A denial as Envoy's HTTP answer: 401 for a key that is not usable, 403 for one that may not do
    this, 429 with retry-after for a rate limit (whole seconds, rounded up, so waiting that long is always
    enough), 429 with what is left for credits."""
    code, message, answer = decision.code.name, decision.message, refusal(decision.code)
    name = "" if decision.key is None else decision.key.name
    if answer is UNAUTHENTICATED:
        return denied(answer.http_status, code, message, [("www-authenticate", 'Bearer error="invalid_token"')], name)
    if decision.code is AuthCode.INSUFFICIENT_SCOPE:
        return denied(answer.http_status, code, message, [("www-authenticate", 'Bearer error="insufficient_scope"')], name)
    if answer is RESOURCE_EXHAUSTED:
        assert decision.rate is not None  # a rate-limited decision always says by how much
        return denied(answer.http_status, code, message, [("retry-after", str(retry_after(decision))), *_client_headers(decision)], name)
    if answer is OUT_OF_CREDITS:
        return denied(answer.http_status, code, message, _client_headers(decision), name)
    return denied(answer.http_status, code, message, key_name=name)


def allowed(decision: Decision, headers: Mapping[str, str], credential_headers: tuple[str, ...]) -> Answer:
    key = decision.key
    assert key is not None  # an allowed decision always names its key
    key_name = key.name
    identity: tuple[tuple[str, str], ...] = (
        ("x-apikey-id", key.key_id), ("x-apikey-name", key_name), ("x-apikey-account", key.account_id)
    )
    names = _ACCOUNT_KEY_IDENTITY
    if key.project_id:
        identity += (("x-apikey-project", key.project_id),)
        names = _PROJECT_KEY_IDENTITY
    if decision.credits_remaining is not None:
        identity += ((CREDITS_TO_SERVICE, str(decision.credits_remaining)),)
        names = names | {CREDITS_TO_SERVICE}
    # Envoy applies the removals after the additions, so a name set here must not be removed too.
    forged = tuple(name for name in headers if name.startswith(IDENTITY_PREFIX) and name not in names)
    return Answer(
        200, headers=identity, remove=credential_headers + forged, client_headers=_client_headers(decision),
        key_name=key_name,
    )


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
    """One Envoy check: route settings, request headers and the downstream address in, an Answer out."""

    def __init__(self, authorizer: Authorizer, xff_trusted_hops: int = 0) -> None:
        self._authorizer = authorizer
        self._hops = xff_trusted_hops
        # A route's settings arrive with every check, and anyone may send one: one line a minute says enough.
        self._route_warnings = Throttle(log, 60.0)

    def misconfigured(self, error: InvalidArgument) -> Answer:
        """A route whose settings are wrong: 500 until the config is fixed, never an open route."""
        self._route_warnings.warning("an Envoy route is misconfigured: %s", error, event="ext_authz.misconfigured_route")
        return denied(500, "MISCONFIGURED", f"the route's ext_authz settings are wrong: {error}")

    def client_address(self, headers: Mapping[str, str], downstream: str) -> tuple[str, str]:
        """The client's address and where it came from, for a key's allowed_ip_ranges: picked, not parsed
        (only a key with ranges parses it). With N trusted hops, the N-th entry of x-forwarded-for from the
        right, the downstream address being the 0th, as Envoy's xff_num_trusted_hops counts: each trusted
        proxy appends the address of its own peer, so entries left of those N are whatever the client wrote
        and never count. A header with fewer entries came through fewer proxies than configured (or
        straight from the client), and every entry in it may be the client's own: the downstream address is
        then the one that no client can write, so falling back to it can never let a forged entry in."""
        if self._hops:
            forwarded = headers.get(FORWARDED_FOR)
            if forwarded:
                entries = forwarded.rsplit(",", self._hops)
                if len(entries) >= self._hops:
                    return entries[-self._hops].strip(), _FROM_FORWARDED_FOR
        return downstream, _FROM_DOWNSTREAM

    def answer(
        self, settings: tuple[tuple[str, str], ...], headers: Mapping[str, str], caller: Caller | None, downstream: str
    ) -> Answer | Coroutine[Any, Any, Answer]:
        """The Answer, or a coroutine that gives it when the decision needs an await (a cache miss, a shared
        rate limit, credits): a cached check is answered without one (Authorizer.check). `settings` sorted by
        name; `downstream` the address of Envoy's peer, as Envoy reports it."""
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
        client_ip, source = self.client_address(headers, downstream)
        try:
            decision = self._authorizer.check(
                presented, route.required_scopes, resource, project_id, caller, client_ip=client_ip, cost=route.cost
            )
        except InvalidArgument as error:  # the route's values were checked above: only the address is left
            return _bad_address(error, source)
        if isinstance(decision, Decision):
            return _answer(decision, headers, removed)
        return _awaited(decision, headers, removed, source)


def _answer(decision: Decision, headers: Mapping[str, str], removed: tuple[str, ...]) -> Answer:
    return allowed(decision, headers, removed) if decision.allowed else refused(decision)


def _bad_address(error: InvalidArgument, source: str) -> Answer:
    """A key with ranges asked about an address that is none: the request's 400, naming where it was read."""
    return denied(400, "INVALID_ARGUMENT", f"{source}: {str(error).removeprefix(f'{error.field}: ')}")


async def _awaited(
    decision: Coroutine[Any, Any, Decision], headers: Mapping[str, str], removed: tuple[str, ...], source: str
) -> Answer:
    try:
        return _answer(await decision, headers, removed)
    except InvalidArgument as error:
        return _bad_address(error, source)
    except Unavailable as error:
        return denied(503, "UNAVAILABLE", str(error))
