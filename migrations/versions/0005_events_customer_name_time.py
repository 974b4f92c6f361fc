"""events: one index on (customer, name, time) in place of (name, customer, time) and
(customer, time)

Every event is written once and every index entry is paid on every write. The reads
that need speed are one customer's: real-time rescoring, real-time segment
re-evaluation and a journey's event conditions ask for a customer's events by name and
time, and "any event" conditions for a customer's events by time; this one index serves
all of them. Whole-segment and whole-model passes aggregate over every customer and read
this index (or the table) in full rather than one name's range.

Measured on single-stream COPYs of 1,000,000 events sorted by customer: 8.3-9.1 -> 5.3-5.8
us of PostgreSQL CPU a row.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24 09:40:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_events_customer_name_time", "events", ["customer_id", "name", "occurred_at"]
    )
    op.drop_index("ix_events_name_customer_time", table_name="events")
    op.drop_index("ix_events_customer_time", table_name="events")


def downgrade() -> None:
    op.create_index("ix_events_customer_time", "events", ["customer_id", "occurred_at"])
    op.create_index(
        "ix_events_name_customer_time", "events", ["name", "customer_id", "occurred_at"]
    )
    op.drop_index("ix_events_customer_name_time", table_name="events")
