from sqlalchemy import inspect


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
