"""`/v1/rfm-models` through HTTP on a real store (no Temporal needed without a schedule)."""

from __future__ import annotations

import json

import pytest

from tests.utils.api import api_harness
from tests.utils.rfm import T, load, model_body, purchase

DAY_PURCHASES = [
    purchase("alice", "2026-11-19T10:00:00+00:00", 300),
    purchase("alice", "2026-11-10T10:00:00+00:00", 200),
    purchase("bob", "2026-11-01T10:00:00+00:00", 20),
    purchase("carol", "2026-09-01T10:00:00+00:00", 5),
]


def _events():
    from datetime import datetime

    return [
        purchase(
            e.customer_id, datetime.fromisoformat(str(e.occurred_at)), e.properties["total_price"]
        )
        for e in DAY_PURCHASES
    ]


def test_model_crud_score_and_read_side(store_engine, temporal_address):
    load(store_engine, _events())
    with api_harness(store_engine, temporal_address=temporal_address) as api:
        created = api.post("/v1/rfm-models", role="marketer", json=model_body(segment_map="rfm11"))
        assert created.status_code == 201, created.text
        body = created.json()
        assert body["version"] == 1 and body["timeframe"] == "P90D"
        assert "default:can-t-lose-them" in body["segments"] and len(body["segments"]) == 11

        scored = api.post(
            "/v1/rfm-models/default/score", role="marketer", json={"as_of": T.isoformat()}
        )
        assert scored.status_code == 200, scored.text
        result = scored.json()
        assert (result["scored"], result["entries"], result["exits"]) == (3, 3, 0)
        assert result["pass_id"] >= 1 and result["duration_ms"] >= 0

        page = api.get("/v1/rfm-models/default/scores?limit=2", role="marketer").json()
        assert [row["customer_id"] for row in page["data"]] == ["alice", "bob"]
        alice = page["data"][0]
        assert (alice["recency_days"], alice["frequency"], alice["monetary"]) == (1, 2, 500.0)
        # N = 3 and alice is better than both others on every measure: 1 + floor(5 * 2 / 3).
        assert (alice["r"], alice["f"], alice["m"]) == (4, 4, 4)
        assert alice["label"] == "Champions"
        rest = api.get(
            f"/v1/rfm-models/default/scores?limit=2&cursor={page['next_cursor']}", role="marketer"
        ).json()
        assert [row["customer_id"] for row in rest["data"]] == ["carol"]
        assert rest["next_cursor"] is None

        streamed = api.get(
            "/v1/rfm-models/default/scores",
            role="marketer",
            headers={"Accept": "application/x-ndjson"},
        )
        assert streamed.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in streamed.text.splitlines()]
        assert [row["customer_id"] for row in lines] == ["alice", "bob", "carol"]
        assert lines[0] == alice

        summary = api.get("/v1/rfm-models/default/summary", role="marketer").json()
        assert summary["scored"] == 3 and summary["pass_id"] == result["pass_id"]
        champions = next(x for x in summary["labels"] if x["label"] == "Champions")
        assert champions == {
            "label": "Champions",
            "segment": "default:champions",
            "count": 1,
            "share": 1 / 3,
            "monetary": 500.0,
        }
        assert len(summary["labels"]) == 11
        assert [row["r"] for row in summary["grid"]] == [5, 4, 3, 2, 1]
        assert sum(sum(row["counts"]) for row in summary["grid"]) == 3
        assert summary["grid"][1]["counts"] == [0, 0, 0, 1, 0]  # alice: R4 F4
        assert summary["grid"][1]["by_f"] == {"F1": 0, "F2": 0, "F3": 0, "F4": 1, "F5": 0}

        replaced = api.client.put(
            "/v1/rfm-models/default",
            headers=api.headers("marketer"),
            json={k: v for k, v in model_body(name="Renamed").items() if k != "slug"},
        )
        assert replaced.status_code == 200, replaced.text
        assert replaced.json()["version"] == 2 and replaced.json()["segment_map"] == "seed5"
        listed = api.get("/v1/rfm-models", role="marketer").json()
        assert [m["name"] for m in listed["data"]] == ["Renamed"]

        deleted = api.client.delete("/v1/rfm-models/default", headers=api.headers("marketer"))
        assert deleted.status_code == 200 and deleted.json()["slug"] == "default"
        assert api.get("/v1/rfm-models/default", role="marketer").status_code == 404


def test_validation_errors_name_the_field(store_engine, temporal_address):
    with api_harness(store_engine, temporal_address=temporal_address) as api:
        uncovered = api.post(
            "/v1/rfm-models",
            role="marketer",
            json=model_body(segment_map={"rules": [{"label": "Top", "r": [2, 5]}]}),
        )
        assert uncovered.status_code == 422
        error = uncovered.json()["error"]
        assert error["field"] == "segment_map.rules"
        assert error["message"] == "cell R1 F1 M1 matches no rule"

        bad_range = api.post(
            "/v1/rfm-models",
            role="marketer",
            json=model_body(segment_map={"rules": [{"label": "All", "f": [1, 6]}]}),
        )
        assert bad_range.json()["error"]["field"] == "segment_map.rules[0].f[1]"

        for field, value in (
            ("timeframe", "ninety days"),
            ("segment_map", "rfm12"),
            ("slug", "Not A Slug"),
            ("targeting", {"attribute": "plan", "op": "like"}),
            ("realtime", "sometimes"),
        ):
            response = api.post(
                "/v1/rfm-models", role="marketer", json=model_body(**{field: value})
            )
            assert response.status_code == 422, (field, response.text)
            assert response.json()["error"]["field"].startswith(field), response.json()

        missing = model_body()
        del missing["monetary_property"]
        response = api.post("/v1/rfm-models", role="marketer", json=missing)
        assert response.json()["error"] == {
            "code": "missing_field",
            "message": "Field required",
            "field": "monetary_property",
        }

        assert api.post("/v1/rfm-models", role="marketer", json=model_body()).status_code == 201
        again = api.post("/v1/rfm-models", role="marketer", json=model_body())
        assert again.status_code == 409 and again.json()["error"]["field"] == "slug"

        naive = api.post(
            "/v1/rfm-models/default/score", role="marketer", json={"as_of": "2026-11-20T10:00:00"}
        )
        assert naive.status_code == 422 and naive.json()["error"]["field"] == "as_of"
        assert api.post("/v1/rfm-models/nope/score", role="marketer").status_code == 404
        assert api.get("/v1/rfm-models/nope/summary", role="marketer").status_code == 404
        mismatch = api.client.put(
            "/v1/rfm-models/default",
            headers=api.headers("marketer"),
            json=model_body(slug="other"),
        )
        assert mismatch.status_code == 422 and mismatch.json()["error"]["field"] == "slug"
        bad_cursor = api.get("/v1/rfm-models/default/scores?cursor=%%%", role="marketer")
        assert bad_cursor.status_code == 422


def test_roles(store_engine, temporal_address):
    with api_harness(store_engine, temporal_address=temporal_address) as api:
        assert api.get("/v1/rfm-models", role="ingest").status_code == 403
        assert api.client.get("/v1/rfm-models").status_code == 401
        assert api.get("/v1/rfm-models", role="admin").status_code == 200


@pytest.mark.parametrize("schedule", ["PT1H", None])
def test_a_model_needs_temporal_and_nothing_is_kept_without_it(store_engine, schedule):
    # The harness points at a closed port: the model is refused with 503, not half-made
    # (its first pass, and any schedule, are Temporal's to run).
    with api_harness(store_engine) as api:
        response = api.post("/v1/rfm-models", role="marketer", json=model_body(schedule=schedule))
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "temporal_unavailable"
        assert api.get("/v1/rfm-models/default", role="marketer").status_code == 404
        assert api.get("/v1/segments", role="marketer").json()["data"] == []


def test_targeting_must_name_existing_segments(store_engine, temporal_address):
    with api_harness(store_engine, temporal_address=temporal_address) as api:
        response = api.post(
            "/v1/rfm-models",
            role="marketer",
            json=model_body(targeting={"all": [{"segment": "vip"}]}),
        )
        assert response.status_code == 422, response.text
        assert response.json()["error"]["field"] == "targeting.all[0].segment"


def test_summary_monetary_is_money_without_float_noise(store_engine, temporal_address):
    # Three customers alike in R, F and M share a label, whose monetary is a float sum.
    assert 0.1 + 0.1 + 0.1 == 0.30000000000000004
    load(store_engine, [purchase(customer, T, 0.1) for customer in ("a", "b", "c")])
    with api_harness(store_engine, temporal_address=temporal_address) as api:
        body = model_body(segment_map="rfm11")
        assert api.post("/v1/rfm-models", role="marketer", json=body).status_code == 201
        scored = api.post(
            "/v1/rfm-models/default/score", role="marketer", json={"as_of": T.isoformat()}
        )
        assert scored.status_code == 200, scored.text
        summary = api.get("/v1/rfm-models/default/summary", role="marketer").json()
    [shared] = [label for label in summary["labels"] if label["count"]]
    assert shared["count"] == 3 and shared["monetary"] == 0.3
