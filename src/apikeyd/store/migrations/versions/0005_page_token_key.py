"""a page-token key every replica shares

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01

Page tokens were bound to their request by a hash of public inputs, so anyone could forge one with any
position (an event id past BIGINT answered INTERNAL). They now carry an HMAC under this key. It lives in the
database, not in each process, because replicas behind one balancer must accept each other's tokens.
Going down and up again makes a new key: tokens issued before stop working (INVALID_ARGUMENT, start again).
"""

import secrets

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    table = op.create_table(
        'server_secrets',
        sa.Column('name', sa.String(length=63), nullable=False),
        sa.Column('value', sa.String(length=255), nullable=False),
        sa.PrimaryKeyConstraint('name'),
    )
    # A bound parameter, never literal SQL: the key must not appear in a printed migration script.
    op.get_bind().execute(sa.insert(table), [{'name': 'page_token', 'value': secrets.token_hex(32)}])


def downgrade() -> None:
    op.drop_table('server_secrets')
