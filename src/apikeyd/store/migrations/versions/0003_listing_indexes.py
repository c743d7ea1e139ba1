"""indexes for listing an account's keys by project, by state, and by both

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24

ListApiKeys reads one page in (create_time, key_id) order after the page token's position. With
`project_id = "..."` (every project key's list is filtered so) or `state = ...` in the filter, the account
index alone makes the database walk the account's keys in order and drop the other projects' or states'
rows, up to the whole account before the page is full (PostgreSQL rather reads them all and sorts). Each
of these indexes has the filter's columns first, so a page starts at its place in the index and reads
only its own rows.
"""

from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


_INDEXES = (
    ("ix_api_keys_project_page", ["account_id", "project_id", "create_time", "key_id"]),
    ("ix_api_keys_state_page", ["account_id", "state", "create_time", "key_id"]),
    ("ix_api_keys_project_state_page", ["account_id", "project_id", "state", "create_time", "key_id"]),
)


def upgrade() -> None:
    context = op.get_context()
    if context.dialect.name == "postgresql":
        # CONCURRENTLY: a production table keeps taking writes while its indexes build (a plain CREATE INDEX
        # blocks them for the whole build). It cannot run in a transaction. A build that failed half-way
        # leaves an INVALID index and no alembic version, so a rerun drops what is there and builds again.
        with context.autocommit_block():
            for name, columns in _INDEXES:
                op.drop_index(name, table_name="api_keys", postgresql_concurrently=True, if_exists=True)
                op.create_index(name, "api_keys", columns, postgresql_concurrently=True)
        return
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        for name, columns in _INDEXES:
            batch_op.create_index(name, columns, unique=False)


def downgrade() -> None:
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        for name, _ in reversed(_INDEXES):
            batch_op.drop_index(name)
