"""Journey analytics and "who is in a journey", exact on runs built by hand in the store."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from sqlalchemy import text

from core.errors import ValidationFailed
from store.analytics import journey_analytics, runs_by_step
from tests.utils.api import api_harness
from tests.utils.inspection import HandRun, add_journey
from tests.utils.journey_runtime import CHAMPIONS

T0 = datetime.fromisoformat("2026-03-01T00:00:00+00:00")
SLUG = CHAMPIONS["slug"]


def _build(engine) -> None:  # noqa: ANN001
    """Six Champions runs (five on version 1, one on version 2) and a run of another
    journey whose rows must never count:

    A clicks welcome, gets vip, converts on day 2 while pausing;
    B does not click, gets the reminder, vip, recs, completes;
    C does not click, gets the reminder, converts on day 4 during the reminder send;
    D was skipped (unsubscribed) and waits for the click;
    E's welcome failed and E left the segment while waiting;
    F (version 2) is in doubt about welcome and waits for the click.
    """
    with engine.begin() as conn:
        add_journey(conn, versions=2)
        add_journey(conn, definition={**CHAMPIONS, "slug": "other", "name": "Other"})

        a = HandRun(conn, SLUG, "a", T0)
        a.send("welcome", days=0, events=("delivered", "open", "click", "click"))
        a.click(days=1)
        a.send("vip", days=1)
        a.finish("goal_reached", "pause", "goal event Purchase", days=2)
        a.position(status="converted", step="pause", since_days=1, ended_days=2, converted_days=2)

        b = HandRun(conn, SLUG, "b", T0 + timedelta(hours=1))
        b.send("welcome", days=0, status="delivered", events=("delivered",))
        b.no_click(days=3)
        b.send("reminder", days=3, events=("delivered", "open"))
        b.send("vip", days=3)
        b.delay_over("pause", days=5)
        b.send("recs", days=5)
        b.finish("completed", "recs", "reached the end of the journey", days=5)
        b.position(status="completed", step="recs", since_days=5, ended_days=5)

        c = HandRun(conn, SLUG, "c", T0 + timedelta(hours=2))
        c.send("welcome", days=0)
        c.no_click(days=3)
        c.send("reminder", days=3)
        c.finish("goal_reached", "reminder", "goal event Purchase", days=4)
        c.position(
            status="converted", step="reminder", since_days=3, ended_days=4, converted_days=4
        )

        d = HandRun(conn, SLUG, "d", T0 + timedelta(hours=3))
        d.send("welcome", days=0, status="skipped")
        d.position(step="wait_click", since_days=0, waiting_for="click on welcome")

        e = HandRun(conn, SLUG, "e", T0 + timedelta(hours=4))
        e.send("welcome", days=0, status="failed")
        e.finish("exited", "wait_click", "segment transition 99: left default:champions", days=1)
        e.position(status="exited", step="wait_click", since_days=0, ended_days=1)

        f = HandRun(conn, SLUG, "f", T0 + timedelta(hours=5), version=2)
        f.send("welcome", days=0, status="in_doubt")
        f.position(step="wait_click", since_days=0, waiting_for="click on welcome")

        other = HandRun(conn, "other", "a", T0)
        other.send("welcome", days=0, events=("delivered", "open", "click"))
        other.click(days=1)
        other.position(step="vip", since_days=1)


def _steps(result) -> dict:  # noqa: ANN001
    return {step.step: step for step in result.steps}


def _exits(step) -> dict[str, tuple[int, float, str | None]]:  # noqa: ANN001
    return {e.exit: (e.count, e.share, e.next) for e in step.exits}


def test_analytics_over_every_version(store_engine) -> None:
    _build(store_engine)
    with store_engine.connect() as conn:
        result = journey_analytics(conn, journey_slug=SLUG)
    assert (result.triggered, result.converted) == (6, 2)
    assert result.conversion_rate == pytest.approx(2 / 6, abs=1e-4)
    assert result.avg_days_to_convert == pytest.approx(3.0, abs=1e-3)  # (2 + 4) / 2
    assert (result.in_progress, result.completed, result.exited_early, result.failed) == (
        2,
        1,
        1,
        0,
    )
    assert [s.step for s in result.steps] == [
        "welcome",
        "wait_click",
        "vip",
        "reminder",
        "pause",
        "recs",
    ]
    steps = _steps(result)
    welcome = steps["welcome"]
    assert (welcome.type, welcome.entered, welcome.sent, welcome.delivered) == ("email", 6, 3, 2)
    assert (welcome.opened, welcome.clicked) == (1, 1)
    assert (welcome.failed, welcome.skipped, welcome.in_doubt) == (1, 1, 1)
    assert welcome.exits is None

    wait = steps["wait_click"]
    assert wait.entered == 6  # A, B, C decided; E left while waiting; D and F wait now
    assert _exits(wait) == {
        "on_event": (1, pytest.approx(1 / 3, abs=1e-4), "vip"),
        "on_timeout": (2, pytest.approx(2 / 3, abs=1e-4), "reminder"),
    }
    reminder = steps["reminder"]
    assert (reminder.entered, reminder.sent, reminder.delivered, reminder.opened) == (2, 2, 1, 1)
    assert reminder.clicked == 0
    assert (steps["vip"].entered, steps["vip"].sent) == (2, 2)
    assert (steps["pause"].entered, steps["pause"].sent) == (2, 0)
    assert (steps["recs"].entered, steps["recs"].sent) == (1, 1)


def test_analytics_of_one_version(store_engine) -> None:
    _build(store_engine)
    with store_engine.connect() as conn:
        result = journey_analytics(conn, journey_slug=SLUG, version=1)
    assert (result.triggered, result.converted, result.in_progress) == (5, 2, 1)
    welcome = _steps(result)["welcome"]
    assert (welcome.entered, welcome.sent, welcome.in_doubt) == (5, 3, 0)
    assert _steps(result)["wait_click"].entered == 5


def test_analytics_of_an_entry_window(store_engine) -> None:
    _build(store_engine)
    with store_engine.connect() as conn:
        later = journey_analytics(conn, journey_slug=SLUG, entered_from=T0 + timedelta(minutes=90))
        earlier = journey_analytics(conn, journey_slug=SLUG, entered_to=T0 + timedelta(minutes=90))
    # C, D, E, F entered after 01:30; A and B before.
    assert (later.triggered, later.converted, later.avg_days_to_convert) == (4, 1, 4.0)
    assert later.conversion_rate == 0.25
    welcome = _steps(later)["welcome"]
    assert (welcome.entered, welcome.sent, welcome.delivered) == (4, 1, 0)
    assert (welcome.skipped, welcome.failed, welcome.in_doubt) == (1, 1, 1)
    assert _exits(_steps(later)["wait_click"]) == {
        "on_event": (0, 0.0, "vip"),
        "on_timeout": (1, 1.0, "reminder"),
    }
    assert _steps(later)["vip"].entered == 0
    assert (earlier.triggered, earlier.converted, earlier.completed) == (2, 1, 1)
    assert _steps(earlier)["welcome"].clicked == 1


def _copy_message_journeys(engine, *, where: str = "1 = 1") -> None:  # noqa: ANN001
    """Give events the journey, version and step of their message, as
    record_message_event writes them (the hand-built events have none)."""
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE message_events SET"
                " journey_slug = (SELECT m.journey_slug FROM messages m"
                "   WHERE m.id = message_events.message_id),"
                " version = (SELECT m.version FROM messages m WHERE m.id = message_events.message_id),"
                " step = (SELECT m.step FROM messages m WHERE m.id = message_events.message_id)"
                f" WHERE {where}"
            )
        )


def test_analytics_count_the_same_from_the_events_journey_columns(store_engine) -> None:
    _build(store_engine)
    variants = (
        {},
        {"version": 1},
        {"entered_from": T0 + timedelta(minutes=90)},
        {"entered_to": T0 + timedelta(minutes=90)},
    )

    def analytics() -> list:
        with store_engine.connect() as conn:
            return [journey_analytics(conn, journey_slug=SLUG, **kwargs) for kwargs in variants]

    through_messages = analytics()
    # Half the events carry their journey (A's second click does, its first does not).
    _copy_message_journeys(store_engine, where="id % 2 = 0")
    assert analytics() == through_messages
    _copy_message_journeys(store_engine)
    with store_engine.connect() as conn:
        untagged = conn.execute(
            text("SELECT count(*) FROM message_events WHERE journey_slug IS NULL")
        ).scalar_one()
    assert untagged == 0
    from_columns = analytics()
    assert from_columns == through_messages
    welcome, reminder = _steps(from_columns[0])["welcome"], _steps(from_columns[0])["reminder"]
    assert (welcome.delivered, welcome.opened, welcome.clicked) == (2, 1, 1)
    assert (reminder.delivered, reminder.opened, reminder.clicked) == (1, 1, 0)
    assert _steps(from_columns[3])["welcome"].clicked == 1
    assert _steps(from_columns[2])["welcome"].clicked == 0


def test_branch_shares_come_from_the_matched_condition(store_engine) -> None:
    definition = {
        **CHAMPIONS,
        "slug": "branchy",
        "start": "split",
        "steps": {
            "split": {
                "type": "branch",
                "branches": [
                    {"condition": {"attribute": "vip", "op": "eq", "value": True}, "next": "a"},
                    {"condition": {"attribute": "vip", "op": "eq", "value": False}, "next": None},
                ],
                "default": "b",
            },
            "a": {"type": "email", "template": "champions/welcome.html", "next": None},
            "b": {"type": "email", "template": "champions/reminder.html", "next": None},
        },
    }
    with store_engine.begin() as conn:
        add_journey(conn, definition=definition)
        for index, matched in enumerate([0, 0, 1, None]):
            run = HandRun(conn, "branchy", f"x{index}", T0)
            reason = "no condition held: default -> b" if matched is None else "condition held"
            run.line("branch_taken", "split", reason, at=T0, detail={"matched": matched})
    with store_engine.connect() as conn:
        split = _steps(journey_analytics(conn, journey_slug="branchy"))["split"]
    assert split.entered == 4
    assert _exits(split) == {
        "condition_1": (2, 0.5, "a"),
        "condition_2": (1, 0.25, None),
        "default": (1, 0.25, "b"),
    }


def test_runs_by_step_pages_through_who_is_where(store_engine) -> None:
    _build(store_engine)
    with store_engine.connect() as conn:
        first = runs_by_step(conn, journey_slug=SLUG, step="wait_click", status="running", limit=1)
        second = runs_by_step(
            conn,
            journey_slug=SLUG,
            step="wait_click",
            status="running",
            limit=1,
            cursor=first.next_cursor,
        )
        converted = runs_by_step(conn, journey_slug=SLUG, status="converted", limit=10)
        with pytest.raises(ValidationFailed):
            runs_by_step(conn, journey_slug=SLUG, cursor="not-ours")
    assert [r.customer_id for r in first.data] == ["d"] and first.next_cursor
    assert [r.customer_id for r in second.data] == ["f"] and second.next_cursor is None
    assert sorted(r.customer_id for r in converted.data) == ["a", "c"]
    assert second.data[0].waiting_for == "click on welcome"


def test_analytics_and_runs_over_http(store_engine) -> None:
    _build(store_engine)
    with api_harness(store_engine) as api:
        for role in ("marketer", "support", "admin"):
            response = api.get(f"/v1/journeys/{SLUG}/analytics", role=role)
            assert response.status_code == 200, response.text
        assert api.get(f"/v1/journeys/{SLUG}/analytics", role="ingest").status_code == 403
        body = api.get(
            f"/v1/journeys/{SLUG}/analytics",
            role="marketer",
            params={"version": 1, "from": "2026-03-01T01:30:00Z"},
        ).json()
        assert (body["triggered"], body["converted"], body["version"]) == (3, 1, 1)
        assert body["steps"][0]["step"] == "welcome"
        naive = api.get(
            f"/v1/journeys/{SLUG}/analytics", role="marketer", params={"from": "2026-03-01"}
        )
        assert naive.status_code == 422
        assert api.get("/v1/journeys/nope/analytics").status_code == 404

        runs = api.get(
            f"/v1/journeys/{SLUG}/runs",
            role="support",
            params={"step": "wait_click", "status": "running"},
        )
        assert runs.status_code == 200
        assert [r["customer_id"] for r in runs.json()["data"]] == ["d", "f"]
        bad = api.get(f"/v1/journeys/{SLUG}/runs", role="support", params={"cursor": "zz"})
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "cursor"
        assert api.get("/v1/journeys/nope/runs", role="support").status_code == 404
