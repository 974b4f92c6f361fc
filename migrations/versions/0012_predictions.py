"""predictive models: definitions, trainings (report and fitted estimator), scores

`prediction_models` holds each model's current definition (target event, horizon,
direction, levels, features). `prediction_trainings` keeps every training: the
definition it trained, the instant it trained as of, its validation report and the
pickled estimator that scoring applies; ids are never given out twice (SQLite
AUTOINCREMENT). `prediction_scores` holds each customer's latest probability and level
per model; the condition language reads it by (model, customer).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-12 09:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from core.tables import BigId, IdString, JSONType, UTCDateTime

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "prediction_models",
        sa.Column("slug", sa.String(100), primary_key=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("definition", JSONType, nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
    )
    op.create_table(
        "prediction_trainings",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("model_slug", sa.String(100), nullable=False),
        sa.Column("model_version", sa.Integer(), nullable=False),
        sa.Column("definition", JSONType, nullable=False),
        sa.Column("as_of", UTCDateTime(), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=False),
        sa.Column("finished_at", UTCDateTime(), nullable=True),
        sa.Column("status", sa.String(30), nullable=False),
        sa.Column("report", JSONType, nullable=False),
        sa.Column("artifact", sa.LargeBinary(), nullable=True),
        sa.Column("scored", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sqlite_autoincrement=True,
    )
    op.create_index(
        "ix_prediction_trainings_model_id", "prediction_trainings", ["model_slug", "id"]
    )
    op.create_table(
        "prediction_scores",
        sa.Column("model_slug", sa.String(100), primary_key=True),
        sa.Column("customer_id", IdString, primary_key=True),
        sa.Column("probability", sa.Float(), nullable=False),
        sa.Column("level", sa.String(10), nullable=False),
        sa.Column("training_id", BigId, nullable=False),
        sa.Column("scored_at", UTCDateTime(), nullable=False),
        postgresql_with={"fillfactor": 50},
    )


def downgrade() -> None:
    op.drop_table("prediction_scores")
    op.drop_index("ix_prediction_trainings_model_id", table_name="prediction_trainings")
    op.drop_table("prediction_trainings")
    op.drop_table("prediction_models")
