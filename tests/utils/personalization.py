"""Factories for personalisation tests: campaign definitions, the seed's label segments,
events at given times, and customers sorted into the control group or out of it."""

from __future__ import annotations

import copy
import json
from datetime import datetime
from itertools import count
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import Session

from core.personalization import bucket_of, control_threshold
from core.tables import Event
from tests.utils.segments import add_label_segment

SHIPPED = Path(__file__).resolve().parent.parent.parent / "templates/personalizations/homepage.json"
SEED_LABELS = ("champions", "regulars", "promising", "needs-attention", "at-risk")
_event_ids = count(1)


def shipped_campaign() -> dict[str, Any]:
    """The seed's campaign as shipped (slug `rfm-homepage`)."""
    return json.loads(SHIPPED.read_text())


def campaign(slug: str = "home", **changes: Any) -> dict[str, Any]:
    """A small valid campaign: VIP (segment `vip`), then Big spenders (total_spent > 500)."""
    base: dict[str, Any] = {
        "slug": slug,
        "name": "Homepage",
        "control_share": 0.1,
        "conversion": {"event": "Purchase", "value_property": "total_price", "within": "P7D"},
        "default": {
            "banner": "Welcome",
            "top_bar": "Hello {{ customer.first_name | default('there') }}",
            "recommended": "Best-sellers",
            "offer": "",
        },
        "experiences": [
            {
                "name": "VIP",
                "segment": "vip",
                "content": {"banner": "VIP early access", "offer": "20% off"},
            },
            {
                "name": "Big spenders",
                "condition": {"attribute": "total_spent", "op": "gt", "value": 500},
                "content": {"offer": "Free shipping"},
            },
        ],
    }
    return copy.deepcopy({**base, **changes})


def add_seed_segments(engine: Engine, members: dict[str, list[str]] | None = None) -> None:
    """The seed5 label segments of model `default`, with `members` by label."""
    for label in SEED_LABELS:
        add_label_segment(engine, f"default:{label}", (members or {}).get(label, []))


def add_event_at(
    engine: Engine,
    customer_id: str,
    name: str,
    at: datetime,
    properties: dict[str, Any] | None = None,
) -> None:
    with Session(engine) as session:
        session.add(
            Event(
                event_id=f"pz-{next(_event_ids)}",
                customer_id=customer_id,
                name=name,
                occurred_at=at,
                properties=properties or {},
                realtime_pending=False,
            )
        )
        session.commit()


def customers_by_group(
    slug: str, share: float, *, treated: int, held_out: int, prefix: str = "c"
) -> tuple[list[str], list[str]]:
    """`treated` ids outside the control group of campaign `slug` and `held_out` inside."""
    threshold = control_threshold(share)
    outside: list[str] = []
    inside: list[str] = []
    for i in count():
        customer = f"{prefix}-{i}"
        if bucket_of(slug, customer) < threshold:
            if len(inside) < held_out:
                inside.append(customer)
        elif len(outside) < treated:
            outside.append(customer)
        if len(outside) == treated and len(inside) == held_out:
            return outside, inside
    raise AssertionError("unreachable")


def migrate_to(engine: Engine, revision: str) -> None:
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
