"""Templates are proven before they are used: saving a template, validating, creating and
activating a journey render each template for sample customers in the send path's own
environment, and a template that would fail at every send is a 422 naming the template,
the step and the line."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session

from core.rendering import (
    TemplateProblem,
    customer_context,
    prove_template,
    render_email,
    template_context,
)
from core.tables import Customer
from store.templates import SHIPPED_TEMPLATES_DIR, save_template, template_path_problem
from tests.test_journeys_api import add_segments
from tests.utils.api import ApiHarness, api_harness
from tests.utils.journey_runtime import CHAMPIONS

SHIPPED = sorted(
    file.relative_to(SHIPPED_TEMPLATES_DIR).as_posix()
    for file in SHIPPED_TEMPLATES_DIR.rglob("*")
    if file.is_file()
    and template_path_problem(file.relative_to(SHIPPED_TEMPLATES_DIR).as_posix()) is None
)

UNGUARDED = (
    "{% block subject %}Hello{% endblock %}\n"
    "{% block html %}<p>\n"
    "Hi {{ customer.first_name }},\n"
    "</p>{% endblock %}"
)
DEFAULTED = UNGUARDED.replace("customer.first_name", 'customer.first_name | default("there")')
BAD_FILTER = (
    "{% block subject %}Hello{% endblock %}\n"
    "{% block html %}\n"
    "{% if customer.first_name is defined %}\n"
    "{{ customer.first_name | shout }}\n"
    "{% endif %}{% endblock %}"
)
DIVIDES_BY_ZERO = (
    "{% block subject %}Hello{% endblock %}\n{% block html %}\n{{ 10 / 0 }}{% endblock %}"
)
UNKNOWN_METHOD = (
    "{% block subject %}Hello{% endblock %}\n{% block html %}\n\n{{ customer.id.shout() }}"
    "{% endblock %}"
)
# Guarded, so it renders for customers without `total`; breaks when `total` is not a number.
ROUNDS_TOTAL = (
    "{% block subject %}Hello{% endblock %}\n"
    "{% block html %}{% if customer.total is defined %}\n"
    "You spent {{ customer.total | round }}.{% endif %}{% endblock %}"
)


def _problem(source: str, path: str = "t/x.html", **kwargs: Any) -> TemplateProblem:
    with pytest.raises(TemplateProblem) as caught:
        prove_template(source, path=path, **kwargs)
    return caught.value


# --- the proof itself -------------------------------------------------------------------


@pytest.mark.parametrize("path", SHIPPED)
def test_every_shipped_template_is_proven(path: str) -> None:
    source = (SHIPPED_TEMPLATES_DIR / path).read_text()
    prove_template(source, path=path)
    prove_template(source, path=path, known_attributes={"first_name": "Grace", "city": "Oslo"})


def test_an_unguarded_attribute_names_the_variable_and_the_line() -> None:
    problem = _problem(UNGUARDED)
    assert (problem.kind, problem.code, problem.line) == ("undefined", "template_undefined", 3)
    assert problem.message.startswith("line 3: `first_name` is undefined: add `| default(...)`")
    # Even when every stored customer has the attribute: customers differ.
    assert _problem(UNGUARDED, known_attributes={"first_name": "Ada"}).line == 3
    prove_template(DEFAULTED, path="t/x.html")


def test_an_sms_must_not_read_the_email_unguarded() -> None:
    problem = _problem("Hi!\n{{ customer.email }}", path="t/x.sms.txt")
    assert problem.line == 2 and "`email` is undefined" in problem.message
    prove_template("{{ customer.phone }}: {{ name }} {{ journey }} {{ step }}", path="t/x.sms.txt")


def test_a_bad_filter_names_its_line_even_where_no_send_reaches_it() -> None:
    problem = _problem(BAD_FILTER)
    assert (problem.code, problem.line) == ("template_syntax", 4)
    assert problem.message == "line 4: no filter named 'shout'"


@pytest.mark.parametrize(
    ("source", "line", "words"),
    [
        (DIVIDES_BY_ZERO, 3, "ZeroDivisionError: division by zero"),
        (UNKNOWN_METHOD, 4, "has no attribute 'shout'"),
    ],
    ids=["divides_by_zero", "unknown_method"],
)
def test_runtime_errors_name_their_line(source: str, line: int, words: str) -> None:
    problem = _problem(source)
    assert problem.line == line and problem.message.startswith(f"line {line}:")
    assert words in problem.message


def test_guarded_parts_render_with_the_known_attributes() -> None:
    prove_template(ROUNDS_TOTAL, path="t/x.html")
    prove_template(ROUNDS_TOTAL, path="t/x.html", known_attributes={"total": 12.5})
    problem = _problem(ROUNDS_TOTAL, known_attributes={"total": "a lot"})
    assert problem.line == 3 and "every known attribute" in problem.message


def test_the_send_path_names_the_line_too() -> None:
    context = template_context(
        customer_context(customer_id="c-1", email="a@example.com", phone=None, attributes={}),
        journey="j",
        step="s",
        unsubscribe_url="https://j.example/u/T",
    )
    with pytest.raises(TemplateProblem) as caught:
        render_email(DIVIDES_BY_ZERO, context)
    assert caught.value.line == 3 and caught.value.kind == "render"


# --- saving a template ------------------------------------------------------------------


@pytest.fixture
def api(store_engine: Engine):
    add_segments(store_engine)
    with api_harness(store_engine) as harness:
        yield harness


def _put(api: ApiHarness, path: str, source: str) -> Any:
    return api.client.put(
        f"/v1/templates/{path}", headers=api.headers("marketer"), json={"source": source}
    )


def _stored_paths(api: ApiHarness) -> set[str]:
    listed = api.get("/v1/templates", role="marketer").json()["data"]
    return {t["path"] for t in listed if t["origin"] == "api"}


@pytest.mark.parametrize(
    ("source", "code", "line"),
    [
        (UNGUARDED, "template_undefined", 3),
        (BAD_FILTER, "template_syntax", 4),
        (DIVIDES_BY_ZERO, "template_render_failed", 3),
    ],
    ids=["unguarded", "bad_filter", "divides_by_zero"],
)
def test_saving_a_template_that_does_not_render_is_a_422_and_stores_nothing(
    api: ApiHarness, source: str, code: str, line: int
) -> None:
    created = api.post(
        "/v1/templates", role="marketer", json={"path": "winter/sale.html", "source": source}
    )
    assert created.status_code == 422, created.text
    error = created.json()["error"]
    assert (error["code"], error["field"]) == (code, "source")
    assert error["message"].startswith(f"line {line}:")
    assert api.get("/v1/templates/winter/sale.html", role="marketer").status_code == 404
    assert _put(api, "winter/sale.html", source).status_code == 422
    assert _stored_paths(api) == set()


def test_a_defaulted_template_saves_and_a_broken_replacement_changes_nothing(
    api: ApiHarness,
) -> None:
    created = api.post(
        "/v1/templates", role="marketer", json={"path": "winter/sale.html", "source": DEFAULTED}
    )
    assert created.status_code == 201, created.text
    replaced = _put(api, "winter/sale.html", UNGUARDED)
    assert replaced.status_code == 422 and replaced.json()["error"]["message"].startswith("line 3:")
    stored = api.get("/v1/templates/winter/sale.html", role="marketer").json()
    assert stored["source"] == DEFAULTED


def test_a_template_is_proven_against_the_stored_customers_attributes(
    api: ApiHarness,
) -> None:
    assert _put(api, "t/total.html", ROUNDS_TOTAL).status_code == 200
    with Session(api.engine) as session:
        session.add(Customer(id="c-1", attributes={"total": "a lot"}))
        session.commit()
    refused = _put(api, "t/total.html", ROUNDS_TOTAL + " ")
    assert refused.status_code == 422
    assert refused.json()["error"]["code"] == "template_render_failed"
    assert refused.json()["error"]["message"].startswith("line 3:")


# --- journeys ---------------------------------------------------------------------------


SLUG = CHAMPIONS["slug"]


def _journey(vip_template: str = "champions/vip_rewards.html") -> dict[str, Any]:
    raw = copy.deepcopy(CHAMPIONS)
    raw["steps"]["vip"]["template"] = vip_template
    return raw


def _store_unproven(api: ApiHarness, path: str, source: str) -> None:
    """A template that never went through the API's proof (saved before it existed)."""
    with Session(api.engine) as session:
        save_template(session, path=path, source=source)
        session.commit()


def test_validate_lists_a_template_that_does_not_render_with_its_step_and_line(
    api: ApiHarness,
) -> None:
    _store_unproven(api, "t/vip.html", UNGUARDED)
    raw = _journey("t/vip.html")
    raw["steps"]["recs"]["template"] = "t/bad_filter.html"
    _store_unproven(api, "t/bad_filter.html", BAD_FILTER)
    body = api.post("/v1/journeys/validate", role="marketer", json=raw).json()
    assert body["valid"] is False
    found = {e["field"]: e for e in body["errors"]}
    assert set(found) == {"steps.vip.template", "steps.recs.template"}
    vip = found["steps.vip.template"]
    assert vip["code"] == "template_undefined"
    assert vip["message"].startswith(
        "step 'vip': template 't/vip.html' does not render: line 3: `first_name` is undefined"
    )
    assert found["steps.recs.template"]["code"] == "template_syntax"
    assert "line 4: no filter named 'shout'" in found["steps.recs.template"]["message"]

    created = api.post("/v1/journeys", role="marketer", json=raw)
    assert created.status_code == 422
    assert {e["field"] for e in created.json()["errors"]} == set(found)
    assert api.get(f"/v1/journeys/{SLUG}", role="marketer").status_code == 404


def test_activate_refuses_a_version_whose_template_no_longer_renders(
    api: ApiHarness,
) -> None:
    assert _put(api, "t/vip.html", DEFAULTED).status_code == 200
    assert api.post("/v1/journeys", role="marketer", json=_journey("t/vip.html")).status_code == 201
    before = api.get(f"/v1/journeys/{SLUG}", role="marketer").json()
    _store_unproven(api, "t/vip.html", DIVIDES_BY_ZERO)

    refused = api.post(f"/v1/journeys/{SLUG}/activate", role="marketer")
    assert refused.status_code == 422, refused.text
    error = refused.json()["error"]
    assert (error["code"], error["field"]) == ("template_render_failed", "steps.vip.template")
    assert "'t/vip.html'" in error["message"] and "line 3: ZeroDivisionError" in error["message"]
    after = api.get(f"/v1/journeys/{SLUG}", role="marketer").json()
    assert after == before and after["state"] == "draft" and after["active_version"] is None

    _store_unproven(api, "t/vip.html", DEFAULTED)
    activated = api.post(f"/v1/journeys/{SLUG}/activate", role="marketer")
    assert activated.status_code == 200 and activated.json()["state"] == "active"


def test_a_journeys_own_attribute_updates_join_the_sample_customer(api: ApiHarness) -> None:
    adds_one = (
        "{% block subject %}Hello{% endblock %}\n"
        "{% block html %}{% if customer.points is defined %}\n"
        "{{ customer.points + 1 }} points{% endif %}{% endblock %}"
    )
    assert _put(api, "t/points.html", adds_one).status_code == 200
    raw = _journey("t/points.html")
    raw["steps"]["pause"] = {
        "type": "update_attribute",
        "attribute": "points",
        "value": "many",
        "next": "recs",
    }
    body = api.post("/v1/journeys/validate", role="marketer", json=raw).json()
    [error] = body["errors"]
    assert error["field"] == "steps.vip.template" and "line 3: TypeError" in error["message"]
    raw["steps"]["pause"]["value"] = 10
    assert api.post("/v1/journeys/validate", role="marketer", json=raw).json()["valid"] is True
