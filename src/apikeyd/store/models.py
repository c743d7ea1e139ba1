"""Tables. Times are stored as UTC; SQLite keeps them as sortable text, PostgreSQL as timestamptz."""

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Index, Integer, String, TypeDecorator, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from apikeyd.domain.credits import Calendar, Credits, Refill, RefillMode


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in and out, whatever the engine keeps."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def refill_to_json(refill: Refill | None) -> dict[str, Any] | None:
    if refill is None:
        return None
    value: dict[str, Any] = {"amount": refill.amount, "mode": refill.mode.value, "cap": refill.cap}
    if refill.calendar is not None:
        value["calendar"] = refill.calendar.value
    if refill.every is not None:
        value["every_seconds"] = int(refill.every.total_seconds())
    return value


def credits_from_columns(remaining: int | None, refill: dict[str, Any] | None, next_refill: datetime | None) -> Credits | None:
    if remaining is None:
        return None
    if refill is None:
        return Credits(remaining)
    every = refill.get("every_seconds")
    calendar = refill.get("calendar")
    parsed = Refill(
        amount=int(refill["amount"]),
        mode=RefillMode(refill["mode"]),
        calendar=Calendar(calendar) if calendar else None,
        every=timedelta(seconds=every) if every else None,
        cap=int(refill.get("cap", 0)),
    )
    return Credits(remaining, parsed, next_refill)


class Base(DeclarativeBase):
    pass


class ApiKeyRow(Base):
    __tablename__ = "api_keys"

    key_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    account_id: Mapped[str] = mapped_column(String(63))
    project_id: Mapped[str] = mapped_column(String(63), default="")
    display_name: Mapped[str] = mapped_column(String(255))
    description: Mapped[str] = mapped_column(String(1024), default="")
    scopes: Mapped[list[str]] = mapped_column(JSON)
    labels: Mapped[dict[str, str]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16))
    prefix: Mapped[str] = mapped_column(String(32))
    lookup_id: Mapped[str] = mapped_column(String(32), unique=True)
    masked_key: Mapped[str] = mapped_column(String(64))
    secret_hash: Mapped[str] = mapped_column(String(255))
    previous_secret_hash: Mapped[str | None] = mapped_column(String(255))
    previous_secret_expire_time: Mapped[datetime | None] = mapped_column(UTCDateTime)
    expire_time: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # [[limit, period_seconds], ...]
    rate_limits: Mapped[list[list[int]]] = mapped_column(JSON)
    create_time: Mapped[datetime] = mapped_column(UTCDateTime)
    update_time: Mapped[datetime] = mapped_column(UTCDateTime)
    last_used_time: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoke_time: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoke_reason: Mapped[str] = mapped_column(String(1024), default="")
    # Bumped by every change; the etag and the guard against lost updates.
    revision: Mapped[int] = mapped_column(Integer)
    # Credits (store/credits.py): NULL remaining for unlimited. Spending writes only these two columns
    # and not the revision, so a spend is no change to the key.
    credits_remaining: Mapped[int | None] = mapped_column(BigInteger)
    credits_next_refill: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # {"amount", "mode", "calendar" or "every_seconds", "cap"}
    credits_refill: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    allowed_ip_ranges: Mapped[list[str]] = mapped_column(JSON, default=list)
    previous_secret_last_used_time: Mapped[datetime | None] = mapped_column(UTCDateTime)
    end_grace_after_unused_seconds: Mapped[int | None] = mapped_column(Integer)

    # ListApiKeys pages: keyset on (create_time, key_id) within the account, or within its project, state or
    # both when the filter names them (migration 0003), so a page costs the same at any account size.
    __table_args__ = (
        Index("ix_api_keys_account_page", "account_id", "create_time", "key_id"),
        Index("ix_api_keys_project_page", "account_id", "project_id", "create_time", "key_id"),
        Index("ix_api_keys_state_page", "account_id", "state", "create_time", "key_id"),
        Index("ix_api_keys_project_state_page", "account_id", "project_id", "state", "create_time", "key_id"),
        # The sweep that ends graces early (store/graces.py): only keys whose rotation asked for it.
        Index(
            "ix_api_keys_idle_graces",
            "previous_secret_expire_time",
            postgresql_where=text("end_grace_after_unused_seconds IS NOT NULL"),
            sqlite_where=text("end_grace_after_unused_seconds IS NOT NULL"),
        ),
    )


class KeyEventRow(Base):
    """One row per mutation, written in the mutation's transaction; never holds a secret or hash."""

    __tablename__ = "key_events"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    key_id: Mapped[str] = mapped_column(String(36), index=True)
    account_id: Mapped[str] = mapped_column(String(63))
    kind: Mapped[str] = mapped_column(String(16))
    time: Mapped[datetime] = mapped_column(UTCDateTime)
    changed_fields: Mapped[list[str]] = mapped_column(JSON)
    details: Mapped[dict[str, Any]] = mapped_column(JSON)
    project_id: Mapped[str] = mapped_column(String(63), default="")
    # Who: the calling key (empty for the admin command line), its address and the RPC.
    actor_key_id: Mapped[str] = mapped_column(String(36), default="")
    actor_name: Mapped[str] = mapped_column(String(160), default="")
    actor_display_name: Mapped[str] = mapped_column(String(255), default="")
    peer: Mapped[str] = mapped_column(String(128), default="")
    method: Mapped[str] = mapped_column(String(64), default="")

    # ListAuditEvents pages: keyset on the id within the account, or within a project key's project (0004).
    __table_args__ = (
        Index("ix_key_events_account", "account_id", "id"),
        Index("ix_key_events_project", "account_id", "project_id", "id"),
    )


class RequestIdRow(Base):
    """request_ids of creates and rotations (AIP-155): a retry within a day answers with the first result."""

    __tablename__ = "request_ids"

    request_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    account_id: Mapped[str] = mapped_column(String(63))
    method: Mapped[str] = mapped_column(String(64))
    fingerprint: Mapped[str] = mapped_column(String(64))
    key_id: Mapped[str] = mapped_column(String(36))
    create_time: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class ServerSecretRow(Base):
    """Keys every replica shares, made once by a migration: `page_token` signs page tokens (domain/listing)."""

    __tablename__ = "server_secrets"

    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    value: Mapped[str] = mapped_column(String(255))  # hex


class KeyUsageRow(Base):
    """Authorize outcomes of one key in one bucket (store/usage.py). Account and project are kept here, so
    that usage is listed by who may see it without a join, and outlives the key's deletion."""

    __tablename__ = "key_usage"

    key_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    granularity: Mapped[str] = mapped_column(String(8), primary_key=True)  # minute, hour, day
    bucket: Mapped[datetime] = mapped_column(UTCDateTime, primary_key=True)
    account_id: Mapped[str] = mapped_column(String(63))
    project_id: Mapped[str] = mapped_column(String(63), default="")
    ok: Mapped[int] = mapped_column(BigInteger, default=0)
    rate_limited: Mapped[int] = mapped_column(BigInteger, default=0)
    credits_exhausted: Mapped[int] = mapped_column(BigInteger, default=0)
    insufficient_scope: Mapped[int] = mapped_column(BigInteger, default=0)
    project_mismatch: Mapped[int] = mapped_column(BigInteger, default=0)
    expired: Mapped[int] = mapped_column(BigInteger, default=0)
    disabled: Mapped[int] = mapped_column(BigInteger, default=0)
    revoked: Mapped[int] = mapped_column(BigInteger, default=0)
    ip_not_allowed: Mapped[int] = mapped_column(BigInteger, default=0)

    __table_args__ = (
        # An account's page: keyset on (key_id, bucket) within a granularity.
        Index("ix_key_usage_account", "account_id", "granularity", "key_id", "bucket"),
        # A project key's page: the same order within its project, so other projects' rows are never walked.
        Index("ix_key_usage_project", "account_id", "project_id", "granularity", "key_id", "bucket"),
        # Retention: the oldest buckets of a granularity first.
        Index("ix_key_usage_retention", "granularity", "bucket"),
    )
