"""The size limits of domain/limits.py applied to each request as it arrives, before authentication, before
any parse or digest, before the database: every check here is a length or a count, so a request over a
limit costs as little as one within it. Each servicer method starts with `check_request`."""

from collections.abc import Callable
from typing import Any

import grpc
from envoy.service.auth.v3 import external_auth_pb2 as ext

from apikeyd.domain import limits as L
from apikeyd.domain.errors import InvalidArgument
from apikeyd.logs import REQUEST_ID_METADATA
from apikeyd.v1 import api_keys_pb2 as pb

_METADATA_LIMITS = {
    "authorization": L.MAX_AUTHORIZATION_LENGTH,
    REQUEST_ID_METADATA: L.MAX_X_REQUEST_ID_LENGTH,
}


def _metadata(context: grpc.aio.ServicerContext) -> None:
    total = 0
    for name, value in context.invocation_metadata() or ():
        total += len(name) + len(value)
        limit = _METADATA_LIMITS.get(name)
        if limit is not None:
            L.check_length(f"{name} metadata", value, limit)
    if total > L.MAX_METADATA_BYTES:
        raise InvalidArgument("metadata", f"at most {L.MAX_METADATA_BYTES} bytes, got {total}")


def _name(name: str, field: str = "name") -> None:
    L.check_length(field, name, L.MAX_NAME_LENGTH)


def _parent(request: Any) -> None:
    L.check_length("parent", request.parent, L.MAX_PARENT_LENGTH)


def _etag(etag: str, field: str = "etag") -> None:
    L.check_length(field, etag, L.MAX_ETAG_LENGTH)


def _request_id(request: Any) -> None:
    L.check_length("request_id", request.request_id, L.MAX_REQUEST_ID_LENGTH)


def _api_key(key: pb.ApiKey) -> None:
    """The fields of a new or updated key that are not bounded by their own rule before any work."""
    L.check_length("api_key.project_id", key.project_id, L.MAX_PROJECT_ID_LENGTH)
    L.check_count("api_key.scopes", key.scopes, L.MAX_SCOPES)
    L.check_count("api_key.labels", key.labels, L.MAX_LABELS)
    L.check_count("api_key.rate_limits", key.rate_limits, L.MAX_RATE_LIMITS)
    L.check_count("api_key.allowed_ip_ranges", key.allowed_ip_ranges, L.MAX_IP_RANGES)
    L.check_each_length("api_key.allowed_ip_ranges", key.allowed_ip_ranges, L.MAX_IP_LENGTH)


def _create(request: pb.CreateApiKeyRequest) -> None:
    _parent(request)
    _request_id(request)
    _api_key(request.api_key)


def _list(request: pb.ListApiKeysRequest | pb.ListAuditEventsRequest) -> None:
    _parent(request)
    L.check_length("filter", request.filter, L.MAX_FILTER_LENGTH)
    L.check_length("page_token", request.page_token, L.MAX_PAGE_TOKEN_LENGTH)


def _usage(request: pb.ListApiKeyUsageRequest) -> None:
    _name(request.parent, "parent")
    L.check_count("key_ids", request.key_ids, L.MAX_USAGE_KEY_IDS)
    L.check_each_length("key_ids", request.key_ids, L.MAX_KEY_ID_LENGTH)
    L.check_length("page_token", request.page_token, L.MAX_PAGE_TOKEN_LENGTH)


def _update(request: pb.UpdateApiKeyRequest) -> None:
    _name(request.api_key.name, "api_key.name")
    _etag(request.api_key.etag, "api_key.etag")
    _api_key(request.api_key)
    paths = request.update_mask.paths
    L.check_count("update_mask.paths", paths, L.MAX_UPDATE_MASK_PATHS)
    L.check_each_length("update_mask.paths", paths, L.MAX_UPDATE_MASK_PATH_LENGTH)


def _get(request: pb.GetApiKeyRequest) -> None:
    _name(request.name)


def _revoke_or_delete(request: pb.RevokeApiKeyRequest | pb.DeleteApiKeyRequest) -> None:
    _name(request.name)
    _etag(request.etag)


def _rotate(request: pb.RotateApiKeyRequest) -> None:
    _name(request.name)
    _etag(request.etag)
    _request_id(request)


def _authorize(request: pb.AuthorizeRequest) -> None:
    L.check_authorize(request.key, request.required_scopes, request.resource, request.project_id)
    L.check_length("client_ip", request.client_ip, L.MAX_IP_LENGTH)


def _check(request: ext.CheckRequest) -> None:
    extensions = request.attributes.context_extensions
    L.check_count("context_extensions", extensions, L.MAX_CONTEXT_EXTENSIONS)
    L.check_each_length("context_extensions keys", extensions.keys(), L.MAX_CONTEXT_EXTENSION_KEY_LENGTH)
    L.check_each_length("context_extensions values", extensions.values(), L.MAX_CONTEXT_EXTENSION_VALUE_LENGTH)
    # Their number first: each costs the loop a Python step in ext_authz.request_headers. The values of the
    # few Check reads are checked as it reads them (ext_authz._check_client_values), in either of Envoy's forms.
    http = request.attributes.request.http
    L.check_count("attributes.request.http.headers", http.headers, L.MAX_REQUEST_HEADERS)
    L.check_count("attributes.request.http.header_map.headers", http.header_map.headers, L.MAX_REQUEST_HEADERS)


_CHECKS: dict[type, Callable[[Any], None]] = {
    pb.CreateApiKeyRequest: _create,
    pb.GetApiKeyRequest: _get,
    pb.ListApiKeysRequest: _list,
    pb.UpdateApiKeyRequest: _update,
    pb.RevokeApiKeyRequest: _revoke_or_delete,
    pb.DeleteApiKeyRequest: _revoke_or_delete,
    pb.RotateApiKeyRequest: _rotate,
    pb.ListAuditEventsRequest: _list,
    pb.ListApiKeyUsageRequest: _usage,
    pb.AuthorizeRequest: _authorize,
    pb.WatchApiKeyChangesRequest: lambda _: None,  # one number, checked by the handler
    ext.CheckRequest: _check,
}


def check_request(request: Any, context: grpc.aio.ServicerContext) -> None:
    """InvalidArgument naming the field and its limit for the first one the request exceeds."""
    _metadata(context)
    _CHECKS[type(request)](request)
