"""Segment memberships and the transition outbox.

`apply_membership` is the one place memberships change: it diffs a staged set of
(segment, customer) rows against the stored memberships inside the caller's transaction
and writes one `entered` / `exited` transition per change, so a crash mid-pass leaves
the old state whole and a rerun with nothing changed writes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, text
from sqlalchemy.engine import Connection

from core.metrics import count_segment_changes
from core.tables import UTCDateTime


@dataclass(frozen=True)
class MembershipDiff:
    entries: int
    exits: int


def _create_stage(conn: Connection) -> None:
    if conn.dialect.name == "postgresql":
        conn.execute(
            text(
                "CREATE TEMP TABLE IF NOT EXISTS staged_membership ("
                ' segment_slug varchar(200) NOT NULL, customer_id varchar(255) COLLATE "C"'
                " NOT NULL,"
                " context text NOT NULL DEFAULT '{}',"
                " PRIMARY KEY (segment_slug, customer_id)) ON COMMIT DELETE ROWS"
            )
        )
    else:
        conn.execute(
            text(
                "CREATE TEMP TABLE IF NOT EXISTS staged_membership ("
                " segment_slug TEXT NOT NULL, customer_id TEXT NOT NULL,"
                " context TEXT NOT NULL DEFAULT '{}',"
                " PRIMARY KEY (segment_slug, customer_id)) WITHOUT ROWID"
            )
        )
    conn.execute(text("DELETE FROM staged_membership"))


def apply_membership(
    conn: Connection,
    *,
    segment_slugs: Sequence[str],
    staged_sql: str,
    params: dict[str, Any],
    source: str,
    now: datetime,
    customer_ids: Sequence[str] | None = None,
    scope_sql: str | None = None,
    expanding: Sequence[str] = (),
) -> MembershipDiff:
    """Make the memberships of `segment_slugs` equal the rows `staged_sql` selects.

    `staged_sql` is a SELECT of `(segment_slug, customer_id)` or
    `(segment_slug, customer_id, context)` where context is JSON text carried onto the
    entry transition; `expanding` names its list parameters (`IN :ids`). With
    `customer_ids` (a list: real-time re-evaluation of one customer) or `scope_sql` (a
    SELECT of customer ids, its parameters taken from `params`: an RFM pass's
    relabelled customers), only those customers' memberships are in scope; the others
    are left as they are. Runs in the caller's transaction.
    """
    if not segment_slugs:
        return MembershipDiff(0, 0)
    if customer_ids is not None and scope_sql is not None:
        raise ValueError("give customer_ids or scope_sql, not both")
    _create_stage(conn)
    expand = [bindparam(name, expanding=True) for name in expanding if f":{name}" in staged_sql]
    probe = text(f"SELECT * FROM ({staged_sql}) q LIMIT 0").bindparams(*expand)
    with_context = "q.context" if "context" in conn.execute(probe, params).keys() else "'{}'"
    conn.execute(
        text(
            "INSERT INTO staged_membership (segment_slug, customer_id, context) "
            f"SELECT q.segment_slug, q.customer_id, {with_context} FROM ({staged_sql}) q"
        ).bindparams(*expand),
        params,
    )
    if conn.dialect.name == "postgresql":
        # Temporary tables are never auto-analysed: without statistics the planner takes
        # the staged set for a few rows and picks quadratic nested-loop anti-joins.
        conn.execute(text("ANALYZE staged_membership"))
    scope_params: dict[str, Any] = {
        "slugs": list(segment_slugs),
        "source": source,
        "now": now,
    }
    in_scope = ""  # appended to a customer_id column: limits a statement to the scope
    if customer_ids is not None:
        in_scope = " IN :customer_ids"
        scope_params["customer_ids"] = list(customer_ids)
    elif scope_sql is not None:
        in_scope = f" IN ({scope_sql})"
        scope_params.update({k: v for k, v in params.items() if f":{k}" in scope_sql})

    def run(sql: str) -> int:
        typed = [bindparam("slugs", expanding=True), bindparam("now", type_=UTCDateTime())]
        if customer_ids is not None:
            typed.append(bindparam("customer_ids", expanding=True))
        used = {k: v for k, v in scope_params.items() if f":{k}" in sql}
        statement = text(sql).bindparams(*[p for p in typed if p.key in used])
        return conn.execute(statement, used).rowcount or 0

    scoped = f" AND m.customer_id{in_scope}" if in_scope else ""
    if conn.dialect.name == "postgresql":
        exits, entries = _write_diff_postgres(run, scoped=scoped)
    else:
        exits, entries = _write_diff(run, scoped=scoped)
    conn.execute(text("DELETE FROM staged_membership"))
    count_segment_changes(source, entries=entries, exits=exits)
    return MembershipDiff(entries=entries, exits=exits)


# Memberships of the diff's segments (and scope) that the staged set no longer has.
_GONE = (
    " segment_memberships m WHERE m.segment_slug IN :slugs{scoped} AND NOT EXISTS ("
    " SELECT 1 FROM staged_membership s"
    " WHERE s.segment_slug = m.segment_slug AND s.customer_id = m.customer_id)"
)
_TRANSITION_COLUMNS = "(segment_slug, customer_id, kind, source, context, occurred_at)"


def _write_diff_postgres(run: Callable[[str], int], *, scoped: str) -> tuple[int, int]:
    """Exits, then entries: each one statement whose DELETE or INSERT ... ON CONFLICT
    returns exactly the rows that changed, so nothing is anti-joined twice and entries
    are found by primary-key probes rather than by sorting every membership."""
    exits = run(
        f"WITH gone AS (DELETE FROM{_GONE.format(scoped=scoped)}"
        " RETURNING m.segment_slug, m.customer_id)"
        f" INSERT INTO segment_transitions {_TRANSITION_COLUMNS}"
        " SELECT g.segment_slug, g.customer_id, 'exited', :source, '{}', :now FROM gone g"
        " ORDER BY g.segment_slug, g.customer_id"
    )
    entries = run(
        "WITH added AS (INSERT INTO segment_memberships (segment_slug, customer_id, since)"
        " SELECT s.segment_slug, s.customer_id, :now FROM staged_membership s WHERE true"
        " ON CONFLICT (segment_slug, customer_id) DO NOTHING"
        " RETURNING segment_slug, customer_id)"
        f" INSERT INTO segment_transitions {_TRANSITION_COLUMNS}"
        " SELECT a.segment_slug, a.customer_id, 'entered', :source, CAST(s.context AS jsonb),"
        " :now FROM added a JOIN staged_membership s"
        " ON s.segment_slug = a.segment_slug AND s.customer_id = a.customer_id"
        " ORDER BY a.segment_slug, a.customer_id"
    )
    return exits, entries


def _write_diff(run: Callable[[str], int], *, scoped: str) -> tuple[int, int]:
    """Exits and entries as transitions first, then the memberships (SQLite: no data
    modifying statement inside a WITH)."""
    exits = run(
        f"INSERT INTO segment_transitions {_TRANSITION_COLUMNS}"
        " SELECT m.segment_slug, m.customer_id, 'exited', :source, '{}', :now FROM"
        + _GONE.format(scoped=scoped)
        + " ORDER BY m.segment_slug, m.customer_id"
    )
    entries = run(
        f"INSERT INTO segment_transitions {_TRANSITION_COLUMNS}"
        " SELECT s.segment_slug, s.customer_id, 'entered', :source, s.context, :now"
        " FROM staged_membership s"
        " WHERE NOT EXISTS ("
        "  SELECT 1 FROM segment_memberships m"
        "  WHERE m.segment_slug = s.segment_slug AND m.customer_id = s.customer_id)"
        " ORDER BY s.segment_slug, s.customer_id"
    )
    if exits:
        run(
            "DELETE FROM segment_memberships WHERE rowid IN (SELECT m.rowid FROM"
            + _GONE.format(scoped=scoped)
            + ")"
        )
    if entries:
        run(
            "INSERT INTO segment_memberships (segment_slug, customer_id, since)"
            " SELECT s.segment_slug, s.customer_id, :now FROM staged_membership s"
            " WHERE true ON CONFLICT (segment_slug, customer_id) DO NOTHING"
        )
    return exits, entries


def record_transitions(
    conn: Connection,
    *,
    segment_slug: str,
    customer_ids: Sequence[str],
    kind: str,
    source: str,
    now: datetime,
) -> MembershipDiff:
    """Externally owned segments: add (`entered`) or remove (`exited`) members.

    Only real changes are recorded, so a repeated report changes nothing.
    """
    ids = sorted(set(customer_ids))
    if not ids:
        return MembershipDiff(0, 0)
    staged = (
        "SELECT :slug AS segment_slug, c.id AS customer_id FROM customers c WHERE c.id IN :ids"
        if kind == "entered"
        else "SELECT :slug AS segment_slug, c.id AS customer_id FROM customers c WHERE 1 = 0"
    )
    return apply_membership(
        conn,
        segment_slugs=[segment_slug],
        staged_sql=staged,
        params={"slug": segment_slug, "ids": ids},
        expanding=("ids",),
        source=source,
        now=now,
        customer_ids=ids,
    )


def fetch_undispatched(conn: Connection, *, limit: int) -> list[dict[str, Any]]:
    """The oldest transitions not yet handed to journeys, in the order they were written."""
    rows = conn.execute(
        text(
            "SELECT id, segment_slug, customer_id, kind, source, context, occurred_at"
            " FROM segment_transitions WHERE dispatched_at IS NULL ORDER BY id LIMIT :limit"
        ),
        {"limit": limit},
    ).mappings()
    return [dict(r) for r in rows]


def mark_dispatched(conn: Connection, *, ids: Sequence[int], now: datetime) -> None:
    if not ids:
        return
    conn.execute(
        text("UPDATE segment_transitions SET dispatched_at = :now WHERE id IN :ids").bindparams(
            bindparam("ids", expanding=True), bindparam("now", type_=UTCDateTime())
        ),
        {"ids": list(ids), "now": now},
    )
