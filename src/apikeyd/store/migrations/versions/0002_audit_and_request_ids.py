"""audit columns on key_events; request_ids

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

_AUDIT_COLUMNS = (
    ('project_id', 63),
    ('actor_key_id', 36),
    ('actor_name', 160),
    ('actor_display_name', 255),
    ('peer', 128),
    ('method', 64),
)


def upgrade() -> None:
    with op.batch_alter_table('key_events', schema=None) as batch_op:
        for name, length in _AUDIT_COLUMNS:
            batch_op.add_column(sa.Column(name, sa.String(length=length), nullable=False, server_default=''))
    op.create_table('request_ids',
    sa.Column('request_id', sa.String(length=36), nullable=False),
    sa.Column('account_id', sa.String(length=63), nullable=False),
    sa.Column('method', sa.String(length=64), nullable=False),
    sa.Column('fingerprint', sa.String(length=64), nullable=False),
    sa.Column('key_id', sa.String(length=36), nullable=False),
    sa.Column('create_time', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('request_id')
    )
    with op.batch_alter_table('request_ids', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_request_ids_create_time'), ['create_time'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('request_ids', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_request_ids_create_time'))
    op.drop_table('request_ids')
    with op.batch_alter_table('key_events', schema=None) as batch_op:
        for name, _ in reversed(_AUDIT_COLUMNS):
            batch_op.drop_column(name)
