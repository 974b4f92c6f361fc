"""Personalisation analytics at scale, on SQLite and PostgreSQL: 20,000 generated viewers,
some shown two experiences, with goal events in and out of their windows, filtered out,
of another name, with and without a numeric value, counted by the store and again here in
Python, each group of each audience compared figure by figure.

The store's query must stay linear without planner statistics (a test store is never
ANALYZEd): the quadratic plan it replaced took minutes here."""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from sqlalchemy import bindparam, text

from core.tables import UTCDateTime
from store.personalization import (
    CampaignAnalytics,
    ViewRecord,
    activate_campaign,
    campaign_analytics,
    create_campaign,
    record_views,
)
from tests.utils.personalization import campaign
from tests.utils.segments import add_label_segment

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
NOW = T0 + timedelta(days=40)
WINDOW = timedelta(days=7)
VIEWERS = 20_000
AUDIENCES = ("VIP", "Big spenders")
GOAL = {
    "event": "Purchase",
    "value_property": "total_price",
    "within": "P7D",
    "where": [{"property": "channel", "op": "eq", "value": "web"}],
}


@dataclass(frozen=True)
class Shown:
    experience: str
    audience: str | None
    at: datetime
    views: int


@dataclass(frozen=True)
class Bought:
    name: str
    at: datetime
    properties: dict[str, object]


def _generate(seed: int) -> tuple[dict[str, list[Shown]], dict[str, list[Bought]]]:
    """Each viewer's view rows and events; no two of a customer's events at one instant,
    so "the first qualifying event" has one answer."""
    rng = random.Random(seed)
    shown: dict[str, list[Shown]] = {}
    events: dict[str, list[Bought]] = defaultdict(list)
    for i in range(VIEWERS):
        customer = f"a-{i}"
        first = T0 + timedelta(
            seconds=rng.randrange(0, 20 * 86_400), microseconds=rng.randrange(10**6)
        )
        kind = rng.random()
        audience = rng.choice(AUDIENCES) if kind < 0.8 else None
        if audience is None:
            experience = "default"
        elif kind < 0.1:
            experience = "control"
        else:
            experience = audience
        rows = [Shown(experience, audience, first, rng.randrange(1, 4))]
        if rng.random() < 0.1:  # shown something else too, before or after
            other = rng.choice(AUDIENCES)
            shift = timedelta(hours=rng.randrange(1, 72)) * rng.choice((-1, 1))
            rows.append(Shown(other, other, first + shift, rng.randrange(1, 3)))
        shown[customer] = rows
        offsets = rng.sample(range(-4 * 86_400, 12 * 86_400), rng.randrange(0, 4))
        for offset in offsets:
            at = first + timedelta(seconds=offset)
            value: object = rng.choice(
                (rng.randrange(1, 300), rng.randrange(1, 3000) / 8, "12", None)
            )
            properties: dict[str, object] = {"channel": "web" if rng.random() < 0.8 else "store"}
            if value is not None:
                properties["total_price"] = value
            events[customer].append(
                Bought("Purchase" if rng.random() < 0.9 else "Viewed", at, properties)
            )
        if rng.random() < 0.02:  # the window's last instant still counts
            events[customer].append(
                Bought("Purchase", first + WINDOW, {"channel": "web", "total_price": 1})
            )
    return shown, events


def _store(engine, shown, events) -> None:  # noqa: ANN001
    add_label_segment(engine, "vip", [])
    views = [
        ViewRecord("home", 1, customer, row.experience, row.audience, 0, row.at, row.views)
        for customer, rows in shown.items()
        for row in rows
    ]
    insert = text(
        "INSERT INTO events (event_id, customer_id, name, occurred_at, properties, received_at,"
        " realtime_pending) VALUES (:id, :customer, :name, :at, :properties, :at, false)"
    ).bindparams(bindparam("at", type_=UTCDateTime()))
    rows = [
        {
            "id": f"{customer}-{n}",
            "customer": customer,
            "name": event.name,
            "at": event.at,
            "properties": orjson.dumps(event.properties).decode(),
        }
        for customer, bought in events.items()
        for n, event in enumerate(bought)
    ]
    with engine.begin() as conn:
        create_campaign(conn, raw=campaign(conversion=GOAL), now=T0)
        activate_campaign(conn, slug="home", now=T0)
        record_views(conn, views=views)
        for start in range(0, len(rows), 5_000):
            conn.execute(insert, rows[start : start + 5_000])


Cell = tuple[str, str | None]


def _expected(
    shown, events, *, viewed_from: datetime | None = None, viewed_to: datetime | None = None
) -> dict[Cell, tuple[int, int, int, float]]:  # noqa: ANN001
    """(viewers, views, conversions, value) by (experience, audience), counted here."""
    cells: dict[Cell, list[float]] = defaultdict(lambda: [0, 0, 0, 0.0])
    for customer, rows in shown.items():
        first = min(rows, key=lambda row: (row.at, row.experience))
        if viewed_from and first.at < viewed_from or viewed_to and first.at >= viewed_to:
            continue
        cell = cells[(first.experience, first.audience)]
        cell[0] += 1
        cell[1] += sum(row.views for row in rows)
        qualifying = [
            event
            for event in events.get(customer, [])
            if event.name == "Purchase"
            and event.properties.get("channel") == "web"
            and first.at <= event.at <= first.at + WINDOW
            and event.at <= NOW
            and (viewed_to is None or event.at < viewed_to)
        ]
        if qualifying:
            converted = min(qualifying, key=lambda event: event.at)
            cell[2] += 1
            price = converted.properties.get("total_price")
            cell[3] += price if isinstance(price, int | float) else 0
    return {key: (int(v[0]), int(v[1]), int(v[2]), v[3]) for key, v in cells.items()}


def _assert_matches(report: CampaignAnalytics, expected: dict[Cell, tuple]) -> None:
    def figures(arm) -> tuple:  # noqa: ANN001
        return (arm.viewers, arm.views, arm.conversions, pytest.approx(arm.conversion_value))

    def want(cell: Cell) -> tuple:
        viewers, views, conversions, value = expected.get(cell, (0, 0, 0, 0.0))
        return (viewers, views, conversions, pytest.approx(value))

    for experience in report.experiences:
        name = experience.experience
        assert figures(experience) == want((name, name)), name
        assert figures(experience.control) == want(("control", name)), f"control of {name}"
    assert figures(report.default) == want(("default", None))
    control = [expected.get(("control", name), (0, 0, 0, 0.0)) for name in AUDIENCES]
    assert report.control.viewers == sum(c[0] for c in control)
    assert report.control.conversions == sum(c[2] for c in control)


def test_analytics_of_20000_viewers_match_a_count_made_in_python(store_engine) -> None:
    shown, events = _generate(seed=15)
    _store(store_engine, shown, events)
    expected = _expected(shown, events)
    # the generated data exercises every group and both outcomes in each
    assert all(expected[(name, name)][2] > 100 for name in AUDIENCES)
    assert all(
        0 < expected[("control", name)][2] < expected[("control", name)][0] for name in AUDIENCES
    )
    with store_engine.connect() as conn:
        report = campaign_analytics(conn, slug="home", now=NOW)
    _assert_matches(report, expected)
    assert (
        sum(e.viewers + e.control.viewers for e in report.experiences) + report.default.viewers
        == VIEWERS
    )

    viewed_from, viewed_to = T0 + timedelta(days=5), T0 + timedelta(days=12)
    with store_engine.connect() as conn:
        window = campaign_analytics(
            conn, slug="home", viewed_from=viewed_from, viewed_to=viewed_to, now=NOW
        )
    _assert_matches(window, _expected(shown, events, viewed_from=viewed_from, viewed_to=viewed_to))
