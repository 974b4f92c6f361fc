"""Factories for RFM tests and a plain-Python reading of the scoring definition.

`reference_scores` follows docs/rfm.md line by line, customer by customer, with no SQL,
so the store's set-based statement is checked against an independent implementation.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import insert
from sqlalchemy.engine import Connection, Engine

from core.rfm import RfmModelCreate, label_for
from core.tables import Customer, Event

T = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
_ids = itertools.count(1)


def model_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "slug": "default",
        "name": "Lifecycle RFM",
        "recency_event": "Purchase",
        "frequency_event": "Purchase",
        "monetary_event": "Purchase",
        "monetary_property": "total_price",
        "timeframe": "P90D",
        "targeting": None,
        "segment_map": "seed5",
        "schedule": None,
        "realtime": False,
    }
    body.update(changes)
    return body


def make_model(**changes: Any) -> RfmModelCreate:
    return RfmModelCreate.model_validate(model_body(**changes))


@dataclass
class EventRow:
    customer_id: str
    name: str
    occurred_at: datetime
    properties: dict[str, Any] = field(default_factory=dict)


def purchase(customer_id: str, occurred_at: datetime, price: Any = None, **props: Any) -> EventRow:
    properties = dict(props)
    if price is not None:
        properties["total_price"] = price
    return EventRow(customer_id, "Purchase", occurred_at, properties)


def add_customers(
    conn: Connection, ids: list[str], attributes: dict[str, dict[str, Any]] | None = None
) -> None:
    if not ids:
        return
    now = datetime.now(UTC)
    conn.execute(
        insert(Customer.__table__),
        [
            {
                "id": cid,
                "attributes": (attributes or {}).get(cid, {}),
                "created_at": now,
                "updated_at": now,
            }
            for cid in ids
        ],
    )


def add_events(conn: Connection, events: list[EventRow], *, with_customers: bool = True) -> None:
    if with_customers:
        known = set(conn.exec_driver_sql("SELECT id FROM customers").scalars())
        add_customers(conn, sorted({e.customer_id for e in events} - known))
    if not events:
        return
    now = datetime.now(UTC)
    conn.execute(
        insert(Event.__table__),
        [
            {
                "event_id": f"ev-{next(_ids)}",
                "customer_id": e.customer_id,
                "name": e.name,
                "occurred_at": e.occurred_at,
                "properties": e.properties,
                "received_at": now,
            }
            for e in events
        ],
    )


def generated_history(
    *, customers: int, seed: int = 7, as_of: datetime = T
) -> tuple[list[str], list[EventRow]]:
    """Customers with 0-12 purchases over 200 days: many ties, some junk prices."""
    rng = random.Random(seed)
    ids = [f"c{n:05d}" for n in range(customers)]
    events: list[EventRow] = []
    for cid in ids:
        for _ in range(rng.choice((0, 1, 1, 2, 2, 3, 4, 6, 12))):
            at = as_of - timedelta(
                seconds=rng.randint(0, 200 * 86_400), microseconds=rng.randint(0, 999_999)
            )
            roll = rng.random()
            if roll < 0.05:
                price: Any = "12.5"
            elif roll < 0.1:
                price = None
            elif roll < 0.5:
                price = rng.choice((10, 20, 25, 50, 100))
            else:
                price = round(rng.uniform(1, 500), 2)
            events.append(purchase(cid, at, price))
            if rng.random() < 0.2:
                events.append(EventRow(cid, "Visit", at - timedelta(hours=3)))
    return ids, events


def load(engine: Engine, events: list[EventRow], customers: list[str] | None = None) -> None:
    with engine.begin() as conn:
        if customers:
            add_customers(conn, customers)
        add_events(conn, events, with_customers=customers is None)


@dataclass(frozen=True)
class Expected:
    recency_days: int
    frequency: int
    monetary: Decimal
    r: int
    f: int
    m: int
    label: str


def reference_scores(
    events: list[EventRow],
    model: RfmModelCreate,
    as_of: datetime,
    eligible: set[str] | None = None,
) -> dict[str, Expected]:
    """The contract's definition, customer by customer, in plain Python."""
    start = as_of - model.timeframe
    window = [e for e in events if start < e.occurred_at <= as_of]
    by_customer: dict[str, list[EventRow]] = {}
    for e in window:
        by_customer.setdefault(e.customer_id, []).append(e)
    measures: dict[str, tuple[int, int, Decimal]] = {}
    for cid, rows in by_customer.items():
        if eligible is not None and cid not in eligible:
            continue
        if not any(e.name in (model.recency_event, model.frequency_event) for e in rows):
            continue
        recency = [e.occurred_at for e in rows if e.name == model.recency_event]
        if recency:
            days = (as_of - max(recency)) // timedelta(days=1)
        else:
            days = math.ceil(model.timeframe / timedelta(days=1))
        frequency = sum(1 for e in rows if e.name == model.frequency_event)
        monetary = Decimal(0)
        for e in rows:
            value = e.properties.get(model.monetary_property)
            if e.name == model.monetary_event and type(value) in (int, float):
                monetary += Decimal(str(value))
        measures[cid] = (days, frequency, monetary)
    n = len(measures)
    rules = model.rules()
    out = {}
    for cid, (days, frequency, monetary) in measures.items():
        w_r = sum(1 for d, _, _ in measures.values() if d > days)
        w_f = sum(1 for _, fr, _ in measures.values() if fr < frequency)
        w_m = sum(1 for _, _, mo in measures.values() if mo < monetary)
        r, f, m = (1 + (5 * w) // n for w in (w_r, w_f, w_m))
        out[cid] = Expected(days, frequency, monetary, r, f, m, label_for(rules, r, f, m))
    return out
