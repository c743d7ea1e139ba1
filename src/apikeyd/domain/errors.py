"""Errors the domain and the layers above raise; the service maps each to one gRPC status code."""


class ApiKeyError(Exception):
    """Base of every error meant for the caller; the message says what to fix and never holds a secret."""


class InvalidArgument(ApiKeyError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class NotFound(ApiKeyError):
    pass


class FailedPrecondition(ApiKeyError):
    pass


class Aborted(ApiKeyError):
    """A stale etag, or a concurrent change that won the race."""


class Unavailable(ApiKeyError):
    """The database cannot be reached; retrying later may succeed."""
