"""trace_handoffs: the trace of each customer's latest traced event

Written by the API only when tracing is on; the dispatcher reads it to start the
customer's journeys inside that trace (docs/production.md#traces).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from core.tables import IdString, UTCDateTime

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "trace_handoffs",
        sa.Column("customer_id", IdString, primary_key=True),
        sa.Column("traceparent", sa.String(100), nullable=False),
        sa.Column("recorded_at", UTCDateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("trace_handoffs")
