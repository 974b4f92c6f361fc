"""DispatcherWorkflow: keeps the transition dispatcher activity running, forever.

The worker starts it at boot under a fixed id (`ensure_dispatcher`), keeping the one
that runs already. The activity does the work and heartbeats; this workflow only
restarts it after each stint and continues as new before its history grows large.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from core.runs import (
        DISPATCH_TRANSITIONS_ACTIVITY,
        DISPATCHER_WORKFLOW,
        DispatchCounts,
        DispatcherInput,
    )

DISPATCH_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
    # The outbox keeps every transition until it is dispatched: retry without end.
    maximum_attempts=0,
)


@workflow.defn(name=DISPATCHER_WORKFLOW)
class DispatcherWorkflow:
    def __init__(self) -> None:
        self._totals = DispatchCounts()

    @workflow.query(name="totals")
    def totals(self) -> DispatchCounts:
        """What this run of the dispatcher has dispatched so far."""
        return self._totals

    @workflow.run
    async def run(self, input: DispatcherInput) -> None:
        stint = input.dispatch
        for _ in range(input.stints_before_continue):
            counts: DispatchCounts = await workflow.execute_activity(
                DISPATCH_TRANSITIONS_ACTIVITY,
                stint,
                result_type=DispatchCounts,
                start_to_close_timeout=timedelta(seconds=stint.run_for_seconds + 300),
                # The dispatcher heartbeats every 5 s: a dead worker's dispatcher is
                # taken up by another worker within 10 s.
                heartbeat_timeout=timedelta(seconds=10),
                retry_policy=DISPATCH_RETRY,
            )
            self._totals.add(counts)
        await workflow.wait_condition(workflow.all_handlers_finished)
        workflow.continue_as_new(input)
