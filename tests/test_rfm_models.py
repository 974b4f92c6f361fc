"""Model definitions: segment maps, their validation, and the store's model lifecycle."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from sqlalchemy import text

from core.errors import Conflict, NotFound
from core.rfm import (
    RFM11,
    SEED5,
    CustomSegmentMap,
    RfmModelDefinition,
    cell_labels,
    label_slug,
    segment_slug,
)
from store.rfm_models import (
    create_model,
    customer_scores,
    delete_model,
    get_model,
    list_models,
    update_model,
)
from store.scoring import score_model
from tests.utils.rfm import T, load, make_model, model_body, purchase

# The rfm11 grid of docs/rfm.md, row by row (R 5 down to 1), FM 1..5 across.
RFM11_TABLE = {
    5: ["New Customers", "Potential Loyalist", "Loyal Customers", "Champions", "Champions"],
    4: ["New Customers", "Potential Loyalist", "Loyal Customers", "Champions", "Champions"],
    3: ["Promising", "Potential Loyalist", "Need Attention", "Loyal Customers", "Loyal Customers"],
    2: ["Hibernating", "About To Sleep", "Need Attention", "At Risk", "At Risk"],
    1: ["Lost", "Hibernating", "At Risk", "Can't Lose Them", "Can't Lose Them"],
}


def test_rfm11_is_the_grid_of_the_contract():
    labels = cell_labels(RFM11)
    for (r, f, m), label in labels.items():
        fm = -(-(f + m) // 2)
        assert label == RFM11_TABLE[r][fm - 1], (r, f, m)
    assert {label_slug(label) for label in labels.values()} == {
        "champions",
        "loyal-customers",
        "potential-loyalist",
        "new-customers",
        "promising",
        "need-attention",
        "about-to-sleep",
        "at-risk",
        "can-t-lose-them",
        "hibernating",
        "lost",
    }


@pytest.mark.parametrize(
    ("cell", "label"),
    [
        ((5, 5, 4), "Champions"),
        ((4, 3, 5), "Regulars"),
        ((2, 5, 3), "Needs Attention"),
        ((2, 5, 2), "At Risk"),
        ((1, 1, 1), "At Risk"),
        ((3, 2, 5), "Promising"),
        ((5, 3, 2), "Promising"),
        ((3, 3, 3), "Regulars"),
    ],
)
def test_seed5_first_match_wins(cell, label):
    assert cell_labels(SEED5)[cell] == label


def test_shipped_maps_cover_every_cell():
    CustomSegmentMap(rules=list(SEED5))
    CustomSegmentMap(rules=list(RFM11))


def test_an_uncovered_cell_is_named():
    rules = [{"label": "Top", "r": [3, 5]}, {"label": "Low", "r": [1, 2], "f": [2, 5]}]
    body = model_body(segment_map={"rules": rules})
    del body["slug"]
    with pytest.raises(ValidationError) as info:
        RfmModelDefinition.model_validate(body)
    errors = [e for e in info.value.errors() if e["type"] == "uncovered_cell"]
    assert errors and errors[0]["msg"] == "cell R1 F1 M1 matches no rule"
    assert errors[0]["loc"][0] == "segment_map" and errors[0]["loc"][-1] == "rules"


def test_a_gap_in_fm_is_found():
    rules = [{"label": "A", "fm": [1, 2]}, {"label": "B", "fm": [4, 5]}]
    with pytest.raises(ValidationError, match="cell R1 F1 M4 matches no rule"):
        CustomSegmentMap.model_validate({"rules": rules})


def test_custom_rules_are_checked():
    for bad in (
        {"rules": []},
        {"rules": [{"label": "A", "r": [4, 2]}]},
        {"rules": [{"label": "A", "r": [0, 5]}]},
        {"rules": [{"label": "A", "x": [1, 5]}]},
        {"rules": [{"label": "At Risk"}, {"label": "at risk"}]},
        {"rules": [{"label": "'"}]},
    ):
        with pytest.raises(ValidationError):
            CustomSegmentMap.model_validate(bad)
    custom = CustomSegmentMap.model_validate(
        {"rules": [{"label": "VIP", "r": [5, 5], "m": [5, 5]}, {"label": "Everyone"}]}
    )
    assert cell_labels(tuple(custom.rules))[(5, 1, 5)] == "VIP"
    assert cell_labels(tuple(custom.rules))[(4, 5, 5)] == "Everyone"


def test_definition_fields_are_validated():
    with pytest.raises(ValidationError) as info:
        make_model(timeframe="90 days", schedule="PT1S", slug="Bad Slug", segment_map="rfm12")
    fields = {e["loc"][0] for e in info.value.errors()}
    assert {"timeframe", "schedule", "slug", "segment_map"} <= fields


def test_segment_slugs():
    assert segment_slug("default", "Can't Lose Them") == "default:can-t-lose-them"
    assert segment_slug("default", "Needs Attention") == "default:needs-attention"


def _segments(engine) -> dict[str, tuple]:
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT slug, kind, model_slug FROM segments")).all()
    return {row[0]: tuple(row[1:]) for row in rows}


def test_model_lifecycle_keeps_versions_and_segments(store_engine):
    with store_engine.begin() as conn:
        created = create_model(conn, model=make_model(), now=T)
    assert created.version == 1
    assert _segments(store_engine) == {
        f"default:{s}": ("rfm", "default")
        for s in ("champions", "needs-attention", "at-risk", "regulars", "promising")
    }
    load(store_engine, [purchase("a", T, 10), purchase("b", T, 10)])
    with store_engine.begin() as conn:
        score_model(conn, model_slug="default", as_of=T)
        assert [s.label for s in customer_scores(conn, customer_id="a")] == ["At Risk"]
        with pytest.raises(Conflict):
            create_model(conn, model=make_model(), now=T)

    # Version 2 switches to rfm11: seed5-only labels disappear, their members exit.
    with store_engine.begin() as conn:
        updated = update_model(
            conn, slug="default", definition=make_model(segment_map="rfm11"), now=T
        )
    assert updated.version == 2
    segments = _segments(store_engine)
    assert "default:regulars" not in segments and "default:can-t-lose-them" in segments
    assert "default:at-risk" in segments  # shared by both maps
    with store_engine.connect() as conn:
        versions = conn.execute(
            text("SELECT version FROM rfm_model_versions WHERE slug = 'default' ORDER BY version")
        ).scalars()
        assert list(versions) == [1, 2]
        assert [m.slug for m in list_models(conn)] == ["default"]
        assert get_model(conn, slug="default").definition.segment_map == "rfm11"

    with store_engine.begin() as conn:
        exits = delete_model(conn, slug="default", now=T)
    assert exits == 2
    assert _segments(store_engine) == {}
    with store_engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM rfm_scores")).scalar_one() == 0
        assert conn.execute(text("SELECT COUNT(*) FROM segment_memberships")).scalar_one() == 0
        kinds = conn.execute(
            text("SELECT kind, COUNT(*) FROM segment_transitions GROUP BY kind")
        ).all()
        assert dict(kinds) == {"entered": 2, "exited": 2}
        with pytest.raises(NotFound):
            get_model(conn, slug="default")


def test_label_segments_do_not_take_over_other_segments(store_engine):
    with store_engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO segments (slug, name, kind, version, created_at, updated_at)"
                " VALUES ('default:champions', 'mine', 'rule', 1, '2026-01-01', '2026-01-01')"
            )
        )
    with pytest.raises(Conflict) as info, store_engine.begin() as conn:
        create_model(conn, model=make_model(), now=T)
    assert info.value.field == "segment_map"
