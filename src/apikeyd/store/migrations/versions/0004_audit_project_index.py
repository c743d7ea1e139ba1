"""index for a project key's audit log

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24

A project key lists only its project's events. Without an index on the project, its page walked the
account's whole log (bounded per page, so a busy account gave it pages of nothing, and its page tokens
pointed at other projects' event ids). With (account_id, project_id, id) its page starts at its place in
the index and reads only its own events.
"""

from apikeyd.store.migrate import create_indexes, drop_indexes

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

_INDEXES = (("ix_key_events_project", ["account_id", "project_id", "id"]),)


def upgrade() -> None:
    create_indexes("key_events", _INDEXES)


def downgrade() -> None:
    drop_indexes("key_events", _INDEXES)
