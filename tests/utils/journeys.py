"""A stand-in journey run for lifecycle tests; alone in its module so the workflow
sandbox imports nothing else."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow


@workflow.defn(name="JourneyArchiveProbe")
class ParkedRun:
    """Parks on a three-day wait, like a journey run waiting for a click."""

    @workflow.run
    async def run(self) -> None:
        await workflow.wait_condition(lambda: False, timeout=timedelta(days=3))
