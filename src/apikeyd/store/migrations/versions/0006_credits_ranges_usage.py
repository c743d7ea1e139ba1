"""credits, IP ranges, the previous secret's last use, and usage buckets

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02

Issue 12. The new api_keys columns are NULL or empty for existing keys, which means what those keys had
before: unlimited uses, any address, no early end of grace.
"""

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

_COUNTS = (
    "ok", "rate_limited", "credits_exhausted", "insufficient_scope", "project_mismatch",
    "expired", "disabled", "revoked", "ip_not_allowed",
)


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as table:
        table.add_column(sa.Column("credits_remaining", sa.BigInteger(), nullable=True))
        table.add_column(sa.Column("credits_next_refill", sa.DateTime(timezone=True), nullable=True))
        table.add_column(sa.Column("credits_refill", sa.JSON(), nullable=True))
        table.add_column(sa.Column("allowed_ip_ranges", sa.JSON(), nullable=False, server_default="[]"))
        table.add_column(sa.Column("previous_secret_last_used_time", sa.DateTime(timezone=True), nullable=True))
        table.add_column(sa.Column("end_grace_after_unused_seconds", sa.Integer(), nullable=True))
    op.create_index(
        "ix_api_keys_idle_graces", "api_keys", ["previous_secret_expire_time"],
        postgresql_where=sa.text("end_grace_after_unused_seconds IS NOT NULL"),
        sqlite_where=sa.text("end_grace_after_unused_seconds IS NOT NULL"),
    )
    op.create_table(
        "key_usage",
        sa.Column("key_id", sa.String(length=36), nullable=False),
        sa.Column("granularity", sa.String(length=8), nullable=False),
        sa.Column("bucket", sa.DateTime(timezone=True), nullable=False),
        sa.Column("account_id", sa.String(length=63), nullable=False),
        sa.Column("project_id", sa.String(length=63), nullable=False),
        *(sa.Column(name, sa.BigInteger(), nullable=False) for name in _COUNTS),
        sa.PrimaryKeyConstraint("key_id", "granularity", "bucket"),
    )
    op.create_index("ix_key_usage_account", "key_usage", ["account_id", "granularity", "key_id", "bucket"])
    op.create_index("ix_key_usage_retention", "key_usage", ["granularity", "bucket"])
    op.create_index("ix_key_usage_project", "key_usage", ["account_id", "project_id", "granularity", "key_id", "bucket"])


def downgrade() -> None:
    op.drop_index("ix_key_usage_project", table_name="key_usage")
    op.drop_index("ix_key_usage_retention", table_name="key_usage")
    op.drop_index("ix_key_usage_account", table_name="key_usage")
    op.drop_table("key_usage")
    op.drop_index("ix_api_keys_idle_graces", table_name="api_keys")
    with op.batch_alter_table("api_keys") as table:
        for column in (
            "end_grace_after_unused_seconds", "previous_secret_last_used_time", "allowed_ip_ranges",
            "credits_refill", "credits_next_refill", "credits_remaining",
        ):
            table.drop_column(column)
