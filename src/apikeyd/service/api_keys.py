"""apikeyd.v1.ApiKeyService."""

from collections import OrderedDict

import grpc
from google.protobuf.empty_pb2 import Empty

from apikeyd.authorizer.authorizer import Authorizer
from apikeyd.domain.decision import Decision
from apikeyd.domain.errors import InvalidArgument
from apikeyd.domain.model import parse_key_name, parse_parent
from apikeyd.lifecycle import KeyManager
from apikeyd.service.convert import api_key_to_pb, decision_to_pb, duration, new_key_from_pb, update_from_pb
from apikeyd.service.errors import grpc_errors
from apikeyd.v1 import api_keys_pb2 as pb
from apikeyd.v1 import api_keys_pb2_grpc as pb_grpc

Context = grpc.aio.ServicerContext


_MAX_RENDERED = 10_000


class ApiKeyService(pb_grpc.ApiKeyServiceServicer):
    def __init__(self, manager: KeyManager, authorizer: Authorizer) -> None:
        self._manager = manager
        self._authorizer = authorizer
        # A cached key's allowed decision is one object, answered again and again: its response is built
        # once. Keyed by id() with the decision itself kept alive beside it, so the id cannot be reused.
        self._rendered: OrderedDict[int, tuple[Decision, pb.AuthorizeResponse]] = OrderedDict()

    @grpc_errors
    async def CreateApiKey(self, request: pb.CreateApiKeyRequest, context: Context) -> pb.CreateApiKeyResponse:
        account_id = parse_parent(request.parent)
        if not request.HasField("api_key"):
            raise InvalidArgument("api_key", "is required")
        key, secret = await self._manager.create(account_id, new_key_from_pb(request.api_key))
        return pb.CreateApiKeyResponse(api_key=api_key_to_pb(key), secret=secret)

    @grpc_errors
    async def GetApiKey(self, request: pb.GetApiKeyRequest, context: Context) -> pb.ApiKey:
        return api_key_to_pb(await self._manager.get(*parse_key_name(request.name)))

    @grpc_errors
    async def ListApiKeys(self, request: pb.ListApiKeysRequest, context: Context) -> pb.ListApiKeysResponse:
        account_id = parse_parent(request.parent)
        page, token, total = await self._manager.list(account_id, request.filter, request.page_size, request.page_token)
        return pb.ListApiKeysResponse(
            api_keys=[api_key_to_pb(key) for key in page], next_page_token=token, total_size=total
        )

    @grpc_errors
    async def UpdateApiKey(self, request: pb.UpdateApiKeyRequest, context: Context) -> pb.ApiKey:
        account_id, key_id = parse_key_name(request.api_key.name, "api_key.name")
        values = update_from_pb(request.api_key, request.update_mask)
        key = await self._manager.update(account_id, key_id, values, request.api_key.etag)
        return api_key_to_pb(key)

    @grpc_errors
    async def RevokeApiKey(self, request: pb.RevokeApiKeyRequest, context: Context) -> pb.ApiKey:
        account_id, key_id = parse_key_name(request.name)
        return api_key_to_pb(await self._manager.revoke(account_id, key_id, request.reason, request.etag))

    @grpc_errors
    async def DeleteApiKey(self, request: pb.DeleteApiKeyRequest, context: Context) -> Empty:
        account_id, key_id = parse_key_name(request.name)
        await self._manager.delete(account_id, key_id, request.etag)
        return Empty()

    @grpc_errors
    async def RotateApiKey(self, request: pb.RotateApiKeyRequest, context: Context) -> pb.RotateApiKeyResponse:
        account_id, key_id = parse_key_name(request.name)
        grace = duration(request, "grace_period")
        key, secret = await self._manager.rotate(account_id, key_id, grace, request.etag)
        return pb.RotateApiKeyResponse(api_key=api_key_to_pb(key), secret=secret)

    @grpc_errors
    async def Authorize(self, request: pb.AuthorizeRequest, context: Context) -> pb.AuthorizeResponse:
        decision = await self._authorizer.authorize(
            request.key, request.required_scopes, request.resource, request.project_id
        )
        if decision.rate is not None or not decision.allowed:
            return decision_to_pb(decision)
        rendered = self._rendered.get(id(decision))
        if rendered is not None and rendered[0] is decision:
            return rendered[1]
        response = decision_to_pb(decision)
        self._rendered[id(decision)] = (decision, response)
        if len(self._rendered) > _MAX_RENDERED:
            self._rendered.popitem(last=False)
        return response
