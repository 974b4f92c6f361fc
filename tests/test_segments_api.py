"""The segments API end to end on both stores; schedules on a real Temporal dev server."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from temporalio.client import ScheduleOverlapPolicy
from temporalio.service import RPCError, RPCStatusCode

from tests.utils.api import api_harness
from tests.utils.segments import add_customer, add_event, add_label_segment

BUYERS = {"event": "Purchase", "count": {"gte": 1}, "within": "P30D"}


@pytest.fixture
def api(store_engine):
    """Temporal unreachable (127.0.0.1:1): enough for everything but rule segment saves."""
    with api_harness(store_engine) as harness:
        yield harness


def send(api, method, path, role="marketer", headers=None, **kwargs):
    return api.client.request(method, path, headers=api.headers(role, **(headers or {})), **kwargs)


def test_validation_errors_name_the_node(api):
    bad_op = {"all": [{"segment": "x"}, {"any": [{"attribute": "plan", "op": "like", "value": 1}]}]}
    response = send(
        api, "POST", "/v1/segments", json={"slug": "s", "name": "S", "condition": bad_op}
    )
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "condition.all[1].any[0].op"
    unknown = {"all": [{"attribute": "plan", "op": "exists"}, {"segment": "ghost"}]}
    response = send(
        api, "POST", "/v1/segments", json={"slug": "s", "name": "S", "condition": unknown}
    )
    assert response.status_code == 422
    assert response.json()["error"] == {
        "code": "unknown_segment",
        "message": "no segment 'ghost'",
        "field": "condition.all[1].segment",
    }
    response = send(
        api, "POST", "/v1/segments", json={"slug": "Bad Slug", "name": "S", "condition": BUYERS}
    )
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "slug"


def test_saving_a_rule_segment_without_temporal_is_503_and_saves_nothing(api):
    response = send(
        api, "POST", "/v1/segments", json={"slug": "buyers", "name": "Buyers", "condition": BUYERS}
    )
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "temporal_unavailable"
    assert send(api, "GET", "/v1/segments/buyers", role="support").status_code == 404


def test_preview_counts_and_samples(api):
    for cid in ("c1", "c2", "c3"):
        add_customer(api.engine, cid)
    add_event(api.engine, "c2", "Purchase", days_ago=1)
    add_event(api.engine, "c3", "Purchase", days_ago=2)
    # The preview runs as of the request's clock, so the condition counts all time.
    response = send(
        api,
        "POST",
        "/v1/segments/preview",
        json={"condition": {"event": "Purchase", "count": {"gte": 1}}, "sample": 1},
    )
    assert response.status_code == 200
    assert response.json() == {"count": 2, "sample": ["c2"]}
    response = send(api, "POST", "/v1/segments/preview", json={"condition": {"segment": "nope"}})
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "condition.segment"
    assert (
        send(
            api, "POST", "/v1/segments/preview", role="support", json={"condition": BUYERS}
        ).status_code
        == 403
    )


def test_external_segment_entries_and_exits_are_idempotent(api):
    add_customer(api.engine, "known")
    created = send(
        api,
        "POST",
        "/v1/segments",
        json={"slug": "crm-vip", "name": "CRM VIP", "owner": "external"},
    )
    assert created.status_code == 201
    assert created.json()["kind"] == "external"
    assert created.json()["condition"] is None

    body = {"customer_ids": ["known", "new-1", "new-1"]}
    assert (
        send(api, "POST", "/v1/segments/crm-vip/entries", role="marketer", json=body).status_code
        == 403
    )
    first = send(api, "POST", "/v1/segments/crm-vip/entries", role="ingest", json=body)
    assert first.json() == {"entries": 2, "exits": 0, "created_customers": 1}
    repeat = send(api, "POST", "/v1/segments/crm-vip/entries", role="ingest", json=body)
    assert repeat.json() == {"entries": 0, "exits": 0, "created_customers": 0}
    assert api.get("/v1/customers/new-1", role="support").status_code == 200

    exits = send(
        api,
        "POST",
        "/v1/segments/crm-vip/exits",
        role="ingest",
        json={"customer_ids": ["new-1", "stranger"]},
    )
    assert exits.json()["exits"] == 1
    again = send(
        api, "POST", "/v1/segments/crm-vip/exits", role="ingest", json={"customer_ids": ["new-1"]}
    )
    assert again.json()["exits"] == 0

    followed = send(api, "GET", "/v1/segments/crm-vip/transitions", role="support").json()
    assert [(t["customer_id"], t["kind"]) for t in followed["data"]] == [
        ("known", "entered"),
        ("new-1", "entered"),
        ("new-1", "exited"),
    ]
    after_first = send(
        api,
        "GET",
        f"/v1/segments/crm-vip/transitions?since={followed['data'][0]['id']}",
        role="support",
    ).json()
    assert [t["customer_id"] for t in after_first["data"]] == ["new-1", "new-1"]
    since_time = followed["data"][0]["occurred_at"]
    by_time = send(
        api, "GET", "/v1/segments/crm-vip/transitions", role="support", params={"since": since_time}
    ).json()
    assert len(by_time["data"]) == 3
    bad = send(api, "GET", "/v1/segments/crm-vip/transitions?since=yesterday", role="support")
    assert bad.status_code == 422
    assert bad.json()["error"]["field"] == "since"

    members = send(api, "GET", "/v1/segments/crm-vip/members", role="support").json()
    assert [m["customer_id"] for m in members["data"]] == ["known"]
    assert send(api, "DELETE", "/v1/segments/crm-vip").status_code == 204
    assert send(api, "GET", "/v1/segments/crm-vip").status_code == 404


def test_rfm_segments_take_no_entries_and_no_edits(api):
    add_label_segment(api.engine, "default:champions", [])
    response = send(
        api,
        "POST",
        "/v1/segments/default:champions/entries",
        role="ingest",
        json={"customer_ids": ["x"]},
    )
    assert response.status_code == 409
    listed = send(api, "GET", "/v1/segments", role="support").json()["data"]
    assert [(s["slug"], s["kind"], s["owner"]) for s in listed] == [
        ("default:champions", "rfm", "rfm-model:default")
    ]
    assert send(api, "DELETE", "/v1/segments/default:champions").status_code == 409


@pytest.fixture
def api_with_temporal(store_engine, dev_server_env):
    target = dev_server_env.client.service_client.config.target_host
    with api_harness(
        store_engine, temporal_address=target, task_queue="segments-api-test"
    ) as harness:
        harness.temporal = dev_server_env.client
        yield harness


async def describe_schedule(client, slug):
    return await client.get_schedule_handle(f"segment-eval:{slug}").describe()


async def test_rule_segment_lifecycle_with_its_schedule(api_with_temporal):
    api = api_with_temporal
    for i in range(3):
        add_customer(api.engine, f"c{i}", {"plan": "pro" if i else "free"})
    condition = {"all": [{"attribute": "plan", "op": "eq", "value": "pro"}]}
    created = send(
        api, "POST", "/v1/segments", json={"slug": "pros", "name": "Pros", "condition": condition}
    )
    assert created.status_code == 201, created.text
    assert created.json()["schedule"] == "PT5M"
    schedule = (await describe_schedule(api.temporal, "pros")).schedule
    assert schedule.spec.intervals[0].every == timedelta(minutes=5)
    assert schedule.policy.overlap == ScheduleOverlapPolicy.SKIP
    assert schedule.action.workflow == "SegmentEvaluationWorkflow"

    updated = send(
        api,
        "PUT",
        "/v1/segments/pros",
        json={"name": "Pros", "condition": condition, "schedule": "PT1H"},
    )
    assert updated.status_code == 200
    assert updated.json()["version"] == 2
    schedule = (await describe_schedule(api.temporal, "pros")).schedule
    assert schedule.spec.intervals[0].every == timedelta(hours=1)

    ran = send(api, "POST", "/v1/segments/pros/evaluate").json()
    assert (ran["entries"], ran["exits"]) == (2, 0)
    page = send(api, "GET", "/v1/segments/pros/members?limit=1", role="support").json()
    assert [m["customer_id"] for m in page["data"]] == ["c1"]
    rest = send(
        api,
        "GET",
        f"/v1/segments/pros/members?limit=1&cursor={page['next_cursor']}",
        role="support",
    ).json()
    assert [m["customer_id"] for m in rest["data"]] == ["c2"]
    assert rest["next_cursor"] is None
    streamed = send(
        api,
        "GET",
        "/v1/segments/pros/members",
        role="support",
        headers={"Accept": "application/x-ndjson"},
    )
    assert streamed.headers["content-type"].startswith("application/x-ndjson")
    assert [json.loads(line)["customer_id"] for line in streamed.text.splitlines()] == ["c1", "c2"]

    assert send(api, "DELETE", "/v1/segments/pros").status_code == 204
    with pytest.raises(RPCError) as gone:
        await describe_schedule(api.temporal, "pros")
    assert gone.value.status == RPCStatusCode.NOT_FOUND
