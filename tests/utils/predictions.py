"""Generated histories for predictive models, with a known probability per customer.

Every customer has a type k (0-4) and joins in a random one of the `windows` horizon
windows before `T` (so tenures spread alike at every cutoff). From then on a type-k
customer visits k + 1 times in every window (so their features show k), and makes a
purchase in each window, independently, with probability `BUY_CHANCE[k]`. Windows are
aligned on the cutoffs a training as of `T` reads (T - j * horizon), so the label of
every training row, and the outcome after T, is a Bernoulli draw with that known
probability.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.engine import Engine

from tests.utils.rfm import EventRow, load

T = datetime(2026, 6, 1, tzinfo=UTC)
HORIZON = timedelta(days=30)
BUY_CHANCE = (0.05, 0.2, 0.45, 0.7, 0.9)


def model_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "slug": "buy-30d",
        "name": "Will purchase in 30 days",
        "target": {"event": "Purchase", "within": "P30D"},
        "direction": "will_do",
        "levels": {"medium": 0.3, "high": 0.6},
        "features": {"value_property": "total_price"},
        "schedule": None,
        "realtime": True,
    }
    body.update(changes)
    return body


def customer_type(customer_id: str) -> int:
    return int(customer_id.split("-")[1])


def known_history(
    *,
    customers: int,
    windows: int = 12,
    seed: int = 11,
    as_of: datetime = T,
    horizon: timedelta = HORIZON,
    after: int = 0,
) -> list[EventRow]:
    """Events of `customers` customers (ids `k{n}-{type}`) over `windows` horizon windows
    before `as_of`, and `after` windows after it."""
    rng = random.Random(seed)
    events: list[EventRow] = []
    span = horizon.total_seconds()
    for n in range(customers):
        kind = n % len(BUY_CHANCE)
        cid = f"k{n:05d}-{kind}"
        joined = rng.randrange(1, windows + 1)
        for j in range(-after, joined):
            start = as_of - (j + 1) * horizon
            for _ in range(kind + 1):
                at = start + timedelta(seconds=rng.uniform(1, span - 1))
                events.append(EventRow(cid, "Visit", at))
            if rng.random() < BUY_CHANCE[kind]:
                at = start + timedelta(seconds=rng.uniform(1, span - 1))
                events.append(EventRow(cid, "Purchase", at, {"total_price": 20 + 10 * kind}))
    return events


def load_known(engine: Engine, **kwargs: Any) -> list[EventRow]:
    events = known_history(**kwargs)
    load(engine, events)
    return events
