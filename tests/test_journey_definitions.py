"""Journey definitions: every validation rule names its step; the shipped five validate;
the store's lifecycle draft -> active (immutable) -> new draft -> active -> pause /
resume -> archive."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from sqlalchemy import text
from sqlmodel import Session

from core.errors import Conflict, NotFound, ValidationFailed
from core.journeys import (
    STEP_TYPES,
    JourneyDefinition,
    check_journey,
    parse_journey,
    validate_journey,
)
from core.tables import JourneyRun, Segment
from store.journeys import (
    SHIPPED_JOURNEYS_DIR,
    activate_journey,
    active_journeys_for_segment,
    archive_journey,
    create_journey,
    get_journey,
    get_journey_version,
    install_shipped_journeys,
    list_journeys,
    missing_trigger_segments,
    pause_journey,
    put_journey,
    resume_journey,
)
from store.templates import SHIPPED_TEMPLATES_DIR
from tests.utils.journey_runtime import CHAMPIONS

SEED5_SEGMENTS = [
    "default:champions",
    "default:regulars",
    "default:promising",
    "default:needs-attention",
    "default:at-risk",
]
KNOWN_TEMPLATES = {
    "champions/welcome.html",
    "champions/reminder.html",
    "champions/vip_rewards.html",
    "champions/recommendations.html",
    "t/sms.txt",
}

# The seed's Champions flow, as the runtime tests run it.
BASE: dict[str, Any] = CHAMPIONS


def base(**changes: Any) -> dict[str, Any]:
    raw = copy.deepcopy(BASE)
    raw.update(changes)
    return raw


def check(raw: dict[str, Any]) -> list[tuple[str, str | None]]:
    """(code, field) of every error, parse and check together."""
    _, errors = validate_journey(
        raw,
        template_exists=lambda path: path in KNOWN_TEMPLATES,
        segment_exists=lambda slug: slug in SEED5_SEGMENTS,
    )
    return [(e.code, e.field) for e in errors]


def test_the_design_example_is_valid():
    assert check(base()) == []


def test_start_that_is_not_a_step():
    assert ("unknown_step", "start") in check(base(start="hello"))


@pytest.mark.parametrize(
    ("step", "field", "target_field"),
    [
        ("reminder", "next", "steps.reminder.next"),
        ("wait_click", "on_event", "steps.wait_click.on_event"),
        ("wait_click", "on_timeout", "steps.wait_click.on_timeout"),
    ],
)
def test_dangling_targets_name_their_step_and_field(step, field, target_field):
    raw = base()
    raw["steps"][step][field] = "nowhere"
    assert ("dangling_next", target_field) in check(raw)


def test_dangling_branch_targets():
    raw = base()
    raw["steps"]["pause"]["next"] = "split"
    raw["steps"]["split"] = {
        "type": "branch",
        "branches": [
            {"condition": {"attribute": "vip", "op": "eq", "value": True}, "next": "recs"},
            {"condition": {"attribute": "plan", "op": "exists"}, "next": "ghost"},
        ],
        "default": "phantom",
    }
    errors = check(raw)
    assert ("dangling_next", "steps.split.branches[1].next") in errors
    assert ("dangling_next", "steps.split.default") in errors
    assert ("dangling_next", "steps.split.branches[0].next") not in errors


def test_missing_next_is_reported_by_its_step():
    raw = base()
    del raw["steps"]["vip"]["next"]
    assert check(raw) == [("missing_field", "steps.vip.next")]


def test_unreachable_steps():
    raw = base()
    raw["steps"]["orphan"] = {"type": "email", "template": "champions/reminder.html", "next": None}
    raw["steps"]["reminder"]["next"] = "recs"
    raw["steps"]["wait_click"]["on_event"] = "reminder"
    errors = check(raw)
    assert ("unreachable_step", "steps.orphan") in errors
    assert ("unreachable_step", "steps.vip") in errors
    assert ("unreachable_step", "steps.pause") in errors
    assert ("unreachable_step", "steps.recs") not in errors


def test_template_that_does_not_exist():
    raw = base()
    raw["steps"]["vip"]["template"] = "champions/nope.html"
    assert check(raw) == [("unknown_template", "steps.vip.template")]


def test_template_of_the_wrong_channel():
    raw = base()
    raw["steps"]["vip"] = {"type": "sms", "template": "champions/vip_rewards.html", "next": "pause"}
    assert check(raw) == [("template_channel_mismatch", "steps.vip.template")]


@pytest.mark.parametrize(
    ("of_step", "code"),
    [("pause", "invalid_of_step"), ("nothing", "invalid_of_step"), ("recs", "invalid_of_step")],
)
def test_of_step_must_be_an_email_step_before_the_wait(of_step, code):
    raw = base()
    raw["steps"]["wait_click"]["of_step"] = of_step
    assert (code, "steps.wait_click.of_step") in check(raw)


def test_click_wait_without_of_step():
    raw = base()
    del raw["steps"]["wait_click"]["of_step"]
    assert check(raw) == [("missing_field", "steps.wait_click.of_step")]


def test_of_step_only_for_email_events():
    raw = base()
    raw["steps"]["wait_click"]["event"] = "Viewed Product"
    assert check(raw) == [("invalid", "steps.wait_click.of_step")]


def test_loop_without_a_wait_names_its_first_step():
    raw = base()
    raw["steps"]["recs"]["next"] = "vip"
    raw["steps"]["pause"] = {"type": "email", "template": "champions/reminder.html", "next": "recs"}
    errors = check(raw)
    assert ("loop_without_wait", "steps.vip") in errors


def test_self_loop_without_a_wait():
    raw = base()
    raw["steps"]["recs"]["next"] = "recs"
    assert ("loop_without_wait", "steps.recs") in check(raw)


def test_loop_with_a_wait_and_a_way_out_is_valid():
    raw = base()
    raw["steps"]["recs"]["next"] = "again"
    raw["steps"]["again"] = {
        "type": "branch",
        "branches": [
            {"condition": {"attribute": "vip", "op": "eq", "value": True}, "next": "pause"}
        ],
        "default": None,
    }
    assert check(raw) == []


def test_loop_with_a_wait_and_no_way_out_needs_a_goal_or_segment_exit():
    raw = base(goal=None)
    raw["steps"]["recs"]["next"] = "pause"
    errors = check(raw)
    assert errors == [("no_end", "steps.pause")]
    # A goal or a segment exit can end such a run (a newsletter every few days).
    assert check(base(goal=None, exit_on_segment_exit=True, steps=raw["steps"])) == []
    assert check(base(steps=raw["steps"])) == []


def test_trigger_segment_that_does_not_exist():
    assert check(base(trigger={"segment": "default:nope"})) == [
        ("unknown_segment", "trigger.segment")
    ]


def test_segment_inside_a_branch_condition_must_exist():
    raw = base()
    raw["steps"]["pause"]["next"] = "split"
    raw["steps"]["split"] = {
        "type": "branch",
        "branches": [
            {
                "condition": {
                    "any": [{"segment": "default:regulars"}, {"not": {"segment": "default:gone"}}]
                },
                "next": "recs",
            }
        ],
        "default": "recs",
    }
    assert check(raw) == [
        ("unknown_segment", "steps.split.branches[0].condition.any[1].not.segment")
    ]


def test_goal_on_a_click_is_refused():
    assert check(base(goal={"event": "email_clicked", "within": "P7D"})) == [
        ("invalid", "goal.event")
    ]


def test_waiting_for_the_goal_event_is_refused():
    raw = base()
    raw["steps"]["wait_click"].update(event="Purchase", of_step=None)
    assert check(raw) == [("goal_shadows_wait", "steps.wait_click.event")]


def test_cooldown_needs_after_completion():
    assert check(base(reentry={"policy": "never", "cooldown": "P1D"})) == [
        ("invalid", "reentry.cooldown")
    ]


def test_step_ids_must_be_plain():
    raw = base()
    raw["steps"]["recs.v2"] = raw["steps"].pop("recs")
    raw["steps"]["pause"]["next"] = "recs.v2"
    assert check(raw) == [("invalid_step_id", "steps.recs.v2")]


def test_every_error_is_reported_at_once():
    raw = base(start="welcome", trigger={"segment": "default:nope"})
    raw["steps"]["wait_click"]["on_timeout"] = "gone"
    raw["steps"]["vip"]["template"] = "champions/missing.html"
    raw["steps"]["orphan"] = {"type": "delay", "duration": "P1D", "next": None}
    assert sorted(check(raw), key=str) == sorted(
        [
            ("dangling_next", "steps.wait_click.on_timeout"),
            ("unreachable_step", "steps.reminder"),
            ("unreachable_step", "steps.orphan"),
            ("unknown_template", "steps.vip.template"),
            ("unknown_segment", "trigger.segment"),
        ],
        key=str,
    )


def test_unknown_step_type_is_named_by_its_step():
    raw = base()
    raw["steps"]["vip"]["type"] = "fax"
    definition, errors = parse_journey(raw)
    assert definition is None
    assert [(e.code, e.field) for e in errors] == [("unknown_step_type", "steps.vip.type")]
    assert "'vip'" in errors[0].message and "fax" in errors[0].message


def test_parse_errors_use_field_paths_without_union_tags():
    raw = base()
    raw["steps"]["pause"]["duration"] = "two days"
    raw["steps"]["recs"]["colour"] = "red"
    del raw["steps"]["reminder"]["type"]
    raw["steps"]["pause"]["next"] = "split"
    raw["steps"]["split"] = {
        "type": "branch",
        "branches": [{"condition": {"attribute": "vip", "op": "is"}, "next": "recs"}],
        "default": None,
    }
    _, errors = parse_journey(raw)
    assert {(e.code, e.field) for e in errors} == {
        ("invalid", "steps.pause.duration"),
        ("unknown_field", "steps.recs.colour"),
        ("missing_field", "steps.reminder.type"),
        ("invalid", "steps.split.branches[0].condition.op"),
    }


def test_graph_errors_are_reported_beside_parse_errors():
    raw = base()
    raw["steps"]["vip"]["type"] = "fax"
    raw["steps"]["orphan"] = {"type": "delay", "duration": "P1D", "next": None}
    raw["steps"]["reminder"]["next"] = "void"
    errors = check(raw)
    assert ("unknown_step_type", "steps.vip.type") in errors
    assert ("unreachable_step", "steps.orphan") in errors
    assert ("dangling_next", "steps.reminder.next") in errors


def test_not_an_object():
    definition, errors = parse_journey(["steps"])
    assert definition is None and errors[0].code == "invalid"


def test_check_journey_on_a_parsed_definition():
    definition = JourneyDefinition.model_validate(base())
    assert (
        check_journey(definition, template_exists=lambda _: True, segment_exists=lambda _: True)
        == []
    )
    errors = check_journey(
        definition,
        template_exists=lambda p: p != "champions/vip_rewards.html",
        segment_exists=lambda _: False,
    )
    assert [(e.code, e.field) for e in errors] == [
        ("unknown_template", "steps.vip.template"),
        ("unknown_segment", "trigger.segment"),
    ]


# --- the shipped five ---------------------------------------------------------------------


def shipped() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted(SHIPPED_JOURNEYS_DIR.glob("*.json"))}


def test_the_five_shipped_journeys_validate_against_the_shipped_templates():
    journeys = shipped()
    assert sorted(journeys) == [
        "at_risk.json",
        "champions.json",
        "needs_attention.json",
        "promising.json",
        "regulars.json",
    ]
    for name, raw in journeys.items():
        _, errors = validate_journey(
            raw,
            template_exists=lambda path: (SHIPPED_TEMPLATES_DIR / path).is_file(),
            segment_exists=lambda slug: slug in SEED5_SEGMENTS,
        )
        assert errors == [], name
    triggers = {raw["trigger"]["segment"] for raw in journeys.values()}
    assert triggers == set(SEED5_SEGMENTS)
    used = {step["type"] for raw in journeys.values() for step in raw["steps"].values()}
    assert used == set(STEP_TYPES)


def walk(definition: JourneyDefinition, *, clicked: bool) -> list[str]:
    """The steps one customer passes, following the click decision one way."""
    path, step_id = [], definition.start
    while step_id is not None:
        path.append(step_id)
        step = definition.steps[step_id]
        if step.type == "wait_for_event":
            step_id = step.on_event if clicked else step.on_timeout
        elif step.type == "exit":
            step_id = None
        else:
            step_id = step.next
    return path


def test_champions_is_the_seed_flow():
    definition = JourneyDefinition.model_validate(shipped()["champions.json"])
    assert definition.trigger.segment == "default:champions"
    assert definition.goal is not None and definition.goal.event == "Purchase"
    assert definition.goal.within.days == 30
    assert (
        definition.reentry.policy == "after_completion" and definition.reentry.cooldown.days == 30
    )

    def sent(path: list[str]) -> list[str]:
        return [definition.steps[s].template for s in path if definition.steps[s].type == "email"]

    clicker = walk(definition, clicked=True)
    non_clicker = walk(definition, clicked=False)
    rest = [
        "champions/vip_rewards.html",
        "champions/recommendations.html",
        "champions/share_story.html",
    ]
    assert sent(clicker) == ["champions/welcome.html", *rest]
    assert sent(non_clicker) == ["champions/welcome.html", "champions/reminder.html", *rest]
    wait = definition.steps[clicker[1]]
    assert wait.type == "wait_for_event" and wait.event == "email_clicked"
    assert wait.of_step == clicker[0] and wait.timeout.days == 3
    between = [definition.steps[s].type for s in clicker[clicker.index("vip") :]]
    assert between == ["email", "delay", "email", "delay", "email"]


# --- the store: lifecycle -----------------------------------------------------------------


def add_segments(engine, slugs=SEED5_SEGMENTS) -> None:
    with Session(engine) as session:
        for slug in slugs:
            session.add(Segment(slug=slug, name=slug, kind="rfm", model_slug="default"))
        session.commit()


def run(engine, fn, **kwargs):
    with Session(engine) as session:
        result = fn(session, **kwargs)
        session.commit()
        return result


def test_lifecycle_draft_activate_new_version_activate(store_engine):
    add_segments(store_engine)
    created = run(store_engine, create_journey, raw=base())
    assert (created.state, created.latest_version, created.active_version) == ("draft", 1, None)
    assert run(store_engine, active_journeys_for_segment, segment_slug="default:champions") == []

    active = run(store_engine, activate_journey, slug="champions-nurture")
    assert (active.state, active.active_version) == ("active", 1)
    [entry] = run(store_engine, active_journeys_for_segment, segment_slug="default:champions")
    assert entry.slug == "champions-nurture" and entry.version == 1
    assert entry.definition.steps["vip"].template == "champions/vip_rewards.html"

    v2 = base(name="Champions v2")
    v2["steps"]["vip"]["template"] = "champions/reminder.html"
    drafted = run(store_engine, put_journey, slug="champions-nurture", raw=v2)
    assert (drafted.state, drafted.latest_version, drafted.active_version) == ("active", 2, 1)
    [entry] = run(store_engine, active_journeys_for_segment, segment_slug="default:champions")
    assert (
        entry.version == 1
        and entry.definition.steps["vip"].template == "champions/vip_rewards.html"
    )

    again = run(store_engine, activate_journey, slug="champions-nurture")
    assert (again.state, again.active_version, again.name) == ("active", 2, "Champions v2")
    [entry] = run(store_engine, active_journeys_for_segment, segment_slug="default:champions")
    assert (
        entry.version == 2 and entry.definition.steps["vip"].template == "champions/reminder.html"
    )

    # Version 1 is immutable: still what it was when it was active.
    v1 = run(store_engine, get_journey_version, slug="champions-nurture", version=1)
    assert v1.steps["vip"].template == "champions/vip_rewards.html" and v1.name == BASE["name"]
    full = run(store_engine, get_journey, slug="champions-nurture")
    assert [v.version for v in full.versions] == [2, 1]
    assert all(v.activated_at is not None for v in full.versions)


def test_create_refuses_invalid_and_duplicate(store_engine):
    add_segments(store_engine)
    raw = base()
    raw["steps"]["vip"]["template"] = "champions/missing.html"
    with pytest.raises(ValidationFailed) as failed:
        run(store_engine, create_journey, raw=raw)
    assert [(e.code, e.field) for e in failed.value.errors] == [
        ("unknown_template", "steps.vip.template")
    ]
    run(store_engine, create_journey, raw=base())
    with pytest.raises(Conflict):
        run(store_engine, create_journey, raw=base())


def test_put_slug_must_match_and_defaults_to_the_path(store_engine):
    add_segments(store_engine)
    run(store_engine, create_journey, raw=base())
    with pytest.raises(ValidationFailed) as failed:
        run(store_engine, put_journey, slug="champions-nurture", raw=base(slug="other"))
    assert failed.value.errors[0].field == "slug"
    raw = base()
    del raw["slug"]
    assert run(store_engine, put_journey, slug="champions-nurture", raw=raw).latest_version == 2
    with pytest.raises(NotFound):
        run(store_engine, put_journey, slug="nope", raw=raw)


def test_a_new_trigger_applies_only_once_activated(store_engine):
    add_segments(store_engine)
    run(store_engine, create_journey, raw=base())
    run(store_engine, activate_journey, slug="champions-nurture")
    run(
        store_engine,
        put_journey,
        slug="champions-nurture",
        raw=base(trigger={"segment": "default:regulars"}),
    )
    assert run(store_engine, active_journeys_for_segment, segment_slug="default:regulars") == []
    assert (
        len(run(store_engine, active_journeys_for_segment, segment_slug="default:champions")) == 1
    )
    run(store_engine, activate_journey, slug="champions-nurture")
    assert run(store_engine, active_journeys_for_segment, segment_slug="default:champions") == []
    assert len(run(store_engine, active_journeys_for_segment, segment_slug="default:regulars")) == 1


def test_activation_refuses_a_definition_no_longer_valid(store_engine):
    add_segments(store_engine)
    run(store_engine, create_journey, raw=base())
    with store_engine.begin() as conn:
        conn.execute(text("DELETE FROM segments WHERE slug = 'default:champions'"))
    with pytest.raises(ValidationFailed) as failed:
        run(store_engine, activate_journey, slug="champions-nurture")
    assert [e.field for e in failed.value.errors] == ["trigger.segment"]
    assert run(store_engine, get_journey, slug="champions-nurture").state == "draft"


def test_pause_resume_archive(store_engine):
    add_segments(store_engine)
    run(store_engine, create_journey, raw=base())
    with pytest.raises(Conflict):
        run(store_engine, pause_journey, slug="champions-nurture")
    run(store_engine, activate_journey, slug="champions-nurture")

    assert run(store_engine, pause_journey, slug="champions-nurture").state == "paused"
    assert run(store_engine, pause_journey, slug="champions-nurture").state == "paused"
    assert run(store_engine, active_journeys_for_segment, segment_slug="default:champions") == []
    assert run(store_engine, resume_journey, slug="champions-nurture").state == "active"
    assert (
        len(run(store_engine, active_journeys_for_segment, segment_slug="default:champions")) == 1
    )

    with Session(store_engine) as session:
        for customer, status in (("c-1", "running"), ("c-2", "completed"), ("c-3", "running")):
            session.add(
                JourneyRun(
                    workflow_id=f"journey:champions-nurture:{customer}",
                    run_id=f"run-{customer}",
                    journey_slug="champions-nurture",
                    version=1,
                    customer_id=customer,
                    status=status,
                )
            )
        session.commit()
    result = run(store_engine, archive_journey, slug="champions-nurture", runs="finish")
    assert result.journey.state == "archived"
    assert [r.workflow_id for r in result.running] == [
        "journey:champions-nurture:c-1",
        "journey:champions-nurture:c-3",
    ]
    assert run(store_engine, active_journeys_for_segment, segment_slug="default:champions") == []
    for action in (pause_journey, resume_journey, activate_journey):
        with pytest.raises(Conflict):
            run(store_engine, action, slug="champions-nurture")
    with pytest.raises(Conflict):
        run(store_engine, put_journey, slug="champions-nurture", raw=base())
    assert [j.state for j in run(store_engine, list_journeys, state="archived")] == ["archived"]


def test_install_the_shipped_journeys(store_engine):
    assert sorted(run(store_engine, missing_trigger_segments)) == sorted(SEED5_SEGMENTS)
    with pytest.raises(ValidationFailed) as failed:
        run(store_engine, install_shipped_journeys)
    assert {e.field for e in failed.value.errors} == {"trigger.segment"}
    assert run(store_engine, list_journeys) == []

    add_segments(store_engine)
    first = run(store_engine, install_shipped_journeys)
    assert sorted((o.action, o.state, o.version) for o in first) == [("created", "draft", 1)] * 5
    second = run(store_engine, install_shipped_journeys, activate=True)
    assert {(o.action, o.state, o.version) for o in second} == {("unchanged", "active", 1)}
    # The dispatcher reads with a bare Connection inside its own transaction.
    with store_engine.connect() as conn:
        for segment in SEED5_SEGMENTS:
            [entry] = active_journeys_for_segment(conn, segment_slug=segment)
            assert entry.definition.trigger.segment == segment and entry.version == 1
