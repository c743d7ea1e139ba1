"""WatchApiKeyChanges over gRPC: the change stream (change_stream.py) written to one call."""

import time
from collections.abc import Awaitable, Callable
from datetime import timedelta

import grpc

from apikeyd.change_stream import Batch, ChangeStreams
from apikeyd.domain.access import Caller
from apikeyd.domain.errors import InvalidArgument
from apikeyd.domain.model import KeyChange, key_name
from apikeyd.v1 import api_keys_pb2 as pb

_CHUNK = 1000  # changes per response of a replay: a long one is not one large message
_RECHECK = 1.0  # seconds between checks of the calling key, unless a change names it


def _change(change: KeyChange) -> pb.ApiKeyChange:
    return pb.ApiKeyChange(
        event_id=change.event_id,
        api_key=key_name(change.account_id, change.key_id),
        key_id=change.key_id,
        kind=pb.AuditEvent.Kind.Value(change.kind.name),
    )


def _response(batch: Batch) -> pb.WatchApiKeyChangesResponse:
    response = pb.WatchApiKeyChangesResponse(position=batch.position)
    if batch.changes:
        response.changes.extend(map(_change, batch.changes))
    if batch.synced_at is not None:
        # Stamped as it is written, by hand: protobuf's FromTimedelta and GetCurrentTime are Python code, a
        # tenth of a heartbeat's CPU with 500 streams (py-spy).
        response.heartbeat = True
        age_ns = max(time.monotonic_ns() - int(batch.synced_at * 1e9), 0)
        response.sync_age.seconds, response.sync_age.nanos = divmod(age_ns, 1_000_000_000)
        response.send_time.seconds, response.send_time.nanos = divmod(time.time_ns(), 1_000_000_000)
    return response


async def stream_changes(
    streams: ChangeStreams,
    caller: Caller,
    reauthenticate: Callable[[], Awaitable[Caller]],
    request: pb.WatchApiKeyChangesRequest,
    context: grpc.aio.ServicerContext,
) -> None:
    """Until the client goes away or the server drains. Before a heartbeat, once a second or when a change
    names it, the calling key is checked again through the cache, so a stream ends once its own key is
    revoked, disabled, expired or loses `apikeys:authorize`."""
    if request.resume_after < 0:
        raise InvalidArgument("resume_after", "must be a position from an earlier response, or 0 to start afresh")
    reach = caller.reach
    subscription = streams.subscribe(reach)
    try:
        replay = await streams.replay(subscription, request.resume_after)
        # In responses of at most _CHUNK changes, each no further than the resume point but the last.
        chunks = [replay.changes[i : i + _CHUNK] for i in range(0, len(replay.changes), _CHUNK)] or [[]]
        for number, chunk in enumerate(chunks, 1):
            position = replay.position if number == len(chunks) else request.resume_after
            response = _response(Batch(chunk, position, None))
            if number == 1:
                response.reach.all_accounts = reach.everything
                response.reach.account_id = reach.account_id
                response.reach.project_id = reach.project_id
                response.lease.FromTimedelta(timedelta(seconds=streams.lease))
            await context.write(response)
        checked_at = time.monotonic()
        own = caller.key.key_id if caller.key is not None else ""
        while (batch := await subscription.next()) is not None:
            if batch.synced_at is not None and (
                time.monotonic() - checked_at >= _RECHECK or any(c.key_id == own for c in batch.changes)
            ):
                await reauthenticate()
                checked_at = time.monotonic()
            await context.write(_response(batch))
    finally:
        streams.unsubscribe(subscription)
