"""The journeys API: definitions in (every error naming its field), the lifecycle, roles,
and archive cancelling runs in flight through Temporal."""

from __future__ import annotations

import asyncio
import copy
import uuid
from typing import Any

import pytest
from sqlalchemy import text
from sqlmodel import Session
from temporalio.client import WorkflowExecutionStatus, WorkflowFailureError
from temporalio.worker import Worker

from core.tables import JourneyRun, Segment
from tests.test_journey_definitions import BASE, SEED5_SEGMENTS
from tests.utils.api import api_harness
from tests.utils.journeys import ParkedRun

SLUG = BASE["slug"]


def definition(**changes: Any) -> dict[str, Any]:
    raw = copy.deepcopy(BASE)
    raw.update(changes)
    return raw


def add_segments(engine) -> None:
    with Session(engine) as session:
        for slug in SEED5_SEGMENTS:
            session.add(Segment(slug=slug, name=slug, kind="rfm", model_slug="default"))
        session.commit()


@pytest.fixture
def api(store_engine):
    add_segments(store_engine)
    with api_harness(store_engine) as harness:
        yield harness


def put(api, path: str, role: str = "marketer", **kwargs: Any):
    return api.client.put(path, headers=api.headers(role), **kwargs)


def fields(response) -> set[str | None]:
    body = response.json()
    return {e["field"] for e in body.get("errors", [body["error"]])}


def test_create_get_and_list(api):
    created = api.post("/v1/journeys", role="marketer", json=definition())
    assert created.status_code == 201, created.text
    body = created.json()
    assert (body["slug"], body["state"], body["latest_version"], body["active_version"]) == (
        SLUG,
        "draft",
        1,
        None,
    )
    [version] = body["versions"]
    assert (
        version["status"] == "draft"
        and version["definition"]["steps"]["pause"]["duration"] == "P2D"
    )

    got = api.get(f"/v1/journeys/{SLUG}", role="marketer").json()
    assert got["trigger_segment"] == "default:champions"

    second = definition(slug="regulars-loyalty", trigger={"segment": "default:regulars"})
    assert api.post("/v1/journeys", role="marketer", json=second).status_code == 201
    page = api.get("/v1/journeys?limit=1", role="marketer").json()
    assert [j["slug"] for j in page["data"]] == [SLUG] and page["next_cursor"] == SLUG
    rest = api.get(f"/v1/journeys?limit=1&cursor={page['next_cursor']}", role="marketer").json()
    assert [j["slug"] for j in rest["data"]] == ["regulars-loyalty"] and rest["next_cursor"] is None


def test_create_answers_422_with_every_error_naming_its_field(api):
    raw = definition(trigger={"segment": "default:nobody"})
    raw["steps"]["wait_click"]["on_timeout"] = "gone"
    raw["steps"]["vip"]["template"] = "champions/missing.html"
    raw["steps"]["orphan"] = {"type": "delay", "duration": "P1D", "next": None}
    response = api.post("/v1/journeys", role="marketer", json=raw)
    assert response.status_code == 422
    assert fields(response) == {
        "steps.wait_click.on_timeout",
        "steps.reminder",
        "steps.orphan",
        "steps.vip.template",
        "trigger.segment",
    }
    assert api.get(f"/v1/journeys/{SLUG}", role="marketer").status_code == 404


def test_unknown_step_type_and_bad_fields(api):
    raw = definition()
    raw["steps"]["vip"]["type"] = "carrier_pigeon"
    raw["steps"]["pause"]["duration"] = "soon"
    response = api.post("/v1/journeys", role="marketer", json=raw)
    assert response.status_code == 422
    codes = {(e["code"], e["field"]) for e in response.json()["errors"]}
    assert codes == {("unknown_step_type", "steps.vip.type"), ("invalid", "steps.pause.duration")}
    not_json = api.post(
        "/v1/journeys",
        role="marketer",
        content=b"{nope",
        headers={"Content-Type": "application/json"},
    )
    assert not_json.status_code in (400, 422)
    assert not_json.json()["error"]["code"] == "malformed_json"


def test_validate_reports_every_error_without_storing(api):
    raw = definition()
    raw["steps"]["recs"]["next"] = "vip"
    raw["steps"]["pause"] = {"type": "email", "template": "champions/reminder.html", "next": "recs"}
    raw["steps"]["wait_click"]["of_step"] = "pause"
    response = api.post("/v1/journeys/validate", role="marketer", json=raw)
    assert response.status_code == 200
    body = response.json()
    assert body["valid"] is False
    assert {(e["code"], e["field"]) for e in body["errors"]} >= {
        ("loop_without_wait", "steps.vip"),
        ("invalid_of_step", "steps.wait_click.of_step"),
    }
    ok = api.post("/v1/journeys/validate", role="marketer", json=definition()).json()
    assert ok == {"valid": True, "errors": []}
    assert api.get("/v1/journeys", role="marketer").json()["data"] == []


def test_lifecycle_over_http(api):
    api.post("/v1/journeys", role="marketer", json=definition())
    active = api.post(f"/v1/journeys/{SLUG}/activate", role="marketer")
    assert active.status_code == 200 and active.json()["active_version"] == 1

    v2 = definition(name="Champions, second cut")
    v2["steps"]["pause"]["duration"] = "P4D"
    drafted = put(api, f"/v1/journeys/{SLUG}", json=v2)
    assert drafted.status_code == 200, drafted.text
    body = drafted.json()
    assert (body["state"], body["latest_version"], body["active_version"]) == ("active", 2, 1)
    assert [(v["version"], v["status"]) for v in body["versions"]] == [(2, "draft"), (1, "active")]

    body = api.post(f"/v1/journeys/{SLUG}/activate", role="marketer").json()
    assert [(v["version"], v["status"]) for v in body["versions"]] == [
        (2, "active"),
        (1, "superseded"),
    ]
    v1 = body["versions"][1]["definition"]
    assert v1["steps"]["pause"]["duration"] == "P2D" and v1["name"] == BASE["name"]

    assert api.post(f"/v1/journeys/{SLUG}/pause", role="marketer").json()["state"] == "paused"
    assert api.post(f"/v1/journeys/{SLUG}/resume", role="marketer").json()["state"] == "active"

    missing_runs = api.post(f"/v1/journeys/{SLUG}/archive", role="marketer", json={})
    assert missing_runs.status_code == 422 and fields(missing_runs) == {"runs"}
    archived = api.post(f"/v1/journeys/{SLUG}/archive", role="marketer", json={"runs": "finish"})
    assert archived.status_code == 200
    assert archived.json()["journey"]["state"] == "archived" and archived.json()["cancelled"] == []

    refused = api.post(f"/v1/journeys/{SLUG}/activate", role="marketer")
    assert refused.status_code == 409 and refused.json()["error"]["field"] == "slug"


def test_activation_refuses_an_invalid_definition(api):
    api.post("/v1/journeys", role="marketer", json=definition())
    with api.engine.begin() as conn:
        conn.execute(text("DELETE FROM segments WHERE slug = 'default:champions'"))
    response = api.post(f"/v1/journeys/{SLUG}/activate", role="marketer")
    assert response.status_code == 422 and fields(response) == {"trigger.segment"}
    assert api.get(f"/v1/journeys/{SLUG}", role="marketer").json()["state"] == "draft"


def test_conflicts_and_not_found(api):
    api.post("/v1/journeys", role="marketer", json=definition())
    again = api.post("/v1/journeys", role="marketer", json=definition())
    assert again.status_code == 409 and again.json()["error"]["field"] == "slug"
    assert api.post(f"/v1/journeys/{SLUG}/pause", role="marketer").status_code == 409
    assert api.post("/v1/journeys/nope/activate", role="marketer").status_code == 404
    other_slug = put(api, f"/v1/journeys/{SLUG}", json=definition(slug="other"))
    assert other_slug.status_code == 422 and fields(other_slug) == {"slug"}


def test_roles(api):
    assert api.client.get("/v1/journeys").status_code == 401
    assert api.get("/v1/journeys", role="ingest").status_code == 403
    assert api.post("/v1/journeys", role="support", json=definition()).status_code == 403
    assert api.get("/v1/journeys", role="admin").status_code == 200


async def test_archive_cancel_cancels_runs_in_flight(store_engine, time_skipping_env):
    add_segments(store_engine)
    client = time_skipping_env.client
    task_queue = f"archive-{uuid.uuid4()}"
    address = client.service_client.config.target_host
    async with Worker(client, task_queue=task_queue, workflows=[ParkedRun]):
        ids = [f"journey:{SLUG}:{uuid.uuid4().hex[:8]}" for _ in range(2)]
        handles = [
            await client.start_workflow(ParkedRun.run, id=wid, task_queue=task_queue) for wid in ids
        ]
        with Session(store_engine) as session:
            for handle in handles:
                session.add(
                    JourneyRun(
                        workflow_id=handle.id,
                        run_id=handle.result_run_id or "",
                        journey_slug=SLUG,
                        version=1,
                        customer_id=handle.id.rsplit(":", 1)[1],
                    )
                )
            # A run recorded as running whose workflow is already gone: nothing to cancel.
            session.add(
                JourneyRun(
                    workflow_id=f"journey:{SLUG}:ghost",
                    run_id="gone",
                    journey_slug=SLUG,
                    version=1,
                    customer_id="ghost",
                )
            )
            session.commit()
        with api_harness(store_engine, temporal_address=address) as api:
            api.post("/v1/journeys", role="marketer", json=definition())
            api.post(f"/v1/journeys/{SLUG}/activate", role="marketer")
            response = await asyncio.to_thread(
                api.post, f"/v1/journeys/{SLUG}/archive", role="marketer", json={"runs": "cancel"}
            )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["in_flight"] == 3 and sorted(body["cancelled"]) == sorted(ids)
        for handle in handles:
            with pytest.raises(WorkflowFailureError):
                await handle.result()
            assert (await handle.describe()).status == WorkflowExecutionStatus.CANCELED
