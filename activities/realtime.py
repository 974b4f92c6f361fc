"""Real-time processing of new events and attribute changes.

A long-running activity (kept alive by `RealtimeWorkflow`) claims what arrived since it
last looked, re-scores and re-evaluates those customers in the same transaction as the
claim (so a crash re-processes instead of losing work), then signals the customers'
running journeys with the events (goals, waits).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any

from pydantic import BaseModel
from sqlalchemy.engine import Connection, Engine
from temporalio import activity

from activities.outages import riding_out_outages
from core import metrics
from core.db import sqlite_writer_role
from core.settings import Settings
from core.tables import utcnow
from store.customers import claim_pending_customers
from store.events import claim_pending_events
from store.failures import FailureSubject, clear_failures, due_keys, record_failure
from store.writer import group_writer

log = logging.getLogger("journeys.realtime")

PROCESS_REALTIME_ACTIVITY = "process_realtime"
# How often the processor heartbeats: a quarter of the heartbeat timeout RealtimeWorkflow
# gives it, so a beat that comes late still comes in time.
HEARTBEAT_SECONDS = 2.5

CustomerStep = Callable[[Connection, Sequence[str]], object]
EventSink = Callable[[Sequence[dict[str, Any]]], Awaitable[None]]


class RealtimeInput(BaseModel):
    run_seconds: float = 3600.0
    batch_size: int = 2_000


class RealtimeResult(BaseModel):
    events: int = 0
    customers: int = 0


class RealtimeActivities:
    """Bound to the store and the steps of the other rooms (scoring, segments, journeys)."""

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        *,
        customer_steps: Sequence[CustomerStep],
        event_sink: EventSink | None,
    ):
        self.engine = engine
        self.settings = settings
        self.customer_steps = list(customer_steps)
        self.event_sink = event_sink

    def process_batch(self, batch_size: int) -> tuple[list[dict[str, Any]], list[str]]:
        """Claim a batch and apply every customer step to it, all in one transaction.

        Customers set aside earlier join the batch once their retry time has come. If the
        batch fails as a whole, each customer is tried alone, and one that still fails is
        set aside with its error: the rest of the batch is processed and the claim kept.
        """
        now = utcnow()
        started = time.perf_counter()

        def claim_and_apply(conn: Connection) -> tuple[list[dict[str, Any]], list[str]]:
            events = claim_pending_events(conn, limit=batch_size)
            metrics.observe_realtime_lag([e.get("received_at") for e in events], now)
            changed = claim_pending_customers(conn, limit=batch_size)
            retried = due_keys(
                conn, kind="customer", stage="realtime", now=now, limit=max(1, batch_size // 10)
            )
            customer_ids = sorted({e["customer_id"] for e in events} | set(changed) | set(retried))
            if customer_ids:
                self._apply_steps(conn, customer_ids, retried=retried, now=now)
            return events, customer_ids

        # With the process's other writes (store/writer.py): one lock, one commit.
        events, customer_ids = group_writer(self.engine).run(claim_and_apply)
        if customer_ids:
            metrics.observe_pass("realtime", time.perf_counter() - started)
        return events, customer_ids

    def _apply_steps(
        self, conn: Connection, customer_ids: list[str], *, retried: list[str], now: datetime
    ) -> None:
        try:
            with conn.begin_nested():
                for step in self.customer_steps:
                    step(conn, customer_ids)
        except Exception:  # noqa: BLE001 - any failure: find whose it is
            log.warning("a real-time batch of %d customers failed; trying each", len(customer_ids))
        else:
            clear_failures(conn, kind="customer", stage="realtime", keys=retried)
            return
        for customer_id in customer_ids:
            try:
                with conn.begin_nested():
                    for step in self.customer_steps:
                        step(conn, [customer_id])
            except Exception as exc:  # noqa: BLE001 - set aside, never stop the others
                failure = record_failure(
                    conn,
                    subject=FailureSubject("customer", customer_id, "realtime"),
                    error=exc,
                    now=now,
                )
                log.error(
                    "customer %r set aside by real-time processing (attempt %d): %s",
                    customer_id,
                    failure.attempts,
                    failure.error,
                )
            else:
                clear_failures(conn, kind="customer", stage="realtime", keys=[customer_id])

    @activity.defn(name=PROCESS_REALTIME_ACTIVITY)
    async def process_realtime(self, request: RealtimeInput) -> RealtimeResult:
        result = RealtimeResult()
        sqlite_writer_role.set("realtime")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + request.run_seconds

        async def keep_heartbeating() -> None:
            # A batch that outlasts the heartbeat timeout must not pass for a dead worker.
            while True:
                activity.heartbeat(result.events)
                await asyncio.sleep(HEARTBEAT_SECONDS)

        heartbeats = asyncio.create_task(keep_heartbeating())
        try:
            while loop.time() < deadline:
                events, customers = await riding_out_outages(
                    lambda: asyncio.to_thread(self.process_batch, request.batch_size),
                    "real-time processor",
                )
                result.events += len(events)
                result.customers += len(customers)
                if events and self.event_sink is not None:
                    await self._deliver(events)
                if len(events) < request.batch_size and len(customers) < request.batch_size:
                    await asyncio.sleep(self.settings.realtime_poll_seconds)
        finally:
            heartbeats.cancel()
        return result

    async def _deliver(self, events: Sequence[dict[str, Any]]) -> None:
        # The claim is committed; a Temporal hiccup must not drop the signals, so retry
        # with backoff while the activity lives (a worker crash here is the one gap).
        assert self.event_sink is not None
        delay = 0.2
        while True:
            try:
                await self.event_sink(events)
                return
            except Exception:  # noqa: BLE001
                log.exception("signalling %d events to journeys failed; retrying", len(events))
                activity.heartbeat()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)


def rescoring_step(now_factory: Callable[[], Any] = utcnow) -> CustomerStep:
    from store.scoring import rescore_customers

    def step(conn: Connection, customer_ids: Sequence[str]) -> object:
        return rescore_customers(conn, customer_ids=customer_ids, now=now_factory())

    return step


def segment_step(now_factory: Callable[[], Any] = utcnow) -> CustomerStep:
    from store.segments import reevaluate_customers

    def step(conn: Connection, customer_ids: Sequence[str]) -> object:
        return reevaluate_customers(conn, customer_ids=customer_ids, now=now_factory())

    return step


def prediction_step(now_factory: Callable[[], Any] = utcnow) -> CustomerStep:
    from store.predictions import rescore_customers

    def step(conn: Connection, customer_ids: Sequence[str]) -> object:
        return rescore_customers(conn, customer_ids=customer_ids, now=now_factory())

    return step
