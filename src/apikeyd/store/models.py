"""Tables. Times are stored as UTC; SQLite keeps them as sortable text, PostgreSQL as timestamptz."""

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Index, Integer, String, TypeDecorator
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


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

    # ListApiKeys pages: keyset on (create_time, key_id) within the account, or within its project, state or
    # both when the filter names them (migration 0003), so a page costs the same at any account size.
    __table_args__ = (
        Index("ix_api_keys_account_page", "account_id", "create_time", "key_id"),
        Index("ix_api_keys_project_page", "account_id", "project_id", "create_time", "key_id"),
        Index("ix_api_keys_state_page", "account_id", "state", "create_time", "key_id"),
        Index("ix_api_keys_project_state_page", "account_id", "project_id", "state", "create_time", "key_id"),
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
