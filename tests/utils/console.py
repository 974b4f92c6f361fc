"""A store that looks like the seed's use case, for the console's tests and screenshots:
customers with purchases, the `default` RFM model scored twice (so a migration matrix
exists), the example rule segments evaluated, the seed journeys active with runs along
their paths (messages, clicks, branches, conversions), the homepage campaign active with
views and conversions, and one record set aside in the quarantine."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import insert
from sqlalchemy.engine import Engine
from sqlmodel import Session

from core.personalization import bucket_of
from core.rfm import RfmModelCreate
from core.tables import Customer, Event, utcnow
from store import segments as segment_store
from store.failures import FailureSubject, record_failure
from store.journeys import install_shipped_journeys
from store.personalization import (
    LiveCampaign,
    ViewRecord,
    install_shipped_campaigns,
    record_views,
    version_definition,
)
from store.rfm_models import create_model
from store.scoring import score_model
from tests.utils.inspection import HandRun
from tests.utils.rfm import model_body

EXAMPLES = Path(__file__).resolve().parent.parent.parent / "examples" / "segments"
FIRST_NAMES = ("Ada", "Ben", "Chloé", "Dev", "Eun", "Femi", "Gus", "Hana", "Ines", "Jon")


@dataclass(frozen=True)
class Seeded:
    customers: list[str]
    now: datetime
    champion: str
    """a customer in default:champions with a run of champions-nurture"""
    at_risk: str
    """a customer with an at-risk-winback run that took the SMS branch"""


def _customers(engine: Engine, rng: random.Random, count: int, now: datetime) -> list[str]:
    ids = [f"cus-{i:04d}" for i in range(count)]
    customers, events = [], []
    for index, customer_id in enumerate(ids):
        spend = 0.0
        activity = rng.choice([0.02, 0.05, 0.1, 0.2, 0.4])
        last_active = rng.choice([1, 3, 10, 25, 45, 80, 150])
        for day in range(160):
            if day < last_active or rng.random() > activity:
                continue
            price = round(rng.choice([19.5, 35, 60, 120, 240]) * rng.uniform(0.8, 1.2), 2)
            spend += price
            events.append(
                {
                    "event_id": f"{customer_id}-p{day}",
                    "customer_id": customer_id,
                    "name": "Purchase",
                    "occurred_at": now - timedelta(days=day, hours=rng.randrange(24)),
                    "properties": {"total_price": price},
                    "received_at": now - timedelta(minutes=rng.randrange(0, 55)),
                    "realtime_pending": False,
                }
            )
        if rng.random() < 0.5:
            events.append(
                {
                    "event_id": f"{customer_id}-v",
                    "customer_id": customer_id,
                    "name": "Visit",
                    "occurred_at": now - timedelta(days=rng.randrange(0, 60)),
                    "properties": {},
                    "received_at": now - timedelta(minutes=rng.randrange(0, 55)),
                    "realtime_pending": False,
                }
            )
        customers.append(
            {
                "id": customer_id,
                "email": f"{customer_id}@example.com",
                "phone": f"+4670{index:07d}" if index % 3 else None,
                "attributes": {
                    "first_name": FIRST_NAMES[index % len(FIRST_NAMES)],
                    "total_spent": round(spend, 2),
                    "engagement_score": rng.randrange(0, 100),
                    "sms_opt_in": index % 3 != 0,
                    "signed_up_at": (now - timedelta(days=rng.randrange(5, 400))).isoformat(),
                },
                "created_at": now - timedelta(days=400),
                "updated_at": now - timedelta(days=1),
                "realtime_pending": False,
            }
        )
    with engine.begin() as conn:
        conn.execute(insert(Customer.__table__), customers)
        conn.execute(insert(Event.__table__), events)
    return ids


def _segments(engine: Engine, now: datetime) -> None:
    import json

    with engine.begin() as conn:
        for path in sorted(EXAMPLES.glob("*.json")):
            raw = json.loads(path.read_text())
            segment_store.create_segment(
                conn,
                slug=raw["slug"],
                name=raw["name"],
                kind="rule",
                condition=raw["condition"],
                schedule=raw.get("schedule"),
                now=now - timedelta(days=10),
            )
            segment_store.evaluate_segment(conn, slug=raw["slug"], now=now - timedelta(days=10))
            segment_store.evaluate_segment(conn, slug=raw["slug"], now=now)


def _members(engine: Engine, slug: str) -> list[str]:
    with engine.connect() as conn:
        return [m.customer_id for m in segment_store.iter_members(conn, slug=slug)]


def _runs(engine: Engine, rng: random.Random, now: datetime) -> tuple[str, str]:
    champions = _members(engine, "default:champions")
    at_risk = _members(engine, "default:at-risk") or champions
    with engine.begin() as conn:
        for index, customer_id in enumerate(champions[:60]):
            run = HandRun(
                conn,
                journey="champions-nurture",
                customer_id=customer_id,
                entered_at=now - timedelta(days=rng.uniform(2, 12)),
            )
            clicked = index % 3 == 0
            run.send(
                "welcome",
                days=0,
                events=("delivered", "open", "click") if clicked else ("delivered",),
            )
            if clicked:
                run.click(days=1)
                run.send("vip", days=1, events=("delivered", "open"))
            elif index % 3 == 1:
                run.no_click(days=3)
                run.send("reminder", days=3, status="sent" if index % 4 else "skipped")
                run.send("vip", days=3.1)
            else:
                run.position(
                    step="wait_click",
                    since_days=0,
                    waiting_for="click on welcome",
                    waiting_until_days=3,
                )
                continue
            if index % 5 == 0:
                run.finish("goal_reached", "vip", "Purchase within the goal window", days=1.5)
                run.position(
                    status="converted",
                    step="vip",
                    since_days=1.5,
                    ended_days=1.5,
                    converted_days=1.5,
                )
            else:
                run.position(
                    step="pause",
                    since_days=3.2,
                    waiting_for="delay of 2 days",
                    waiting_until_days=5.2,
                )
        for index, customer_id in enumerate(at_risk[:30]):
            run = HandRun(
                conn,
                journey="at-risk-winback",
                customer_id=customer_id,
                entered_at=now - timedelta(days=rng.uniform(6, 12)),
            )
            run.send("welcome", days=0, events=("delivered",))
            run.no_click(days=3)
            run.send("reminder", days=3)
            run.delay_over("pause", days=5)
            opted_in = index % 3 != 0
            run.line(
                "branch_taken",
                "by_channel",
                "condition 1 held -> winback_sms" if opted_in else "no condition held -> done",
                at=run.at(5),
                detail={"matched": 0 if opted_in else None},
            )
            if opted_in:
                run.line(
                    "sent",
                    "winback_sms",
                    "Sent SMS to +46***",
                    at=run.at(5),
                    detail={"channel": "sms"},
                )
                run.finish(
                    "attribute_updated", "mark_contacted", "set winback_contacted = true", days=5
                )
                run.finish("completed", None, "the journey ended", days=5)
                run.position(status="completed", step=None, since_days=5, ended_days=5)
            else:
                run.finish("exited", "done", "exit step", days=5)
                run.position(status="exited", step="done", since_days=5, ended_days=5)
    return champions[0], at_risk[1]


def _views(engine: Engine, rng: random.Random, customers: list[str], now: datetime) -> None:
    with engine.begin() as conn:
        definition = version_definition(conn, slug="rfm-homepage", version=1)
        campaign = LiveCampaign.build(
            slug="rfm-homepage",
            version=1,
            state="active",
            stamp=(),
            dialect=conn.dialect,
            definition=definition,
        )
        views, conversions = [], []
        for customer_id in customers:
            decision = campaign.decide(conn, customer_id=customer_id)
            at = now - timedelta(days=rng.uniform(1, 6))
            views.append(
                ViewRecord(
                    campaign="rfm-homepage",
                    version=1,
                    customer_id=customer_id,
                    experience=decision.experience,
                    audience=decision.audience,
                    bucket=bucket_of("rfm-homepage", customer_id),
                    at=at,
                    views=rng.randrange(1, 6),
                )
            )
            chance = 0.18 if decision.experience not in ("control", "default") else 0.1
            if rng.random() < chance:
                conversions.append(
                    {
                        "event_id": f"{customer_id}-conv",
                        "customer_id": customer_id,
                        "name": "Purchase",
                        "occurred_at": at + timedelta(hours=rng.uniform(1, 48)),
                        "properties": {"total_price": 80},
                        "received_at": now,
                        "realtime_pending": False,
                    }
                )
        record_views(conn, views=views)
        if conversions:
            conn.execute(insert(Event.__table__), conversions)


def seed_console_store(engine: Engine, *, customers: int = 240, seed: int = 20) -> Seeded:
    rng = random.Random(seed)
    now = utcnow()
    ids = _customers(engine, rng, customers, now)
    with engine.begin() as conn:
        create_model(conn, model=RfmModelCreate.model_validate(model_body()), now=now)
        score_model(conn, model_slug="default", as_of=now - timedelta(days=30))
        score_model(conn, model_slug="default", as_of=now)
    _segments(engine, now)
    with Session(engine) as session:
        install_shipped_journeys(session, activate=True, now=now - timedelta(days=20))
        install_shipped_campaigns(session, activate=True, now=now - timedelta(days=20))
        session.commit()
    champion, at_risk = _runs(engine, rng, now)
    _views(engine, rng, ids, now)
    with engine.begin() as conn:
        record_failure(
            conn,
            subject=FailureSubject("customer", ids[7], "realtime"),
            error="attributes.address: not an object",
            now=now,
        )
    return Seeded(customers=ids, now=now, champion=champion, at_risk=at_risk)
