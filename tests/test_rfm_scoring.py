"""The scoring definition of docs/rfm.md, on both databases, on hand-made data."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from store.rfm_models import create_model, update_model
from store.scoring import rescore_customers, score_model
from tests.utils.rfm import (
    EventRow,
    T,
    add_customers,
    add_events,
    generated_history,
    load,
    make_model,
    purchase,
    reference_scores,
)

DAY = timedelta(days=1)


def setup_model(engine: Engine, **changes) -> None:
    with engine.begin() as conn:
        create_model(conn, model=make_model(**changes), now=T)


def run_pass(engine: Engine, slug: str = "default", as_of: datetime = T):
    with engine.begin() as conn:
        return score_model(conn, model_slug=slug, as_of=as_of)


def scores(engine: Engine, slug: str = "default") -> dict[str, tuple]:
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT customer_id, recency_days, frequency, monetary, r, f, m, label"
                " FROM rfm_scores WHERE model_slug = :slug"
            ),
            {"slug": slug},
        ).all()
    return {row[0]: tuple(row[1:]) for row in rows}


def members(engine: Engine) -> set[tuple[str, str]]:
    with engine.connect() as conn:
        return set(
            conn.execute(text("SELECT segment_slug, customer_id FROM segment_memberships")).all()
        )


def transitions(engine: Engine) -> list[dict]:
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT segment_slug, customer_id, kind, source, context"
                " FROM segment_transitions ORDER BY id"
            )
        ).mappings()
        out = []
        for row in rows:
            item = dict(row)
            if isinstance(item["context"], str):
                item["context"] = json.loads(item["context"])
            out.append(item)
        return out


def test_ties_boundaries_and_labels(store_engine):
    setup_model(store_engine)
    load(
        store_engine,
        [
            purchase("c1", T - 1 * DAY, 50),
            purchase("c1", T - 10 * DAY, 50),
            purchase("c2", T - 1 * DAY - timedelta(hours=1), 100),
            purchase("c3", T - 30 * DAY, 10),
            purchase("c4", T - 100 * DAY, 999),  # before the window
            purchase("c5", T - 90 * DAY, 999),  # the window's open end
            purchase("c6", T, 20),  # its closed end
            purchase("c6", T + timedelta(microseconds=1), 999),  # after T
        ],
    )
    result = run_pass(store_engine)
    assert result.scored == 4
    # N = 4. Recency days 1, 1, 30, 0; frequency 2, 1, 1, 1; monetary 100, 100, 10, 20.
    assert scores(store_engine) == {
        "c1": (1, 2, 100.0, 2, 4, 3, "Needs Attention"),
        "c2": (1, 1, 100.0, 2, 1, 3, "At Risk"),
        "c3": (30, 1, 10.0, 1, 1, 1, "At Risk"),
        "c6": (0, 1, 20.0, 4, 1, 2, "Promising"),
    }
    assert result.entries == 4 and result.exits == 0
    assert members(store_engine) == {
        ("default:needs-attention", "c1"),
        ("default:at-risk", "c2"),
        ("default:at-risk", "c3"),
        ("default:promising", "c6"),
    }


def test_whole_days_are_floored_to_the_microsecond(store_engine):
    setup_model(store_engine)
    load(
        store_engine,
        [
            purchase("exact", T - 2 * DAY, 1),
            purchase("short", T - 2 * DAY + timedelta(microseconds=1), 1),
            purchase("long", T - 2 * DAY - timedelta(microseconds=1), 1),
            purchase("edge", T - 90 * DAY + timedelta(microseconds=1), 1),
        ],
    )
    run_pass(store_engine)
    days = {cid: row[0] for cid, row in scores(store_engine).items()}
    assert days == {"exact": 2, "short": 1, "long": 2, "edge": 89}


def test_a_single_customer_scores_ones(store_engine):
    setup_model(store_engine, segment_map="rfm11")
    load(store_engine, [purchase("only", T - 3 * DAY, 500), purchase("only", T - 2 * DAY, 500)])
    run_pass(store_engine)
    assert scores(store_engine) == {"only": (2, 2, 1000.0, 1, 1, 1, "Lost")}
    assert members(store_engine) == {("default:lost", "only")}


def test_everyone_equal_scores_ones(store_engine):
    setup_model(store_engine)
    load(store_engine, [purchase(f"c{i}", T - 5 * DAY, 30) for i in range(7)])
    run_pass(store_engine)
    assert {row[3:6] for row in scores(store_engine).values()} == {(1, 1, 1)}


def test_empty_window_scores_nobody_and_empties_the_segments(store_engine):
    setup_model(store_engine)
    load(store_engine, [purchase("a", T - 5 * DAY, 30), purchase("b", T - 6 * DAY, 30)])
    run_pass(store_engine)
    assert len(members(store_engine)) == 2
    later = T + 200 * DAY
    result = run_pass(store_engine, as_of=later)
    assert (result.scored, result.entries, result.exits) == (0, 0, 2)
    assert scores(store_engine) == {} and members(store_engine) == set()
    exits = [t for t in transitions(store_engine) if t["kind"] == "exited"]
    assert {t["customer_id"] for t in exits} == {"a", "b"}
    assert {t["source"] for t in exits} == {f"rfm-pass:{result.pass_id}"}


def test_monetary_counts_only_json_numbers(store_engine):
    setup_model(store_engine)
    load(
        store_engine,
        [
            purchase("mix", T - DAY, 12.5),
            purchase("mix", T - DAY, 3),
            purchase("mix", T - DAY, "42"),
            purchase("mix", T - DAY, True),
            purchase("mix", T - DAY, None),  # property missing
            EventRow("mix", "Purchase", T - DAY, {"total_price": None}),
            EventRow("mix", "Purchase", T - DAY, {"total_price": {"amount": 5}}),
            purchase("neg", T - DAY, -7.25),
        ],
    )
    run_pass(store_engine)
    got = scores(store_engine)
    assert got["mix"][1:3] == (7, 15.5)
    assert got["neg"][1:3] == (1, -7.25)


def test_targeting_excludes_customers_from_the_population(store_engine):
    from store.segments import compile_condition  # noqa: F401  (targeting needs the compiler)

    setup_model(store_engine, targeting={"attribute": "signed_up", "op": "eq", "value": True})
    with store_engine.begin() as conn:
        add_customers(
            conn,
            ["in1", "in2", "out1", "out2"],
            {"in1": {"signed_up": True}, "in2": {"signed_up": True}, "out1": {"signed_up": False}},
        )
        add_events(
            conn,
            [
                purchase("in1", T - 1 * DAY, 10),
                purchase("in2", T - 20 * DAY, 20),
                purchase("out1", T - 1 * DAY, 1000),
                purchase("out2", T - 1 * DAY, 1000),
            ],
            with_customers=False,
        )
    result = run_pass(store_engine)
    # N = 2, so the excluded customers do not push the others down.
    assert result.scored == 2
    got = scores(store_engine)
    assert set(got) == {"in1", "in2"}
    assert got["in1"][3:6] == (3, 1, 1) and got["in2"][3:6] == (1, 1, 3)


def test_recency_and_frequency_events_may_differ(store_engine):
    setup_model(store_engine, recency_event="Visit", frequency_event="Purchase")
    load(
        store_engine,
        [
            EventRow("visitor", "Visit", T - 2 * DAY),
            purchase("buyer", T - 3 * DAY, 10),
            purchase("both", T - 4 * DAY, 10),
            EventRow("both", "Visit", T - 1 * DAY),
            EventRow("other", "Signup", T - DAY),  # neither event: not scored
        ],
    )
    run_pass(store_engine)
    got = scores(store_engine)
    assert set(got) == {"visitor", "buyer", "both"}
    # A customer with no recency event in the window counts as old as the window.
    assert {cid: row[:3] for cid, row in got.items()} == {
        "visitor": (2, 0, 0.0),
        "buyer": (90, 1, 10.0),
        "both": (1, 1, 10.0),
    }


def test_a_rerun_writes_no_transitions_and_changes_are_transitions(store_engine):
    setup_model(store_engine)
    load(store_engine, [purchase("a", T - DAY, 100), purchase("b", T - 50 * DAY, 1)])
    first = run_pass(store_engine)
    before = transitions(store_engine)
    second = run_pass(store_engine)
    assert (second.entries, second.exits) == (0, 0)
    assert transitions(store_engine) == before
    assert second.pass_id != first.pass_id
    # Rows the second pass did not change still name the pass that wrote them.
    with store_engine.connect() as conn:
        kept = set(conn.execute(text("SELECT pass_id FROM rfm_scores")).scalars())
    assert kept == {first.pass_id}
    entry = before[0]
    assert entry["kind"] == "entered" and entry["source"] == f"rfm-pass:{first.pass_id}"
    assert set(entry["context"]) == {"model", "pass_id", "r", "f", "m", "label"}
    assert entry["context"]["model"] == "default" and entry["context"]["pass_id"] == first.pass_id

    # "b" buys a lot: a and b swap places.
    load(store_engine, [purchase("b", T - timedelta(hours=1), 500) for _ in range(3)])
    third = run_pass(store_engine)
    assert third.entries >= 1 and third.exits >= 1
    new = transitions(store_engine)[len(before) :]
    assert {t["source"] for t in new} == {f"rfm-pass:{third.pass_id}"}
    got = scores(store_engine)
    for t in new:
        if t["kind"] == "entered":
            assert t["context"]["label"] == got[t["customer_id"]][6]


def test_a_failed_pass_leaves_the_previous_state_whole(store_engine):
    setup_model(store_engine)
    load(store_engine, [purchase("a", T - DAY, 100), purchase("b", T - 50 * DAY, 1)])
    run_pass(store_engine)
    state = (scores(store_engine), members(store_engine), transitions(store_engine))
    load(store_engine, [purchase("c", T - DAY, 1000)])

    def crash(done: int, total: int, step: str) -> None:
        if step == "recording the pass":
            raise RuntimeError("worker died")

    with pytest.raises(RuntimeError), store_engine.begin() as conn:
        score_model(conn, model_slug="default", as_of=T, progress=crash)
    assert (scores(store_engine), members(store_engine), transitions(store_engine)) == state
    rerun = run_pass(store_engine)
    assert "c" in scores(store_engine) and rerun.entries >= 1


def test_unknown_model_is_not_found(store_engine):
    from core.errors import NotFound

    with pytest.raises(NotFound), store_engine.begin() as conn:
        score_model(conn, model_slug="nope", as_of=T)


def test_scores_match_the_reference_on_generated_data(store_engine):
    customers, events = generated_history(customers=400, seed=11)
    setup_model(store_engine, segment_map="rfm11")
    load(store_engine, events, customers)
    run_pass(store_engine)
    expected = reference_scores(events, make_model(segment_map="rfm11"), T)
    got = scores(store_engine)
    assert set(got) == set(expected)
    for cid, exp in expected.items():
        days, freq, money, r, f, m, label = got[cid]
        assert (days, freq, r, f, m, label) == (
            exp.recency_days,
            exp.frequency,
            exp.r,
            exp.f,
            exp.m,
            exp.label,
        ), cid
        assert (
            Decimal(str(money)) == exp.monetary.quantize(Decimal("0.01"))
            or abs(money - float(exp.monetary)) < 1e-6
        )


def test_sqlite_and_postgres_agree_on_thousands_of_customers(sqlite_engine, postgres_engine):
    customers, events = generated_history(customers=3000, seed=3)
    results = []
    for engine in (sqlite_engine, postgres_engine):
        setup_model(engine, segment_map="rfm11", recency_event="Visit")
        load(engine, events, customers)
        result = run_pass(engine)
        results.append((result.scored, result.entries, scores(engine), members(engine)))
    (n1, e1, s1, m1), (n2, e2, s2, m2) = results
    assert n1 == n2 > 1000 and e1 == e2 == n1
    assert s1.keys() == s2.keys()
    for cid in s1:
        a, b = s1[cid], s2[cid]
        assert a[:2] == b[:2] and a[3:] == b[3:], cid
        assert abs(a[2] - b[2]) < 1e-9, cid
    assert m1 == m2
    expected = reference_scores(events, make_model(segment_map="rfm11", recency_event="Visit"), T)
    assert {cid: (e.r, e.f, e.m, e.label) for cid, e in expected.items()} == {
        cid: row[3:] for cid, row in s1.items()
    }


def test_realtime_rescoring_moves_a_customer_and_writes_the_transition(store_engine):
    setup_model(store_engine, realtime=True)
    load(
        store_engine,
        [purchase(f"c{i}", T - (i + 1) * DAY, 10 * (i + 1)) for i in range(10)]
        + [purchase("c0", T - 2 * DAY, 5)],
    )
    first = run_pass(store_engine)
    before = scores(store_engine)
    assert before["c9"][6] == "At Risk"
    # c9 (oldest, 1 purchase) buys twice, big, just after the pass.
    now = T + timedelta(hours=1)
    load(store_engine, [purchase("c9", T + timedelta(minutes=30), 1000) for _ in range(2)])
    with store_engine.begin() as conn:
        changed = rescore_customers(conn, customer_ids=["c9"], now=now)
    assert changed == 1
    after = scores(store_engine)
    # Against the pass's cut-points: 0 days beats everyone, 3 purchases and 1100 the most.
    assert after["c9"] == (0, 3, 2100.0, 5, 5, 5, "Champions")
    assert {k: v for k, v in after.items() if k != "c9"} == {
        k: v for k, v in before.items() if k != "c9"
    }
    new = [t for t in transitions(store_engine) if t["source"] != f"rfm-pass:{first.pass_id}"]
    assert [(t["segment_slug"], t["kind"]) for t in new] == [
        ("default:at-risk", "exited"),
        ("default:champions", "entered"),
    ]
    assert {t["source"] for t in new} == {f"rfm-realtime:{first.pass_id}"}
    assert new[1]["context"]["label"] == "Champions"
    # Nothing new: nothing changes.
    with store_engine.begin() as conn:
        assert rescore_customers(conn, customer_ids=["c9"], now=now) == 0
    assert len(transitions(store_engine)) == len(new) + first.entries


def test_realtime_scores_a_newcomer_and_drops_one_who_left_the_window(store_engine):
    setup_model(store_engine, realtime=True)
    load(store_engine, [purchase(f"c{i}", T - (i + 1) * DAY, 10) for i in range(5)])
    run_pass(store_engine)
    load(store_engine, [purchase("new", T + timedelta(minutes=1), 10)])
    with store_engine.begin() as conn:
        # 86 days later c4 (5 days old at T) has left the 90-day window.
        changed = rescore_customers(conn, customer_ids=["new", "c4", "ghost"], now=T + 86 * DAY)
    assert changed == 2
    got = scores(store_engine)
    assert "c4" not in got and "new" in got
    assert not any(cid == "c4" for _, cid in members(store_engine))


def test_realtime_ignores_models_without_the_flag_or_a_pass(store_engine):
    setup_model(store_engine, realtime=False)
    load(store_engine, [purchase("a", T - DAY, 10)])
    run_pass(store_engine)
    with store_engine.begin() as conn:
        create_model(conn, model=make_model(slug="fresh", realtime=True), now=T)
        assert rescore_customers(conn, customer_ids=["a"], now=T) == 0
    assert set(scores(store_engine, "fresh")) == set()


def test_rule_segments_naming_a_label_follow_the_pass(store_engine):
    from store.segments import create_segment

    setup_model(store_engine)
    with store_engine.begin() as conn:
        create_segment(
            conn,
            slug="at-risk-buyers",
            name="At risk",
            kind="rule",
            condition={"segment": "default:at-risk"},
            now=T,
        )
    load(store_engine, [purchase("a", T - DAY, 100), purchase("b", T - 50 * DAY, 1)])
    run_pass(store_engine)
    at_risk = {cid for slug, cid in members(store_engine) if slug == "default:at-risk"}
    assert (
        at_risk
        and {cid for slug, cid in members(store_engine) if slug == "at-risk-buyers"} == at_risk
    )


def label_members(engine: Engine, slug: str = "default") -> set[tuple[str, str]]:
    """The label memberships the model's stored scores call for."""
    from core.rfm import segment_slug

    return {(segment_slug(slug, row[6]), cid) for cid, row in scores(engine, slug).items()}


def test_a_pass_moves_only_relabelled_customers_one_exit_and_one_entry_each(store_engine):
    from core.rfm import segment_slug

    customers, events = generated_history(customers=300, seed=5)
    setup_model(store_engine, segment_map="rfm11")
    load(store_engine, events, customers)
    run_pass(store_engine)
    before = {cid: row[6] for cid, row in scores(store_engine).items()}
    # Three days on: some customers leave the window, a newcomer and a few buyers move.
    later = T + 3 * DAY
    load(
        store_engine,
        [purchase("newcomer", later - DAY, 40)]
        + [purchase(cid, later - DAY, 300) for cid in sorted(before)[:20:4]],
        ["newcomer"],
    )
    second = run_pass(store_engine, as_of=later)
    after = {cid: row[6] for cid, row in scores(store_engine).items()}
    relabelled = {cid for cid in before.keys() | after.keys() if before.get(cid) != after.get(cid)}
    # The data must exercise every case: kept labels, new labels, newcomers, leavers.
    assert before.keys() & after.keys() - relabelled
    assert "newcomer" in relabelled and before.keys() - after.keys()
    assert any(cid in before and cid in after for cid in relabelled)
    expected = sorted(
        [(segment_slug("default", before[c]), c, "exited") for c in relabelled if c in before]
        + [(segment_slug("default", after[c]), c, "entered") for c in relabelled if c in after]
    )
    written = [
        (t["segment_slug"], t["customer_id"], t["kind"])
        for t in transitions(store_engine)
        if t["source"] == f"rfm-pass:{second.pass_id}"
    ]
    assert sorted(written) == expected
    assert (second.exits, second.entries) == (
        sum(1 for c in relabelled if c in before),
        sum(1 for c in relabelled if c in after),
    )
    assert members(store_engine) == label_members(store_engine)


def test_a_version_restoring_a_label_gives_it_back_its_members(store_engine):
    # Version 2 drops "Old" (its members exit, their scores keep the label); version 3
    # brings it back: the next pass must refill it though no stored label changes.
    two_labels = {"rules": [{"label": "Recent", "r": [3, 5]}, {"label": "Old"}]}
    other = {"rules": [{"label": "Recent", "r": [3, 5]}, {"label": "Other"}]}
    setup_model(store_engine, segment_map=two_labels)
    load(store_engine, [purchase(f"c{i}", T - (i * 10 + 1) * DAY, 10) for i in range(6)])
    run_pass(store_engine)
    assert {cid for slug, cid in members(store_engine) if slug == "default:old"}
    for segment_map in (other, two_labels):
        with store_engine.begin() as conn:
            update_model(
                conn, slug="default", definition=make_model(segment_map=segment_map), now=T
            )
    assert not any(slug == "default:old" for slug, _ in members(store_engine))
    again = run_pass(store_engine)
    assert again.entries == 3 and again.exits == 0
    assert members(store_engine) == label_members(store_engine)


def test_a_first_pass_leaves_postgres_statistics_that_count_its_rows(postgres_engine):
    # Until autovacuum gets to them, the planner would take the freshly filled tables
    # for empty and plan every real-time rescoring and the next pass accordingly.
    setup_model(postgres_engine)
    load(postgres_engine, [purchase(f"c{i}", T - (i + 1) * DAY, 10) for i in range(40)])
    first = run_pass(postgres_engine)

    def estimates() -> dict[str, float]:
        with postgres_engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT relname, reltuples FROM pg_class WHERE oid IN"
                    " (CAST('rfm_scores' AS regclass), CAST('segment_memberships' AS regclass))"
                )
            ).all()
        return dict(rows)

    assert estimates() == {"rfm_scores": first.scored, "segment_memberships": first.entries}
    # A pass that inserts no more rows than the statistics count leaves them alone.
    load(postgres_engine, [purchase("late", T - DAY, 10)])
    run_pass(postgres_engine)
    assert estimates() == {"rfm_scores": 40, "segment_memberships": 40}


def test_score_pages_keep_room_for_the_next_pass_on_postgres(postgres_engine):
    # A day later a pass rewrites nearly every row: with room on the page the new
    # version is a heap-only update that touches no index (migration 0002).
    with postgres_engine.connect() as conn:
        options = conn.execute(
            text("SELECT reloptions FROM pg_class WHERE oid = CAST('rfm_scores' AS regclass)")
        ).scalar_one()
    assert options == ["fillfactor=50"]


def test_passes_one_after_another_on_one_pooled_connection(postgres_engine: Engine) -> None:
    # A session that has used a temp table can no longer change temp_buffers: a later
    # pass on the same pooled connection must still run.
    from sqlalchemy import create_engine
    from sqlalchemy.pool import StaticPool

    single = create_engine(postgres_engine.url, poolclass=StaticPool)
    setup_model(single)
    load(single, [purchase("a", T - DAY, 10.0), purchase("b", T - 2 * DAY, 20.0)])
    with single.begin() as conn:  # other work on the same session used a temp table
        conn.execute(text("CREATE TEMP TABLE IF NOT EXISTS scratch (x int)"))
        conn.execute(text("INSERT INTO scratch VALUES (1)"))
    first = run_pass(single)
    second = run_pass(single, as_of=T + DAY)
    assert (first.scored, second.scored) == (2, 2)
    single.dispose()
