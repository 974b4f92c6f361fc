"""Support's view of journey runs: a customer's journeys with readable timelines, a run's
raw Temporal history, a live run's state (a workflow query), and who is in a journey.

Everything here reads; nothing writes to the store or signals a workflow.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any, Literal

from fastapi import Path, Query
from pydantic import BaseModel, Field, computed_field
from temporalio.client import WorkflowExecutionStatus, WorkflowQueryRejectedError
from temporalio.common import QueryRejectCondition
from temporalio.service import RPCError, RPCStatusCode

from api.boundary import PageLimit, resource_router
from api.deps import SessionDep, SettingsDep, SupportKey, TemporalDep, TemporalUnavailable
from core.errors import JourneysError, NotFound
from core.runs import JourneyRunState
from store.analytics import journey_exists, runs_by_step
from store.inspection import InspectedRun, customer_exists, customer_journeys, temporal_ui_url
from store.runs import RunSummary

router = resource_router(tags=["runs"])

# The journey workflow's query (workflows/journey.py `JourneyWorkflow.state`).
STATE_QUERY = "state"
TEMPORAL_TIMEOUT = timedelta(seconds=10)

WorkflowId = Annotated[
    str, Path(min_length=1, max_length=500, description="e.g. journey:champions:c-42")
]
RunStatusFilter = Literal["running", "completed", "converted", "exited", "failed", "cancelled"]


class RunClosed(JourneysError):
    """A live query was asked of a run that has ended."""

    status_code = 409
    code = "run_closed"


class CustomerJourneys(BaseModel):
    customer_id: str
    data: list[InspectedRun]


class RunHistory(BaseModel):
    workflow_id: str
    run_id: str | None = Field(description="The run asked for; null: the latest run.")
    ui_url: str
    history: dict[str, Any] = Field(description="Temporal's history JSON (`events`).")


class RunState(BaseModel):
    workflow_id: str
    run_id: str = Field(description="The Temporal run that answered (the current one).")
    status: str = Field(description="Temporal's execution status.")
    ui_url: str
    state: JourneyRunState


@router.get(
    "/v1/customers/{customer_id}/journeys",
    response_model=CustomerJourneys,
    summary="A customer's journey runs, each with a readable timeline",
)
def list_customer_journeys(
    customer_id: Annotated[str, Path(min_length=1, max_length=255)],
    session: SessionDep,
    settings: SettingsDep,
    _: SupportKey,
) -> CustomerJourneys:
    """Every run (newest first) with where it stands, what it waits for, the Temporal UI
    link and the timeline: what happened, when and why."""
    conn = session.connection()
    runs = customer_journeys(
        conn,
        customer_id=customer_id,
        ui_base=settings.temporal_ui_url,
        namespace=settings.temporal_namespace,
    )
    if not runs and not customer_exists(conn, customer_id=customer_id):
        raise NotFound(f"no customer {customer_id!r}", field="customer_id")
    return CustomerJourneys(customer_id=customer_id, data=runs)


@router.get(
    "/v1/runs/{workflow_id:path}/history",
    response_model=RunHistory,
    summary="A run's raw Temporal history as JSON",
)
async def run_history(
    workflow_id: WorkflowId,
    # The key before Temporal: a caller without the role must not set off a connection.
    _: SupportKey,
    client: TemporalDep,
    settings: SettingsDep,
    run_id: Annotated[str | None, Query(max_length=64)] = None,
) -> RunHistory:
    """The workflow's event history as the SDK's `fetch_history` gives it (the latest
    run of the workflow id unless `run_id` names one)."""
    handle = client.get_workflow_handle(workflow_id, run_id=run_id)
    try:
        history = await handle.fetch_history(rpc_timeout=TEMPORAL_TIMEOUT)
    except RPCError as exc:
        raise _temporal_error(exc, workflow_id) from exc
    return RunHistory(
        workflow_id=workflow_id,
        run_id=run_id,
        ui_url=temporal_ui_url(
            settings.temporal_ui_url, settings.temporal_namespace, workflow_id, history.run_id
        ),
        history=history.to_json_dict(),
    )


@router.get(
    "/v1/runs/{workflow_id:path}/state",
    response_model=RunState,
    summary="A live run's current state, asked of the workflow (no database read)",
)
async def run_state(
    workflow_id: WorkflowId,
    _: SupportKey,
    client: TemporalDep,
    settings: SettingsDep,
) -> RunState:
    """The running workflow's own answer to its `state` query: step, since when, what it
    waits for and until when, events received. 409 `run_closed` once the run has ended."""
    handle = client.get_workflow_handle(workflow_id)
    try:
        described = await handle.describe(rpc_timeout=TEMPORAL_TIMEOUT)
        if described.status != WorkflowExecutionStatus.RUNNING:
            raise _closed(workflow_id, described.status)
        state = await handle.query(
            STATE_QUERY,
            result_type=JourneyRunState,
            reject_condition=QueryRejectCondition.NOT_OPEN,
            rpc_timeout=TEMPORAL_TIMEOUT,
        )
    except WorkflowQueryRejectedError as exc:
        raise _closed(workflow_id, exc.status) from exc
    except RPCError as exc:
        raise _temporal_error(exc, workflow_id) from exc
    return RunState(
        workflow_id=workflow_id,
        run_id=described.run_id,
        status=described.status.name if described.status else "UNKNOWN",
        ui_url=temporal_ui_url(
            settings.temporal_ui_url, settings.temporal_namespace, workflow_id, described.run_id
        ),
        state=state,
    )


def _closed(workflow_id: str, status: WorkflowExecutionStatus | None) -> RunClosed:
    name = status.name.lower() if status is not None else "closed"
    return RunClosed(
        f"run {workflow_id} has ended ({name}): there is no live state to query; read its"
        f" timeline at GET /v1/customers/{{id}}/journeys or its history at"
        f" GET /v1/runs/{workflow_id}/history",
        field="workflow_id",
    )


def _temporal_error(exc: RPCError, workflow_id: str) -> JourneysError:
    if exc.status == RPCStatusCode.NOT_FOUND:
        return NotFound(f"no workflow {workflow_id!r}", field="workflow_id")
    if exc.status == RPCStatusCode.INVALID_ARGUMENT:
        return NotFound(f"no such run of workflow {workflow_id!r}", field="run_id")
    return TemporalUnavailable(f"Temporal did not answer: {exc.message}")


class RunPublic(RunSummary):
    """A run as the API shows it; `journey` names the journey as every other response does."""

    journey_slug: str = Field(
        # In the schema only: pydantic's `deprecated=True` would warn on every read.
        json_schema_extra={"deprecated": True},
        description="the same as `journey`; kept for older clients",
    )

    @computed_field
    @property
    def journey(self) -> str:
        return self.journey_slug


class RunsPage(BaseModel):
    data: list[RunPublic]
    next_cursor: str | None


@router.get(
    "/v1/journeys/{slug}/runs",
    response_model=RunsPage,
    summary="Who is in a journey: its runs, by step and status",
)
def list_journey_runs(
    slug: Annotated[str, Path(min_length=1, max_length=200)],
    session: SessionDep,
    _: SupportKey,
    step: Annotated[str | None, Query(max_length=200)] = None,
    status: RunStatusFilter | None = None,
    limit: PageLimit = 100,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> RunsPage:
    """The journey's runs, oldest first, optionally those on `step` and of `status`."""
    conn = session.connection()
    if not journey_exists(conn, journey_slug=slug):
        raise NotFound(f"no journey {slug!r}", field="slug")
    page = runs_by_step(
        conn, journey_slug=slug, step=step, status=status, limit=limit, cursor=cursor
    )
    return RunsPage(
        data=[RunPublic.model_validate(run.model_dump()) for run in page.data],
        next_cursor=page.next_cursor,
    )
