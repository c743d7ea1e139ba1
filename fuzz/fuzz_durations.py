"""Durations and times as they arrive (service/convert, convert_usage, domain/model): any seconds and nanos a
Duration or Timestamp can carry convert and validate, or raise InvalidArgument naming the field."""

from datetime import UTC, datetime

import atheris
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

with atheris.instrument_imports(include=["apikeyd"]):
    from apikeyd.domain import model
    from apikeyd.domain.errors import InvalidArgument
    from apikeyd.service import convert, convert_usage
    from apikeyd.v1 import api_keys_pb2 as pb

from fuzz.harness import main

_NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _int64(provider: atheris.FuzzedDataProvider) -> int:
    return provider.ConsumeIntInRange(-(2**63), 2**63 - 1)


def check(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    nanos = provider.ConsumeIntInRange(-(2**31), 2**31 - 1)
    try:
        request = pb.RotateApiKeyRequest(grace_period=Duration(seconds=_int64(provider), nanos=nanos))
        model.validate_grace(convert.duration(request, "grace_period"))
    except InvalidArgument as error:
        assert error.field == "grace_period", error
    try:
        key = pb.ApiKey(
            display_name="k",
            scopes=["a:b"],
            expire_time=Timestamp(seconds=_int64(provider), nanos=nanos),
            rate_limits=[pb.RateLimit(limit=_int64(provider), period=Duration(seconds=_int64(provider)))],
        )
        new = convert.new_key_from_pb(key)
        model.validate_expire_time(new.expire_time, _NOW)
        model.validate_rate_limits(list(new.rate_limits))
    except InvalidArgument as error:
        assert error.field in ("expire_time", "rate_limits"), error
    try:  # a usage range: any two timestamps, any granularity number
        convert_usage.usage_query_from_pb(
            pb.ListApiKeyUsageRequest(
                parent="accounts/a/apiKeys/-",
                granularity=provider.ConsumeIntInRange(-(2**31), 2**31 - 1),
                start_time=Timestamp(seconds=_int64(provider), nanos=nanos),
                end_time=Timestamp(seconds=_int64(provider), nanos=provider.ConsumeIntInRange(-(2**31), 2**31 - 1)),
            )
        )
    except InvalidArgument as error:
        assert error.field in ("granularity", "start_time", "end_time"), error


if __name__ == "__main__":
    main(check)
