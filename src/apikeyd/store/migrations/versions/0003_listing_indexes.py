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

from apikeyd.store.migrate import create_indexes, drop_indexes

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
    create_indexes("api_keys", _INDEXES)


def downgrade() -> None:
    drop_indexes("api_keys", _INDEXES)
