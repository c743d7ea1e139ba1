"""apikeyd.v1.ApiKeyService."""

from collections import OrderedDict
from typing import TypeAlias

import grpc
from google.protobuf.empty_pb2 import Empty

from apikeyd.authorizer.authorizer import Authorizer
from apikeyd.change_stream import ChangeStreams
from apikeyd.domain.access import AUTHORIZE, Caller
from apikeyd.domain.decision import Decision
from apikeyd.domain.echo import refuse_key
from apikeyd.domain.errors import InvalidArgument, Unauthenticated
from apikeyd.domain.ip_ranges import parse_address
from apikeyd.domain.model import parse_key_name, parse_parent
from apikeyd.lifecycle import IssuedKey, KeyManager
from apikeyd.metrics import Metrics
from apikeyd.service.convert import (
    api_key_to_pb,
    audit_event_to_pb,
    decision_to_pb,
    duration,
    new_key_from_pb,
    update_from_pb,
)
from apikeyd.service.convert_usage import usage_query_from_pb, usage_to_pb
from apikeyd.service.errors import grpc_errors
from apikeyd.service.key_changes import stream_changes
from apikeyd.service.request_limits import check_request
from apikeyd.tracing import Tracing
from apikeyd.usage_queries import UsageQueries
from apikeyd.v1 import api_keys_pb2 as pb
from apikeyd.v1 import api_keys_pb2_grpc as pb_grpc

Context: TypeAlias = grpc.aio.ServicerContext

_MAX_RENDERED = 10_000


def bearer_token(context: Context) -> str:
    for name, value in context.invocation_metadata() or ():
        if name == "authorization":
            scheme, _, token = str(value).partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated("the authorization metadata must be `Bearer <key>`")
            return token.strip()
    raise Unauthenticated("no credential: send the metadata `authorization: Bearer <key>` with a key of this service")


async def authorizing_caller(manager: KeyManager, required: bool, context: Context, method: str) -> Caller | None:
    """Who asks Authorize or Envoy's Check: nobody in particular by default; with
    APIKEYD_AUTHORIZE_REQUIRES_KEY, a key with apikeys:authorize, which then sees only keys in its reach."""
    if not required:
        return None
    caller = await manager.authenticate(bearer_token(context), context.peer(), method)
    caller.require(AUTHORIZE)
    return caller


class ApiKeyService(pb_grpc.ApiKeyServiceServicer):
    def __init__(
        self,
        manager: KeyManager,
        authorizer: Authorizer,
        metrics: Metrics,
        streams: ChangeStreams,
        authorize_requires_key: bool = False,
        *,
        usage: UsageQueries,
        tracing: Tracing | None = None,
    ) -> None:
        self._manager = manager
        self._tracing = tracing  # None with tracing off: Authorize's whole cost of it is one check
        self._usage = usage
        self._streams = streams
        self._authorizer = authorizer
        self._authorize_requires_key = authorize_requires_key
        # grpc_errors counts every call here and times the ones named in rpc_timers (apikeyd.metrics).
        self.rpc_counts = metrics.rpc_counts
        self.rpc_timers = {"Authorize": metrics.authorize_seconds}
        # A cached key's allowed decision is one object, answered again and again: its response is built
        # once. Keyed by id() with the decision itself kept alive beside it, so the id cannot be reused.
        self._rendered: OrderedDict[int, tuple[Decision, pb.AuthorizeResponse]] = OrderedDict()

    async def _caller(self, context: Context, method: str) -> Caller:
        return await self._manager.authenticate(bearer_token(context), context.peer(), method)

    @staticmethod
    def _issued(issued: IssuedKey) -> tuple[pb.ApiKey, str, bool]:
        return api_key_to_pb(issued.key), issued.secret, issued.replayed

    @grpc_errors
    async def CreateApiKey(self, request: pb.CreateApiKeyRequest, context: Context) -> pb.CreateApiKeyResponse:
        check_request(request, context)
        caller = await self._caller(context, "CreateApiKey")
        account_id = parse_parent(request.parent)
        if not request.HasField("api_key"):
            raise InvalidArgument("api_key", "is required")
        issued = await self._manager.create(caller, account_id, new_key_from_pb(request.api_key), request.request_id)
        key, secret, replayed = self._issued(issued)
        return pb.CreateApiKeyResponse(api_key=key, secret=secret, secret_already_delivered=replayed)

    @grpc_errors
    async def GetApiKey(self, request: pb.GetApiKeyRequest, context: Context) -> pb.ApiKey:
        check_request(request, context)
        caller = await self._caller(context, "GetApiKey")
        return api_key_to_pb(await self._manager.get(caller, *parse_key_name(request.name)))

    @grpc_errors
    async def ListApiKeys(self, request: pb.ListApiKeysRequest, context: Context) -> pb.ListApiKeysResponse:
        check_request(request, context)
        caller = await self._caller(context, "ListApiKeys")
        account_id = parse_parent(request.parent)
        page, token = await self._manager.list_keys(
            caller, account_id, request.filter, request.page_size, request.page_token
        )
        return pb.ListApiKeysResponse(api_keys=[api_key_to_pb(key) for key in page], next_page_token=token)

    @grpc_errors
    async def UpdateApiKey(self, request: pb.UpdateApiKeyRequest, context: Context) -> pb.ApiKey:
        check_request(request, context)
        caller = await self._caller(context, "UpdateApiKey")
        account_id, key_id = parse_key_name(request.api_key.name, "api_key.name")
        values = update_from_pb(request.api_key, request.update_mask)
        key = await self._manager.update(caller, account_id, key_id, values, request.api_key.etag, request.allow_self)
        return api_key_to_pb(key)

    @grpc_errors
    async def RevokeApiKey(self, request: pb.RevokeApiKeyRequest, context: Context) -> pb.ApiKey:
        check_request(request, context)
        caller = await self._caller(context, "RevokeApiKey")
        account_id, key_id = parse_key_name(request.name)
        key = await self._manager.revoke(caller, account_id, key_id, request.reason, request.etag, request.allow_self)
        return api_key_to_pb(key)

    @grpc_errors
    async def DeleteApiKey(self, request: pb.DeleteApiKeyRequest, context: Context) -> Empty:
        check_request(request, context)
        caller = await self._caller(context, "DeleteApiKey")
        account_id, key_id = parse_key_name(request.name)
        await self._manager.delete(caller, account_id, key_id, request.etag, request.allow_self)
        return Empty()

    @grpc_errors
    async def RotateApiKey(self, request: pb.RotateApiKeyRequest, context: Context) -> pb.RotateApiKeyResponse:
        check_request(request, context)
        caller = await self._caller(context, "RotateApiKey")
        account_id, key_id = parse_key_name(request.name)
        grace = duration(request, "grace_period")
        end_after = duration(request, "end_grace_after_unused") if request.HasField("end_grace_after_unused") else None
        issued = await self._manager.rotate(
            caller, account_id, key_id, grace, request.etag, request.request_id, request.allow_self, end_after
        )
        key, secret, replayed = self._issued(issued)
        return pb.RotateApiKeyResponse(api_key=key, secret=secret, secret_already_delivered=replayed)

    @grpc_errors
    async def ListAuditEvents(self, request: pb.ListAuditEventsRequest, context: Context) -> pb.ListAuditEventsResponse:
        check_request(request, context)
        caller = await self._caller(context, "ListAuditEvents")
        account_id = parse_parent(request.parent)
        events, token = await self._manager.list_events(
            caller, account_id, request.filter, request.page_size, request.page_token
        )
        return pb.ListAuditEventsResponse(
            audit_events=[audit_event_to_pb(event) for event in events], next_page_token=token
        )

    @grpc_errors
    async def ListApiKeyUsage(self, request: pb.ListApiKeyUsageRequest, context: Context) -> pb.ListApiKeyUsageResponse:
        check_request(request, context)
        caller = await self._caller(context, "ListApiKeyUsage")
        usage, token = await self._usage.list_usage(caller, usage_query_from_pb(request), request.page_token)
        return pb.ListApiKeyUsageResponse(usage=[usage_to_pb(bucket) for bucket in usage], next_page_token=token)

    @grpc_errors
    async def WatchApiKeyChanges(self, request: pb.WatchApiKeyChangesRequest, context: Context) -> None:
        check_request(request, context)
        token = bearer_token(context)

        async def caller() -> Caller:
            return await self._manager.watcher(token, context.peer())

        await stream_changes(self._streams, await caller(), caller, request, context)

    @grpc_errors
    async def Authorize(self, request: pb.AuthorizeRequest, context: Context) -> pb.AuthorizeResponse:
        check_request(request, context)
        caller = await authorizing_caller(self._manager, self._authorize_requires_key, context, "Authorize")
        project_id = refuse_key("project_id", request.project_id)  # it goes into messages and log lines
        if request.client_ip:
            parse_address(request.client_ip)  # a bad address is the caller's bug, whatever the key
        decision = await self._authorizer.authorize(
            request.key,
            request.required_scopes,
            request.resource,
            project_id,
            caller,
            client_ip=request.client_ip,
            cost=request.cost if request.HasField("cost") else 1,
        )
        if self._tracing is not None:
            self._tracing.decided(decision)
        if decision.rate is not None or decision.credits_remaining is not None or not decision.allowed:
            return decision_to_pb(decision)
        rendered = self._rendered.get(id(decision))
        if rendered is not None and rendered[0] is decision:
            return rendered[1]
        response = decision_to_pb(decision)
        self._rendered[id(decision)] = (decision, response)
        if len(self._rendered) > _MAX_RENDERED:
            self._rendered.popitem(last=False)
        return response
