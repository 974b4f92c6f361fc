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
