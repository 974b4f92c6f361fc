from sqlalchemy import inspect


def test_migrations_create_every_table(store_engine):
    names = set(inspect(store_engine).get_table_names())
    assert {"customers", "events", "api_keys", "segment_transitions", "messages"} <= names
