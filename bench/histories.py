"""Temporal history per run, for the benches: length, workflow tasks, activities, markers
(local activities, patches), signals and timers, averaged over sampled runs."""

from __future__ import annotations

from collections import Counter

from temporalio.api.enums.v1 import EventType
from temporalio.client import Client


async def history_stats(client: Client, workflow_ids: list[str]) -> Counter:
    """Event counts by type (and "events" in all) over these runs' histories."""
    total: Counter = Counter()
    for workflow_id in workflow_ids:
        history = await client.get_workflow_handle(workflow_id).fetch_history()
        total["events"] += len(history.events)
        for event in history.events:
            total[event.event_type] += 1
    return total


_HISTORY_COLUMNS = (
    ("events", "events"),
    ("workflow tasks", EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED),
    ("activities", EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED),
    # Local activities' results, and a version patch's marker once per run.
    ("markers", EventType.EVENT_TYPE_MARKER_RECORDED),
    ("signals", EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED),
    ("timers", EventType.EVENT_TYPE_TIMER_STARTED),
)


def print_history_table(rows: list[tuple[str, Counter, int]]) -> None:
    """History length and tasks per run, each flow on a line."""
    print("   " + f"{'per run':22}" + "".join(f"{name:>17}" for name, _ in _HISTORY_COLUMNS))
    for label, total, runs in rows:
        runs = max(runs, 1)
        print(
            "   "
            + f"{label:22}"
            + "".join(f"{total[key] / runs:17.1f}" for _, key in _HISTORY_COLUMNS)
        )
