"""A customer's journeys as support reads them: each run's position and a readable timeline.

The timeline is built from the run's stored lines (store/runs.py), the segment transition
that started it and the journey version it runs on. Each entry says what happened
(`text`) and why (`reason`): "entered Champions (RFM pass 42, R5 F4 M5)" because of
segment transition 42; "no click on welcome" because the 3-day timer fired; "sent
reminder email" because there was no click on welcome within 3 days. Waits, which write
no line of their own, are shown where they began.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any
from urllib.parse import quote

from pydantic import BaseModel, ValidationError
from sqlalchemy import bindparam, text
from sqlalchemy.engine import Connection

from core.journeys import (
    BranchStep,
    DelayStep,
    EmailStep,
    JourneyDefinition,
    SmsStep,
    WaitForEventStep,
)
from core.tables import JSONType
from store.runs import RunWithTimeline, TimelineLine, customer_runs

_EVENT_WORDS = {"email_clicked": "click", "email_opened": "open"}
_SEND_OUTCOMES = ("sent", "skipped", "failed", "in_doubt", "deferred")


class TimelineEntry(BaseModel):
    at: datetime
    step: str | None
    kind: str
    text: str
    reason: str
    detail: dict[str, Any] = {}


class InspectedRun(BaseModel):
    workflow_id: str
    run_id: str
    journey: str
    version: int
    customer_id: str
    status: str
    step: str | None
    since: datetime | None
    waiting_for: str | None
    waiting_until: datetime | None
    entered_at: datetime
    ended_at: datetime | None
    converted_at: datetime | None
    ui_url: str
    history_url: str
    timeline: list[TimelineEntry]


class EntryTransition(BaseModel):
    id: int
    segment_slug: str
    segment_name: str | None
    source: str
    context: dict[str, Any]


def temporal_ui_url(ui_base: str, namespace: str, workflow_id: str, run_id: str) -> str:
    """The run's history page in the Temporal UI."""
    return (
        f"{ui_base.rstrip('/')}/namespaces/{quote(namespace, safe='')}"
        f"/workflows/{quote(workflow_id, safe='')}/{quote(run_id, safe='')}/history"
    )


def history_path(workflow_id: str, run_id: str) -> str:
    """The API path of the run's raw Temporal history."""
    return f"/v1/runs/{quote(workflow_id, safe=':')}/history?run_id={quote(run_id, safe='')}"


def customer_journeys(
    conn: Connection, *, customer_id: str, ui_base: str, namespace: str
) -> list[InspectedRun]:
    """Every run of the customer, newest first, each with its readable timeline."""
    runs = customer_runs(conn, customer_id=customer_id)
    if not runs:
        return []
    definitions = _definitions(conn, keys={(run.journey_slug, run.version) for run in runs})
    transitions = _entry_transitions(
        conn, ids={run.entry_transition_id for run in runs if run.entry_transition_id}
    )
    return [
        InspectedRun(
            workflow_id=run.workflow_id,
            run_id=run.run_id,
            journey=run.journey_slug,
            version=run.version,
            customer_id=run.customer_id,
            status=run.status,
            step=run.step,
            since=run.step_since,
            waiting_for=run.waiting_for,
            waiting_until=run.waiting_until,
            entered_at=run.entered_at,
            ended_at=run.ended_at,
            converted_at=run.converted_at,
            ui_url=temporal_ui_url(ui_base, namespace, run.workflow_id, run.run_id),
            history_url=history_path(run.workflow_id, run.run_id),
            timeline=readable_timeline(
                run,
                definition=definitions.get((run.journey_slug, run.version)),
                entry=transitions.get(run.entry_transition_id or -1),
            ),
        )
        for run in runs
    ]


def customer_exists(conn: Connection, *, customer_id: str) -> bool:
    found = conn.execute(text("SELECT 1 FROM customers WHERE id = :id"), {"id": customer_id})
    return found.first() is not None


def _definitions(
    conn: Connection, *, keys: set[tuple[str, int]]
) -> dict[tuple[str, int], JourneyDefinition]:
    slugs = sorted({slug for slug, _ in keys})
    rows = conn.execute(
        text(
            "SELECT journey_slug, version, definition FROM journey_versions"
            " WHERE journey_slug IN :slugs"
        )
        .bindparams(_expanding("slugs"))
        .columns(definition=JSONType),
        {"slugs": slugs},
    ).all()
    found: dict[tuple[str, int], JourneyDefinition] = {}
    for row in rows:
        if (row.journey_slug, row.version) not in keys:
            continue
        try:
            found[(row.journey_slug, row.version)] = JourneyDefinition.model_validate(
                row.definition
            )
        except ValidationError:
            continue
    return found


def _entry_transitions(conn: Connection, *, ids: set[int]) -> dict[int, EntryTransition]:
    if not ids:
        return {}
    rows = conn.execute(
        text(
            "SELECT t.id, t.segment_slug, s.name AS segment_name, t.source, t.context"
            " FROM segment_transitions t LEFT JOIN segments s ON s.slug = t.segment_slug"
            " WHERE t.id IN :ids"
        )
        .bindparams(_expanding("ids"))
        .columns(context=JSONType),
        {"ids": sorted(ids)},
    ).all()
    return {
        int(row.id): EntryTransition(
            id=int(row.id),
            segment_slug=row.segment_slug,
            segment_name=row.segment_name,
            source=row.source or "",
            context=row.context or {},
        )
        for row in rows
    }


def _expanding(name: str) -> Any:
    return bindparam(name, expanding=True)


# --- the readable timeline ----------------------------------------------------------------


def _human(duration: timedelta) -> str:
    seconds = int(duration.total_seconds())
    for unit, size in (("day", 86_400), ("hour", 3_600), ("minute", 60), ("second", 1)):
        if seconds >= size and seconds % size == 0:
            count = seconds // size
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return f"{duration.total_seconds():g} seconds"


def _awaited(step: WaitForEventStep) -> str:
    word = _EVENT_WORDS.get(step.event, step.event)
    return f"{word} on {step.of_step}" if step.of_step else word


def _entry_text(line: TimelineLine, entry: EntryTransition | None) -> tuple[str, str]:
    """("entered Champions (RFM pass 42, R5 F4 M5)", "segment transition 42 (rfm-pass:42)")."""
    if entry is None:
        # The runtime's own line: "segment transition 42: entered x (RFM pass 7, ...)".
        head, sep, tail = line.reason.partition(": ")
        return (tail, head) if sep else (line.reason or "entered the journey", "segment entry")
    context = entry.context
    details: list[str] = []
    pass_id = context.get("pass_id")
    if pass_id is None and entry.source.startswith("rfm-pass:"):
        pass_id = entry.source.split(":", 1)[1]
    if pass_id is not None:
        details.append(f"RFM pass {pass_id}")
    scores = " ".join(f"{k.upper()}{context[k]}" for k in ("r", "f", "m") if k in context)
    if scores:
        details.append(scores)
    name = entry.segment_name or entry.segment_slug
    tail = f" ({', '.join(details)})" if details else ""
    reason = f"segment transition {entry.id}: entered segment {entry.segment_slug}"
    if entry.source:
        reason += f" ({entry.source})"
    return f"entered {name}{tail}", reason


def readable_timeline(
    run: RunWithTimeline,
    *,
    definition: JourneyDefinition | None,
    entry: EntryTransition | None,
) -> list[TimelineEntry]:
    """The run's lines as "what happened" / "why", with the waits put where they began."""
    steps = definition.steps if definition is not None else {}
    entries: list[TimelineEntry] = []
    # Why the run is on the step it is on: the last decision and where it led.
    arrived_because: dict[str, str] = {}
    previous_at = run.entered_at

    def add(line: TimelineLine, text_: str, reason: str, kind: str | None = None) -> None:
        entries.append(
            TimelineEntry(
                at=line.occurred_at,
                step=line.step,
                kind=kind or line.kind,
                text=text_,
                reason=reason,
                detail=line.detail,
            )
        )

    for line in run.timeline:
        # A send on a second visit is keyed `reminder#2`; its step is `reminder`.
        step = steps.get((line.step or "").partition("#")[0])
        kind = line.kind
        if kind == "entered":
            add(line, *_entry_text(line, entry))
        elif kind in _SEND_OUTCOMES and _is_send_line(line, step):
            channel = line.detail.get("channel") or (step.type if step else "message")
            subject = line.detail.get("subject")
            what = f"{line.step} {channel}" + (f" (subject “{subject}”)" if subject else "")
            verb = {
                "sent": f"sent {what}",
                "skipped": f"skipped {what}",
                "failed": f"could not send {what}",
                "in_doubt": f"{what}: outcome unknown",
                "deferred": f"deferred {what}"
                + (
                    f" until {line.detail['deferred_until']}"
                    if line.detail.get("deferred_until")
                    else ""
                ),
            }[kind]
            # A deferral is followed by the send itself, which still owes its reason.
            key = (line.step or "").partition("#")[0]
            why = arrived_because.get(key) if kind == "deferred" else arrived_because.pop(key, None)
            add(line, verb, f"{why}; {line.reason}" if why else line.reason)
        elif kind in ("timer_fired", "event_received") and isinstance(step, WaitForEventStep):
            awaited = _awaited(step)
            began = line.occurred_at - step.timeout if kind == "timer_fired" else previous_at
            entries.append(
                TimelineEntry(
                    at=began,
                    step=line.step,
                    kind="waited",
                    text=f"waited for {awaited}, up to {_human(step.timeout)}",
                    reason=f"step {line.step}: wait_for_event {step.event}"
                    + (f" of {step.of_step}" if step.of_step else "")
                    + f", timeout {_human(step.timeout)}",
                )
            )
            if kind == "timer_fired":
                target = step.on_timeout
                add(line, f"no {awaited}", f"{line.reason} -> {target or 'end'}")
                because = f"no {awaited} within {_human(step.timeout)} (timer fired {_at(line)})"
            else:
                target = step.on_event
                add(line, f"{awaited} received", f"{line.reason} -> {target or 'end'}")
                because = f"{awaited} received ({_at(line)})"
            if target:
                arrived_because[target] = f"after {line.step}: {because}"
        elif kind == "branch_taken":
            target = _branch_target(step, line.detail.get("matched"))
            add(line, f"decision at {line.step}: {line.reason}", line.reason)
            if target:
                arrived_because[target] = f"after {line.step}: {line.reason}"
        elif kind == "timer_fired" and isinstance(step, DelayStep):
            add(line, f"waited {_human(step.duration)}", line.reason)
        elif kind == "goal_reached":
            add(line, "converted", line.reason)
        elif kind == "exited":
            add(line, "left the journey", line.reason)
        elif kind == "completed":
            add(line, "completed the journey", line.reason)
        elif kind == "failed":
            add(line, "the run failed", line.reason)
        elif kind == "attribute_updated":
            add(line, line.reason, f"step {line.step}")
        else:
            add(
                line,
                f"{kind.replace('_', ' ')}" + (f" at {line.step}" if line.step else ""),
                line.reason,
            )
        previous_at = line.occurred_at

    if run.status == "running" and run.waiting_for:
        until = f" until {run.waiting_until:%Y-%m-%d %H:%M:%S} UTC" if run.waiting_until else ""
        entries.append(
            TimelineEntry(
                at=run.step_since or previous_at,
                step=run.step,
                kind="waiting",
                text=f"waiting for {run.waiting_for}{until}",
                reason=f"step {run.step}",
            )
        )
    return entries


def _is_send_line(line: TimelineLine, step: Any) -> bool:
    """A line the messaging activity wrote (not the run's own `failed` at a send step)."""
    if "message_id" in line.detail or "channel" in line.detail:
        return True
    return isinstance(step, EmailStep | SmsStep) and not (
        line.kind == "failed" and line.reason.startswith(f"step {line.step} failed")
    )


def _at(line: TimelineLine) -> str:
    return f"{line.occurred_at:%Y-%m-%d %H:%M} UTC"


def _branch_target(step: Any, matched: Any) -> str | None:
    if not isinstance(step, BranchStep):
        return None
    if matched is None:
        return step.default
    index = int(matched)
    return step.branches[index].next if 0 <= index < len(step.branches) else None
