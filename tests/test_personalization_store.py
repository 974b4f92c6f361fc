"""Personalisation campaigns in the store, on SQLite and PostgreSQL: lifecycle and
versions, the one-statement decision, views merged into one row per customer and
experience, and analytics (conversions once per customer within the window after the
first view, the value property, lift over the control of the same audience)."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import time
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from sqlalchemy import inspect, text

from core.errors import Conflict, NotFound, ValidationFailed
from core.statistics import Arm, compare
from core.tables import utcnow
from store.personalization import (
    ViewRecord,
    activate_campaign,
    archive_campaign,
    campaign_analytics,
    count_views,
    create_campaign,
    get_campaign,
    install_shipped_campaigns,
    load_live_campaign,
    pause_campaign,
    put_campaign,
    record_views,
    validate_campaign,
    version_definition,
)
from tests.utils.personalization import (
    add_event_at,
    add_seed_segments,
    campaign,
    customers_by_group,
    migrate_to,
)
from tests.utils.segments import add_customer, add_label_segment

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
TABLES = {"personalizations", "personalization_versions", "personalization_views"}


def _setup(engine, **changes) -> None:  # noqa: ANN001
    add_label_segment(engine, "vip", [])
    with engine.begin() as conn:
        create_campaign(conn, raw=campaign(**changes), now=T0)
        activate_campaign(conn, slug=changes.get("slug", "home"), now=T0)


def test_the_migration_adds_the_tables_and_reverses(store_engine) -> None:
    assert set(inspect(store_engine).get_table_names()) >= TABLES
    migrate_to(store_engine, "0008")
    assert not TABLES & set(inspect(store_engine).get_table_names())
    migrate_to(store_engine, "head")
    assert set(inspect(store_engine).get_table_names()) >= TABLES
    key = inspect(store_engine).get_pk_constraint("personalization_views")
    assert set(key["constrained_columns"]) == {
        "campaign_slug",
        "version",
        "customer_id",
        "experience",
    }


# --- lifecycle -------------------------------------------------------------------------------


def test_an_active_version_is_frozen_and_edits_make_new_versions(store_engine) -> None:
    add_label_segment(store_engine, "vip", [])
    with store_engine.begin() as conn:
        created = create_campaign(conn, raw=campaign(), now=T0)
        assert (created.state, created.latest_version, created.active_version) == ("draft", 1, None)
        with pytest.raises(Conflict) as taken:
            create_campaign(conn, raw=campaign(), now=T0)
        assert taken.value.code == "campaign_exists"
        active = activate_campaign(conn, slug="home", now=T0)
        assert (active.state, active.active_version) == ("active", 1)
        edited = put_campaign(conn, slug="home", raw=campaign(control_share=0.2), now=T0)
        assert (edited.state, edited.latest_version, edited.active_version) == ("active", 2, 1)
        assert version_definition(conn, slug="home", version=1).control_share == 0.1
        assert load_live_campaign(conn, slug="home").version == 1  # still deciding on v1
        activate_campaign(conn, slug="home", now=T0)
        assert load_live_campaign(conn, slug="home").version == 2
        paused = pause_campaign(conn, slug="home", now=T0)
        assert paused.state == "paused" and not load_live_campaign(conn, slug="home").serving
        assert activate_campaign(conn, slug="home", now=T0).state == "active"
        archived = archive_campaign(conn, slug="home", now=T0)
        assert archived.state == "archived"
        for refused in (
            lambda: put_campaign(conn, slug="home", raw=campaign(), now=T0),
            lambda: activate_campaign(conn, slug="home", now=T0),
            lambda: pause_campaign(conn, slug="home", now=T0),
        ):
            with pytest.raises(Conflict) as raised:
                refused()
            assert raised.value.code == "campaign_archived"
        versions = get_campaign(conn, slug="home").versions
        assert [v.version for v in versions] == [2, 1]
        assert all(v.activated_at is not None for v in versions)


def test_pausing_a_draft_is_refused(store_engine) -> None:
    add_label_segment(store_engine, "vip", [])
    with store_engine.begin() as conn:
        create_campaign(conn, raw=campaign(), now=T0)
        with pytest.raises(Conflict):
            pause_campaign(conn, slug="home")
        with pytest.raises(NotFound):
            activate_campaign(conn, slug="nope")


def test_validation_names_every_error_with_its_path(store_engine) -> None:
    add_customer(store_engine, "c1", {"first_name": "Ann", "city": "Oslo"})
    raw = campaign(
        default={"banner": "{{ customer.city }}", "top_bar": "{% if %}"},
        experiences=[
            {"name": "VIP", "segment": "nope", "content": {"offer": "{{ customer.nope.x }}"}},
            {
                "name": "Deep",
                "condition": {"all": [{"segment": "vip"}, {"segment": "gone"}]},
                "content": {"banner": "{{ customer.first_name | default('you') }}"},
            },
        ],
    )
    with store_engine.begin() as conn:
        definition, errors = validate_campaign(conn, raw=raw)
    assert definition is None
    assert {(e.code, e.field) for e in errors} == {
        ("template_undefined", "default.banner"),
        ("template_syntax", "default.top_bar"),
        ("template_undefined", "experiences[0].content.offer"),
        ("unknown_segment", "experiences[0].segment"),
        ("unknown_segment", "experiences[1].condition.all[0].segment"),
        ("unknown_segment", "experiences[1].condition.all[1].segment"),
    }
    # a template is proven even when the rest of the body does not parse
    with store_engine.connect() as conn:
        _, errors = validate_campaign(conn, raw={**raw, "control_share": "much"})
    assert ("template_undefined", "default.banner") in {(e.code, e.field) for e in errors}


def test_activation_checks_the_version_again(store_engine) -> None:
    add_label_segment(store_engine, "vip", [])
    with store_engine.begin() as conn:
        create_campaign(conn, raw=campaign(), now=T0)
        conn.execute(text("DELETE FROM segments WHERE slug = 'vip'"))
        with pytest.raises(ValidationFailed) as raised:
            activate_campaign(conn, slug="home", now=T0)
    assert raised.value.errors[0].field == "experiences[0].segment"


# --- decisions -------------------------------------------------------------------------------


def _decide(engine, customer: str, slug: str = "home"):  # noqa: ANN001, ANN202
    with engine.connect() as conn:
        return load_live_campaign(conn, slug=slug).decide(conn, customer_id=customer)


def test_the_first_matching_experience_decides(store_engine) -> None:
    treated, held_out = customers_by_group("home", 0.1, treated=4, held_out=2)
    vip, spender, both, nobody = treated
    add_label_segment(store_engine, "vip", [vip, both, held_out[0]])
    add_customer(store_engine, vip, {"first_name": "Vi"})
    add_customer(store_engine, spender, {"total_spent": 900})
    add_customer(store_engine, both, {"total_spent": 900})
    add_customer(store_engine, nobody, {"total_spent": 10})
    add_customer(store_engine, held_out[0], {})
    add_customer(store_engine, held_out[1], {"total_spent": 501})
    with store_engine.begin() as conn:
        create_campaign(conn, raw=campaign(), now=T0)
        activate_campaign(conn, slug="home", now=T0)

    got = {c: _decide(store_engine, c) for c in [*treated, *held_out, "stranger"]}
    assert {c: (d.experience, d.audience) for c, d in got.items()} == {
        vip: ("VIP", "VIP"),
        spender: ("Big spenders", "Big spenders"),
        both: ("VIP", "VIP"),  # in order: the first match wins
        nobody: ("default", None),
        held_out[0]: ("control", "VIP"),
        held_out[1]: ("control", "Big spenders"),
        "stranger": ("default", None),
    }
    assert got[vip].content == {
        "banner": "VIP early access",
        "top_bar": "Hello Vi",
        "recommended": "Best-sellers",
        "offer": "20% off",
    }
    assert got[spender].content["offer"] == "Free shipping"
    assert got[spender].content["banner"] == "Welcome"  # left out: the default's
    assert got[held_out[0]].content == got[nobody].content | {"top_bar": "Hello there"}
    assert got["stranger"].content["top_bar"] == "Hello there"
    assert all(d.serving for d in got.values())


def test_event_conditions_are_evaluated_as_of_now(store_engine) -> None:
    (recent, old, never), _ = customers_by_group("ev", 0.0, treated=3, held_out=0)
    for customer in (recent, old, never):
        add_customer(store_engine, customer, {})
    now = utcnow()
    add_event_at(store_engine, recent, "Purchase", now - timedelta(days=2), {"total_price": 80})
    add_event_at(store_engine, old, "Purchase", now - timedelta(days=40), {"total_price": 80})
    add_event_at(store_engine, never, "Purchase", now - timedelta(days=1), {"total_price": 5})
    condition = {
        "event": "Purchase",
        "count": {"gte": 1},
        "within": "P30D",
        "where": [{"property": "total_price", "op": "gte", "value": 50}],
    }
    raw = campaign(
        slug="ev",
        control_share=0,
        experiences=[{"name": "Recent buyers", "condition": condition, "content": {"offer": "x"}}],
    )
    with store_engine.begin() as conn:
        create_campaign(conn, raw=raw, now=T0)
        activate_campaign(conn, slug="ev", now=T0)
    assert [_decide(store_engine, c, "ev").experience for c in (recent, old, never)] == [
        "Recent buyers",
        "default",
        "default",
    ]


def test_a_paused_campaign_shows_everyone_the_default(store_engine) -> None:
    (vip,), _ = customers_by_group("home", 0.1, treated=1, held_out=0)
    add_label_segment(store_engine, "vip", [vip])
    add_customer(store_engine, vip, {})
    with store_engine.begin() as conn:
        create_campaign(conn, raw=campaign(), now=T0)
    assert _decide(store_engine, vip).experience == "default"  # a draft
    with store_engine.begin() as conn:
        activate_campaign(conn, slug="home", now=T0)
    assert _decide(store_engine, vip).experience == "VIP"
    with store_engine.begin() as conn:
        pause_campaign(conn, slug="home", now=T0)
    paused = _decide(store_engine, vip)
    assert (paused.experience, paused.serving) == ("default", False)


# --- views ------------------------------------------------------------------------------------


def _view(customer: str, experience: str, at: datetime, **kw) -> ViewRecord:  # noqa: ANN003
    audience = kw.pop("audience", None if experience == "default" else experience)
    return ViewRecord(
        campaign=kw.pop("campaign", "home"),
        version=kw.pop("version", 1),
        customer_id=customer,
        experience=experience,
        audience=audience,
        bucket=kw.pop("bucket", 5_000),
        at=at,
        **kw,
    )


def test_views_merge_into_one_row_per_customer_and_experience(store_engine) -> None:
    with store_engine.begin() as conn:
        stored = record_views(
            conn,
            views=[
                _view("a", "VIP", T0 + timedelta(minutes=5)),
                _view("a", "VIP", T0 + timedelta(minutes=1)),
                _view("a", "VIP", T0 + timedelta(minutes=9)),
                _view("b", "control", T0, audience="VIP", bucket=3),
            ],
        )
    assert stored == 4
    # a later batch, and a view reported late that happened before the first one known
    with store_engine.begin() as conn:
        record_views(
            conn,
            views=[
                _view("a", "VIP", T0 + timedelta(minutes=20)),
                _view("b", "control", T0 - timedelta(minutes=1), audience="Big spenders", bucket=3),
            ],
        )
    with store_engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT customer_id, experience, audience, views FROM personalization_views"
                " ORDER BY customer_id"
            )
        ).all()
        assert [tuple(r) for r in rows] == [
            ("a", "VIP", "VIP", 4),
            ("b", "control", "Big spenders", 2),
        ]
        assert count_views(conn, slug="home") == 6
        first = get_first_last(conn, "a")
    assert first == (T0 + timedelta(minutes=1), T0 + timedelta(minutes=20))


def get_first_last(conn, customer: str) -> tuple[datetime, datetime]:  # noqa: ANN001
    from core.tables import UTCDateTime

    row = conn.execute(
        text(
            "SELECT first_viewed_at, last_viewed_at FROM personalization_views"
            " WHERE customer_id = :c"
        ).columns(first_viewed_at=UTCDateTime(), last_viewed_at=UTCDateTime()),
        {"c": customer},
    ).one()
    return row[0], row[1]


# --- analytics ---------------------------------------------------------------------------------


def test_a_conversion_is_the_goal_within_the_window_after_the_first_view(store_engine) -> None:
    _setup(
        store_engine,
        conversion={
            "event": "Purchase",
            "value_property": "order.total",
            "within": "P7D",
            "where": [{"property": "channel", "op": "eq", "value": "web"}],
        },
    )
    first = T0
    views = [
        _view("in-window", "VIP", first),
        _view("in-window", "VIP", first + timedelta(days=3)),  # a later view starts nothing
        _view("twice", "VIP", first),
        _view("before", "VIP", first),
        _view("late", "VIP", first),
        _view("filtered", "VIP", first),
        _view("edge", "VIP", first),
        _view("no-value", "VIP", first),
    ]
    with store_engine.begin() as conn:
        record_views(conn, views=views)

    def buy(customer: str, at: datetime, total: object = 10, channel: str = "web") -> None:
        add_event_at(
            store_engine,
            customer,
            "Purchase",
            at,
            {"order": {"total": total}, "channel": channel},
        )

    buy("in-window", first + timedelta(days=6), total=30)
    buy("twice", first + timedelta(hours=1), total=5)
    buy("twice", first + timedelta(hours=2), total=500)  # counted once: the first
    buy("before", first - timedelta(seconds=1))
    buy("late", first + timedelta(days=7, seconds=1))
    buy("filtered", first + timedelta(days=1), channel="store")
    buy("edge", first + timedelta(days=7), total=2.5)  # the window's last instant counts
    buy("no-value", first + timedelta(days=1), total="12")  # text: converted, no value
    add_event_at(store_engine, "in-window", "Viewed", first + timedelta(days=1))

    with store_engine.connect() as conn:
        report = campaign_analytics(conn, slug="home", now=first + timedelta(days=30))
    vip = report.experiences[0]
    assert (vip.viewers, vip.views, vip.conversions) == (7, 8, 4)
    assert vip.conversion_value == pytest.approx(30 + 5 + 2.5)
    assert vip.conversion_rate == pytest.approx(4 / 7)
    assert vip.value_per_viewer == pytest.approx(37.5 / 7)


def test_each_customer_counts_once_in_the_group_of_their_first_view(store_engine) -> None:
    _setup(store_engine)
    with store_engine.begin() as conn:
        record_views(
            conn,
            views=[
                # moved from Big spenders into VIP: counted where first shown
                _view("mover", "Big spenders", T0),
                _view("mover", "VIP", T0 + timedelta(hours=1)),
                _view("held", "control", T0, audience="VIP", bucket=1),
                _view("held", "control", T0 + timedelta(hours=5), audience="VIP", bucket=1),
                _view("plain", "default", T0),
                _view("v2-only", "VIP", T0, version=2),
            ],
        )
    add_event_at(store_engine, "mover", "Purchase", T0 + timedelta(hours=2), {"total_price": 9})
    add_event_at(store_engine, "held", "Purchase", T0 + timedelta(hours=2), {"total_price": 4})
    with store_engine.connect() as conn:
        report = campaign_analytics(conn, slug="home", version=1, now=T0 + timedelta(days=9))
    vip, spenders = report.experiences
    assert (vip.viewers, spenders.viewers, spenders.views, spenders.conversions) == (0, 1, 2, 1)
    assert (vip.control.viewers, vip.control.conversions, vip.control.views) == (1, 1, 2)
    assert (report.control.viewers, report.default.viewers) == (1, 1)
    assert report.overall.viewers == 1 and report.overall.control.viewers == 1
    assert report.experiences[0].conversion_value == 0


def test_lift_is_measured_against_the_control_of_the_same_audience(store_engine) -> None:
    _setup(store_engine)
    views, buyers = [], []
    # VIP: 300 treated (90 convert), 120 held out (24 convert).
    # Big spenders: 200 treated (20 convert), 100 held out (20 convert).
    groups = [
        ("VIP", "VIP", 300, 90),
        ("control", "VIP", 120, 24),
        ("Big spenders", "Big spenders", 200, 20),
        ("control", "Big spenders", 100, 20),
    ]
    for n, (experience, audience, viewers, converted) in enumerate(groups):
        for i in range(viewers):
            customer = f"g{n}-{i}"
            views.append(_view(customer, experience, T0, audience=audience))
            if i < converted:
                buyers.append(customer)
    with store_engine.begin() as conn:
        record_views(conn, views=views)
        conn.execute(
            text(
                "INSERT INTO events (event_id, customer_id, name, occurred_at, properties,"
                " received_at, realtime_pending) VALUES (:id, :c, 'Purchase', :at, :p, :at, :f)"
            ).bindparams(*_time_binds()),
            [
                {
                    "id": f"b-{c}",
                    "c": c,
                    "at": T0 + timedelta(days=1),
                    "p": '{"total_price": 10}',
                    "f": False,
                }
                for c in buyers
            ],
        )
    with store_engine.connect() as conn:
        report = campaign_analytics(conn, slug="home", now=T0 + timedelta(days=9))
    vip, spenders = report.experiences
    expected_vip = compare(Arm(300, 90), Arm(120, 24))
    assert (vip.conversions, vip.control.conversions) == (90, 24)
    assert vip.lift == pytest.approx((0.3 - 0.2) / 0.2)
    assert vip.lift_ci == pytest.approx(expected_vip.lift_ci)
    assert vip.p_value == pytest.approx(expected_vip.p_value)
    assert vip.always_valid_ci == pytest.approx(expected_vip.always_valid_ci)
    assert vip.significant == expected_vip.significant
    assert vip.warning is None
    assert spenders.lift == pytest.approx(-0.5)
    assert vip.conversion_value == pytest.approx(900)
    # against all control customers instead, VIP's lift would read 0.3 / 0.2933 - 1
    overall = compare(Arm(500, 110), Arm(220, 44))
    assert report.overall.lift == pytest.approx(overall.lift)
    assert report.control.viewers == 220


def _time_binds() -> list:
    from sqlalchemy import bindparam

    from core.tables import UTCDateTime

    return [bindparam("at", type_=UTCDateTime())]


def test_from_and_to_select_viewers_by_their_first_view(store_engine) -> None:
    _setup(store_engine)
    with store_engine.begin() as conn:
        record_views(
            conn,
            views=[
                _view("early", "VIP", T0),
                _view("early", "VIP", T0 + timedelta(days=5)),
                _view("mid", "VIP", T0 + timedelta(days=2)),
                _view("late", "VIP", T0 + timedelta(days=4)),
            ],
        )
    add_event_at(store_engine, "mid", "Purchase", T0 + timedelta(days=3, hours=12))
    with store_engine.connect() as conn:
        window = campaign_analytics(
            conn,
            slug="home",
            viewed_from=T0 + timedelta(days=1),
            viewed_to=T0 + timedelta(days=3),
            now=T0 + timedelta(days=20),
        )
        wider = campaign_analytics(
            conn,
            slug="home",
            viewed_from=T0 + timedelta(days=1),
            viewed_to=T0 + timedelta(days=4),
            now=T0 + timedelta(days=20),
        )
    # `to` bounds conversions too: "mid" bought after day 3
    assert (window.experiences[0].viewers, window.experiences[0].conversions) == (1, 0)
    assert (wider.experiences[0].viewers, wider.experiences[0].conversions) == (1, 1)


def test_analytics_of_an_unknown_campaign_or_version(store_engine) -> None:
    _setup(store_engine)
    with store_engine.connect() as conn, pytest.raises(NotFound):
        campaign_analytics(conn, slug="nope")
    with store_engine.connect() as conn, pytest.raises(NotFound):
        campaign_analytics(conn, slug="home", version=9)


# --- the shipped campaign ------------------------------------------------------------------------


def test_the_shipped_campaign_installs_once_and_activates(store_engine) -> None:
    with store_engine.begin() as conn, pytest.raises(ValidationFailed) as missing:
        install_shipped_campaigns(conn)
    assert any(e.code == "unknown_segment" for e in missing.value.errors)
    add_seed_segments(store_engine)
    with store_engine.begin() as conn:
        first = install_shipped_campaigns(conn)
        again = install_shipped_campaigns(conn, activate=True)
        third = install_shipped_campaigns(conn, activate=True)
    assert [(o.slug, o.action, o.state) for o in first] == [("rfm-homepage", "created", "draft")]
    assert [(o.action, o.state) for o in again] == [("unchanged", "active")]
    assert [(o.action, o.state, o.version) for o in third] == [("unchanged", "active", 1)]


def test_a_segment_a_campaign_uses_is_not_deleted(store_engine) -> None:
    from store.segments import create_segment, delete_segment

    _setup(store_engine)
    with store_engine.begin() as conn:
        create_segment(conn, slug="ext", name="Ext", kind="external", now=T0)
        create_segment(
            conn, slug="big", name="Big", kind="rule", now=T0,
            condition={"attribute": "total_spent", "op": "gt", "value": 1},
        )  # fmt: skip
        put_campaign(
            conn, slug="home", raw=campaign(experiences=[{"name": "E", "segment": "ext"}]), now=T0
        )
        activate_campaign(conn, slug="home", now=T0)
        put_campaign(
            conn,
            slug="home",
            raw=campaign(experiences=[{"name": "Big", "condition": {"not": {"segment": "big"}}}]),
            now=T0,
        )
    with store_engine.begin() as conn, pytest.raises(Conflict) as used:
        delete_segment(conn, slug="ext")
    assert used.value.code == "in_use"
    assert [e.message for e in used.value.errors] == [
        "segment 'ext' is used by personalization campaign home (active, v2) experiences[0].segment"
    ]
    with store_engine.begin() as conn, pytest.raises(Conflict) as drafted:
        delete_segment(conn, slug="big")
    assert "home (draft, v3) experiences[0].condition.not.segment" in drafted.value.message
    with store_engine.begin() as conn:
        archive_campaign(conn, slug="home", now=T0)
        delete_segment(conn, slug="ext")
        delete_segment(conn, slug="big")


async def test_the_decision_reader_reads_what_the_statement_reads(store_engine) -> None:
    from store.personalization import DecisionReader

    (vip,), (held,) = customers_by_group("home", 0.1, treated=1, held_out=1)
    add_label_segment(store_engine, "vip", [vip, held])
    add_customer(store_engine, vip, {"first_name": "Vi"})
    add_customer(store_engine, held, {})
    with store_engine.begin() as conn:
        create_campaign(conn, raw=campaign(), now=T0)
        activate_campaign(conn, slug="home", now=T0)
    with store_engine.connect() as conn:
        live = load_live_campaign(conn, slug="home")
    reader = DecisionReader(store_engine, size=2)
    try:
        statement = live.statement.at(time.time())
        for customer in (vip, held, "stranger"):
            row = await reader.read(statement, customer)
            assert live.decide_row(customer, row) == _decide(store_engine, customer)
        # at once (PostgreSQL reads them in batches), repeats and strangers among them
        many = [vip, "stranger", held, vip, f"x-{vip}", held] * 20
        batches: list[list[str]] = []
        fetch_many = reader._fetch_many

        async def counted(statement, ids):  # noqa: ANN001, ANN202
            batches.append(ids)
            return await fetch_many(statement, ids)

        reader._fetch_many = counted
        rows = await asyncio.gather(*(reader.read(statement, c) for c in many))
        if store_engine.dialect.name == "postgresql":
            assert len(batches) < len(many) and sorted(batches[0]) == sorted(set(many))
        assert [live.decide_row(c, row) for c, row in zip(many, rows, strict=True)] == [
            _decide(store_engine, c) for c in many
        ]
        if store_engine.dialect.name == "postgresql":
            # a batch that fails fails each of its reads, and the next batch is read again
            broken = dataclasses.replace(statement, many_sql="SELECT no_such_column")
            failed = await asyncio.gather(
                *(reader.read(broken, c) for c in many[:5]), return_exceptions=True
            )
            assert all(isinstance(f, psycopg.errors.UndefinedColumn) for f in failed)
            assert live.decide_row(vip, await reader.read(statement, vip)) == _decide(
                store_engine, vip
            )
        if store_engine.dialect.name == "sqlite":
            # the slow path waits as every connection does, then the loop's short wait again
            reader.fetch(statement, vip, patient=True)
            fairy = reader._checkout()
            raw = fairy.dbapi_connection
            assert raw.execute("PRAGMA busy_timeout").fetchone()[0] == reader.LOOP_WAIT_MS
            with pytest.raises(sqlite3.OperationalError, match="readonly"):
                raw.execute("DELETE FROM customers")
            reader._idle.put(fairy)
    finally:
        await reader.aclose()
