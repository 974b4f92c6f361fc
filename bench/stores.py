"""The store a bench script measures: a SQLite file or its own PostgreSQL schema, migrated."""

from __future__ import annotations

import argparse
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import Engine

from core.db import make_engine
from core.migrate import migrate


def bench_store(*, db: str, url: str, sqlite_path: str, schema: str, reuse: bool) -> Engine:
    """A migrated store; without `reuse` whatever an earlier run left there is dropped."""
    if db == "sqlite":
        path = Path(sqlite_path)
        if not reuse:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
        engine = make_engine(f"sqlite:///{path}")
    else:
        admin = make_engine(url)
        with admin.begin() as conn:
            if not reuse:
                conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
            conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
        admin.dispose()
        sep = "&" if "?" in url else "?"
        engine = make_engine(f"{url}{sep}options=-csearch_path%3D{schema}")
    migrate(engine)
    return engine


def bench_store_from_args(args: argparse.Namespace, *, schema: str) -> Engine:
    """bench_store from a script's --db, --url, --sqlite-path and --reuse options."""
    return bench_store(
        db=args.db, url=args.url, sqlite_path=args.sqlite_path, schema=schema, reuse=args.reuse
    )
