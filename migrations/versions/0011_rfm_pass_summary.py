"""rfm_passes.summary: each pass's label counts, R-by-F grid and label migrations

A pass stores what it counted as it scored: customers and monetary per label, the 5x5
R-by-F grid, and how many customers moved from each label they held before the pass to
each label they hold after it. The console reads these instead of counting a million
scores on every view, and the migration matrix between two passes needs the labels held
before a pass, which nothing else keeps. Passes from before this migration have none.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-20 09:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from core.tables import JSONType

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("rfm_passes") as batch:
        batch.add_column(sa.Column("summary", JSONType, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("rfm_passes") as batch:
        batch.drop_column("summary")
