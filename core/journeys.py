"""Journey definitions (docs/journeys.md), validated by pydantic.

A run carries a snapshot of the `JourneyDefinition` version it entered on, so these
models cross into the workflow: they must stay plain data.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError

from core.conditions import Condition
from core.durations import Duration
from core.errors import ErrorDetail

if TYPE_CHECKING:
    from core.rendering import TemplateProblem


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EmailStep(_Strict):
    type: Literal["email"]
    template: str = Field(min_length=1)
    next: str | None


class SmsStep(_Strict):
    type: Literal["sms"]
    template: str = Field(min_length=1)
    next: str | None


class DelayStep(_Strict):
    type: Literal["delay"]
    duration: Duration
    next: str | None


class WaitForEventStep(_Strict):
    """Wait for an event (any name, or `email_clicked` / `email_opened` of `of_step`)."""

    type: Literal["wait_for_event"]
    event: str = Field(min_length=1)
    of_step: str | None = None
    timeout: Duration
    on_event: str | None
    on_timeout: str | None


class BranchCase(_Strict):
    condition: Condition
    next: str | None


class BranchStep(_Strict):
    """Ordered conditions, evaluated for the customer when the run reaches the step."""

    type: Literal["branch"]
    branches: list[BranchCase] = Field(min_length=1)
    default: str | None


class UpdateAttributeStep(_Strict):
    type: Literal["update_attribute"]
    attribute: str = Field(min_length=1)
    value: Any
    next: str | None


class ExitStep(_Strict):
    type: Literal["exit"]


Step = Annotated[
    EmailStep
    | SmsStep
    | DelayStep
    | WaitForEventStep
    | BranchStep
    | UpdateAttributeStep
    | ExitStep,
    Field(discriminator="type"),
]


class Trigger(_Strict):
    segment: str = Field(min_length=1)


class Goal(_Strict):
    event: str = Field(min_length=1)
    within: Duration = timedelta(days=30)


class Reentry(_Strict):
    policy: Literal["never", "after_completion"] = "never"
    cooldown: Duration | None = None


class QuietHours(_Strict):
    """Sends that fall between `start` and `end` (local time of the customer) wait."""

    start: str = Field(pattern=r"^([01]\d|2[0-3]):[0-5]\d$")
    end: str = Field(pattern=r"^([01]\d|2[0-3]):[0-5]\d$")
    timezone_attribute: str = "timezone"
    default_timezone: str = "UTC"


class FrequencyCap(_Strict):
    max_messages: int = Field(ge=1)
    per: Duration
    action: Literal["defer", "skip"] = "defer"


class JourneyDefinition(_Strict):
    slug: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$", max_length=200)
    name: str = Field(min_length=1)
    trigger: Trigger
    goal: Goal | None = None
    exit_on_segment_exit: StrictBool = False
    reentry: Reentry = Reentry()
    in_doubt_policy: Literal["skip", "resend"] = "skip"
    quiet_hours: QuietHours | None = None
    frequency_cap: FrequencyCap | None = None
    start: str
    steps: dict[str, Step] = Field(min_length=1)


# --- validation -----------------------------------------------------------------------

STEP_TYPES = ("email", "sms", "delay", "wait_for_event", "branch", "update_attribute", "exit")
EMAIL_EVENTS = ("email_clicked", "email_opened")
_WAIT_TYPES = ("delay", "wait_for_event")
# Email bodies are HTML, SMS bodies plain text (`winback.sms.txt`), as the renderer expects.
_TEMPLATE_SUFFIX = {"email": ".html", "sms": ".txt"}
_TARGET_KEYS = {
    "email": ("next",),
    "sms": ("next",),
    "delay": ("next",),
    "update_attribute": ("next",),
    "wait_for_event": ("on_event", "on_timeout"),
    "branch": ("default",),
    "exit": (),
}
_STEP_ID = re.compile(r"^[A-Za-z0-9_-]{1,100}$")
# Why a step's template (path, step id) does not render for a sample customer, or None.
TemplateCheck = Callable[[str, str], "TemplateProblem | None"]


@dataclasses.dataclass
class _Node:
    """One step reduced to what the graph checks need; built from a model or raw JSON."""

    id: str
    kind: str | None
    targets: list[tuple[str, str | None]] = dataclasses.field(
        default_factory=list
    )  # (field, step id)
    template: str | None = None
    event: str | None = None
    of_step: str | None = None
    has_of_step_field: bool = False
    conditions: list[tuple[str, Any]] = dataclasses.field(
        default_factory=list
    )  # (field, condition JSON)
    # A step whose JSON did not say where it goes next: it may lead anywhere.
    uncertain: bool = False


@dataclasses.dataclass
class _Outline:
    """The parts of a definition the checks read, whether or not it parsed."""

    start: str | None = None
    trigger_segment: str | None = None
    goal_event: str | None = None
    exit_on_segment_exit: bool = False
    reentry_policy: str | None = None
    has_cooldown: bool = False
    nodes: dict[str, _Node] = dataclasses.field(default_factory=dict)


def _outline_of(definition: JourneyDefinition) -> _Outline:
    out = _Outline()
    out.start = definition.start
    out.trigger_segment = definition.trigger.segment
    out.goal_event = definition.goal.event if definition.goal else None
    out.exit_on_segment_exit = definition.exit_on_segment_exit
    out.reentry_policy = definition.reentry.policy
    out.has_cooldown = definition.reentry.cooldown is not None
    for step_id, step in definition.steps.items():
        node = _Node(step_id, step.type)
        if isinstance(step, EmailStep | SmsStep):
            node.template = step.template
        if isinstance(step, EmailStep | SmsStep | DelayStep | UpdateAttributeStep):
            node.targets.append(("next", step.next))
        elif isinstance(step, WaitForEventStep):
            node.event = step.event
            node.of_step = step.of_step
            node.has_of_step_field = step.of_step is not None
            node.targets += [("on_event", step.on_event), ("on_timeout", step.on_timeout)]
        elif isinstance(step, BranchStep):
            for i, case in enumerate(step.branches):
                node.targets.append((f"branches[{i}].next", case.next))
                condition = case.condition.model_dump(mode="json", by_alias=True, exclude_none=True)
                node.conditions.append((f"branches[{i}].condition", condition))
            node.targets.append(("default", step.default))
        out.nodes[step_id] = node
    return out


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _outline_of_raw(raw: dict[str, Any]) -> _Outline:
    """Best effort over JSON that did not parse, so validation can still report the graph."""
    out = _Outline()
    out.start = _text(raw.get("start"))
    trigger = raw.get("trigger")
    out.trigger_segment = _text(trigger.get("segment")) if isinstance(trigger, dict) else None
    goal = raw.get("goal")
    out.goal_event = _text(goal.get("event")) if isinstance(goal, dict) else None
    out.exit_on_segment_exit = raw.get("exit_on_segment_exit") is True
    reentry = raw.get("reentry")
    if isinstance(reentry, dict):
        out.reentry_policy = _text(reentry.get("policy"))
        out.has_cooldown = reentry.get("cooldown") is not None
    steps = raw.get("steps")
    if not isinstance(steps, dict):
        return out
    for step_id, step in steps.items():
        if not isinstance(step, dict):
            out.nodes[str(step_id)] = _Node(str(step_id), None, uncertain=True)
            continue
        kind = step.get("type") if step.get("type") in STEP_TYPES else None
        node = _Node(str(step_id), kind)
        node.template = _text(step.get("template"))
        node.event = _text(step.get("event"))
        node.of_step = _text(step.get("of_step"))
        node.has_of_step_field = step.get("of_step") is not None
        keys = _TARGET_KEYS.get(kind or "", ("next", "on_event", "on_timeout", "default"))
        for key in keys:
            if key in step and (step[key] is None or isinstance(step[key], str)):
                node.targets.append((key, step[key]))
            elif kind is not None:
                node.uncertain = True
        branches = step.get("branches")
        if isinstance(branches, list):
            for i, case in enumerate(branches):
                target = case.get("next", 0) if isinstance(case, dict) else 0
                if target is None or isinstance(target, str):
                    node.targets.append((f"branches[{i}].next", target))
                    node.conditions.append((f"branches[{i}].condition", case.get("condition")))
                else:
                    node.uncertain = True
        elif kind == "branch":
            node.uncertain = True
        if kind is None and not node.targets:
            node.uncertain = True
        out.nodes[node.id] = node
    return out


def _segments_named(condition: Any, path: str) -> list[tuple[str, str]]:
    """Every (field, slug) of a `{"segment": ...}` inside a condition, at any depth."""
    if not isinstance(condition, dict):
        return []
    found: list[tuple[str, str]] = []
    if isinstance(condition.get("segment"), str):
        found.append((f"{path}.segment", condition["segment"]))
    for key in ("all", "any"):
        if isinstance(condition.get(key), list):
            for i, inner in enumerate(condition[key]):
                found += _segments_named(inner, f"{path}.{key}[{i}]")
    if "not" in condition:
        found += _segments_named(condition["not"], f"{path}.not")
    return found


def _reachable(nodes: dict[str, _Node], start: str) -> list[str]:
    seen = [start]
    stack = [start]
    while stack:
        node = nodes[stack.pop()]
        if node.uncertain:
            return list(nodes)
        for _, target in node.targets:
            if target in nodes and target not in seen:
                seen.append(target)
                stack.append(target)
    return seen


def _targets(nodes: dict[str, _Node], step_id: str) -> list[str]:
    return [t for _, t in nodes[step_id].targets if t in nodes]


def _loops_without_wait(nodes: dict[str, _Node], order: list[str]) -> list[list[str]]:
    """Cycles made only of steps that do not wait (Tarjan's SCC over the non-wait steps)."""
    eligible = {
        n
        for n in order
        if nodes[n].kind is not None and nodes[n].kind not in _WAIT_TYPES and not nodes[n].uncertain
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    loops: list[list[str]] = []

    def edges(step_id: str) -> list[str]:
        return [t for _, t in nodes[step_id].targets if t in eligible]

    def visit(step_id: str) -> None:
        index[step_id] = low[step_id] = len(index)
        stack.append(step_id)
        on_stack.add(step_id)
        for target in edges(step_id):
            if target not in index:
                visit(target)
                low[step_id] = min(low[step_id], low[target])
            elif target in on_stack:
                low[step_id] = min(low[step_id], index[target])
        if low[step_id] == index[step_id]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == step_id:
                    break
            if len(component) > 1 or step_id in edges(step_id):
                loops.append(sorted(component, key=order.index))

    for step_id in order:
        if step_id in eligible and step_id not in index:
            visit(step_id)
    return loops


def _can_end(nodes: dict[str, _Node], order: list[str]) -> set[str]:
    """Steps from which some path reaches the end of the run (an exit or a null next)."""
    ending = {
        n
        for n in order
        if nodes[n].kind in (None, "exit")
        or nodes[n].uncertain
        or any(t is None or t not in nodes for _, t in nodes[n].targets)
        or not nodes[n].targets
    }
    changed = True
    while changed:
        changed = False
        for n in order:
            if n not in ending and any(t in ending for _, t in nodes[n].targets):
                ending.add(n)
                changed = True
    return ending


def _check_outline(
    out: _Outline,
    *,
    template_exists: Callable[[str], bool],
    segment_exists: Callable[[str], bool],
    template_problem: TemplateCheck | None = None,
) -> list[ErrorDetail]:
    errors: list[ErrorDetail] = []
    nodes = out.nodes
    order = list(nodes)

    for step_id in order:
        if not _STEP_ID.match(step_id):
            errors.append(
                ErrorDetail(
                    "invalid_step_id",
                    f"step id {step_id!r} must be 1-100 letters, digits, '_' or '-'",
                    f"steps.{step_id}",
                )
            )

    if out.start is not None and out.start not in nodes:
        errors.append(ErrorDetail("unknown_step", f"start names no step: {out.start!r}", "start"))

    for node in nodes.values():
        for field, target in node.targets:
            if target is not None and target not in nodes:
                errors.append(
                    ErrorDetail(
                        "dangling_next",
                        f"step {node.id!r}: {field} names no step: {target!r}",
                        f"steps.{node.id}.{field}",
                    )
                )

    if out.start in nodes:
        reachable = _reachable(nodes, out.start)
        for step_id in order:
            if step_id not in reachable:
                errors.append(
                    ErrorDetail(
                        "unreachable_step",
                        f"step {step_id!r} cannot be reached from start {out.start!r}",
                        f"steps.{step_id}",
                    )
                )
        can_end = _can_end(nodes, order)
        trapped = [n for n in reachable if n not in can_end and nodes[n].kind is not None]
        # Name the loop that holds the run, not the steps leading into it.
        looping = [n for n in trapped if any(n in _reachable(nodes, t) for t in _targets(nodes, n))]
        # A goal or a segment exit can still end a run that loops with waits (a monthly
        # newsletter); without either, nothing ever would.
        endless = out.goal_event is None and not out.exit_on_segment_exit
        if looping and endless:
            first = min(looping, key=order.index)
            errors.append(
                ErrorDetail(
                    "no_end",
                    f"steps {', '.join(sorted(looping, key=order.index))} loop with no way out: "
                    "with no goal and no exit_on_segment_exit, a run that gets there never ends",
                    f"steps.{first}",
                )
            )

    for loop in _loops_without_wait(nodes, order):
        errors.append(
            ErrorDetail(
                "loop_without_wait",
                f"steps {' -> '.join(loop)} form a loop with no delay or wait_for_event in it",
                f"steps.{loop[0]}",
            )
        )

    for node in nodes.values():
        has_template = node.template is not None and node.kind in ("email", "sms")
        exists = has_template and template_exists(node.template)  # type: ignore[arg-type]
        if has_template and not exists:
            errors.append(
                ErrorDetail(
                    "unknown_template",
                    f"step {node.id!r}: template {node.template!r} does not exist",
                    f"steps.{node.id}.template",
                )
            )
        suffix = _TEMPLATE_SUFFIX.get(node.kind or "")
        fits = not (has_template and suffix and not node.template.endswith(suffix))  # type: ignore[union-attr]
        if not fits:
            errors.append(
                ErrorDetail(
                    "template_channel_mismatch",
                    f"step {node.id!r}: a {node.kind} step takes a {suffix} template",
                    f"steps.{node.id}.template",
                )
            )
        problem = (
            template_problem(node.template, node.id)  # type: ignore[arg-type]
            if exists and fits and template_problem is not None
            else None
        )
        if problem is not None:
            errors.append(
                ErrorDetail(
                    problem.code,
                    f"step {node.id!r}: template {node.template!r} does not render: "
                    f"{problem.message}",
                    f"steps.{node.id}.template",
                )
            )
        if node.kind == "wait_for_event":
            errors += _check_wait(node, nodes, out.goal_event)
        for field, condition in node.conditions:
            for path, slug in _segments_named(condition, f"steps.{node.id}.{field}"):
                if not segment_exists(slug):
                    errors.append(
                        ErrorDetail(
                            "unknown_segment",
                            f"step {node.id!r}: segment {slug!r} does not exist",
                            path,
                        )
                    )

    if out.trigger_segment is not None and not segment_exists(out.trigger_segment):
        errors.append(
            ErrorDetail(
                "unknown_segment",
                f"trigger segment {out.trigger_segment!r} does not exist",
                "trigger.segment",
            )
        )
    if out.goal_event in EMAIL_EVENTS:
        errors.append(
            ErrorDetail(
                "invalid",
                f"goal event {out.goal_event!r} names no step; use a wait_for_event step for "
                "clicks and opens, and a behavioural event (Purchase) as the goal",
                "goal.event",
            )
        )
    if out.reentry_policy == "never" and out.has_cooldown:
        errors.append(
            ErrorDetail(
                "invalid",
                "a cooldown applies only to the after_completion re-entry policy",
                "reentry.cooldown",
            )
        )
    return errors


def _check_wait(node: _Node, nodes: dict[str, _Node], goal_event: str | None) -> list[ErrorDetail]:
    errors: list[ErrorDetail] = []
    field = f"steps.{node.id}.of_step"
    if node.event in EMAIL_EVENTS:
        if node.of_step is None:
            errors.append(
                ErrorDetail(
                    "missing_field",
                    f"step {node.id!r}: {node.event} needs of_step naming the email step",
                    field,
                )
            )
        elif node.of_step not in nodes or nodes[node.of_step].kind != "email":
            errors.append(
                ErrorDetail(
                    "invalid_of_step",
                    f"step {node.id!r}: of_step {node.of_step!r} is not an email step",
                    field,
                )
            )
        elif node.id not in _reachable(nodes, node.of_step):
            errors.append(
                ErrorDetail(
                    "invalid_of_step",
                    f"step {node.id!r}: email step {node.of_step!r} never comes before this wait",
                    field,
                )
            )
    elif node.has_of_step_field:
        errors.append(
            ErrorDetail(
                "invalid",
                f"step {node.id!r}: of_step applies only to email_clicked and email_opened",
                field,
            )
        )
    if goal_event is not None and goal_event not in EMAIL_EVENTS and node.event == goal_event:
        errors.append(
            ErrorDetail(
                "goal_shadows_wait",
                f"step {node.id!r} waits for {node.event!r}, the journey's goal: that event "
                "converts and ends the run, so on_event is never taken",
                f"steps.{node.id}.event",
            )
        )
    return errors


def check_journey(
    definition: JourneyDefinition,
    *,
    template_exists: Callable[[str], bool],
    segment_exists: Callable[[str], bool],
    template_problem: TemplateCheck | None = None,
) -> list[ErrorDetail]:
    """Every error of a parsed definition, each naming its field (`steps.wait_click.on_timeout`).

    Checks: start names a step; every next / on_event / on_timeout / branch target names a
    step; every step is reachable; every reachable step can reach the end; no loop is
    without a delay or wait_for_event; templates and segments (trigger and branch
    conditions) exist; each existing template of the right channel renders
    (`template_problem(path, step id)`, when given, returns why it does not, reported at
    `steps.<id>.template`); `of_step` names an email step before the wait; the goal and
    re-entry settings make sense. An empty list means valid.
    """
    return _check_outline(
        _outline_of(definition),
        template_exists=template_exists,
        segment_exists=segment_exists,
        template_problem=template_problem,
    )


def _field_of(loc: tuple[Any, ...]) -> str:
    parts = list(loc)
    if len(parts) >= 3 and parts[0] == "steps":
        del parts[2]  # the union tag pydantic inserts after a step id ("email")
    text = ""
    for position, part in enumerate(parts):
        if isinstance(part, int):
            text += f"[{part}]"
            continue
        is_step_id = position == 1 and parts[0] == "steps"
        if not is_step_id and (str(part)[:1].isupper() or str(part).startswith("function-")):
            continue  # a condition's union tag such as "AttributeCondition", not a field
        text += ("." if text else "") + str(part)
    return text


def _detail_of(err: dict[str, Any]) -> ErrorDetail:
    kind = err.get("type", "invalid")
    loc = tuple(err.get("loc", ()))
    field = _field_of(loc)
    if kind == "union_tag_invalid" and len(loc) == 2 and loc[0] == "steps":
        tag = (err.get("ctx") or {}).get("tag")
        return ErrorDetail(
            "unknown_step_type",
            f"step {loc[1]!r} has unknown type {tag!r}; expected one of {', '.join(STEP_TYPES)}",
            f"{field}.type",
        )
    if kind == "union_tag_not_found" and len(loc) == 2 and loc[0] == "steps":
        return ErrorDetail(
            "missing_field",
            f"step {loc[1]!r} has no type; expected one of {', '.join(STEP_TYPES)}",
            f"{field}.type",
        )
    code = {"missing": "missing_field", "extra_forbidden": "unknown_field"}.get(kind, "invalid")
    message = err.get("msg", "invalid value")
    if len(loc) >= 2 and loc[0] == "steps":
        message = f"step {loc[1]!r}: {message}"
    return ErrorDetail(code, message, field or None)


def _within(field: str | None, parent: str) -> bool:
    return field is not None and (field == parent or field.startswith((f"{parent}.", f"{parent}[")))


def parse_journey(raw: Any) -> tuple[JourneyDefinition | None, list[ErrorDetail]]:
    """The definition, or None and every pydantic error as an ErrorDetail naming its field.

    Fields read like `steps.welcome.template`; an unknown step type is reported at
    `steps.<id>.type` with code `unknown_step_type`.
    """
    if not isinstance(raw, dict):
        return None, [ErrorDetail("invalid", "a journey definition is a JSON object", None)]
    try:
        return JourneyDefinition.model_validate(raw), []
    except ValidationError as exc:
        return None, [_detail_of(err) for err in exc.errors()]


def validate_journey(
    raw: Any,
    *,
    template_exists: Callable[[str], bool],
    segment_exists: Callable[[str], bool],
    template_problem: TemplateCheck | None = None,
) -> tuple[JourneyDefinition | None, list[ErrorDetail]]:
    """Parse and check: the definition when valid, else None and every error found.

    When the JSON does not parse, the graph, template and segment checks still run over
    what can be read of it, so one pass reports every mistake.
    """
    definition, errors = parse_journey(raw)
    if definition is not None:
        return definition, check_journey(
            definition,
            template_exists=template_exists,
            segment_exists=segment_exists,
            template_problem=template_problem,
        )
    if not isinstance(raw, dict):
        return None, errors
    seen = {e.field for e in errors if e.field}
    for extra in _check_outline(
        _outline_of_raw(raw),
        template_exists=template_exists,
        segment_exists=segment_exists,
        template_problem=template_problem,
    ):
        # A field pydantic already rejected is reported once, by pydantic.
        if not any(_within(extra.field, f) for f in seen):
            errors.append(extra)
    return None, errors
