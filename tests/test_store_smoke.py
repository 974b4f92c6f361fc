from sqlalchemy import inspect, text


def test_migrations_create_every_table(store_engine):
    names = set(inspect(store_engine).get_table_names())
    assert {"customers", "events", "api_keys", "segment_transitions", "messages"} <= names


def test_processes_starting_together_migrate_a_new_sqlite_file_once(tmp_path):
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    code = f"from core.db import make_engine; from core.migrate import migrate; migrate(make_engine({url!r}))"
    processes = [
        subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE) for _ in range(4)
    ]
    results = [(p.wait(timeout=120), p.stderr.read().decode()) for p in processes]
    assert [code for code, _ in results] == [0, 0, 0, 0], results
    from core.db import make_engine

    assert "events" in set(inspect(make_engine(url)).get_table_names())


def test_api_processes_starting_together_share_one_bootstrap_key(tmp_path):
    import subprocess
    import sys

    from sqlalchemy import text

    from core.db import make_engine
    from core.migrate import migrate

    url = f"sqlite:///{tmp_path / 'keys.db'}"
    migrate(make_engine(url))
    code = (
        "from core.db import make_engine; from store.keys import ensure_bootstrap_key;"
        f" ensure_bootstrap_key(make_engine({url!r}), secret='boot-secret-0123456789')"
    )
    processes = [
        subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE) for _ in range(6)
    ]
    results = [(p.wait(timeout=120), p.stderr.read().decode()) for p in processes]
    assert [code for code, _ in results] == [0] * 6, results
    with make_engine(url).connect() as conn:
        keys = conn.execute(text("SELECT role, revoked_at FROM api_keys")).all()
    assert keys == [("admin", None)]


def _migrate(engine, revision: str) -> None:
    """Upgrade the store to "head", or downgrade it to `revision`."""
    from alembic import command

    from core.migrate import alembic_config

    config = alembic_config()
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        if revision == "head":
            command.upgrade(config, "head")
        else:
            command.downgrade(config, revision)


def _id_collations(engine) -> dict[tuple[str, str], str | None]:
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT table_name, column_name, collation_name FROM information_schema.columns"
                " WHERE table_schema = current_schema()"
                " AND (column_name = 'customer_id' OR (table_name, column_name) IN"
                " (('customers', 'id'), ('events', 'event_id'), ('events', 'name')))"
            )
        ).all()
    return {(table, column): collation for table, column, collation in rows}


def test_ids_compare_as_bytes_on_postgres_and_the_migration_reverses(postgres_engine):
    collations = _id_collations(postgres_engine)
    assert (
        len(collations) == 13
    )  # personalization_views (0009), trace_handoffs (0010), prediction_scores (0012)
    assert set(collations.values()) == {"C"}

    _migrate(postgres_engine, "0002")
    assert set(_id_collations(postgres_engine).values()) == {None}
    _migrate(postgres_engine, "head")
    assert _id_collations(postgres_engine) == collations


def test_bulk_events_join_their_customers_under_one_collation(store_engine):
    from core.events import EventRecord
    from core.records import parse_body
    from store.events import KnownCustomers, write_event_batch

    body = b"\n".join(
        b'{"event_id": "e-%d", "customer_id": "c-%s", "name": "Purchase",'
        b' "occurred_at": "2026-01-0%dT10:00:00+01:00"}' % (i, name, i + 1)
        for i, name in enumerate([b"B", b"a", "\u00e9".encode(), b"a"])
    )
    batch = parse_body(body, EventRecord)
    write_event_batch(store_engine, events=batch.records, realtime=False, known=KnownCustomers())
    with store_engine.connect() as conn:
        joined = conn.execute(
            text(
                "SELECT c.id, count(*) FROM events e JOIN customers c ON c.id = e.customer_id"
                " GROUP BY c.id ORDER BY c.id"
            )
        ).all()
    # Byte order on both databases: upper case before lower case before accents.
    assert [tuple(row) for row in joined] == [("c-B", 1), ("c-a", 2), ("c-\u00e9", 1)]


def _event_id_cache(engine) -> int:
    with engine.connect() as conn:
        return conn.execute(
            text(
                "SELECT cache_size FROM pg_sequences"
                " WHERE schemaname || '.' || sequencename = pg_get_serial_sequence('events', 'id')"
            )
        ).scalar_one()


def test_event_row_ids_are_cached_on_postgres_and_the_migration_reverses(postgres_engine):
    assert _event_id_cache(postgres_engine) == 1_000
    _migrate(postgres_engine, "0003")
    assert _event_id_cache(postgres_engine) == 1
    _migrate(postgres_engine, "head")
    assert _event_id_cache(postgres_engine) == 1_000


def _event_indexes(engine) -> dict[str, list[str]]:
    return {
        index["name"]: index["column_names"]
        for index in inspect(engine).get_indexes("events")
        if index["name"].startswith("ix_")
    }


def test_events_carry_one_customer_index_and_the_migration_reverses(store_engine):
    indexes = _event_indexes(store_engine)
    assert indexes == {
        "ix_events_customer_name_time": ["customer_id", "name", "occurred_at"],
        "ix_events_pending": ["id"],
    }
    _migrate(store_engine, "0004")
    assert _event_indexes(store_engine) == {
        "ix_events_customer_time": ["customer_id", "occurred_at"],
        "ix_events_name_customer_time": ["name", "customer_id", "occurred_at"],
        "ix_events_pending": ["id"],
    }
    _migrate(store_engine, "head")
    assert _event_indexes(store_engine) == indexes
