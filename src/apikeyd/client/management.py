"""The management calls with names that read well, for both clients: each method builds the request and
makes the call with the connection's token and deadline; with the asyncio client's stub it returns the
awaitable call. Errors are grpc's (grpc.RpcError), with the server's message."""

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from google.protobuf.field_mask_pb2 import FieldMask

from apikeyd.client.settings import Connection
from apikeyd.domain.model import key_name
from apikeyd.v1 import api_keys_pb2 as pb


def name_of(account_id: str, key_id: str) -> str:
    """`accounts/{account_id}/apiKeys/{key_id}`, the name every call below takes."""
    return key_name(account_id, key_id)


class Keys:
    def __init__(self, stub: Any, connection: Connection) -> None:
        self._stub = stub
        self._connection = connection

    def _call(self, method: str, request: Any) -> Any:
        return getattr(self._stub, method)(
            request, timeout=self._connection.timeout, metadata=self._connection.metadata
        )

    def create(
        self,
        account_id: str,
        display_name: str,
        scopes: Sequence[str],
        *,
        project_id: str = "",
        description: str = "",
        labels: Mapping[str, str] | None = None,
        expire_time: datetime | None = None,
        rate_limits: Sequence[tuple[int, timedelta]] = (),
        request_id: str = "",
    ) -> Any:
        """A CreateApiKeyResponse: `.secret` is the key string, shown this once."""
        key = pb.ApiKey(
            display_name=display_name, scopes=scopes, project_id=project_id, description=description, labels=labels or {}
        )
        if expire_time is not None:
            key.expire_time.FromDatetime(expire_time)
        for limit, period in rate_limits:
            key.rate_limits.add(limit=limit).period.FromTimedelta(period)
        return self._call("CreateApiKey", pb.CreateApiKeyRequest(parent=f"accounts/{account_id}", api_key=key, request_id=request_id))

    def get(self, name: str) -> Any:
        return self._call("GetApiKey", pb.GetApiKeyRequest(name=name))

    def list(self, account_id: str, filter: str = "", page_size: int = 0, page_token: str = "") -> Any:
        """One page (ListApiKeysResponse); pass its next_page_token back for the next."""
        return self._call(
            "ListApiKeys",
            pb.ListApiKeysRequest(parent=f"accounts/{account_id}", filter=filter, page_size=page_size, page_token=page_token),
        )

    def update(self, name: str, *, etag: str = "", allow_self: bool = False, **fields: Any) -> Any:
        """The fields given (display_name, description, scopes, labels, expire_time, rate_limits, state), and
        nothing else."""
        key = pb.ApiKey(name=name, etag=etag)
        for field, value in fields.items():
            if field == "expire_time":
                key.expire_time.FromDatetime(value)
            elif field == "state":
                key.state = pb.ApiKey.State.Value(value) if isinstance(value, str) else value
            elif field == "scopes":
                key.scopes.extend(value)
            elif field == "labels":
                key.labels.update(value)
            elif field == "rate_limits":
                for limit, period in value:
                    key.rate_limits.add(limit=limit).period.FromTimedelta(period)
            else:
                setattr(key, field, value)
        return self._call(
            "UpdateApiKey", pb.UpdateApiKeyRequest(api_key=key, update_mask=FieldMask(paths=list(fields)), allow_self=allow_self)
        )

    def disable(self, name: str, *, allow_self: bool = False) -> Any:
        return self.update(name, state="DISABLED", allow_self=allow_self)

    def enable(self, name: str) -> Any:
        return self.update(name, state="ACTIVE")

    def revoke(self, name: str, reason: str = "", *, etag: str = "", allow_self: bool = False) -> Any:
        return self._call("RevokeApiKey", pb.RevokeApiKeyRequest(name=name, reason=reason, etag=etag, allow_self=allow_self))

    def delete(self, name: str, *, etag: str = "", allow_self: bool = False) -> Any:
        return self._call("DeleteApiKey", pb.DeleteApiKeyRequest(name=name, etag=etag, allow_self=allow_self))

    def rotate(
        self, name: str, grace: timedelta = timedelta(0), *, etag: str = "", request_id: str = "", allow_self: bool = False
    ) -> Any:
        """A RotateApiKeyResponse: `.secret` is the new key string; the old one works for `grace`."""
        request = pb.RotateApiKeyRequest(name=name, etag=etag, request_id=request_id, allow_self=allow_self)
        request.grace_period.FromTimedelta(grace)
        return self._call("RotateApiKey", request)

    def audit_events(self, account_id: str, filter: str = "", page_size: int = 0, page_token: str = "") -> Any:
        return self._call(
            "ListAuditEvents",
            pb.ListAuditEventsRequest(parent=f"accounts/{account_id}", filter=filter, page_size=page_size, page_token=page_token),
        )
