"""Building journey runs by hand in the store: runs, timeline lines, messages, events.

Rows are written the way the runtime and the messaging activity write them (same kinds,
same reasons, same detail keys), so inspection and analytics read what production reads.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import insert
from sqlalchemy.engine import Connection

from core.tables import (
    Journey,
    JourneyRun,
    JourneyVersion,
    Message,
    MessageEvent,
    RunEvent,
    Segment,
    SegmentTransition,
)
from tests.utils.journey_runtime import CHAMPIONS

WELCOME_SUBJECT = "You're First in Line: Exclusive Preview Just for Our Top Shoppers!"
SUBJECTS = {
    "welcome": WELCOME_SUBJECT,
    "reminder": "Still thinking it over? Your preview is waiting",
    "vip": "Your VIP rewards are here",
    "recs": "Picked for you",
}
_ids = itertools.count(1)


def add_journey(
    conn: Connection, *, definition: dict[str, Any] | None = None, versions: int = 1
) -> str:
    """The journey (Champions by default) with `versions` activated versions."""
    raw = definition or CHAMPIONS
    now = datetime.fromisoformat("2026-01-01T00:00:00+00:00")
    conn.execute(
        insert(Journey.__table__).values(
            slug=raw["slug"],
            name=raw["name"],
            state="active",
            latest_version=versions,
            active_version=versions,
            trigger_segment=raw["trigger"]["segment"],
            created_at=now,
            updated_at=now,
        )
    )
    for version in range(1, versions + 1):
        conn.execute(
            insert(JourneyVersion.__table__).values(
                journey_slug=raw["slug"],
                version=version,
                definition=raw,
                created_at=now,
                activated_at=now,
            )
        )
    return raw["slug"]


def add_champions_entry(
    conn: Connection, *, customer_id: str, at: datetime, pass_id: int = 42
) -> int:
    """The Champions segment (named) and the RFM transition that put the customer in it."""
    exists = conn.execute(
        Segment.__table__.select().where(Segment.__table__.c.slug == "default:champions")
    ).first()
    if exists is None:
        conn.execute(
            insert(Segment.__table__).values(
                slug="default:champions",
                name="Champions",
                kind="rfm",
                model_slug="default",
                version=1,
                created_at=at,
                updated_at=at,
            )
        )
    result = conn.execute(
        insert(SegmentTransition.__table__)
        .values(
            segment_slug="default:champions",
            customer_id=customer_id,
            kind="entered",
            source=f"rfm-pass:{pass_id}",
            context={
                "model": "default",
                "pass_id": pass_id,
                "r": 5,
                "f": 4,
                "m": 5,
                "label": "Champions",
            },
            occurred_at=at,
            dispatched_at=at,
        )
        .returning(SegmentTransition.__table__.c.id)
    )
    return int(result.scalar_one())


@dataclass
class HandRun:
    """One run being written by hand: its row first, then its lines in order."""

    conn: Connection
    journey: str
    customer_id: str
    entered_at: datetime
    version: int = 1
    transition_id: int | None = None
    workflow_id: str = ""
    run_id: str = ""
    seq: int = 0
    messages: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.workflow_id = self.workflow_id or f"journey:{self.journey}:{self.customer_id}"
        self.run_id = self.run_id or f"run-{next(_ids)}"
        self.conn.execute(
            insert(JourneyRun.__table__).values(
                workflow_id=self.workflow_id,
                run_id=self.run_id,
                journey_slug=self.journey,
                version=self.version,
                customer_id=self.customer_id,
                status="running",
                step=None,
                entry_transition_id=self.transition_id,
                entered_at=self.entered_at,
            )
        )
        transition = self.transition_id if self.transition_id is not None else 42
        self.line(
            "entered",
            None,
            f"segment transition {transition}: entered default:champions (RFM pass 42, R5 F4 M5)",
            at=self.entered_at,
        )

    def at(self, days: float) -> datetime:
        return self.entered_at + timedelta(days=days)

    def line(
        self,
        kind: str,
        step: str | None,
        reason: str,
        *,
        at: datetime,
        detail: dict[str, Any] | None = None,
    ) -> None:
        self.conn.execute(
            insert(RunEvent.__table__).values(
                workflow_id=self.workflow_id,
                run_id=self.run_id,
                seq=self.seq,
                journey_slug=self.journey,
                version=self.version,
                customer_id=self.customer_id,
                step=step,
                kind=kind,
                reason=reason,
                detail=detail or {},
                occurred_at=at,
            )
        )
        self.seq += 1

    def send(
        self, step: str, *, days: float, status: str = "sent", events: tuple[str, ...] = ()
    ) -> int:
        """A send of `step` as the messaging activity records it, with its later events."""
        at = self.at(days)
        subject = SUBJECTS.get(step, f"subject of {step}")
        took_it = status in ("sent", "delivered", "bounced")
        message_id = int(
            self.conn.execute(
                insert(Message.__table__)
                .values(
                    idempotency_key=f"{self.workflow_id}:{self.run_id}:{step}",
                    workflow_id=self.workflow_id,
                    run_id=self.run_id,
                    step=step,
                    journey_slug=self.journey,
                    version=self.version,
                    customer_id=self.customer_id,
                    channel="email",
                    template=f"champions/{step}.html",
                    to=f"{self.customer_id}@example.com",
                    subject=subject if took_it or status == "in_doubt" else None,
                    status=status,
                    provider="outbox",
                    headers={},
                    links=[],
                    attempts=1,
                    created_at=at,
                    updated_at=at,
                    sent_at=at if took_it else None,
                )
                .returning(Message.__table__.c.id)
            ).scalar_one()
        )
        kind = "sent" if took_it else status
        reason = {
            "sent": f"Sent email \u201c{subject}\u201d to {self.customer_id[:1]}***@example.com"
            " via outbox.",
            "skipped": "Not sent: the customer unsubscribed from email on 2026-01-01 00:00 UTC.",
            "failed": "Not sent: the provider refused the message for good (invalid address).",
            "in_doubt": "Outcome unknown: an earlier attempt reached the provider.",
        }[kind]
        self.line(
            kind,
            step,
            reason,
            at=at,
            detail={
                "channel": "email",
                "subject": subject if kind == "sent" else None,
                "message_id": message_id,
                "template": f"champions/{step}.html",
            },
        )
        for offset, event in enumerate(events, start=1):
            self.conn.execute(
                insert(MessageEvent.__table__).values(
                    message_id=message_id,
                    dedupe_key=f"hand:{message_id}:{offset}",
                    kind=event,
                    detail={},
                    occurred_at=at + timedelta(minutes=offset),
                )
            )
        self.messages[step] = message_id
        return message_id

    def no_click(self, *, days: float) -> None:
        self.line(
            "timer_fired",
            "wait_click",
            "timer fired after 3 days: no click on welcome",
            at=self.at(days),
        )

    def click(self, *, days: float) -> None:
        at = self.at(days)
        self.line(
            "event_received",
            "wait_click",
            "click signal on welcome after 1 day",
            at=at,
            detail={"event": "email_clicked", "occurred_at": at.isoformat()},
        )

    def delay_over(self, step: str, *, days: float) -> None:
        self.line("timer_fired", step, "delay of 2 days over", at=self.at(days))

    def position(
        self,
        *,
        status: str = "running",
        step: str | None,
        since_days: float,
        waiting_for: str | None = None,
        waiting_until_days: float | None = None,
        ended_days: float | None = None,
        converted_days: float | None = None,
    ) -> None:
        table = JourneyRun.__table__
        self.conn.execute(
            table.update()
            .where(table.c.workflow_id == self.workflow_id, table.c.run_id == self.run_id)
            .values(
                status=status,
                step=step,
                step_since=self.at(since_days),
                waiting_for=waiting_for,
                waiting_until=(
                    self.at(waiting_until_days) if waiting_until_days is not None else None
                ),
                ended_at=self.at(ended_days) if ended_days is not None else None,
                converted_at=self.at(converted_days) if converted_days is not None else None,
            )
        )

    def finish(self, kind: str, step: str | None, reason: str, *, days: float) -> None:
        self.line(kind, step, reason, at=self.at(days))
