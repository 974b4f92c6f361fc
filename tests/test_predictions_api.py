"""`/v1/predictive-models` end to end on the API: definitions held to their bounds,
training with its figures, scores, the customer profile, and the marketer's segment
"High likelihood to churn and was a Champion"."""

from __future__ import annotations

from datetime import timedelta

import orjson
import pytest
from sqlalchemy import text

from store import rfm_models, scoring
from tests.utils.api import api_harness, assert_error_shape
from tests.utils.predictions import T, load_known, model_body
from tests.utils.rfm import make_model

PATH = "/v1/predictive-models"


@pytest.fixture
def api(store_engine):
    with api_harness(store_engine) as harness:
        yield harness


def _refused(response, field: str, status: int = 422) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert_error_shape(body)
    fields = [body["error"]["field"], *[e.get("field") for e in body.get("errors", [])]]
    assert any(f is not None and f.startswith(field) for f in fields), body


def _count(engine, table: str) -> int:
    with engine.connect() as conn:
        return conn.execute(text(f"SELECT COUNT(*) FROM {table}")).scalar_one()


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"levels": {"medium": 0.7, "high": 0.6}}, "levels"),
        ({"levels": {"medium": 0, "high": 0.6}}, "levels.medium"),
        ({"target": {"event": "Purchase", "within": "PT5M"}}, "target.within"),
        ({"target": {"event": "Purchase", "within": "P9999D"}}, "target.within"),
        ({"target": {"event": "", "within": "P30D"}}, "target.event"),
        (
            {
                "target": {
                    "event": "Purchase",
                    "within": "P30D",
                    "where": [{"property": "sku", "op": "like", "value": "x"}],
                }
            },
            "target.where",
        ),
        ({"direction": "maybe"}, "direction"),
        ({"schedule": "PT5M"}, "schedule"),
        ({"snapshots": 0}, "snapshots"),
        ({"features": {"attributes": ["a..b"]}}, "features.attributes"),
        ({"slug": "Not A Slug"}, "slug"),
        ({"colour": "red"}, "colour"),
        ({"name": "x\u0000y"}, "name"),
    ],
)
def test_a_bad_definition_is_refused_naming_the_field_and_stores_nothing(api, changes, field):
    _refused(api.post(PATH, "marketer", json=model_body(**changes)), field)
    assert _count(api.engine, "prediction_models") == 0


def test_models_are_created_read_and_refused_by_role(api):
    created = api.post(PATH, "marketer", json=model_body())
    assert created.status_code == 201, created.text
    body = created.json()
    assert (body["slug"], body["version"], body["status"]) == ("buy-30d", 1, "untrained")
    assert body["target"] == {"event": "Purchase", "where": [], "within": "P30D"}
    assert api.post(PATH, "marketer", json=model_body()).status_code == 409
    assert api.post(PATH, "support", json=model_body(slug="other")).status_code == 403
    assert api.get(f"{PATH}/buy-30d", "support").json()["slug"] == "buy-30d"
    assert api.get(f"{PATH}/nope", "support").status_code == 404
    listed = api.get(f"{PATH}?limit=1", "marketer").json()
    assert [m["slug"] for m in listed["data"]] == ["buy-30d"] and listed["next_cursor"] is None


def test_a_schedule_needs_temporal_and_nothing_is_stored_without_it(api):
    refused = api.post(PATH, "marketer", json=model_body(schedule="P1D"))
    assert refused.status_code == 503, refused.text
    assert _count(api.engine, "prediction_models") == 0


def test_training_answers_its_figures_and_scores_everyone(api):
    assert api.post(PATH, "marketer", json=model_body()).status_code == 201
    early = api.post(f"{PATH}/buy-30d/train", "marketer", json={"as_of": T.isoformat()})
    _refused(early, "as_of", status=409)
    assert early.json()["error"]["code"] == "not_enough_history"
    future = api.post(f"{PATH}/buy-30d/train", "marketer", json={"as_of": "2199-01-01T00:00:00Z"})
    _refused(future, "as_of")
    _refused(api.post(f"{PATH}/buy-30d/train", "marketer", json={"as_of": "2026-01-01"}), "as_of")

    load_known(api.engine, customers=500, seed=21)
    trained = api.post(f"{PATH}/buy-30d/train", "marketer", json={"as_of": T.isoformat()})
    assert trained.status_code == 200, trained.text
    training = trained.json()
    report = training["report"]
    assert training["status"] in ("ok", "worse_than_rfm") and training["scored"] == 500
    assert report["horizon"] == "P30D" and report["holdout"]["rows"] > 0
    assert [b["method"] for b in report["baselines"]] == ["rfm_heuristic", "bgnbd"]
    for figures in (report["model"], *report["baselines"]):
        assert 0 <= figures["auc"] <= 1 and 0 <= figures["brier"] <= 1
        assert len(figures["calibration"]) == 10
        assert sum(b["customers"] for b in figures["calibration"]) == report["holdout"]["rows"]
    assert report["beats_rfm_heuristic"] == (training["status"] == "ok")
    assert report["holdout"]["cutoffs"] == [
        (T - timedelta(days=30)).isoformat().replace("+00:00", "Z")
    ]

    model = api.get(f"{PATH}/buy-30d", "marketer").json()
    assert model["status"] == training["status"]
    assert model["latest_training"]["id"] == training["id"]
    history = api.get(f"{PATH}/buy-30d/trainings", "marketer").json()["data"]
    assert [t["status"] for t in history] == [training["status"], "failed"]

    first = api.get(f"{PATH}/buy-30d/scores?limit=200", "support").json()
    second = api.get(
        f"{PATH}/buy-30d/scores?limit=400&cursor={first['next_cursor']}", "support"
    ).json()
    paged = first["data"] + second["data"]
    assert len(paged) == 500 and second["next_cursor"] is None
    streamed = api.get(
        f"{PATH}/buy-30d/scores", "support", headers={"accept": "application/x-ndjson"}
    )
    assert [orjson.loads(line) for line in streamed.text.splitlines()] == paged
    for row in paged:
        p = row["probability"]
        assert row["level"] == ("high" if p >= 0.6 else "medium" if p >= 0.3 else "low")

    customer = paged[7]["customer_id"]
    profile = api.get(f"/v1/customers/{customer}", "support").json()
    assert [(p["model"], p["probability"], p["level"]) for p in profile["predictions"]] == [
        ("buy-30d", paged[7]["probability"], paged[7]["level"])
    ]


def test_high_churn_champions_as_a_segment(api):
    load_known(api.engine, customers=500, seed=22)
    with api.engine.begin() as conn:
        rfm_models.create_model(conn, model=make_model(timeframe="P365D"), now=T)
        scoring.score_model(conn, model_slug="default", as_of=T)
    churn = model_body(
        slug="churn-30d",
        name="Will not purchase in 30 days",
        direction="churn",
        levels={"medium": 0.2, "high": 0.4},
    )
    assert api.post(PATH, "marketer", json=churn).status_code == 201
    trained = api.post(f"{PATH}/churn-30d/train", "marketer", json={"as_of": T.isoformat()})
    assert trained.status_code == 200, trained.text

    condition = {
        "all": [
            {"prediction": "churn-30d", "level": "high"},
            {"segment": "default:champions"},
        ]
    }
    preview = api.post(
        "/v1/segments/preview",
        "marketer",
        json={"condition": condition, "sample": 1000, "as_of": T.isoformat()},
    )
    assert preview.status_code == 200, preview.text
    with api.engine.connect() as conn:
        expected = set(
            conn.execute(
                text(
                    "SELECT s.customer_id FROM prediction_scores s JOIN segment_memberships m"
                    " ON m.customer_id = s.customer_id AND m.segment_slug = 'default:champions'"
                    " WHERE s.model_slug = 'churn-30d' AND s.probability >= 0.4"
                )
            ).scalars()
        )
    assert expected and set(preview.json()["sample"]) == expected

    # Used by a segment: the model cannot be deleted; a new threshold relevels at once.
    with api.engine.begin() as conn:
        from store.segments import create_segment

        create_segment(
            conn, slug="churning-champions", name="x", kind="rule", condition=condition, now=T
        )
    refused = api.client.delete(f"{PATH}/churn-30d", headers=api.headers("marketer"))
    _refused(refused, "slug", status=409)
    assert "segment churning-champions condition.all[0]" in refused.json()["error"]["message"]
    body = {k: v for k, v in churn.items() if k != "slug"}
    body["levels"] = {"medium": 0.2, "high": 0.9}
    assert (
        api.client.put(f"{PATH}/churn-30d", headers=api.headers("marketer"), json=body).status_code
        == 200
    )
    again = api.post(
        "/v1/segments/preview",
        "marketer",
        json={"condition": condition, "sample": 1000, "as_of": T.isoformat()},
    ).json()
    with api.engine.connect() as conn:
        strict = set(
            conn.execute(
                text(
                    "SELECT customer_id FROM prediction_scores"
                    " WHERE model_slug = 'churn-30d' AND probability >= 0.9"
                )
            ).scalars()
        )
    assert set(again["sample"]) == expected & strict
