"""The answer to an Authorize call: a code, a message for a person, and the key it concerns."""

import enum
from dataclasses import dataclass, field

from apikeyd.domain.model import VerifiedKey
from apikeyd.domain.ratelimit import RateOutcome


class AuthCode(enum.IntEnum):
    """The contract's codes. The checks run MALFORMED, NOT_FOUND, REVOKED, DISABLED, EXPIRED, IP_NOT_ALLOWED,
    PROJECT_MISMATCH, INSUFFICIENT_SCOPE, RATE_LIMITED, CREDITS_EXHAUSTED; from DISABLED on, the response
    carries the key's identity."""

    OK = 0
    MALFORMED = 1
    NOT_FOUND = 2
    DISABLED = 3
    REVOKED = 4
    EXPIRED = 5
    PROJECT_MISMATCH = 6
    INSUFFICIENT_SCOPE = 7
    RATE_LIMITED = 8
    CREDITS_EXHAUSTED = 9
    IP_NOT_ALLOWED = 10


@dataclass(frozen=True, slots=True)
class Decision:
    code: AuthCode
    message: str = ""
    key: VerifiedKey | None = None
    rate: RateOutcome | None = None
    missing_scopes: tuple[str, ...] = field(default=())
    # For a key whose secret verified: when it, or this rotated-out secret, stops working (Unix times), so
    # that a client-side cache can decide again later (domain/decide.py).
    expire_at: float | None = None
    secret_expire_at: float | None = None
    # Answered from an entry verified earlier while the database does not answer (stale-if-error): true
    # then, but not to be kept by a client-side cache.
    stale: bool = False
    # For a key with credits: what is left after this request (with CREDITS_EXHAUSTED, what is left).
    credits_remaining: int | None = None

    @property
    def allowed(self) -> bool:
        return self.code is AuthCode.OK


MALFORMED = Decision(AuthCode.MALFORMED, "the key is not a well-formed apikeyd key: its shape or checksum is wrong")
NOT_FOUND = Decision(AuthCode.NOT_FOUND, "no key matches the presented key")
