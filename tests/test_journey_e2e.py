"""End to end on the real dev server: an outbox transition -> the dispatcher started by
`ensure_dispatcher` -> JourneyWorkflow -> the real send activity -> the welcome email in
the local outbox, with the run's row and timeline in the store."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import insert
from temporalio.worker import Worker

from activities.dispatch import TransitionDispatcher, ensure_dispatcher
from activities.messaging import MessagingActivities
from activities.runs import RunActivities
from core.settings import Settings
from core.tables import SegmentTransition, utcnow
from store import journeys as journey_store
from store import messages as message_store
from store import runs as run_store
from tests.utils.journey_runtime import (
    CHAMPIONS,
    add_customers,
    add_segment,
    client_for,
    eventually,
    terminate_running_runs,
)
from workflows.dispatch import DispatcherWorkflow
from workflows.journey import JourneyWorkflow


async def test_a_transition_in_the_outbox_sends_the_welcome_email(
    dev_server_env, sqlite_engine
) -> None:
    client = client_for(dev_server_env)
    queue = f"journeys-e2e-{uuid.uuid4()}"
    settings = Settings(task_queue=queue, dispatch_poll_seconds=0.05)
    customer = f"e2e-{uuid.uuid4().hex[:8]}"
    add_segment(sqlite_engine, "default:champions")
    add_customers(sqlite_engine, [customer], {"first_name": "Ada"})
    with sqlite_engine.begin() as conn:
        journey_store.create_journey(conn, raw=CHAMPIONS)
        journey_store.activate_journey(conn, slug=CHAMPIONS["slug"])
        conn.execute(
            insert(SegmentTransition.__table__).values(
                segment_slug="default:champions",
                customer_id=customer,
                kind="entered",
                source="rfm-pass:1",
                context={"pass_id": 1, "r": 5, "f": 5, "m": 4},
                occurred_at=utcnow(),
            )
        )
    activities = [
        *MessagingActivities(engine=sqlite_engine, settings=settings).all(),
        *RunActivities(sqlite_engine).all(),
        *TransitionDispatcher(sqlite_engine, client, task_queue=queue).activities(),
    ]
    dispatcher_id = f"dispatcher-{uuid.uuid4()}"
    with ThreadPoolExecutor(max_workers=8) as executor:
        async with Worker(
            client,
            task_queue=queue,
            workflows=[JourneyWorkflow, DispatcherWorkflow],
            activities=activities,
            activity_executor=executor,
        ):
            await ensure_dispatcher(client, settings, workflow_id=dispatcher_id)
            # A second boot keeps the dispatcher that runs.
            await ensure_dispatcher(client, settings, workflow_id=dispatcher_id)
            try:

                def welcome_in_outbox() -> list:
                    with sqlite_engine.connect() as conn:
                        return message_store.list_outbox(conn, customer_id=customer)

                (message,) = await eventually(welcome_in_outbox, what="welcome in the outbox")

                def run_waits() -> run_store.RunWithTimeline | None:
                    with sqlite_engine.connect() as conn:
                        runs = run_store.customer_runs(conn, customer_id=customer)
                    return runs[0] if runs and runs[0].waiting_for else None

                run = await eventually(run_waits, what="the run waits for the click")
            finally:
                await client.get_workflow_handle(dispatcher_id).terminate("test over")
                await terminate_running_runs(client, sqlite_engine)
    assert message.subject == ("You're First in Line: Exclusive Preview Just for Our Top Shoppers!")
    assert message.step == "welcome" and message.journey_slug == "champions-nurture"
    assert run.step == "wait_click" and run.waiting_for == "click on welcome"
    assert [line.kind for line in run.timeline][:2] == ["entered", "sent"]
    assert run.timeline[0].reason.endswith("entered default:champions (RFM pass 1, R5 F5 M4)")
