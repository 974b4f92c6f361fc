"""Who may write a segment's memberships at a time: a full pass, or real-time processing.

A full pass (a rule segment's evaluation, an RFM model's scoring) holds its key
exclusively from before it reads until it commits, so what it reads is everything
committed before it and nothing it writes can undo real time. Real-time processing asks
for the same keys shared and never waits: a key a pass holds is skipped, and its
customers are flagged for real time again, to be re-evaluated once the pass has
committed. The locks end with the transaction.

The two databases differ here and only here:
- PostgreSQL: transaction-scoped advisory locks on a 64-bit hash of the key.
- SQLite: nothing to take. A pass holds SQLite's one write lock from its first write (its
  staging) to its commit, so real time cannot write meanwhile, and what the pass reads
  after taking it is all there is.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import text
from sqlalchemy.engine import Connection


def segment_key(slug: str) -> str:
    return f"segment:{slug}"


def rfm_model_key(slug: str) -> str:
    return f"rfm-model:{slug}"


def hold_for_pass(conn: Connection, *, key: str) -> None:
    """Wait for, then hold until commit, the exclusive right to write `key`'s members."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"), {"key": key})


def keys_held_by_a_pass(conn: Connection, *, keys: Iterable[str]) -> set[str]:
    """Take each key shared without waiting; the keys a pass holds now, which real time
    must leave alone (SQLite: none)."""
    wanted = sorted(set(keys))
    if conn.dialect.name != "postgresql" or not wanted:
        return set()
    taken = conn.execute(
        text(
            "SELECT k, pg_try_advisory_xact_lock_shared(hashtextextended(k, 0))"
            " FROM unnest(CAST(:keys AS text[])) AS k"
        ),
        {"keys": wanted},
    ).all()
    return {key for key, ok in taken if not ok}
