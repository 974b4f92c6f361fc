"""Keeps the real-time processor running: one long activity, continued as new each hour."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from activities.realtime import PROCESS_REALTIME_ACTIVITY, RealtimeInput, RealtimeResult

REALTIME_WORKFLOW_ID = "journeys-realtime-processor"


@workflow.defn
class RealtimeWorkflow:
    @workflow.run
    async def run(self, request: RealtimeInput) -> None:
        await workflow.execute_activity(
            PROCESS_REALTIME_ACTIVITY,
            request,
            result_type=RealtimeResult,
            start_to_close_timeout=timedelta(seconds=request.run_seconds + 600),
            # The processor heartbeats every 2.5 s: the processor of a worker that died
            # is taken up by another worker (or the same one, restarted) within 10 s.
            heartbeat_timeout=timedelta(seconds=10),
            retry_policy=RetryPolicy(
                initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=30)
            ),
        )
        workflow.continue_as_new(request)
