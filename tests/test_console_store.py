"""The console's reads (store/console.py) and what an RFM pass keeps, on both databases."""

from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, date, datetime, timedelta

from sqlalchemy import insert, text
from sqlalchemy.engine import Engine
from sqlmodel import Session

from core.rfm import RfmModelCreate
from core.tables import Customer, Event, Journey, JourneyRun, Message, SegmentTransition
from store import console as console_store
from store.rfm_models import create_model
from store.scoring import score_model, summarize
from tests.utils.rfm import model_body

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)


def _customer(customer_id: str, **columns: object) -> dict[str, object]:
    return {
        "id": customer_id,
        "email": None,
        "attributes": {},
        "created_at": NOW,
        "updated_at": NOW,
        **columns,
    }


def _history(engine: Engine, customers: int = 120) -> None:
    rng = random.Random(7)
    rows, events = [], []
    for i in range(customers):
        rows.append(_customer(f"m-{i:03d}"))
        for day in range(0, 150, rng.choice([3, 7, 15, 40])):
            if rng.random() < 0.5:
                events.append(
                    {
                        "event_id": f"m-{i}-{day}",
                        "customer_id": f"m-{i:03d}",
                        "name": "Purchase",
                        "occurred_at": NOW - timedelta(days=day + rng.random()),
                        "properties": {"total_price": rng.choice([10, 50, 200])},
                        "received_at": NOW,
                        "realtime_pending": False,
                    }
                )
    with engine.begin() as conn:
        conn.execute(insert(Customer.__table__), rows)
        conn.execute(insert(Event.__table__), events)


def _labels(engine: Engine) -> dict[str, str]:
    with engine.connect() as conn:
        return dict(
            conn.execute(
                text("SELECT customer_id, label FROM rfm_scores WHERE model_slug = 'default'")
            ).all()
        )


def test_a_pass_keeps_its_counts_and_the_matrix_follows_each_customer(store_engine: Engine) -> None:
    _history(store_engine)
    with store_engine.begin() as conn:
        create_model(
            conn, model=RfmModelCreate.model_validate(model_body(timeframe="P60D")), now=NOW
        )
        score_model(conn, model_slug="default", as_of=NOW - timedelta(days=45))
    before = _labels(store_engine)
    with store_engine.begin() as conn:
        score_model(conn, model_slug="default", as_of=NOW)
    after = _labels(store_engine)
    with store_engine.connect() as conn:
        passes = console_store.model_passes(conn, model_slug="default")
        live = summarize(conn, model_slug="default")
    newest, first = passes
    assert newest.summary is not None and first.summary is not None
    assert {k: v.count for k, v in newest.summary.labels.items()} == dict(Counter(after.values()))
    assert {k: v.model_dump() for k, v in newest.summary.labels.items()} == live["labels"]
    assert newest.summary.grid == live["grid"]
    # The first pass scored everyone anew: every move comes from "not scored".
    assert {m.from_label for m in first.summary.moves} == {None}

    labels = ["Champions", "Regulars", "Promising", "Needs Attention", "At Risk"]
    matrix = console_store.migration_matrix(newest, labels)
    assert matrix is not None
    expected: Counter[tuple[str, str]] = Counter()
    for customer in set(before) | set(after):
        expected[(before.get(customer, "not scored"), after.get(customer, "not scored"))] += 1
    cells = {
        (row, column): count
        for row, columns in matrix.cells.items()
        for column, count in columns.items()
        if count
    }
    assert cells == dict(expected)
    assert len({row for row, _ in cells}) > 2  # the history moves customers between labels


def _event(i: int, received: datetime, *, pending: bool = False) -> dict[str, object]:
    return {
        "event_id": f"t-{i}",
        "customer_id": "t-1",
        "name": "Visit",
        "occurred_at": received,
        "properties": {},
        "received_at": received,
        "realtime_pending": pending,
    }


def test_events_per_minute_reads_the_newest_events(store_engine: Engine) -> None:
    minute = NOW.replace(second=0) - timedelta(minutes=3)
    rows = [_event(i, minute + timedelta(seconds=5 * (i % 12))) for i in range(30)]
    rows += [_event(100 + i, NOW - timedelta(minutes=1, seconds=10)) for i in range(4)]
    rows.append(_event(200, NOW - timedelta(hours=3)))
    with store_engine.begin() as conn:
        conn.execute(insert(Customer.__table__), [_customer("t-1")])
        conn.execute(insert(Event.__table__), rows)
    with store_engine.connect() as conn:
        wide = console_store.events_per_minute(conn, now=NOW, minutes=10)
        narrow = console_store.events_per_minute(conn, now=NOW, minutes=10, cap=20)
    counts = {m.minute: m.events for m in wide.minutes if m.events}
    assert counts == {minute: 30, (NOW - timedelta(minutes=2)).replace(second=0): 4}
    assert (wide.sampled, wide.capped, len(wide.minutes)) == (35, False, 10)
    # Capped: the newest 20 by id, of which the last inserted is three hours old.
    assert (narrow.capped, narrow.sampled, sum(m.events for m in narrow.minutes)) == (True, 20, 19)


def test_realtime_lag_is_the_oldest_waiting_event(store_engine: Engine) -> None:
    with store_engine.begin() as conn:
        conn.execute(insert(Customer.__table__), [_customer("t-1", realtime_pending=True)])
        conn.execute(
            insert(Event.__table__),
            [
                _event(1, NOW - timedelta(seconds=90)),
                _event(2, NOW - timedelta(seconds=40), pending=True),
                _event(3, NOW - timedelta(seconds=10), pending=True),
            ],
        )
    with store_engine.connect() as conn:
        lag = console_store.realtime_lag(conn, now=NOW)
    assert (lag.pending_events, lag.pending_customers, lag.lag_seconds) == (2, 1, 40.0)


def test_transitions_per_day_and_activity(store_engine: Engine) -> None:
    rows = []
    for days_ago, kind, count in (
        (0, "entered", 3),
        (0, "exited", 1),
        (2, "entered", 2),
        (9, "entered", 5),
    ):
        rows += [
            {
                "segment_slug": "s",
                "customer_id": f"c{days_ago}{kind}{n}",
                "kind": kind,
                "source": "test",
                "context": {},
                "occurred_at": NOW - timedelta(days=days_ago),
            }
            for n in range(count)
        ]
    with store_engine.begin() as conn:
        conn.execute(insert(SegmentTransition.__table__), rows)
    with Session(store_engine) as session:
        session.add_all(
            [
                Journey(slug="j", name="J", state="active", trigger_segment="s"),
                Journey(slug="k", name="K", state="paused", trigger_segment="s"),
            ]
        )
        session.add_all(
            JourneyRun(
                workflow_id=f"w{i}",
                run_id="r",
                journey_slug="j",
                version=1,
                customer_id=f"c{i}",
                status=status,
            )
            for i, status in enumerate(["running", "running", "converted"])
        )
        session.add_all(
            Message(
                idempotency_key=f"m{i}",
                customer_id="c",
                channel=channel,
                status=status,
                provider="outbox",
            )
            for i, (channel, status) in enumerate(
                [("email", "sent"), ("email", "sent"), ("sms", "failed")]
            )
        )
        session.commit()
    with store_engine.connect() as conn:
        days = console_store.transitions_per_day(conn, now=NOW, days=7)
        one = console_store.transitions_per_day(conn, now=NOW, days=3, slug="s")
        quiet = console_store.transitions_per_day(conn, now=NOW, days=3, slug="none")
        activity = console_store.activity(conn)
    assert [(d.day, d.entered, d.exited) for d in days["s"] if d.entered or d.exited] == [
        (date(2026, 11, 18), 2, 0),
        (date(2026, 11, 20), 3, 1),
    ]
    assert len(days["s"]) == 7 and len(one["s"]) == 3
    assert [(d.entered, d.exited) for d in quiet["none"]] == [(0, 0)] * 3
    assert activity.journeys_by_state == {"active": 1, "paused": 1}
    assert activity.runs_by_status == {"running": 2, "converted": 1}
    assert activity.runs_by_journey == {"j": 2}
    assert activity.sends_by_outcome == {"email": {"sent": 2}, "sms": {"failed": 1}}


def test_find_customers_by_id_prefix_or_email(store_engine: Engine) -> None:
    with store_engine.begin() as conn:
        conn.execute(
            insert(Customer.__table__),
            [
                _customer("ab-1", email="x@example.com"),
                _customer("ab-2"),
                _customer("abc"),
                _customer("b", email="ab-1@example.com"),
            ],
        )
    with store_engine.connect() as conn:
        assert [h.id for h in console_store.find_customers(conn, query="ab-")] == ["ab-1", "ab-2"]
        assert [h.id for h in console_store.find_customers(conn, query="x@example.com")] == ["ab-1"]
        assert [h.id for h in console_store.find_customers(conn, query="ab", limit=2)] == [
            "ab-1",
            "ab-2",
        ]
