"""keys and key events

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None

def upgrade() -> None:

    op.create_table('api_keys',
    sa.Column('key_id', sa.String(length=36), nullable=False),
    sa.Column('account_id', sa.String(length=63), nullable=False),
    sa.Column('project_id', sa.String(length=63), nullable=False),
    sa.Column('display_name', sa.String(length=255), nullable=False),
    sa.Column('description', sa.String(length=1024), nullable=False),
    sa.Column('scopes', sa.JSON(), nullable=False),
    sa.Column('labels', sa.JSON(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('prefix', sa.String(length=32), nullable=False),
    sa.Column('lookup_id', sa.String(length=32), nullable=False),
    sa.Column('masked_key', sa.String(length=64), nullable=False),
    sa.Column('secret_hash', sa.String(length=255), nullable=False),
    sa.Column('previous_secret_hash', sa.String(length=255), nullable=True),
    sa.Column('previous_secret_expire_time', sa.DateTime(timezone=True), nullable=True),
    sa.Column('expire_time', sa.DateTime(timezone=True), nullable=True),
    sa.Column('rate_limits', sa.JSON(), nullable=False),
    sa.Column('create_time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('update_time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_used_time', sa.DateTime(timezone=True), nullable=True),
    sa.Column('revoke_time', sa.DateTime(timezone=True), nullable=True),
    sa.Column('revoke_reason', sa.String(length=1024), nullable=False),
    sa.Column('revision', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('key_id'),
    sa.UniqueConstraint('lookup_id')
    )
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.create_index('ix_api_keys_account_page', ['account_id', 'create_time', 'key_id'], unique=False)

    op.create_table('key_events',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('key_id', sa.String(length=36), nullable=False),
    sa.Column('account_id', sa.String(length=63), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('changed_fields', sa.JSON(), nullable=False),
    sa.Column('details', sa.JSON(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('key_events', schema=None) as batch_op:
        batch_op.create_index('ix_key_events_account', ['account_id', 'id'], unique=False)
        batch_op.create_index(batch_op.f('ix_key_events_key_id'), ['key_id'], unique=False)

def downgrade() -> None:

    with op.batch_alter_table('key_events', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_key_events_key_id'))
        batch_op.drop_index('ix_key_events_account')

    op.drop_table('key_events')
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.drop_index('ix_api_keys_account_page')

    op.drop_table('api_keys')

