"""The console over HTTP (no browser): sign-in, sessions, CSRF, roles, the security
headers, every page on a store that looks like the seed's use case, and changes made
through it. The browser tests (test_console_browser.py) drive the same pages in Chromium."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlmodel import Session

from api.console.cache import Aggregates
from store import console as console_store
from store.keys import create_key, revoke_key
from store.rfm_models import get_model
from tests.utils.api import ApiHarness, api_harness
from tests.utils.console import Seeded, seed_console_store

PAGES = [
    ("/console/", "Events per minute"),
    ("/console/rfm", "Where did each label go?"),
    ("/console/rfm/default", "Recency by frequency"),
    ("/console/segments", "high-value-champions"),
    ("/console/segments/high-value-champions", "Members and movement"),
    ("/console/segments/default:champions", "Members and movement"),
    ("/console/journeys", "champions-nurture"),
    ("/console/journeys/champions-nurture", "The journey"),
    ("/console/journeys/at-risk-winback", "by_channel"),
    ("/console/personalization", "rfm-homepage"),
    ("/console/personalization/rfm-homepage", "Results of version 1"),
    ("/console/customers", "Customer id or email"),
    ("/console/customers?q=cus-00", "cus-0001"),
]


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ApiHarness, Seeded]]:
    from tests.conftest import new_store

    engine, _ = new_store("sqlite", tmp_path_factory.mktemp("console"))
    seeded = seed_console_store(engine)
    with api_harness(engine, key_cache_seconds=0) as api:
        # Counts are computed off the request path; here they are waited for.
        api.client.app.state.console.aggregates.wait_seconds = 30
        yield api, seeded
    engine.dispose()


def _token(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, html[:2000]
    return match.group(1)


def sign_in(client: TestClient, key: str, *, next: str = "") -> Any:
    page = client.get("/console/sign-in")
    data = {"key": key, "csrf_token": _token(page.text), "next": next}
    return client.post("/console/sign-in", data=data, follow_redirects=False)


def _client(api: ApiHarness, role: str) -> TestClient:
    client = TestClient(api.client.app, raise_server_exceptions=False)
    assert sign_in(client, api.keys[role]).status_code == 303
    return client


def test_sign_in_sets_a_strict_session_cookie(seeded: tuple[ApiHarness, Seeded]) -> None:
    api, _ = seeded
    client = TestClient(api.client.app)
    first = client.get("/console/", follow_redirects=False)
    assert (first.status_code, first.headers["location"]) == (
        303,
        "/console/sign-in?next=/console/",
    )
    answer = sign_in(client, api.keys["marketer"], next="/console/journeys")
    assert (answer.status_code, answer.headers["location"]) == (303, "/console/journeys")
    cookie = next(
        c for c in answer.headers.get_list("set-cookie") if c.startswith("journeys_console=")
    )
    flags = {part.strip().lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "samesite=strict", "path=/console"} <= flags
    assert "secure" not in flags  # served over plain HTTP here
    assert api.keys["marketer"] not in cookie
    page = client.get("/console/journeys")
    assert page.status_code == 200 and "Champions RFM campaign" in page.text


def test_the_cookie_is_secure_when_the_console_is_served_over_https(sqlite_engine: Engine) -> None:
    with api_harness(sqlite_engine) as api:
        client = TestClient(api.client.app, base_url="https://journeys.example.com")
        answer = sign_in(client, api.keys["support"])
        assert answer.status_code == 303
        cookie = next(
            c for c in answer.headers.get_list("set-cookie") if c.startswith("journeys_console=")
        )
        assert "secure" in cookie.lower()


def test_every_answer_carries_the_security_headers(seeded: tuple[ApiHarness, Seeded]) -> None:
    api, _ = seeded
    client = _client(api, "support")
    for path in (
        "/console/sign-in",
        "/console/",
        "/console/static/htmx/htmx.min.js",
        "/console/nope",
    ):
        answer = client.get(path)
        policy = answer.headers["content-security-policy"]
        assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
        assert "'unsafe-inline'" not in policy and "'unsafe-eval'" not in policy
        assert answer.headers["x-frame-options"] == "DENY"
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["server-timing"].startswith("app;dur=")
    # No inline script or style anywhere a page could need one.
    for path, _ in PAGES:
        html = client.get(path).text
        assert not re.search(r"<script(?![^>]*\bsrc=)", html), path
        assert "<style" not in html and " style=" not in html, path
        assert not re.search(r"\son[a-z]+=", html), path


def test_sign_in_refuses_unknown_keys_other_roles_and_a_missing_token(
    seeded: tuple[ApiHarness, Seeded],
) -> None:
    api, _ = seeded
    client = TestClient(api.client.app)
    unknown = sign_in(client, "jk_not_a_key")
    assert unknown.status_code == 401 and "unknown or revoked API key" in unknown.text
    for role in ("ingest", "web"):
        refused = sign_in(client, api.keys[role])
        assert (
            refused.status_code == 403 and f"a {role} key may not use the console" in refused.text
        )
    client.get("/console/sign-in")
    no_token = client.post(
        "/console/sign-in", data={"key": api.keys["admin"]}, follow_redirects=False
    )
    assert no_token.status_code == 403
    assert "journeys_console=" not in no_token.headers.get("set-cookie", "")
    # Somebody else's page cannot sign a browser in: the token must match its cookie.
    other = TestClient(api.client.app)
    forged = other.post(
        "/console/sign-in",
        data={"key": api.keys["admin"], "csrf_token": _token(client.get("/console/sign-in").text)},
        follow_redirects=False,
    )
    assert forged.status_code == 403
    # Only console paths are followed after signing in.
    outside = sign_in(TestClient(api.client.app), api.keys["support"], next="https://evil.example/")
    assert outside.headers["location"] == "/console/"


def test_every_page_reads_for_marketer_and_support(seeded: tuple[ApiHarness, Seeded]) -> None:
    api, seed = seeded
    pages = [
        *PAGES,
        (f"/console/customers/{seed.champion}", "champions-nurture"),
        (f"/console/customers/{seed.at_risk}", "at-risk-winback"),
        (f"/console/personalization/rfm-homepage?customer={seed.champion}", "The four slots"),
        (f"/console/customers/{seed.champion}/why?segment=high-value-champions", "Why: segment"),
        (
            f"/console/customers/{seed.at_risk}/why?journey=at-risk-winback&step=by_channel",
            "step by_channel",
        ),
        (f"/console/customers/{seed.champion}/why?personalization=rfm-homepage", "control bucket"),
    ]
    for role in ("marketer", "support", "admin"):
        client = _client(api, role)
        for path, needle in pages:
            answer = client.get(path)
            assert answer.status_code == 200, (role, path, answer.text[:500])
            assert needle in answer.text, (role, path)
            assert "counting…" not in answer.text, (role, path)


def test_support_sees_but_cannot_change(seeded: tuple[ApiHarness, Seeded]) -> None:
    api, _ = seeded
    support = _client(api, "support")
    page = support.get("/console/journeys/champions-nurture")
    assert "Save as a new draft version" not in page.text and "Pause new entries" not in page.text
    assert "(read only)" in page.text
    token = _token(page.text)
    for path, data in (
        ("/console/journeys/champions-nurture/pause", {}),
        ("/console/journeys/champions-nurture/definition", {"definition": "{}"}),
        ("/console/segments/new", {"slug": "x", "name": "x", "condition": "{}"}),
    ):
        answer = support.post(path, data={"csrf_token": token, **data}, follow_redirects=False)
        assert answer.status_code == 403, path
        assert "may look but not change" in answer.text
    assert support.get("/console/segments/new").status_code == 403
    with api.engine.connect() as conn:
        state = conn.execute(text("SELECT state FROM journeys WHERE slug = 'champions-nurture'"))
        assert state.scalar_one() == "active"


def test_a_post_without_the_session_s_token_is_refused(seeded: tuple[ApiHarness, Seeded]) -> None:
    api, _ = seeded
    marketer = _client(api, "marketer")
    for data in ({}, {"csrf_token": "wrong"}):
        answer = marketer.post(
            "/console/journeys/champions-nurture/pause", data=data, follow_redirects=False
        )
        assert answer.status_code == 403 and "CSRF" in answer.text
    # The token of another session does not do either.
    other = _client(api, "marketer")
    token = _token(other.get("/console/journeys").text)
    answer = marketer.post(
        "/console/journeys/champions-nurture/pause",
        data={"csrf_token": token},
        follow_redirects=False,
    )
    assert answer.status_code == 403
    with api.engine.connect() as conn:
        state = conn.execute(text("SELECT state FROM journeys WHERE slug = 'champions-nurture'"))
        assert state.scalar_one() == "active"


def test_a_forged_or_revoked_session_is_signed_out(seeded: tuple[ApiHarness, Seeded]) -> None:
    api, _ = seeded
    forged = TestClient(api.client.app)
    forged.cookies.set("journeys_console", "eyJrIjoia2V5X3gifQ.forged.sig", path="/console")
    assert forged.get("/console/", follow_redirects=False).status_code == 303
    with Session(api.engine) as session:
        row, secret = create_key(session, role="support", name="short-lived")
        key_id = row.id
        session.commit()
    client = TestClient(api.client.app)
    assert sign_in(client, secret).status_code == 303
    assert client.get("/console/", follow_redirects=False).status_code == 200
    with Session(api.engine) as session:
        revoke_key(session, key_id=key_id)
        session.commit()
    # key_cache_seconds=0 here: the revocation is seen at once.
    assert client.get("/console/", follow_redirects=False).status_code == 303


def test_sign_out_ends_the_session(seeded: tuple[ApiHarness, Seeded]) -> None:
    api, _ = seeded
    client = _client(api, "support")
    token = _token(client.get("/console/").text)
    answer = client.post("/console/sign-out", data={"csrf_token": token}, follow_redirects=False)
    assert (answer.status_code, answer.headers["location"]) == (303, "/console/sign-in")
    assert client.get("/console/", follow_redirects=False).status_code == 303


def test_forms_are_held_to_the_input_bounds(seeded: tuple[ApiHarness, Seeded]) -> None:
    api, _ = seeded
    client = _client(api, "marketer")
    token = _token(client.get("/console/").text)
    nul = client.post(
        "/console/journeys/validate", data={"csrf_token": token, "definition": "{\x00}"}
    )
    assert nul.status_code == 422 and "NUL" in nul.text
    big = client.post(
        "/console/journeys/validate",
        content=b"definition=" + b"x" * (1024 * 1024 + 1),
        headers={"content-type": "application/x-www-form-urlencoded", "x-csrf-token": token},
    )
    assert big.status_code == 413
    json_body = client.post(
        "/console/journeys/validate", json={"definition": "{}"}, headers={"x-csrf-token": token}
    )
    assert json_body.status_code == 422


def test_the_rfm_page_shows_what_the_pass_counted(seeded: tuple[ApiHarness, Seeded]) -> None:
    api, _ = seeded
    client = _client(api, "marketer")
    with api.engine.connect() as conn:
        newest = console_store.model_passes(conn, model_slug="default")[0]
        labels = get_model(conn, slug="default").definition.labels()
    matrix = console_store.migration_matrix(newest, labels)
    assert matrix is not None and newest.summary is not None
    html = client.get("/console/rfm/default").text
    table = html[html.index("Customers by label before (rows)") :]
    for row in matrix.rows:
        cells = re.search(rf"<th scope=\"row\">{re.escape(row)}</th>(.*?)</tr>", table)
        assert cells, row
        numbers = [
            int(n.replace(",", "")) for n in re.findall(r'class="num">([\d,]+)<', cells.group(1))
        ]
        assert numbers == [matrix.cells[row][c] for c in matrix.columns] + [
            sum(matrix.cells[row].values())
        ]
    champions = newest.summary.labels["Champions"].count
    assert re.search(rf"Champions</th><td class=\"num\">{champions:,}</td>", html)
    older = client.get(f"/console/rfm/default?pass={newest.id - 1}")
    assert older.status_code == 200 and "not scored" in older.text
    assert client.get("/console/rfm/default?pass=999").status_code == 404


def test_the_journey_page_draws_the_graph_with_counts(seeded: tuple[ApiHarness, Seeded]) -> None:
    api, _ = seeded
    client = _client(api, "support")
    analytics = api.get("/v1/journeys/at-risk-winback/analytics").json()
    html = client.get("/console/journeys/at-risk-winback").text
    graph = html[html.index('class="chart graph"') :]
    for step in analytics["steps"]:
        assert f"{step['step']}: " in graph
        assert re.search(rf"{step['step']}: [^<]*; {step['entered']:,} entered", graph), step
    by_channel = next(s for s in analytics["steps"] if s["step"] == "by_channel")
    for share in by_channel["exits"]:
        target = share["next"] or "end"
        assert f"by_channel -&gt; {target}" in graph and f": {share['count']:,} runs" in graph
    assert f"{analytics['triggered']:,}" in html


def test_the_why_page_draws_what_the_explain_route_answers(
    seeded: tuple[ApiHarness, Seeded],
) -> None:
    api, seed = seeded
    query = "segment=high-value-champions"
    answer = api.get(f"/v1/customers/{seed.champion}/explain?{query}", role="support").json()
    client = _client(api, "support")
    html = client.get(f"/console/customers/{seed.champion}/why?{query}").text
    tree = answer["conditions"][0]["tree"]
    verdicts = re.findall(r'<span class="verdict (true|false)">', html)
    nodes = [tree, *tree["children"]]
    assert verdicts[1:] == ["true" if n["result"] else "false" for n in nodes]
    for node in nodes:
        assert node["value_text"] in html
    assert answer["summary"] in html


def test_a_journey_is_edited_validated_activated_and_paused(sqlite_engine: Engine) -> None:
    seed_console_store(sqlite_engine, customers=40)
    with api_harness(sqlite_engine) as api:
        client = _client(api, "marketer")
        page = client.get("/console/journeys/champions-nurture")
        token = _token(page.text)
        definition = api.get("/v1/journeys/champions-nurture").json()["versions"][0]["definition"]
        broken = {**definition, "start": "nowhere"}
        check = client.post(
            "/console/journeys/validate",
            data={"definition": json.dumps(broken)},
            headers={"x-csrf-token": token, "hx-request": "true"},
        )
        assert (
            check.status_code == 200 and "Not valid yet" in check.text and "nowhere" in check.text
        )
        not_json = client.post(
            "/console/journeys/validate", data={"definition": "{", "csrf_token": token}
        )
        assert "is not JSON" in not_json.text
        refused = client.post(
            "/console/journeys/champions-nurture/definition",
            data={"definition": json.dumps(broken), "csrf_token": token},
        )
        assert refused.status_code == 422 and "nowhere" in refused.text
        changed = {**definition, "name": "Champions, edited in the console"}
        assert (
            "Valid."
            in client.post(
                "/console/journeys/validate",
                data={"definition": json.dumps(changed), "csrf_token": token},
            ).text
        )
        saved = client.post(
            "/console/journeys/champions-nurture/definition",
            data={"definition": json.dumps(changed), "csrf_token": token},
            follow_redirects=False,
        )
        assert saved.status_code == 303
        journey = api.get("/v1/journeys/champions-nurture").json()
        assert (journey["latest_version"], journey["active_version"]) == (2, 1)
        for action, state, active in (
            ("activate", "active", 2),
            ("pause", "paused", 2),
            ("resume", "active", 2),
        ):
            answer = client.post(
                f"/console/journeys/champions-nurture/{action}",
                data={"csrf_token": token},
                follow_redirects=False,
            )
            assert answer.status_code == 303, answer.text
            journey = api.get("/v1/journeys/champions-nurture").json()
            assert (journey["state"], journey["active_version"]) == (state, active)
        assert "Champions, edited in the console" in client.get("/console/journeys").text
        unknown = client.post(
            "/console/journeys/champions-nurture/explode", data={"csrf_token": token}
        )
        assert unknown.status_code == 422


def test_a_segment_is_created_and_edited_with_temporal(
    sqlite_engine: Engine, temporal_address: str
) -> None:
    seed_console_store(sqlite_engine, customers=40)
    with api_harness(sqlite_engine, temporal_address=temporal_address) as api:
        client = _client(api, "marketer")
        token = _token(client.get("/console/segments/new").text)
        condition = '{"all": [{"segment": "default:champions"}, {"attribute": "total_spent", "op": "gt", "value": 900}]}'
        check = client.post(
            "/console/segments/validate",
            data={"slug": "big", "condition": condition.replace("default:champions", "nope")},
            headers={"x-csrf-token": token},
        )
        assert "no segment &#39;nope&#39;" in check.text
        good = client.post(
            "/console/segments/validate",
            data={"slug": "big", "condition": condition, "csrf_token": token},
        )
        assert "total_spent &gt; 900" in good.text
        created = client.post(
            "/console/segments/new",
            data={
                "slug": "big",
                "name": "Big spenders",
                "condition": condition,
                "schedule": "",
                "csrf_token": token,
            },
            follow_redirects=False,
        )
        assert created.status_code == 303, created.text
        segment = api.get("/v1/segments/big").json()
        assert (segment["name"], segment["version"]) == ("Big spenders", 1)
        edited = client.post(
            "/console/segments/big",
            data={
                "name": "Bigger spenders",
                "condition": condition.replace("900", "1500"),
                "schedule": "PT10M",
                "csrf_token": token,
            },
            follow_redirects=False,
        )
        assert edited.status_code == 303, edited.text
        segment = api.get("/v1/segments/big").json()
        assert (segment["name"], segment["version"], segment["schedule"]) == (
            "Bigger spenders",
            2,
            "PT10M",
        )
        assert segment["condition"]["all"][1]["value"] == 1500
        taken = client.post(
            "/console/segments/new",
            data={"slug": "big", "name": "Again", "condition": condition, "csrf_token": token},
        )
        assert taken.status_code == 409 and "exists already" in taken.text


# --- the cache of aggregates ------------------------------------------------------------------


def _eventually(read: Any) -> Any:
    deadline = time.monotonic() + 5
    while (value := read()) is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return value


def test_aggregates_wait_briefly_then_serve_stale_values_while_refreshing(
    sqlite_engine: Engine,
) -> None:
    cache = Aggregates(sqlite_engine, wait_seconds=0.05)
    release = threading.Event()
    calls: list[int] = []

    def slow(_: Any) -> int:
        calls.append(1)
        release.wait(5)
        return len(calls)

    assert cache.get(("k",), slow, max_age=60) is None  # still computing
    assert cache.get(("k",), slow, max_age=60) is None  # asked twice, computed once
    time.sleep(0.5)  # the computation takes at least half a second: kept for five
    release.set()
    value = _eventually(lambda: cache.get(("k",), slow, max_age=60))
    assert value.value == 1 and len(calls) == 1

    # Stale: the old value at once, the next computed behind it.
    counter: list[int] = []

    def quick(_: Any) -> int:
        counter.append(1)
        return len(counter)

    assert _eventually(lambda: cache.get(("q",), quick, max_age=0)).value == 1
    time.sleep(0.05)  # older than ten times its (millisecond) computation
    stale = cache.get(("q",), quick, max_age=0)
    assert stale is not None and stale.value == 1
    _eventually(lambda: None if len(counter) < 2 else True)
    assert _eventually(lambda: cache.get(("q",), quick, max_age=60)).value == 2

    # A slow computation is kept ten times as long as it took, whatever max_age says.
    assert cache.get(("k",), slow, max_age=0).value == 1
    assert len(calls) == 1

    def broken(_: Any) -> int:
        raise RuntimeError("no such table")

    with pytest.raises(RuntimeError, match="no such table"):
        cache.get(("broken",), broken, max_age=60)
    cache.forget("q")  # forgotten: computed afresh
    assert _eventually(lambda: cache.get(("q",), quick, max_age=60)).value == 3
    cache.close()


def test_a_page_shows_counting_and_fills_in_by_itself(seeded: tuple[ApiHarness, Seeded]) -> None:
    api, _ = seeded
    aggregates = api.client.app.state.console.aggregates
    client = _client(api, "support")
    aggregates.forget("segments")
    release = threading.Event()
    original = console_store.transitions_per_day

    def slow(*args: Any, **kwargs: Any) -> Any:
        release.wait(5)
        return original(*args, **kwargs)

    aggregates.wait_seconds = 0.01
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(console_store, "transitions_per_day", slow)
            first = client.get("/console/segments")
            assert "counting…" in first.text
            assert 'hx-get="/console/parts/segments"' in first.text
            release.set()
            deadline = time.monotonic() + 5
            while "counting…" in (part := client.get("/console/parts/segments").text):
                assert time.monotonic() < deadline
                time.sleep(0.02)
        assert "high-value-champions" in part and "hx-get" not in part
    finally:
        aggregates.wait_seconds = 30


def test_htmx_is_vendored_with_its_licence() -> None:
    from api.console.web import STATIC

    script = (STATIC / "htmx" / "htmx.min.js").read_text()
    assert 'version:"2.0.11"' in script.replace(" ", "")
    assert "Zero-Clause BSD" in (STATIC / "htmx" / "LICENSE").read_text()


def test_a_draft_campaign_reads_and_previews_for_a_customer(sqlite_engine: Engine) -> None:
    from tests.utils.personalization import campaign
    from tests.utils.segments import add_customer, add_label_segment

    add_customer(sqlite_engine, "big", {"total_spent": 900, "first_name": "Ada"})
    add_label_segment(sqlite_engine, "vip", [])
    with api_harness(sqlite_engine) as api:
        assert (
            api.post("/v1/personalizations", json=campaign("home"), role="marketer").status_code
            == 201
        )
        client = _client(api, "support")
        page = client.get("/console/personalization/home?customer=big")
        assert page.status_code == 200
        assert "customers where total_spent &gt; 500" in page.text
        bucket = re.search(r"Control bucket (\d+)", page.text)
        assert bucket is not None
        held_out = int(bucket.group(1)) < 1_000  # control_share 0.1
        assert ("control group" if held_out else "experience Big spenders") in page.text
        # Big spenders' own offer, or the default's empty one for a control customer.
        assert ("Free shipping" in page.text) is not held_out
        assert client.get("/console/personalization/nope").status_code == 404
