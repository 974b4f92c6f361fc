"""Alembic environment: the URL comes from the caller's connection or the settings."""

from __future__ import annotations

from alembic import context
from sqlmodel import SQLModel

import core.tables  # noqa: F401  (registers the tables on SQLModel.metadata)
from core.db import make_engine
from core.settings import get_settings

target_metadata = SQLModel.metadata


def _run(connection) -> None:  # noqa: ANN001
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    engine = make_engine(
        context.config.get_main_option("sqlalchemy.url") or get_settings().resolved_database_url
    )
    with engine.connect() as conn:
        _run(conn)
