"""Campaign definitions, control buckets and slot templates (pure: no store).

Control assignment: the same bucket on every call and in every process; the control
share holds on 100,000 generated ids; changing the share moves only the buckets between
the two thresholds. Definitions: every error names its field. Slots: proven in the
decision's sandbox, escaped, and the shipped campaign's all prove."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.personalization import (
    BUCKETS,
    SLOTS,
    bucket_of,
    control_threshold,
    in_control,
    parse_definition,
    segments_named,
    slot_sources,
    stored_form,
)
from core.rendering import TemplateProblem, compile_slot, prove_slot, render_slot, slot_context

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "templates" / "personalizations" / "homepage.json"
IDS = [f"customer-{i}" for i in range(100_000)]


def _definition(**changes: object) -> dict:
    base = {
        "slug": "home",
        "name": "Homepage",
        "control_share": 0.1,
        "conversion": {"event": "Purchase", "value_property": "total_price", "within": "P7D"},
        "default": {"banner": "Hello", "top_bar": "Hi", "recommended": "Best", "offer": ""},
        "experiences": [
            {"name": "VIP", "segment": "default:champions", "content": {"banner": "VIP"}},
            {
                "name": "Big spenders",
                "condition": {"attribute": "total_spent", "op": "gt", "value": 500},
                "content": {"offer": "10% off"},
            },
        ],
    }
    return {**base, **changes}


# --- buckets ---------------------------------------------------------------------------------


def test_a_bucket_is_the_same_on_every_call() -> None:
    first = [bucket_of("home", customer) for customer in IDS[:2_000]]
    for _ in range(3):
        assert [bucket_of("home", customer) for customer in IDS[:2_000]] == first
    assert all(0 <= b < BUCKETS for b in first)
    # another campaign deals its own buckets
    other = [bucket_of("checkout", customer) for customer in IDS[:2_000]]
    assert sum(a == b for a, b in zip(first, other, strict=True)) < 20


def test_a_bucket_survives_a_restart() -> None:
    # A fresh interpreter with another hash seed (Python's str hash is salted per process).
    code = (
        "import json; from core.personalization import bucket_of;"
        " print(json.dumps([bucket_of('home', f'customer-{i}') for i in range(500)]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(done.stdout) == [bucket_of("home", c) for c in IDS[:500]]


@pytest.mark.parametrize("share", [0.1, 0.25, 0.5, 0.01])
def test_the_control_share_holds_on_100000_ids(share: float) -> None:
    held_out = sum(in_control(bucket_of("home", customer), share) for customer in IDS)
    expected = share * len(IDS)
    sd = math.sqrt(len(IDS) * share * (1 - share))
    assert abs(held_out - expected) < 4 * sd, (held_out, expected)


def test_buckets_are_spread_evenly() -> None:
    deciles = [0] * 10
    for customer in IDS:
        deciles[bucket_of("home", customer) * 10 // BUCKETS] += 1
    # chi-square with 9 degrees of freedom: 27.9 is its 99.9th percentile
    chi2 = sum((n - 10_000) ** 2 / 10_000 for n in deciles)
    assert chi2 < 27.9, deciles


def test_changing_the_share_moves_only_the_buckets_it_must() -> None:
    buckets = {customer: bucket_of("home", customer) for customer in IDS}
    before = {c for c, b in buckets.items() if in_control(b, 0.10)}
    after = {c for c, b in buckets.items() if in_control(b, 0.15)}
    assert before <= after  # nobody leaves control when it grows
    moved = after - before
    assert moved == {c for c, b in buckets.items() if 1_000 <= b < 1_500}
    assert abs(len(moved) - 5_000) < 4 * math.sqrt(100_000 * 0.05 * 0.95)
    smaller = {c for c, b in buckets.items() if in_control(b, 0.05)}
    assert smaller <= before
    assert before - smaller == {c for c, b in buckets.items() if 500 <= b < 1_000}
    assert control_threshold(0.1) == 1_000 and control_threshold(0.0) == 0


# --- definitions ------------------------------------------------------------------------------


def test_a_valid_definition_round_trips_through_its_stored_form() -> None:
    definition, errors = parse_definition(_definition())
    assert errors == [] and definition is not None
    again, errors = parse_definition(stored_form(definition))
    assert errors == [] and again == definition
    assert stored_form(definition)["conversion"]["within"] == "P7D"
    # a slot an experience leaves out shows the default's
    assert definition.content_of(definition.experiences[0]) == {
        "banner": "VIP",
        "top_bar": "Hi",
        "recommended": "Best",
        "offer": "",
    }
    assert segments_named(definition) == [("experiences[0].segment", "default:champions")]


def test_every_error_names_its_field() -> None:
    raw = _definition(
        control_share=1.2,
        conversion={"event": "", "within": "PT10S", "value_property": 'a."b'},
        experiences=[
            {"name": "control", "segment": "x"},
            {"name": "Both", "segment": "x", "condition": {"segment": "y"}},
            {"name": "Bad", "condition": {"attribute": "age", "op": "between", "value": 1}},
            {"name": "Slots", "segment": "x", "content": {"hero": "?"}},
        ],
        cors_origins=["https://shop.example.com/path"],
    )
    definition, errors = parse_definition(raw)
    assert definition is None
    fields = {e.field for e in errors}
    assert {
        "control_share",
        "conversion.event",
        "conversion.within",
        "conversion.value_property",
        "experiences[0].name",
        "experiences[1]",
        "experiences[2].condition.op",
        "experiences[3].content.hero",
        "cors_origins[0]",
    } <= fields, errors


def test_experience_names_are_unique() -> None:
    raw = _definition(experiences=[{"name": "A", "segment": "x"}, {"name": "A", "segment": "y"}])
    _, errors = parse_definition(raw)
    assert [(e.code, e.field) for e in errors] == [("duplicate_name", "experiences[1].name")]


def test_slot_sources_are_found_in_raw_json_even_when_it_is_invalid() -> None:
    raw = _definition(control_share="lots")
    found = dict(slot_sources(raw))
    assert found["default.banner"] == "Hello"
    assert found["experiences[0].content.banner"] == "VIP"
    assert found["experiences[1].content.offer"] == "10% off"


# --- slots -----------------------------------------------------------------------------------


def test_a_slot_must_guard_every_attribute_it_reads() -> None:
    prove_slot("Welcome back, {{ customer.first_name | default('there') }}!")
    prove_slot("{% if customer.city is defined %}Hello {{ customer.city }}{% endif %}")
    with pytest.raises(TemplateProblem) as raised:
        prove_slot("Welcome back, {{ customer.first_name }}!")
    assert raised.value.code == "template_undefined"
    assert "first_name" in raised.value.message and "without attributes" in raised.value.message


@pytest.mark.parametrize(
    ("source", "code"),
    [
        ("{{ customer.first_name | shout }}", "template_syntax"),
        ("{% if %}", "template_syntax"),
        ("{{ customer.__class__.__mro__ }}", "template_unsafe"),
        ("{{ 1 / 0 }}", "template_render_failed"),
    ],
)
def test_a_broken_slot_is_refused_with_its_reason(source: str, code: str) -> None:
    with pytest.raises(TemplateProblem) as raised:
        prove_slot(source)
    assert raised.value.code == code


def test_a_slot_escapes_what_it_prints_and_keeps_its_own_markup() -> None:
    slot = compile_slot("<b>Hi</b> {{ customer.first_name | default('there') }}")
    context = slot_context({"first_name": "<script>x</script>"}, campaign="c", experience="e")
    assert render_slot(slot, context) == "<b>Hi</b> &lt;script&gt;x&lt;/script&gt;"
    constant = compile_slot("  Exclusive VIP Offer: 20% off!  ")
    assert constant.constant == "Exclusive VIP Offer: 20% off!"


def test_the_shipped_campaign_is_valid_and_proves() -> None:
    raw = json.loads(SHIPPED.read_text())
    definition, errors = parse_definition(raw)
    assert errors == [] and definition is not None
    assert [e.name for e in definition.experiences] == [
        "Champions",
        "Regulars",
        "Promising",
        "Needs Attention",
        "At Risk",
    ]
    for _, source in slot_sources(raw):
        prove_slot(source, known_attributes={"first_name": "Ann"})
    for experience in definition.experiences:
        assert set(definition.content_of(experience)) == set(SLOTS)


def test_a_slot_is_remembered_by_the_values_it_reads_and_nothing_else() -> None:
    slot = compile_slot("Hi {{ customer.first_name | default('there') }} ({{ experience }})")
    assert slot.reads == ("first_name",)

    def text(customer: dict, experience: str = "VIP") -> str:
        context = slot_context(customer, campaign="c", experience=experience)
        return render_slot(slot, context)

    assert text({"first_name": "Ann", "city": "Oslo"}) == "Hi Ann (VIP)"
    assert text({"first_name": "Bo", "city": "Oslo"}) == "Hi Bo (VIP)"
    assert text({"city": "Rome"}) == "Hi there (VIP)"
    assert text({"first_name": "Ann"}, "control") == "Hi Ann (control)"
    assert text({"first_name": ["a", "list"]}) == "Hi [&#39;a&#39;, &#39;list&#39;] (VIP)"
    assert len(slot.memo) == 4
    # a slot that reaches the whole customer is rendered every time
    whole = compile_slot("{% set c = customer %}{{ c.first_name | default('?') }}")
    assert whole.reads is None
    assert (
        render_slot(whole, slot_context({"first_name": "Ann"}, campaign="c", experience="e"))
        == "Ann"
    )
    assert render_slot(whole, slot_context({}, campaign="c", experience="e")) == "?"


@pytest.mark.parametrize(
    "attributes",
    [
        {},
        {"first_name": "Ann", "city": "Oslo"},
        {"first_name": "", "name": "  Bo Berg "},
        {"firstName": "Cy", "email": "attr@example.com", "id": "not-the-id"},
        {"full_name": "Di Dow", "city": None, "phone": "+1"},
        {"first_name": None, "given_name": "Ed", "tags": ["a"]},
    ],
)
def test_a_field_is_what_the_context_would_hold(attributes: dict) -> None:
    from core.rendering import ABSENT, customer_context, customer_field

    for email, phone in ((None, None), ("a@example.com", "+4712345678"), ("", "")):
        context = customer_context(
            customer_id="c-1", email=email, phone=phone, attributes=attributes
        )
        for name in ("id", "email", "phone", "first_name", "city", "tags", "name", "nope"):
            assert customer_field(
                name, customer_id="c-1", email=email, phone=phone, attributes=attributes
            ) == context.get(name, ABSENT), (name, attributes, email)
