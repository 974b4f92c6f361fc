"""The decision's ASGI fast path (`api.personalizations.DecideFastPath`) answers exactly
what the FastAPI route answers, on SQLite and PostgreSQL: every request below is sent
with the fast path on and again with it off, and the two answers (status, headers, body)
must be identical. The fast path must have answered the ordinary ones itself, and left
every other one (keys, roles, bounds, unknown campaigns, CORS refusals) to the route.
Both record one view per decision of an active campaign."""

from __future__ import annotations

import time
from typing import Any

import pytest

from api import personalizations
from core.personalization import CONTROL
from store.keys import ROLES
from store.personalization import count_views
from tests.utils.api import api_harness
from tests.utils.personalization import add_seed_segments, customers_by_group, shipped_campaign
from tests.utils.segments import add_customer

SLUG = "rfm-homepage"
DECIDE = f"/v1/personalizations/{SLUG}/decide"
DECIDE_TEMPLATE = "/v1/personalizations/{slug}/decide"
SHOP = "https://shop.example.com"
LABELS = ("champions", "regulars", "promising", "needs-attention", "at-risk")


@pytest.fixture
def api(store_engine):
    with api_harness(store_engine, cors_origins=SHOP) as harness:
        yield harness


@pytest.fixture
def answered(monkeypatch) -> list[bool]:  # noqa: ANN001
    """Whether the fast path answered each request it saw (True) or passed it on."""
    seen: list[bool] = []
    ordinary = personalizations.DecideFastPath._ordinary

    async def spy(self, scope, slug):  # noqa: ANN001, ANN202
        body = await ordinary(self, scope, slug)
        seen.append(body is not None)
        return body

    monkeypatch.setattr(personalizations.DecideFastPath, "_ordinary", spy)
    return seen


@pytest.fixture
def routed(monkeypatch) -> list[tuple[Any, Any]]:  # noqa: ANN001
    """The route and path parameters each request's scope held once answered: what a
    middleware wrapping the app (metrics by route) sees."""
    seen: list[tuple[Any, Any]] = []
    call = personalizations.DecideFastPath.__call__

    async def spy(self, scope, receive, send):  # noqa: ANN001, ANN202
        await call(self, scope, receive, send)
        seen.append((scope.get("route"), scope.get("path_params")))

    monkeypatch.setattr(personalizations.DecideFastPath, "__call__", spy)
    return seen


def _customers(api) -> list[str]:  # noqa: ANN001
    """Two of each label (one treated, one held out), one in no segment, one unknown."""
    treated, held = customers_by_group(SLUG, 0.1, treated=6, held_out=5)
    members = {label: [treated[i], held[i]] for i, label in enumerate(LABELS)}
    add_seed_segments(api.engine, members)
    for i, customer in enumerate([*treated, *held]):
        add_customer(api.engine, customer, {"first_name": "Ann"} if i % 2 else {})
    # no campaign check falls due during a test (the request it falls on goes to the route)
    api.client.app.state.campaigns.check_seconds = 3_600
    response = api.post("/v1/personalizations", json=shipped_campaign(), role="marketer")
    assert response.status_code == 201
    assert api.post(f"/v1/personalizations/{SLUG}/activate", role="marketer").status_code == 200
    return [*treated, *held, "never-seen"]


def _both(api, method: str, url: str, headers: dict[str, str]) -> tuple[Any, Any]:  # noqa: ANN001
    def send() -> Any:
        response = api.client.request(method, url, headers=headers, follow_redirects=False)
        return response.status_code, list(response.headers.raw), response.content

    state = api.client.app.state
    state.decide_fast_path = True
    fast = send()
    state.decide_fast_path = False
    try:
        slow = send()
    finally:
        state.decide_fast_path = True
    return fast, slow


def test_ordinary_decisions_are_answered_by_the_fast_path_as_by_the_route(  # noqa: ANN001
    api, answered, routed
) -> None:
    customers = _customers(api)
    for role in ("web", "ingest", "admin"):  # the route's first call fills the key cache
        api.get(f"{DECIDE}?customer_id=warm", role=role)
    experiences = set()
    (decide_route,) = [r for r in personalizations.router.routes if r.path == DECIDE_TEMPLATE]
    for customer in customers:
        for role in ("web", "ingest", "admin"):
            for extra in ({}, {"Origin": SHOP}, {"Origin": "https://elsewhere.example.com"}):
                answered.clear()
                routed.clear()
                fast, slow = _both(api, "GET", f"{DECIDE}?customer_id={customer}", {
                    **api.headers(role), **extra,
                })  # fmt: skip
                assert fast == slow, (customer, role, extra)
                assert fast[0] == 200 and answered == [True], (customer, role, extra)
                assert routed[0] == routed[1] == (decide_route, {"slug": SLUG})
                experiences.add(personalizations.orjson.loads(fast[2])["experience"])
    assert experiences >= {"Champions", "At Risk", CONTROL, "default"}
    api.client.app.state.view_writer.flush()
    with api.engine.connect() as conn:  # every decision but the warm-up ones twice
        assert count_views(conn, slug=SLUG) == 3 + len(customers) * 3 * 3 * 2


def test_everything_else_is_left_to_the_route(api, answered) -> None:  # noqa: ANN001
    customers = _customers(api)
    api.get(f"{DECIDE}?customer_id=warm", role="web")
    web = api.headers("web")
    bearer = web["Authorization"]
    preflight = {"Origin": SHOP, "Access-Control-Request-Method": "GET"}
    cases: list[tuple[str, str, dict[str, str], int]] = [
        ("GET", DECIDE, web, 422),  # no customer_id
        ("GET", f"{DECIDE}?customer_id=", web, 422),
        ("GET", f"{DECIDE}?customer_id={'x' * 256}", web, 422),
        ("GET", f"{DECIDE}?customer_id=a%00b", web, 422),
        ("GET", f"{DECIDE}?customer_id=a&customer_id=b", web, 200),  # the route picks one
        ("GET", f"{DECIDE}?customer_id=a&note=%00", web, 422),
        ("GET", f"{DECIDE}?customer_id=a&note={'y' * 2049}", web, 422),
        ("GET", f"{DECIDE}?customer_id=a", {}, 401),
        ("GET", f"{DECIDE}?customer_id=a", {"Authorization": "Bearer nope"}, 401),
        ("GET", f"{DECIDE}?customer_id=a", {"Authorization": bearer[7:]}, 401),
        ("GET", f"{DECIDE}?customer_id=a", {"Authorization": "Basic abc"}, 401),
        ("GET", f"{DECIDE}?customer_id=a", {"Authorization": "Bearer nope", "Origin": SHOP}, 401),
        ("GET", "/v1/personalizations/nope/decide?customer_id=a", web, 404),
        ("GET", f"/v1/personalizations/{'s' * 201}/decide?customer_id=a", web, 422),
        ("GET", f"{DECIDE}/?customer_id=a", web, 307),
        ("POST", f"{DECIDE}?customer_id=a", web, 405),
        ("HEAD", f"{DECIDE}?customer_id=a", web, 405),
        ("OPTIONS", DECIDE, preflight, 204),
        ("OPTIONS", DECIDE, {**preflight, "Origin": "https://evil.example"}, 403),
    ]
    for role in ROLES:
        api.get(f"{DECIDE}?customer_id=warm", role=role)
        if role not in personalizations.DECIDE_ROLES:
            cases.append(("GET", f"{DECIDE}?customer_id={customers[0]}", api.headers(role), 403))
    assert len(cases) == 19 + 2  # marketer and support
    for method, url, headers, status in cases:
        answered.clear()
        fast, slow = _both(api, method, url, headers)
        assert fast == slow, (method, url, headers)
        assert fast[0] == status, (method, url, headers)
        assert True not in answered, (method, url, headers)
    # the roles the fast path lets through are those the route lets through
    allowed = {
        role for role in ROLES if api.get(f"{DECIDE}?customer_id=a", role=role).status_code == 200
    }
    assert allowed == personalizations.DECIDE_ROLES


def test_a_paused_campaign_is_answered_alike(api, answered) -> None:  # noqa: ANN001
    customers = _customers(api)
    assert api.post(f"/v1/personalizations/{SLUG}/pause", role="marketer").status_code == 200
    api.get(f"{DECIDE}?customer_id=warm", role="web")
    for customer in customers:
        answered.clear()
        fast, slow = _both(api, "GET", f"{DECIDE}?customer_id={customer}", api.headers("web"))
        assert fast == slow and answered == [True]
        assert b'"active":false' in fast[2]


def test_a_campaign_changed_by_another_process_is_seen_within_the_check(
    api, store_engine, answered
) -> None:  # noqa: ANN001
    _customers(api)
    with api_harness(store_engine) as other:  # another API process on the same store
        other.client.app.state.campaigns.check_seconds = 0.2
        first = other.get(f"{DECIDE}?customer_id=c-1", role="web").json()
        assert first["version"] == 1
        raw = {**shipped_campaign(), "control_share": 0.2}
        assert (
            api.client.put(
                f"/v1/personalizations/{SLUG}", json=raw, headers=api.headers("marketer")
            ).status_code
            == 200
        )
        assert api.post(f"/v1/personalizations/{SLUG}/activate", role="marketer").status_code == 200
        versions = set()
        answered.clear()
        for _ in range(40):  # up to 4 s; the check falls due after 0.2 s
            versions.add(other.get(f"{DECIDE}?customer_id=c-1", role="web").json()["version"])
            if 2 in versions:
                break
            time.sleep(0.1)
        assert 2 in versions
        assert all(answered)  # the fast path checked it again itself
