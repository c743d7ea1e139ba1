"""What the client raises when a check cannot be made: the decision is neither allow nor deny."""

import grpc


class AuthorizeError(Exception):
    """The server could not be asked, or refused the request itself (`code`); never carries the key."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


def from_rpc_error(error: grpc.RpcError) -> AuthorizeError:
    # grpc.aio's errors are no grpc.Call, yet carry the same code and details.
    if isinstance(error, grpc.Call | grpc.aio.AioRpcError):
        return AuthorizeError(error.code(), error.details() or "")
    return AuthorizeError(grpc.StatusCode.UNKNOWN, "the call failed")
