"""failures: records that background work set aside, with their error and retry time

The real-time processor, the scheduled RFM and segment passes, the dispatcher and the
send path each record a customer, segment, model, journey or transition they cannot
process here and go on with the others; a success removes the row.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05 02:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from core.tables import BigId, UTCDateTime

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "failures",
        sa.Column("id", BigId, primary_key=True),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("key", sa.String(500), nullable=False),
        sa.Column("stage", sa.String(40), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("first_failed_at", UTCDateTime(), nullable=False),
        sa.Column("last_failed_at", UTCDateTime(), nullable=False),
        sa.Column("next_attempt_at", UTCDateTime(), nullable=False),
        sa.UniqueConstraint("kind", "key", "stage", name="uq_failures_subject"),
    )
    op.create_index("ix_failures_stage_next", "failures", ["stage", "kind", "next_attempt_at"])


def downgrade() -> None:
    op.drop_index("ix_failures_stage_next", table_name="failures")
    op.drop_table("failures")
