"""ListApiKeyUsage's messages <-> domain (the rest of the API's conversions: convert.py)."""

from google.protobuf.timestamp_pb2 import Timestamp

from apikeyd.domain.errors import InvalidArgument
from apikeyd.domain.model import key_name
from apikeyd.domain.usage import (
    Granularity,
    Usage,
    UsageQuery,
    parse_usage_parent,
    validate_key_ids,
    validate_page_size,
    validate_range,
)
from apikeyd.service.convert import timestamp_value
from apikeyd.v1 import api_keys_pb2 as pb

_GRANULARITY_TO_PB = {Granularity.MINUTE: pb.MINUTE, Granularity.HOUR: pb.HOUR, Granularity.DAY: pb.DAY}
_GRANULARITY_FROM_PB = {value: granularity for granularity, value in _GRANULARITY_TO_PB.items()}


def usage_query_from_pb(request: pb.ListApiKeyUsageRequest) -> UsageQuery:
    account_id, key_id = parse_usage_parent(request.parent)
    granularity = _GRANULARITY_FROM_PB.get(request.granularity)
    if granularity is None:
        if request.granularity == pb.USAGE_GRANULARITY_UNSPECIFIED:
            raise InvalidArgument("granularity", "is required: MINUTE, HOUR or DAY")
        raise InvalidArgument("granularity", f"{request.granularity} is not MINUTE, HOUR or DAY")
    key_ids = validate_key_ids(list(request.key_ids), single_key=key_id is not None)
    end = timestamp_value(request, "end_time")
    start = validate_range(granularity, timestamp_value(request, "start_time"), end)
    return UsageQuery(
        account_id=account_id,
        key_ids=(key_id,) if key_id is not None else key_ids,
        single_key=key_id is not None,
        granularity=granularity,
        start=start,
        end=end,
        page_size=validate_page_size(request.page_size),
    )


def usage_to_pb(usage: Usage) -> pb.ApiKeyUsage:
    return pb.ApiKeyUsage(
        api_key=key_name(usage.account_id, usage.key_id),
        key_id=usage.key_id,
        project_id=usage.project_id,
        granularity=_GRANULARITY_TO_PB[usage.granularity],
        start_time=Timestamp(seconds=int(usage.start.timestamp())),  # whole minutes: FromDatetime's work is not needed
        total=usage.total,
        counts={code.name: count for code, count in usage.counts.items()},
    )
