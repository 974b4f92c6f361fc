"""Personalisation pages, and the customer pages support lives on: the profile, scores,
segments, every run with its readable timeline, and "why"."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import quote, urlencode

from fastapi import Path, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel
from sqlalchemy.engine import Connection

from api.boundary import resource_router
from api.console.auth import require_user
from api.console.cache import Aggregates, Cached
from api.console.charts import forest_plot
from api.console.web import redirect, render, url
from core.bounds import MAX_ID_LENGTH
from core.errors import ErrorDetail, NotFound, ValidationFailed
from core.journeys import BranchStep
from core.personalization import SLOTS
from core.rendering import html_to_text
from core.tables import utcnow
from store import console as console_store
from store.customers import customer_segments, get_customer
from store.explain import (
    Explanation,
    explain_journey,
    explain_personalization,
    explain_segment,
)
from store.inspection import customer_journeys
from store.personalization import (
    CampaignAnalytics,
    LiveCampaign,
    campaign_analytics,
    default_analytics_version,
    get_campaign,
    list_campaigns,
    version_definition,
)
from store.rfm_models import customer_scores

router = resource_router()

Slug = Annotated[str, Path(min_length=1, max_length=200)]
CustomerId = Annotated[str, Path(min_length=1, max_length=MAX_ID_LENGTH)]
OptionalText = Annotated[str | None, Query(min_length=1, max_length=MAX_ID_LENGTH)]


def _aggregates(request: Request) -> Aggregates:
    return request.app.state.console.aggregates


# --- personalisation -------------------------------------------------------------------------


@router.get("/personalization")
def campaigns(request: Request) -> Response:
    user = require_user(request)
    with request.app.state.engine.connect() as conn:
        rows = list_campaigns(conn)
    return render(request, "campaigns.html", user=user, nav="personalization", campaigns=rows)


def _analytics(request: Request, slug: str, version: int) -> Cached[CampaignAnalytics] | None:
    return _aggregates(request).get(
        ("campaigns", slug, version),
        lambda conn: campaign_analytics(conn, slug=slug, version=version),
        max_age=30,
    )


def _analytics_context(request: Request, slug: str, version: int) -> dict[str, Any]:
    cached = _analytics(request, slug, version)
    forest = None
    if cached is not None:
        value = cached.value
        forest = forest_plot(
            [(e.experience, e.lift, e.lift_ci, e.significant) for e in value.experiences]
            + [
                (
                    "all experiences",
                    value.overall.lift,
                    value.overall.lift_ci,
                    value.overall.significant,
                )
            ]
        )
    return {
        "analytics": cached,
        "forest": forest,
        "version": version,
        "part_url": url(request, f"/parts/personalization/{slug}"),
    }


class SlotPreview(BaseModel):
    slot: str
    html: str
    text: str


class Preview(BaseModel):
    customer_id: str
    known: bool
    experience: str
    audience: str | None
    bucket: int
    slots: list[SlotPreview]


def _preview(conn: Connection, slug: str, version: int, customer_id: str) -> Preview:
    """What the version shows this customer, decided by the campaign's own statement as
    if it were active (a draft can be previewed before it serves anyone)."""
    definition = version_definition(conn, slug=slug, version=version)
    campaign = LiveCampaign.build(
        slug=slug,
        version=version,
        state="active",
        stamp=(),
        dialect=conn.dialect,
        definition=definition,
    )
    decision = campaign.decide(conn, customer_id=customer_id)
    known = get_customer(conn, customer_id=customer_id) is not None
    return Preview(
        customer_id=customer_id,
        known=known,
        experience=decision.experience,
        audience=decision.audience,
        bucket=decision.bucket,
        slots=[
            SlotPreview(
                slot=slot, html=decision.content[slot], text=html_to_text(decision.content[slot])
            )
            for slot in SLOTS
        ],
    )


@router.get("/personalization/{slug}")
def campaign(request: Request, slug: Slug, customer: OptionalText = None) -> Response:
    user = require_user(request)
    with request.app.state.engine.connect() as conn:
        state = get_campaign(conn, slug=slug)
        version = default_analytics_version(conn, slug=slug)
        definition = version_definition(conn, slug=slug, version=version)
        preview = _preview(conn, slug, version, customer) if customer else None
    return render(
        request,
        "campaign.html",
        user=user,
        nav="personalization",
        campaign=state,
        definition=definition,
        version=version,
        customer=customer or "",
        preview=preview,
        part=_analytics_context(request, slug, version),
    )


@router.get("/parts/personalization/{slug}")
def campaign_part(request: Request, slug: Slug) -> Response:
    require_user(request)
    with request.app.state.engine.connect() as conn:
        version = default_analytics_version(conn, slug=slug)
    return render(
        request, "parts/campaign_results.html", part=_analytics_context(request, slug, version)
    )


# --- customers ---------------------------------------------------------------------------------


@router.get("/customers")
def customers(
    request: Request, q: Annotated[str, Query(max_length=MAX_ID_LENGTH)] = ""
) -> Response:
    user = require_user(request)
    hits: list[console_store.CustomerHit] = []
    query = q.strip()
    if query:
        with request.app.state.engine.connect() as conn:
            hits = console_store.find_customers(conn, query=query)
        exact = [h for h in hits if query in (h.id, h.email)]
        if len(exact) == 1:
            return redirect(request, f"/customers/{_quoted(exact[0].id)}")
    return render(request, "customers.html", user=user, nav="customers", query=query, hits=hits)


def _quoted(customer_id: str) -> str:
    return quote(customer_id, safe="")


@router.get("/why")
def why_form(
    request: Request,
    customer: Annotated[str, Query(min_length=1, max_length=MAX_ID_LENGTH)],
    segment: OptionalText = None,
    journey: OptionalText = None,
    step: OptionalText = None,
    personalization: OptionalText = None,
) -> Response:
    """A "why" asked from a segment, journey or campaign page: go to the customer's."""
    require_user(request)
    query = {
        k: v
        for k, v in (
            ("segment", segment),
            ("journey", journey),
            ("step", step),
            ("personalization", personalization),
        )
        if v
    }
    return redirect(request, f"/customers/{_quoted(customer.strip())}/why?{urlencode(query)}")


@router.get("/customers/{customer_id}")
def customer(request: Request, customer_id: CustomerId) -> Response:
    user = require_user(request)
    settings = request.app.state.settings
    with request.app.state.engine.connect() as conn:
        profile = get_customer(conn, customer_id=customer_id)
        if profile is None:
            raise NotFound(f"no customer {customer_id}", field="customer_id")
        segments = customer_segments(conn, customer_id=customer_id)
        scores = customer_scores(conn, customer_id=customer_id)
        runs = customer_journeys(
            conn,
            customer_id=customer_id,
            ui_base=settings.temporal_ui_url,
            namespace=settings.temporal_namespace,
        )
        branch_steps = _branch_steps(conn, {(r.journey, r.version) for r in runs})
        campaigns = [c for c in list_campaigns(conn) if c.state != "archived"]
    return render(
        request,
        "customer.html",
        user=user,
        nav="customers",
        profile=profile,
        segments=segments,
        scores=scores,
        runs=runs,
        branch_steps=branch_steps,
        campaigns=campaigns,
        quoted=_quoted(customer_id),
    )


def _branch_steps(conn: Connection, keys: set[tuple[str, int]]) -> dict[tuple[str, int], list[str]]:
    found = {}
    for slug, version in keys:
        definition = console_store.journey_definition(conn, slug=slug, version=version)
        if definition is not None:
            found[(slug, version)] = [
                step_id
                for step_id, step in definition.steps.items()
                if isinstance(step, BranchStep)
            ]
    return found


@router.get("/customers/{customer_id}/why")
def why(
    request: Request,
    customer_id: CustomerId,
    segment: OptionalText = None,
    journey: OptionalText = None,
    step: OptionalText = None,
    personalization: OptionalText = None,
) -> Response:
    """The explanation the API's explain route gives, drawn as a tree."""
    user = require_user(request)
    given = [v for v in (segment, journey, personalization) if v is not None]
    if len(given) != 1:
        raise ValidationFailed(
            [ErrorDetail("invalid", "ask about one segment, journey or campaign", "segment")]
        )
    now = utcnow()
    with request.app.state.engine.connect() as conn:
        explanation: Explanation
        if segment is not None:
            explanation = explain_segment(conn, customer_id=customer_id, slug=segment, now=now)
        elif journey is not None:
            explanation = explain_journey(
                conn, customer_id=customer_id, slug=journey, step=step, now=now
            )
        else:
            assert personalization is not None
            explanation = explain_personalization(
                conn, customer_id=customer_id, slug=personalization, now=now
            )
    return render(
        request,
        "why.html",
        user=user,
        nav="customers",
        explanation=explanation,
        quoted=_quoted(customer_id),
    )
