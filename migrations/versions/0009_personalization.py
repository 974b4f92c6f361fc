"""personalisation campaigns: campaigns, their versions, and what each customer was shown

`personalizations` and `personalization_versions` hold campaigns as journeys hold their
definitions (draft, active version frozen, a new version per edit).
`personalization_views` keeps one row per (campaign, version, customer, experience) with
the first and last view and a count: decisions are written there in batches, and
analytics read each viewer's first row.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-10 09:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from core.tables import IdString, JSONType, UTCDateTime

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "personalizations",
        sa.Column("slug", sa.String(200), primary_key=True),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("latest_version", sa.Integer(), nullable=False),
        sa.Column("active_version", sa.Integer(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
    )
    op.create_table(
        "personalization_versions",
        sa.Column("campaign_slug", sa.String(200), primary_key=True),
        sa.Column("version", sa.Integer(), primary_key=True),
        sa.Column("definition", JSONType, nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("activated_at", UTCDateTime(), nullable=True),
    )
    op.create_table(
        "personalization_views",
        sa.Column("campaign_slug", sa.String(200), primary_key=True),
        sa.Column("version", sa.Integer(), primary_key=True),
        sa.Column("customer_id", IdString, primary_key=True),
        sa.Column("experience", sa.String(255), primary_key=True),
        sa.Column("audience", sa.String(255), nullable=True),
        sa.Column("bucket", sa.Integer(), nullable=False),
        sa.Column("first_viewed_at", UTCDateTime(), nullable=False),
        sa.Column("last_viewed_at", UTCDateTime(), nullable=False),
        sa.Column("views", sa.BigInteger(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("personalization_views")
    op.drop_table("personalization_versions")
    op.drop_table("personalizations")
