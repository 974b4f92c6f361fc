"""Referential integrity: a segment, an RFM model or a template still in use is not
deleted (nor a model's map changed so a used label goes): 409 `in_use` naming every user,
and nothing changes. RFM pass ids are never given out twice (migration 0007)."""

from __future__ import annotations

import threading
from typing import Any

from sqlalchemy import text

from core.errors import Conflict
from store import rfm_models as model_store
from store import segments as segment_store
from store.journeys import activate_journey, create_journey, pause_journey, put_journey
from store.references import Reference, segment_users, template_users
from store.scoring import score_model
from tests.test_journeys_api import add_segments, definition
from tests.test_store_smoke import _migrate
from tests.utils.api import api_harness
from tests.utils.rfm import T, load, make_model, model_body, purchase
from tests.utils.segments import NOW, add_customer

JOURNEY = "champions-nurture"
TEMPLATE_SOURCE = (
    "{% block subject %}Winter{% endblock %}"
    '{% block html %}<p><a href="https://shop.example.com/winter">Shop</a></p>{% endblock %}'
)


def errors_of(response) -> list[dict[str, Any]]:
    body = response.json()
    return body.get("errors", [body["error"]])


def in_use(response) -> list[str]:
    """The messages of a 409 `in_use`, after checking every error is one."""
    assert response.status_code == 409, response.text
    errors = errors_of(response)
    assert {e["code"] for e in errors} == {"in_use"}
    assert response.json()["error"] == errors[0]
    return [e["message"] for e in errors]


def archive(api, slug: str = JOURNEY) -> None:
    archived = api.post(f"/v1/journeys/{slug}/archive", role="marketer", json={"runs": "finish"})
    assert archived.status_code == 200, archived.text


def test_a_segment_a_journey_triggers_on_stays_until_the_journey_is_archived(
    store_engine, temporal_address
):
    with api_harness(store_engine, temporal_address=temporal_address) as api:
        created = api.post(
            "/v1/segments",
            role="marketer",
            json={"slug": "vip-list", "name": "VIP", "owner": "external"},
        )
        assert created.status_code == 201, created.text
        entered = api.post(
            "/v1/segments/vip-list/entries", role="ingest", json={"customer_ids": ["c1"]}
        )
        assert entered.status_code == 200, entered.text
        raw = definition(trigger={"segment": "vip-list"})
        assert api.post("/v1/journeys", role="marketer", json=raw).status_code == 201
        assert api.post(f"/v1/journeys/{JOURNEY}/activate", role="marketer").status_code == 200
        second = api.client.put(
            f"/v1/journeys/{JOURNEY}", headers=api.headers("marketer"), json=raw
        )
        assert second.status_code == 200, second.text

        refused = api.client.delete("/v1/segments/vip-list", headers=api.headers("marketer"))
        # The active version and the draft that activate would check again.
        assert in_use(refused) == [
            f"segment 'vip-list' is used by journey {JOURNEY} (active, v1) trigger",
            f"segment 'vip-list' is used by journey {JOURNEY} (draft, v2) trigger",
        ]
        assert {e["field"] for e in errors_of(refused)} == {"slug"}
        assert api.get("/v1/segments/vip-list", role="marketer").status_code == 200
        members = api.get("/v1/segments/vip-list/members", role="marketer").json()["data"]
        assert [m["customer_id"] for m in members] == ["c1"]

        archive(api)
        deleted = api.client.delete("/v1/segments/vip-list", headers=api.headers("marketer"))
        assert deleted.status_code == 204, deleted.text
        assert api.get("/v1/segments/vip-list", role="marketer").status_code == 404


def test_a_segment_another_segment_or_a_model_names_is_not_deleted(store_engine, temporal_address):
    add_customer(store_engine, "c1", {"total_spent": 900})
    with store_engine.begin() as conn:
        for slug, condition in (
            ("big-spenders", {"attribute": "total_spent", "op": "gt", "value": 500}),
            (
                "high-value",
                {"all": [{"segment": "big-spenders"}, {"attribute": "email", "op": "exists"}]},
            ),
        ):
            segment_store.create_segment(
                conn, slug=slug, name=slug, kind="rule", now=NOW, condition=condition
            )
        segment_store.evaluate_segment(conn, slug="big-spenders", now=NOW)
    with api_harness(store_engine, temporal_address=temporal_address) as api:
        model = api.post(
            "/v1/rfm-models",
            role="marketer",
            json=model_body(targeting={"not": {"segment": "big-spenders"}}),
        )
        assert model.status_code == 201, model.text

        refused = api.client.delete("/v1/segments/big-spenders", headers=api.headers("marketer"))
        assert in_use(refused) == [
            "segment 'big-spenders' is used by segment high-value condition.all[0]",
            "segment 'big-spenders' is used by RFM model default targeting.not",
        ]
        members = api.get("/v1/segments/big-spenders/members", role="marketer").json()["data"]
        assert [m["customer_id"] for m in members] == ["c1"]


def test_a_model_whose_label_a_journey_uses_is_neither_deleted_nor_loses_the_label(
    store_engine,
    temporal_address,
):
    with api_harness(store_engine, temporal_address=temporal_address) as api:
        assert api.post("/v1/rfm-models", role="marketer", json=model_body()).status_code == 201
        assert api.post("/v1/journeys", role="marketer", json=definition()).status_code == 201
        assert api.post(f"/v1/journeys/{JOURNEY}/activate", role="marketer").status_code == 200
        assert api.post(f"/v1/journeys/{JOURNEY}/pause", role="marketer").status_code == 200

        refused = api.client.delete("/v1/rfm-models/default", headers=api.headers("marketer"))
        assert in_use(refused) == [
            f"segment 'default:champions' is used by journey {JOURNEY} (paused, v1) trigger"
        ]
        assert api.get("/v1/rfm-models/default", role="marketer").status_code == 200
        assert api.get("/v1/segments/default:champions", role="marketer").status_code == 200

        update = {k: v for k, v in model_body().items() if k != "slug"}
        update["segment_map"] = {"rules": [{"label": "Everyone"}]}
        changed = api.client.put(
            "/v1/rfm-models/default", headers=api.headers("marketer"), json=update
        )
        assert in_use(changed) == [
            f"segment 'default:champions' is used by journey {JOURNEY} (paused, v1) trigger"
        ]
        assert changed.json()["error"]["field"] == "segment_map"
        stored = api.get("/v1/rfm-models/default", role="marketer").json()
        assert (stored["version"], stored["segment_map"]) == (1, "seed5")
        assert api.get("/v1/segments/default:regulars", role="marketer").status_code == 200

        # Dropping only labels nobody uses is fine.
        update["segment_map"] = {"rules": [{"label": "Champions", "r": [4, 5]}, {"label": "Rest"}]}
        kept = api.client.put(
            "/v1/rfm-models/default", headers=api.headers("marketer"), json=update
        )
        assert kept.status_code == 200, kept.text
        assert kept.json()["segments"] == ["default:champions", "default:rest"]

        archive(api)
        deleted = api.client.delete("/v1/rfm-models/default", headers=api.headers("marketer"))
        assert deleted.status_code == 200, deleted.text


def test_a_template_a_journey_sends_is_not_deleted(store_engine, temporal_address):
    add_segments(store_engine)
    with api_harness(store_engine, temporal_address=temporal_address) as api:
        for path in ("winter/sale.html", "champions/welcome.html"):
            saved = api.post(
                "/v1/templates", role="marketer", json={"path": path, "source": TEMPLATE_SOURCE}
            )
            assert saved.status_code == 201, saved.text
        raw = definition()
        raw["steps"]["vip"]["template"] = "winter/sale.html"
        assert api.post("/v1/journeys", role="marketer", json=raw).status_code == 201

        refused = api.client.delete(
            "/v1/templates/winter/sale.html", headers=api.headers("marketer")
        )
        assert in_use(refused) == [
            f"template 'winter/sale.html' is used by journey {JOURNEY} (draft, v1)"
            " steps.vip.template"
        ]
        assert refused.json()["error"]["field"] == "path"
        assert api.get("/v1/templates/winter/sale.html", role="marketer").json()["origin"] == "api"

        # The shipped file of the same path takes over: nothing breaks.
        shadow = api.client.delete(
            "/v1/templates/champions/welcome.html", headers=api.headers("marketer")
        )
        assert shadow.status_code == 204, shadow.text

        archive(api)
        deleted = api.client.delete(
            "/v1/templates/winter/sale.html", headers=api.headers("marketer")
        )
        assert deleted.status_code == 204, deleted.text


def test_users_are_typed_records_for_every_kind_of_reference(store_engine):
    with store_engine.begin() as conn:
        for slug in ("default:champions", "vip"):
            segment_store.create_segment(conn, slug=slug, name=slug, kind="external", now=NOW)
        raw = definition(slug="branchy")
        raw["steps"]["pause"] = {
            "type": "branch",
            "branches": [
                {
                    "condition": {"any": [{"attribute": "x", "op": "exists"}, {"segment": "vip"}]},
                    "next": "recs",
                }
            ],
            "default": None,
        }
        create_journey(conn, raw=raw)
        activate_journey(conn, slug="branchy")
        pause_journey(conn, slug="branchy")
        put_journey(conn, slug="branchy", raw=definition(slug="branchy"))
        uses = segment_users(conn, slugs=["vip"])
        templates = template_users(conn, path="champions/recommendations.html")
    assert uses == [
        Reference(
            target_kind="segment",
            target="vip",
            user_kind="journey",
            user="branchy",
            path="steps.pause.branches[0].condition.any[1]",
            journey_state="paused",
            journey_version=1,
        )
    ]
    assert [(r.journey_state, r.journey_version, r.path) for r in templates] == [
        ("paused", 1, "steps.recs.template"),
        ("draft", 2, "steps.recs.template"),
    ]


def _pass_ids(engine, model: str = "default") -> list[int]:
    ids = []
    for day in range(2):
        with engine.begin() as conn:
            ids.append(score_model(conn, model_slug=model, as_of=T.replace(day=10 + day)).pass_id)
    return ids


def test_pass_ids_are_not_given_out_again_after_a_model_is_deleted(store_engine):
    load(
        store_engine,
        [purchase("c1", T.replace(day=1), 10.0), purchase("c2", T.replace(day=2), 20.0)],
    )
    with store_engine.begin() as conn:
        model_store.create_model(conn, model=make_model(), now=T)
        model_store.create_model(conn, model=make_model(slug="other"), now=T)
    before = _pass_ids(store_engine) + _pass_ids(store_engine, "other")
    for _ in range(2):
        with store_engine.begin() as conn:
            model_store.delete_model(conn, slug="other", now=T)
            model_store.delete_model(conn, slug="default", now=T)
            model_store.create_model(conn, model=make_model(), now=T)
            model_store.create_model(conn, model=make_model(slug="other"), now=T)
        after = _pass_ids(store_engine, "other") + _pass_ids(store_engine)
        assert min(after) > max(before), (before, after)
        before += after


def _passes_autoincrement(engine) -> bool:
    with engine.connect() as conn:
        sql = conn.execute(
            text("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'rfm_passes'")
        ).scalar_one()
    return "AUTOINCREMENT" in sql.upper()


def test_the_pass_id_migration_starts_past_every_cited_pass_and_reverses(store_engine):
    sqlite = store_engine.dialect.name == "sqlite"
    if sqlite:
        assert _passes_autoincrement(store_engine)
    _migrate(store_engine, "0006")
    if sqlite:
        assert not _passes_autoincrement(store_engine)
    # History from before 0007: passes deleted with their model, cited by transitions
    # (and a live pass row written with an explicit id).
    with store_engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO segment_transitions (segment_slug, customer_id, kind, source,"
                " context, occurred_at) VALUES ('gone:champions', 'c1', 'entered', :source,"
                " '{}', CURRENT_TIMESTAMP)"
            ),
            [{"source": "rfm-pass:480"}, {"source": "rfm-realtime:650"}, {"source": "api"}],
        )
        conn.execute(
            text(
                "INSERT INTO rfm_passes (id, model_slug, model_version, as_of, started_at,"
                " scored, entries, exits, cutpoints) VALUES (7, 'old', 1, CURRENT_TIMESTAMP,"
                " CURRENT_TIMESTAMP, 0, 0, 0, '{}')"
            )
        )
    _migrate(store_engine, "head")
    if sqlite:
        assert _passes_autoincrement(store_engine)
    with store_engine.connect() as conn:
        kept = conn.execute(text("SELECT model_slug FROM rfm_passes WHERE id = 7")).scalar_one()
        index = conn.execute(
            text("SELECT 1 FROM rfm_passes WHERE model_slug = 'old' ORDER BY id DESC LIMIT 1")
        )
    assert kept == "old" and index.first() is not None
    load(store_engine, [purchase("c1", T.replace(day=1), 10.0)])
    with store_engine.begin() as conn:
        model_store.create_model(conn, model=make_model(), now=T)
    assert min(_pass_ids(store_engine)) > 650


def test_a_delete_waits_for_a_journey_being_saved_on_the_segment(postgres_engine):
    with postgres_engine.begin() as conn:
        segment_store.create_segment(conn, slug="vip-list", name="VIP", kind="external", now=NOW)
    outcome: list[BaseException | None] = []

    def delete() -> None:
        try:
            with postgres_engine.begin() as conn:
                segment_store.delete_segment(conn, slug="vip-list")
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 (the outcome is the test's to judge)
            outcome.append(exc)

    saving = postgres_engine.connect()
    deleting = threading.Thread(target=delete)
    try:
        transaction = saving.begin()
        create_journey(saving, raw=definition(trigger={"segment": "vip-list"}))
        deleting.start()
        deleting.join(timeout=1)
        assert deleting.is_alive(), f"the delete did not wait: {outcome}"
        transaction.commit()
    finally:
        saving.close()  # rolls back what is not committed: the schema can then be dropped
        if deleting.ident is not None:
            deleting.join(timeout=30)
    assert len(outcome) == 1 and isinstance(outcome[0], Conflict), outcome
    assert outcome[0].code == "in_use"
    with postgres_engine.connect() as conn:
        assert segment_store.get_segment(conn, slug="vip-list").slug == "vip-list"
