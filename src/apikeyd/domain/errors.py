"""Errors the domain and the layers above raise; the service maps each to one gRPC status code."""


class ApiKeyError(Exception):
    """Base of every error meant for the caller; the message says what to fix and never holds a secret."""


class InvalidArgument(ApiKeyError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class NotFound(ApiKeyError):
    pass


def key_not_found(account_id: str, key_id: str) -> NotFound:
    """The one answer for a missing key and for a key outside the caller's reach, so they look alike."""
    return NotFound(f"api key accounts/{account_id}/apiKeys/{key_id} does not exist")


class FailedPrecondition(ApiKeyError):
    pass


class Aborted(ApiKeyError):
    """A stale etag, or a concurrent change that won the race."""


class Unavailable(ApiKeyError):
    """The database cannot be reached; retrying later may succeed."""


class Unauthenticated(ApiKeyError):
    """No credential, or one that is not a usable key; the message says which."""


class PermissionDenied(ApiKeyError):
    """A usable key without the right; the message names what is missing and never whether a target exists."""


class ResourceExhausted(ApiKeyError):
    """A quota is full; the message names the limit."""


class OutOfRange(ApiKeyError):
    """A position or page beyond what exists; the message says where to start instead."""
