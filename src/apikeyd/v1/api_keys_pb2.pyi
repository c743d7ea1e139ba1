import datetime

from google.api import annotations_pb2 as _annotations_pb2
from google.api import field_behavior_pb2 as _field_behavior_pb2
from google.api import resource_pb2 as _resource_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import empty_pb2 as _empty_pb2
from google.protobuf import field_mask_pb2 as _field_mask_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class UsageGranularity(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    USAGE_GRANULARITY_UNSPECIFIED: _ClassVar[UsageGranularity]
    MINUTE: _ClassVar[UsageGranularity]
    HOUR: _ClassVar[UsageGranularity]
    DAY: _ClassVar[UsageGranularity]
USAGE_GRANULARITY_UNSPECIFIED: UsageGranularity
MINUTE: UsageGranularity
HOUR: UsageGranularity
DAY: UsageGranularity

class RateLimit(_message.Message):
    __slots__ = ("limit", "period")
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    PERIOD_FIELD_NUMBER: _ClassVar[int]
    limit: int
    period: _duration_pb2.Duration
    def __init__(self, limit: _Optional[int] = ..., period: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class Credits(_message.Message):
    __slots__ = ("remaining", "refill", "next_refill_time")
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    REFILL_FIELD_NUMBER: _ClassVar[int]
    NEXT_REFILL_TIME_FIELD_NUMBER: _ClassVar[int]
    remaining: int
    refill: CreditRefill
    next_refill_time: _timestamp_pb2.Timestamp
    def __init__(self, remaining: _Optional[int] = ..., refill: _Optional[_Union[CreditRefill, _Mapping]] = ..., next_refill_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CreditRefill(_message.Message):
    __slots__ = ("amount", "calendar", "every", "mode", "cap")
    class Calendar(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        CALENDAR_UNSPECIFIED: _ClassVar[CreditRefill.Calendar]
        DAILY: _ClassVar[CreditRefill.Calendar]
        MONTHLY: _ClassVar[CreditRefill.Calendar]
    CALENDAR_UNSPECIFIED: CreditRefill.Calendar
    DAILY: CreditRefill.Calendar
    MONTHLY: CreditRefill.Calendar
    class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        MODE_UNSPECIFIED: _ClassVar[CreditRefill.Mode]
        REPLACE: _ClassVar[CreditRefill.Mode]
        ADD: _ClassVar[CreditRefill.Mode]
    MODE_UNSPECIFIED: CreditRefill.Mode
    REPLACE: CreditRefill.Mode
    ADD: CreditRefill.Mode
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    CALENDAR_FIELD_NUMBER: _ClassVar[int]
    EVERY_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    CAP_FIELD_NUMBER: _ClassVar[int]
    amount: int
    calendar: CreditRefill.Calendar
    every: _duration_pb2.Duration
    mode: CreditRefill.Mode
    cap: int
    def __init__(self, amount: _Optional[int] = ..., calendar: _Optional[_Union[CreditRefill.Calendar, str]] = ..., every: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., mode: _Optional[_Union[CreditRefill.Mode, str]] = ..., cap: _Optional[int] = ...) -> None: ...

class ApiKey(_message.Message):
    __slots__ = ("name", "key_id", "account_id", "project_id", "display_name", "description", "scopes", "labels", "state", "masked_key", "expire_time", "rate_limits", "create_time", "update_time", "last_used_time", "revoke_time", "revoke_reason", "previous_secret_expire_time", "etag", "credits", "allowed_ip_ranges", "previous_secret_last_used_time", "end_grace_after_unused")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[ApiKey.State]
        ACTIVE: _ClassVar[ApiKey.State]
        DISABLED: _ClassVar[ApiKey.State]
        REVOKED: _ClassVar[ApiKey.State]
    STATE_UNSPECIFIED: ApiKey.State
    ACTIVE: ApiKey.State
    DISABLED: ApiKey.State
    REVOKED: ApiKey.State
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MASKED_KEY_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    RATE_LIMITS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_TIME_FIELD_NUMBER: _ClassVar[int]
    REVOKE_TIME_FIELD_NUMBER: _ClassVar[int]
    REVOKE_REASON_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_SECRET_EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    ETAG_FIELD_NUMBER: _ClassVar[int]
    CREDITS_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_IP_RANGES_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_SECRET_LAST_USED_TIME_FIELD_NUMBER: _ClassVar[int]
    END_GRACE_AFTER_UNUSED_FIELD_NUMBER: _ClassVar[int]
    name: str
    key_id: str
    account_id: str
    project_id: str
    display_name: str
    description: str
    scopes: _containers.RepeatedScalarFieldContainer[str]
    labels: _containers.ScalarMap[str, str]
    state: ApiKey.State
    masked_key: str
    expire_time: _timestamp_pb2.Timestamp
    rate_limits: _containers.RepeatedCompositeFieldContainer[RateLimit]
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    last_used_time: _timestamp_pb2.Timestamp
    revoke_time: _timestamp_pb2.Timestamp
    revoke_reason: str
    previous_secret_expire_time: _timestamp_pb2.Timestamp
    etag: str
    credits: Credits
    allowed_ip_ranges: _containers.RepeatedScalarFieldContainer[str]
    previous_secret_last_used_time: _timestamp_pb2.Timestamp
    end_grace_after_unused: _duration_pb2.Duration
    def __init__(self, name: _Optional[str] = ..., key_id: _Optional[str] = ..., account_id: _Optional[str] = ..., project_id: _Optional[str] = ..., display_name: _Optional[str] = ..., description: _Optional[str] = ..., scopes: _Optional[_Iterable[str]] = ..., labels: _Optional[_Mapping[str, str]] = ..., state: _Optional[_Union[ApiKey.State, str]] = ..., masked_key: _Optional[str] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., rate_limits: _Optional[_Iterable[_Union[RateLimit, _Mapping]]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_used_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., revoke_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., revoke_reason: _Optional[str] = ..., previous_secret_expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., etag: _Optional[str] = ..., credits: _Optional[_Union[Credits, _Mapping]] = ..., allowed_ip_ranges: _Optional[_Iterable[str]] = ..., previous_secret_last_used_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_grace_after_unused: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class CreateApiKeyRequest(_message.Message):
    __slots__ = ("parent", "api_key", "request_id")
    PARENT_FIELD_NUMBER: _ClassVar[int]
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    parent: str
    api_key: ApiKey
    request_id: str
    def __init__(self, parent: _Optional[str] = ..., api_key: _Optional[_Union[ApiKey, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class CreateApiKeyResponse(_message.Message):
    __slots__ = ("api_key", "secret", "secret_already_delivered")
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    SECRET_ALREADY_DELIVERED_FIELD_NUMBER: _ClassVar[int]
    api_key: ApiKey
    secret: str
    secret_already_delivered: bool
    def __init__(self, api_key: _Optional[_Union[ApiKey, _Mapping]] = ..., secret: _Optional[str] = ..., secret_already_delivered: _Optional[bool] = ...) -> None: ...

class GetApiKeyRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListApiKeysRequest(_message.Message):
    __slots__ = ("parent", "page_size", "page_token", "filter")
    PARENT_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    parent: str
    page_size: int
    page_token: str
    filter: str
    def __init__(self, parent: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., filter: _Optional[str] = ...) -> None: ...

class ListApiKeysResponse(_message.Message):
    __slots__ = ("api_keys", "next_page_token")
    API_KEYS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    api_keys: _containers.RepeatedCompositeFieldContainer[ApiKey]
    next_page_token: str
    def __init__(self, api_keys: _Optional[_Iterable[_Union[ApiKey, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class UpdateApiKeyRequest(_message.Message):
    __slots__ = ("api_key", "update_mask", "allow_self")
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MASK_FIELD_NUMBER: _ClassVar[int]
    ALLOW_SELF_FIELD_NUMBER: _ClassVar[int]
    api_key: ApiKey
    update_mask: _field_mask_pb2.FieldMask
    allow_self: bool
    def __init__(self, api_key: _Optional[_Union[ApiKey, _Mapping]] = ..., update_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ..., allow_self: _Optional[bool] = ...) -> None: ...

class RevokeApiKeyRequest(_message.Message):
    __slots__ = ("name", "reason", "etag", "allow_self")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ETAG_FIELD_NUMBER: _ClassVar[int]
    ALLOW_SELF_FIELD_NUMBER: _ClassVar[int]
    name: str
    reason: str
    etag: str
    allow_self: bool
    def __init__(self, name: _Optional[str] = ..., reason: _Optional[str] = ..., etag: _Optional[str] = ..., allow_self: _Optional[bool] = ...) -> None: ...

class DeleteApiKeyRequest(_message.Message):
    __slots__ = ("name", "etag", "allow_self")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ETAG_FIELD_NUMBER: _ClassVar[int]
    ALLOW_SELF_FIELD_NUMBER: _ClassVar[int]
    name: str
    etag: str
    allow_self: bool
    def __init__(self, name: _Optional[str] = ..., etag: _Optional[str] = ..., allow_self: _Optional[bool] = ...) -> None: ...

class RotateApiKeyRequest(_message.Message):
    __slots__ = ("name", "grace_period", "etag", "request_id", "allow_self", "end_grace_after_unused")
    NAME_FIELD_NUMBER: _ClassVar[int]
    GRACE_PERIOD_FIELD_NUMBER: _ClassVar[int]
    ETAG_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ALLOW_SELF_FIELD_NUMBER: _ClassVar[int]
    END_GRACE_AFTER_UNUSED_FIELD_NUMBER: _ClassVar[int]
    name: str
    grace_period: _duration_pb2.Duration
    etag: str
    request_id: str
    allow_self: bool
    end_grace_after_unused: _duration_pb2.Duration
    def __init__(self, name: _Optional[str] = ..., grace_period: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., etag: _Optional[str] = ..., request_id: _Optional[str] = ..., allow_self: _Optional[bool] = ..., end_grace_after_unused: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class RotateApiKeyResponse(_message.Message):
    __slots__ = ("api_key", "secret", "secret_already_delivered")
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    SECRET_ALREADY_DELIVERED_FIELD_NUMBER: _ClassVar[int]
    api_key: ApiKey
    secret: str
    secret_already_delivered: bool
    def __init__(self, api_key: _Optional[_Union[ApiKey, _Mapping]] = ..., secret: _Optional[str] = ..., secret_already_delivered: _Optional[bool] = ...) -> None: ...

class AuthorizeRequest(_message.Message):
    __slots__ = ("key", "required_scopes", "resource", "project_id", "cost", "client_ip")
    KEY_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_SCOPES_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    CLIENT_IP_FIELD_NUMBER: _ClassVar[int]
    key: str
    required_scopes: _containers.RepeatedScalarFieldContainer[str]
    resource: str
    project_id: str
    cost: int
    client_ip: str
    def __init__(self, key: _Optional[str] = ..., required_scopes: _Optional[_Iterable[str]] = ..., resource: _Optional[str] = ..., project_id: _Optional[str] = ..., cost: _Optional[int] = ..., client_ip: _Optional[str] = ...) -> None: ...

class AuthorizeResponse(_message.Message):
    __slots__ = ("allowed", "code", "message", "key_id", "name", "account_id", "project_id", "scopes", "labels", "limit", "remaining", "retry_after", "missing_scopes", "display_name", "expire_time", "secret_expire_time", "revoke_time", "has_limits", "stale", "credits_remaining")
    class Code(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        OK: _ClassVar[AuthorizeResponse.Code]
        MALFORMED: _ClassVar[AuthorizeResponse.Code]
        NOT_FOUND: _ClassVar[AuthorizeResponse.Code]
        DISABLED: _ClassVar[AuthorizeResponse.Code]
        REVOKED: _ClassVar[AuthorizeResponse.Code]
        EXPIRED: _ClassVar[AuthorizeResponse.Code]
        PROJECT_MISMATCH: _ClassVar[AuthorizeResponse.Code]
        INSUFFICIENT_SCOPE: _ClassVar[AuthorizeResponse.Code]
        RATE_LIMITED: _ClassVar[AuthorizeResponse.Code]
        CREDITS_EXHAUSTED: _ClassVar[AuthorizeResponse.Code]
        IP_NOT_ALLOWED: _ClassVar[AuthorizeResponse.Code]
    OK: AuthorizeResponse.Code
    MALFORMED: AuthorizeResponse.Code
    NOT_FOUND: AuthorizeResponse.Code
    DISABLED: AuthorizeResponse.Code
    REVOKED: AuthorizeResponse.Code
    EXPIRED: AuthorizeResponse.Code
    PROJECT_MISMATCH: AuthorizeResponse.Code
    INSUFFICIENT_SCOPE: AuthorizeResponse.Code
    RATE_LIMITED: AuthorizeResponse.Code
    CREDITS_EXHAUSTED: AuthorizeResponse.Code
    IP_NOT_ALLOWED: AuthorizeResponse.Code
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ALLOWED_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_FIELD_NUMBER: _ClassVar[int]
    MISSING_SCOPES_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    SECRET_EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    REVOKE_TIME_FIELD_NUMBER: _ClassVar[int]
    HAS_LIMITS_FIELD_NUMBER: _ClassVar[int]
    STALE_FIELD_NUMBER: _ClassVar[int]
    CREDITS_REMAINING_FIELD_NUMBER: _ClassVar[int]
    allowed: bool
    code: AuthorizeResponse.Code
    message: str
    key_id: str
    name: str
    account_id: str
    project_id: str
    scopes: _containers.RepeatedScalarFieldContainer[str]
    labels: _containers.ScalarMap[str, str]
    limit: int
    remaining: int
    retry_after: _duration_pb2.Duration
    missing_scopes: _containers.RepeatedScalarFieldContainer[str]
    display_name: str
    expire_time: _timestamp_pb2.Timestamp
    secret_expire_time: _timestamp_pb2.Timestamp
    revoke_time: _timestamp_pb2.Timestamp
    has_limits: bool
    stale: bool
    credits_remaining: int
    def __init__(self, allowed: _Optional[bool] = ..., code: _Optional[_Union[AuthorizeResponse.Code, str]] = ..., message: _Optional[str] = ..., key_id: _Optional[str] = ..., name: _Optional[str] = ..., account_id: _Optional[str] = ..., project_id: _Optional[str] = ..., scopes: _Optional[_Iterable[str]] = ..., labels: _Optional[_Mapping[str, str]] = ..., limit: _Optional[int] = ..., remaining: _Optional[int] = ..., retry_after: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., missing_scopes: _Optional[_Iterable[str]] = ..., display_name: _Optional[str] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., secret_expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., revoke_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., has_limits: _Optional[bool] = ..., stale: _Optional[bool] = ..., credits_remaining: _Optional[int] = ...) -> None: ...

class WatchApiKeyChangesRequest(_message.Message):
    __slots__ = ("resume_after",)
    RESUME_AFTER_FIELD_NUMBER: _ClassVar[int]
    resume_after: int
    def __init__(self, resume_after: _Optional[int] = ...) -> None: ...

class ApiKeyChange(_message.Message):
    __slots__ = ("event_id", "api_key", "key_id", "kind")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    event_id: int
    api_key: str
    key_id: str
    kind: AuditEvent.Kind
    def __init__(self, event_id: _Optional[int] = ..., api_key: _Optional[str] = ..., key_id: _Optional[str] = ..., kind: _Optional[_Union[AuditEvent.Kind, str]] = ...) -> None: ...

class WatchApiKeyChangesResponse(_message.Message):
    __slots__ = ("changes", "position", "sync_age", "heartbeat", "reach", "lease", "send_time")
    class Reach(_message.Message):
        __slots__ = ("all_accounts", "account_id", "project_id")
        ALL_ACCOUNTS_FIELD_NUMBER: _ClassVar[int]
        ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
        PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
        all_accounts: bool
        account_id: str
        project_id: str
        def __init__(self, all_accounts: _Optional[bool] = ..., account_id: _Optional[str] = ..., project_id: _Optional[str] = ...) -> None: ...
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    SYNC_AGE_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    REACH_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    SEND_TIME_FIELD_NUMBER: _ClassVar[int]
    changes: _containers.RepeatedCompositeFieldContainer[ApiKeyChange]
    position: int
    sync_age: _duration_pb2.Duration
    heartbeat: bool
    reach: WatchApiKeyChangesResponse.Reach
    lease: _duration_pb2.Duration
    send_time: _timestamp_pb2.Timestamp
    def __init__(self, changes: _Optional[_Iterable[_Union[ApiKeyChange, _Mapping]]] = ..., position: _Optional[int] = ..., sync_age: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., heartbeat: _Optional[bool] = ..., reach: _Optional[_Union[WatchApiKeyChangesResponse.Reach, _Mapping]] = ..., lease: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., send_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class AuditEvent(_message.Message):
    __slots__ = ("name", "event_id", "kind", "event_time", "api_key", "key_id", "account_id", "project_id", "actor", "actor_key_id", "actor_display_name", "peer", "method", "changed_fields", "reason", "details")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[AuditEvent.Kind]
        CREATED: _ClassVar[AuditEvent.Kind]
        UPDATED: _ClassVar[AuditEvent.Kind]
        DISABLED: _ClassVar[AuditEvent.Kind]
        ENABLED: _ClassVar[AuditEvent.Kind]
        REVOKED: _ClassVar[AuditEvent.Kind]
        ROTATED: _ClassVar[AuditEvent.Kind]
        DELETED: _ClassVar[AuditEvent.Kind]
        DENIED: _ClassVar[AuditEvent.Kind]
    KIND_UNSPECIFIED: AuditEvent.Kind
    CREATED: AuditEvent.Kind
    UPDATED: AuditEvent.Kind
    DISABLED: AuditEvent.Kind
    ENABLED: AuditEvent.Kind
    REVOKED: AuditEvent.Kind
    ROTATED: AuditEvent.Kind
    DELETED: AuditEvent.Kind
    DENIED: AuditEvent.Kind
    class DetailsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    EVENT_TIME_FIELD_NUMBER: _ClassVar[int]
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    ACTOR_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    ACTOR_DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELDS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    name: str
    event_id: int
    kind: AuditEvent.Kind
    event_time: _timestamp_pb2.Timestamp
    api_key: str
    key_id: str
    account_id: str
    project_id: str
    actor: str
    actor_key_id: str
    actor_display_name: str
    peer: str
    method: str
    changed_fields: _containers.RepeatedScalarFieldContainer[str]
    reason: str
    details: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., event_id: _Optional[int] = ..., kind: _Optional[_Union[AuditEvent.Kind, str]] = ..., event_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., api_key: _Optional[str] = ..., key_id: _Optional[str] = ..., account_id: _Optional[str] = ..., project_id: _Optional[str] = ..., actor: _Optional[str] = ..., actor_key_id: _Optional[str] = ..., actor_display_name: _Optional[str] = ..., peer: _Optional[str] = ..., method: _Optional[str] = ..., changed_fields: _Optional[_Iterable[str]] = ..., reason: _Optional[str] = ..., details: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ListAuditEventsRequest(_message.Message):
    __slots__ = ("parent", "page_size", "page_token", "filter")
    PARENT_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    parent: str
    page_size: int
    page_token: str
    filter: str
    def __init__(self, parent: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., filter: _Optional[str] = ...) -> None: ...

class ListAuditEventsResponse(_message.Message):
    __slots__ = ("audit_events", "next_page_token")
    AUDIT_EVENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    audit_events: _containers.RepeatedCompositeFieldContainer[AuditEvent]
    next_page_token: str
    def __init__(self, audit_events: _Optional[_Iterable[_Union[AuditEvent, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ListApiKeyUsageRequest(_message.Message):
    __slots__ = ("parent", "granularity", "start_time", "end_time", "key_ids", "page_size", "page_token")
    PARENT_FIELD_NUMBER: _ClassVar[int]
    GRANULARITY_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    KEY_IDS_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    parent: str
    granularity: UsageGranularity
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    key_ids: _containers.RepeatedScalarFieldContainer[str]
    page_size: int
    page_token: str
    def __init__(self, parent: _Optional[str] = ..., granularity: _Optional[_Union[UsageGranularity, str]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., key_ids: _Optional[_Iterable[str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ApiKeyUsage(_message.Message):
    __slots__ = ("api_key", "key_id", "project_id", "granularity", "start_time", "total", "counts")
    class CountsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    GRANULARITY_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    api_key: str
    key_id: str
    project_id: str
    granularity: UsageGranularity
    start_time: _timestamp_pb2.Timestamp
    total: int
    counts: _containers.ScalarMap[str, int]
    def __init__(self, api_key: _Optional[str] = ..., key_id: _Optional[str] = ..., project_id: _Optional[str] = ..., granularity: _Optional[_Union[UsageGranularity, str]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., total: _Optional[int] = ..., counts: _Optional[_Mapping[str, int]] = ...) -> None: ...

class ListApiKeyUsageResponse(_message.Message):
    __slots__ = ("usage", "next_page_token")
    USAGE_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    usage: _containers.RepeatedCompositeFieldContainer[ApiKeyUsage]
    next_page_token: str
    def __init__(self, usage: _Optional[_Iterable[_Union[ApiKeyUsage, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...
