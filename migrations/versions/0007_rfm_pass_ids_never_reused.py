"""RFM pass ids are never given out twice

Journey timelines and segment transitions cite passes by id ("RFM pass 42",
`rfm-pass:42`, `rfm-realtime:42`) and keep citing them after the model, and its passes,
are deleted. SQLite numbered passes max(id) + 1, so deleting a model whose passes were
the newest gave their ids to the next passes; PostgreSQL took them from a sequence
already. Now:

- SQLite: `rfm_passes.id` is `INTEGER PRIMARY KEY AUTOINCREMENT` (the table is rebuilt;
  `sqlite_sequence` remembers the largest id ever given);
- both: the counter starts past every pass id still cited, so ids given out before this
  migration and since deleted are not given again either.

Finding the cited ids reads `segment_transitions` once in full (its source column has no
index), once per database, at upgrade.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-25 10:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The largest pass id the store still holds or cites (NULL when there is none).
_CITED_PASS_IDS = {
    "sqlite": (
        "SELECT MAX(n) FROM ("
        " SELECT MAX(id) AS n FROM rfm_passes"
        " UNION ALL SELECT MAX(pass_id) FROM rfm_scores"
        " UNION ALL SELECT MAX(CAST(substr(source, instr(source, ':') + 1) AS INTEGER))"
        " FROM segment_transitions"
        " WHERE source GLOB 'rfm-pass:[0-9]*' OR source GLOB 'rfm-realtime:[0-9]*')"
    ),
    "postgresql": (
        "SELECT MAX(n) FROM ("
        " SELECT MAX(id) AS n FROM rfm_passes"
        " UNION ALL SELECT MAX(pass_id) FROM rfm_scores"
        " UNION ALL SELECT MAX(CAST(split_part(source, ':', 2) AS bigint))"
        " FROM segment_transitions WHERE source ~ '^rfm-(pass|realtime):[0-9]+$') cited"
    ),
}

# Moves the pass id counter past `cited` (never back).
_START_PAST = {
    "sqlite": (
        "DELETE FROM sqlite_sequence WHERE name = 'rfm_passes';"
        " INSERT INTO sqlite_sequence (name, seq) SELECT 'rfm_passes', n"
        " FROM (SELECT ({cited}) AS n) counter WHERE n IS NOT NULL"
    ),
    "postgresql": (
        "SELECT setval(seq, n) FROM (SELECT"
        " CAST(pg_get_serial_sequence('rfm_passes', 'id') AS regclass) AS seq,"
        " ({cited}) AS n) counter"
        " WHERE n > COALESCE(pg_sequence_last_value(seq), 0)"
    ),
}


def _rebuild_sqlite_passes(*, autoincrement: bool) -> None:
    with op.batch_alter_table(
        "rfm_passes", recreate="always", table_kwargs={"sqlite_autoincrement": autoincrement}
    ):
        pass


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        _rebuild_sqlite_passes(autoincrement=True)
    for statement in _START_PAST[dialect].format(cited=_CITED_PASS_IDS[dialect]).split(";"):
        op.execute(statement)


def downgrade() -> None:
    # PostgreSQL keeps its sequence where it is: ids given out stay given out.
    if op.get_bind().dialect.name == "sqlite":
        _rebuild_sqlite_passes(autoincrement=False)
