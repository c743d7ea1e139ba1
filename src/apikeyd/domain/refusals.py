"""How a refused check is answered to whoever presented the key, in HTTP and in gRPC terms. Envoy's ext_authz
(service/envoy_checks.py) and the client library's interceptor and middleware (apikeyd.client.grpc_auth,
apikeyd.client.asgi) all answer from this one table, so a key is refused alike on every path. The domain
imports no grpc: a gRPC code is named here and looked up by whoever speaks gRPC."""

import math
from collections.abc import Sequence
from dataclasses import dataclass

from apikeyd.domain.decision import AuthCode, Decision


# Compared by identity: two refusals with the same statuses (a rate limit's, a key's credits') are still
# answered apart.
@dataclass(frozen=True, slots=True, eq=False)
class Refusal:
    http_status: int
    grpc_code: str  # a grpc.StatusCode member's name


UNAUTHENTICATED = Refusal(401, "UNAUTHENTICATED")  # no usable key: present another
PERMISSION_DENIED = Refusal(403, "PERMISSION_DENIED")  # a usable key that may not do this
RESOURCE_EXHAUSTED = Refusal(429, "RESOURCE_EXHAUSTED")  # the key's rate limit: retry later
# The key's credits: no retry-after, as waiting brings none back before the key's refill, if it has one.
OUT_OF_CREDITS = Refusal(429, "RESOURCE_EXHAUSTED")
CREDITS_HEADER = "x-apikeyd-credits-remaining"  # what a key with credits has left, for whoever presented it

_REFUSALS = {
    AuthCode.MALFORMED: UNAUTHENTICATED,
    AuthCode.NOT_FOUND: UNAUTHENTICATED,
    AuthCode.REVOKED: UNAUTHENTICATED,
    AuthCode.DISABLED: UNAUTHENTICATED,
    AuthCode.EXPIRED: UNAUTHENTICATED,
    AuthCode.IP_NOT_ALLOWED: PERMISSION_DENIED,
    AuthCode.PROJECT_MISMATCH: PERMISSION_DENIED,
    AuthCode.INSUFFICIENT_SCOPE: PERMISSION_DENIED,
    AuthCode.RATE_LIMITED: RESOURCE_EXHAUSTED,
    AuthCode.CREDITS_EXHAUSTED: OUT_OF_CREDITS,
}


def refusal(code: AuthCode) -> Refusal:
    """How a denial with this code is answered. A code this table does not know (one added later) is
    PERMISSION_DENIED: refused, never let through."""
    return _REFUSALS.get(code, PERMISSION_DENIED)


def retry_after(decision: Decision) -> int:
    """A rate-limited decision's wait in whole seconds, rounded up and at least 1, so that waiting that long
    is always enough (the value of HTTP's Retry-After and of gRPC's `retry-after` trailer)."""
    seconds = decision.rate.retry_after if decision.rate is not None else 0.0
    return max(1, math.ceil(seconds))


def bearer_key(authorization: str) -> str | None:
    """The key in an `authorization: Bearer <key>` value: None when it names another scheme (Basic, say,
    which belongs to the service), "" when Bearer has nothing after it."""
    parts = authorization.split(None, 1)
    if not parts or parts[0].lower() != "bearer":
        return None
    return parts[1].strip() if len(parts) > 1 else ""


class NoKey(Exception):
    """A request refused UNAUTHENTICATED before any check: no key in it, or not one key. `code` is the JSON
    answer's code; the message never holds what was sent."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def presented_key(values: Sequence[str], header: str) -> str:
    """The key among the values a request carries in its credential header (lower case): `Bearer <key>` in
    authorization, the value as it is in any other header (x-api-key, say)."""
    if len(values) > 1:
        raise NoKey("AMBIGUOUS_CREDENTIAL", f"the request carries {header} more than once; send one key")
    value = values[0] if values else ""
    if header == "authorization":
        key = bearer_key(value)
        if key == "":
            raise NoKey("MALFORMED", "the authorization header must be `Bearer <key>`")
        if key is None:
            raise NoKey("MISSING_CREDENTIAL", "no key: send it in `authorization: Bearer <key>`")
        return key
    if not value.strip():
        raise NoKey("MISSING_CREDENTIAL", f"no key: send it in `{header}: <key>`")
    return value.strip()
