"""segments.evaluated_version: the version of a segment its last full pass evaluated

A segment whose current version has not been evaluated yet shows `evaluating`; saving
one starts its evaluation at once. Segments evaluated before this migration count as
evaluated at their current version.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05 02:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("segments") as batch:
        batch.add_column(sa.Column("evaluated_version", sa.Integer(), nullable=True))
    op.execute("UPDATE segments SET evaluated_version = version WHERE evaluated_at IS NOT NULL")


def downgrade() -> None:
    with op.batch_alter_table("segments") as batch:
        batch.drop_column("evaluated_version")
