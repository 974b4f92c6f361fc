"""store/runs.py on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import insert

from core.runs import RunIdentity, RunLine, RunPosition
from core.tables import JourneyVersion, utcnow
from store import runs as run_store


def _run(
    customer: str = "c1", run_id: str = "r1", slug: str = "j", minutes: int = 0
) -> RunIdentity:
    return RunIdentity(
        workflow_id=f"journey:{slug}:{customer}",
        run_id=run_id,
        journey_slug=slug,
        version=1,
        customer_id=customer,
        entered_at=utcnow() - timedelta(days=1) + timedelta(minutes=minutes),
        entry_transition_id=7,
    )


def _line(seq: int, kind: str, reason: str = "") -> RunLine:
    return RunLine(seq=seq, step="welcome", kind=kind, reason=reason or kind, occurred_at=utcnow())


def test_progress_is_insert_if_absent_and_moves_the_run(store_engine) -> None:
    run = _run()
    waiting_until = utcnow() + timedelta(days=3)
    with store_engine.begin() as conn:
        run_store.ensure_runs(conn, identities=[run, run])
        run_store.record_progress(
            conn,
            run=run,
            lines=[_line(0, "entered", "segment transition 7: entered s")],
            position=RunPosition(step="welcome", step_since=utcnow()),
        )
        # A retried write of the same seq is not a second line.
        run_store.record_progress(
            conn,
            run=run,
            lines=[_line(0, "entered", "other"), _line(1, "timer_fired")],
            position=RunPosition(
                step="wait_click", waiting_for="click on welcome", waiting_until=waiting_until
            ),
        )
    with store_engine.connect() as conn:
        (found,) = run_store.customer_runs(conn, customer_id="c1")
    assert [(line.seq, line.reason) for line in found.timeline] == [
        (0, "segment transition 7: entered s"),
        (1, "timer_fired"),
    ]
    assert found.step == "wait_click" and found.waiting_for == "click on welcome"
    assert found.waiting_until == waiting_until
    assert found.entry_transition_id == 7 and found.status == "running"


def test_an_ended_run_is_not_revived_by_a_late_write(store_engine) -> None:
    run = _run()
    ended = utcnow()
    with store_engine.begin() as conn:
        run_store.record_progress(
            conn,
            run=run,
            lines=[],
            position=RunPosition(status="converted", converted_at=ended, ended_at=ended),
        )
        run_store.update_position(
            conn, workflow_id=run.workflow_id, run_id=run.run_id, position=RunPosition(step="vip")
        )
        last = run_store.last_run(conn, journey_slug="j", customer_id="c1")
    assert last is not None
    assert (last.status, last.converted_at, last.ended_at) == ("converted", ended, ended)


def test_last_run_and_running_runs(store_engine) -> None:
    old, new, other = _run(run_id="r1"), _run(run_id="r2", minutes=5), _run("c2", slug="k")
    now = utcnow()
    with store_engine.begin() as conn:
        run_store.ensure_runs(conn, identities=[old, new, other])
        run_store.update_position(
            conn,
            workflow_id=old.workflow_id,
            run_id="r1",
            position=RunPosition(status="completed", ended_at=now),
        )
        conn.execute(
            insert(JourneyVersion.__table__).values(
                journey_slug="j",
                version=1,
                definition={"goal": {"event": "Purchase"}},
                created_at=now,
            )
        )
    with store_engine.connect() as conn:
        assert run_store.last_run(conn, journey_slug="j", customer_id="c1").run_id == "r2"
        assert run_store.last_run(conn, journey_slug="j", customer_id="c2") is None
        latest = run_store.last_runs(conn, journey_slug="j", customer_ids=["c1", "c2"])
        running = run_store.running_runs_of_customers(conn, customer_ids=["c1", "c2"])
        of_customer = run_store.running_runs_of_customer(conn, customer_id="c1")
        of_journey = run_store.running_runs_of_journey(conn, journey_slug="j")
    assert list(latest) == ["c1"]
    assert [(r.run_id, d) for r, d in running] == [
        ("r2", {"goal": {"event": "Purchase"}}),
        (other.run_id, None),
    ]
    assert [r.run_id for r in of_customer] == ["r2"]
    assert [r.run_id for r in of_journey] == ["r2"]


def test_mark_runs_ended_closes_only_running_runs(store_engine) -> None:
    run = _run()
    now = utcnow()
    with store_engine.begin() as conn:
        run_store.ensure_runs(conn, identities=[run])
        run_store.mark_runs_ended(
            conn, keys=[(run.workflow_id, run.run_id)], status="cancelled", now=now
        )
        run_store.mark_runs_ended(
            conn, keys=[(run.workflow_id, run.run_id)], status="failed", now=now
        )
        (found,) = run_store.customer_runs(conn, customer_id="c1")
    assert (found.status, found.ended_at) == ("cancelled", now)
