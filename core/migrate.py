"""Run the Alembic migrations; the app and the worker call this on start."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, Engine

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(url: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url:
        config.set_main_option("sqlalchemy.url", url)
    return config


class SchemaMismatch(Exception):
    """The database's schema revision is not the one this code works with."""


class SchemaNewer(SchemaMismatch):
    """A newer version of journeys migrated the database: this code cannot use it."""

    def __init__(self, found: tuple[str, ...], head: str):
        super().__init__(
            f"was migrated by a newer version of journeys (revision {', '.join(found)});"
            f" this version knows revisions up to {head}"
        )


class SchemaNotMigrated(SchemaMismatch):
    """The database is empty or at an older revision, and the caller does not migrate."""

    def __init__(self, found: tuple[str, ...], head: str):
        at = f"at revision {', '.join(found)}" if found else "no schema revision"
        super().__init__(f"is not migrated ({at}; this version needs {head})")


def migrate(engine: Engine) -> None:
    """Bring the database at `engine` to the newest schema (idempotent).

    Processes starting together (`journeys api --workers N`, the worker beside the API)
    take turns: without a lock two of them both see an empty database and both create
    its tables. Raises SchemaNewer, touching nothing, if a newer version migrated it.
    """
    config = alembic_config()
    with _migration_lock(engine), engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
        _refuse_newer(connection, ScriptDirectory.from_config(config))
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def require_current_schema(engine: Engine) -> None:
    """For callers that only read: the database must be at this code's revision.

    Raises SchemaNewer or SchemaNotMigrated; never writes.
    """
    script = ScriptDirectory.from_config(alembic_config())
    with engine.connect() as connection:
        found = _refuse_newer(connection, script)
    if set(found) != set(script.get_heads()):
        raise SchemaNotMigrated(found, _head(script))


def _refuse_newer(connection: Connection, script: ScriptDirectory) -> tuple[str, ...]:
    """The database's revisions, after checking that this code knows each of them."""
    # Read directly: alembic's MigrationContext would log its two start-up lines again.
    found: tuple[str, ...] = ()
    if inspect(connection).has_table("alembic_version"):
        found = tuple(connection.execute(text("SELECT version_num FROM alembic_version")).scalars())
    known = {revision.revision for revision in script.walk_revisions()}
    if any(revision not in known for revision in found):
        raise SchemaNewer(found, _head(script))
    return found


def _head(script: ScriptDirectory) -> str:
    return ", ".join(script.get_heads())


_PG_LOCK_KEY = 7_240_311_902  # any constant shared by every journeys process


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    """On a SQLite file, an exclusive lock on a file beside it; PostgreSQL locks itself."""
    database = engine.url.database if engine.dialect.name == "sqlite" else None
    if not database or database == ":memory:":
        yield
        return
    lock_path = Path(database).with_name(Path(database).name + ".migrate-lock")
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
