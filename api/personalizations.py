"""Personalisation campaigns (marketer): definitions and their lifecycle; decisions and
views for storefronts (ingest, web); analytics (marketer, support).

The decision is meant for every page view, so its route does the least it can: the
campaign comes from a per-process cache (`store.personalization.CampaignCache`, checked
against the store at most once a second), the customer and their first matching
experience from one statement, and the view goes to the in-process `ViewWriter` (no
write on the request's path).
"""

from __future__ import annotations

import json
import re
import time
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl

import orjson
from fastapi import Body, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.engine import Connection
from starlette.datastructures import State
from starlette.types import ASGIApp, Receive, Scope, Send

from api.boundary import CONFLICT, PERSONALIZATION_DEFINITION_MARK, resource_router
from api.deps import BrowserKey, KeyCache, MarketerKey, SessionDep, SupportKey
from core.bounds import (
    MAX_ID_LENGTH,
    MAX_QUERY_LENGTH,
    MAX_VERSION,
    Identifier,
    Instant,
    Name,
    text_problem,
)
from core.errors import ErrorDetail, ValidationFailed
from core.personalization import CONTROL, DEFAULT, PersonalizationDefinition, bucket_of
from core.tables import utcnow
from store.keys import VerifiedKey, hash_key
from store.personalization import (
    CampaignAnalytics,
    CampaignCache,
    CampaignState,
    DecisionReader,
    LiveCampaign,
    ViewRecord,
    activate_campaign,
    activated_versions,
    archive_campaign,
    campaign_analytics,
    create_campaign,
    get_campaign,
    list_campaigns,
    pause_campaign,
    put_campaign,
    validate_campaign,
    version_definition,
)
from store.templates import SHIPPED_TEMPLATES_DIR
from store.view_writer import ViewWriter

router = resource_router(prefix="/v1/personalizations", tags=["personalizations"])

MAX_SLUG_LENGTH = 200
SlugPath = Annotated[str, Path(min_length=1, max_length=MAX_SLUG_LENGTH)]
MAX_REPORTED_VIEWS = 1_000
# A storefront's clock may run a little ahead; a view much later than now is refused.
FUTURE_TOLERANCE = timedelta(minutes=5)

_EXAMPLE = SHIPPED_TEMPLATES_DIR / "personalizations" / "homepage.json"


def _example() -> dict[str, Any]:
    try:
        return json.loads(_EXAMPLE.read_text())
    except (OSError, ValueError):
        return {}


DefinitionBody = Annotated[
    dict[str, Any],
    Body(
        description=(
            "A campaign: slug, name, control_share, conversion (event, where, "
            "value_property, within), default content and ordered experiences (name, "
            "segment or condition, content with banner / top_bar / recommended / offer), "
            "cors_origins. Read as JSON so that validation reports every error at once; "
            "its schema is `PersonalizationDefinition`."
        ),
        openapi_examples={"homepage": {"summary": "The seed's campaign", "value": _example()}},
        json_schema_extra={PERSONALIZATION_DEFINITION_MARK: True},
    ),
]


# --- models ----------------------------------------------------------------------------------


class ErrorPublic(BaseModel):
    code: str
    message: str
    field: str | None = None


class ValidationPublic(BaseModel):
    valid: bool
    errors: list[ErrorPublic]


class CampaignVersionPublic(BaseModel):
    version: int
    definition: dict[str, Any]
    created_at: datetime
    activated_at: datetime | None = None
    status: Literal["draft", "active", "superseded"] = Field(
        description="active: what decisions use; superseded: once active, replaced since; "
        "draft: never activated"
    )


class CampaignPublic(BaseModel):
    slug: str
    name: str
    state: Literal["draft", "active", "paused", "archived"]
    latest_version: int
    active_version: int | None
    created_at: datetime
    updated_at: datetime
    versions: list[CampaignVersionPublic] | None = None


class CampaignsPublic(BaseModel):
    data: list[CampaignPublic]


class DecisionPublic(BaseModel):
    campaign: str
    version: int
    experience: str = Field(description="an experience's name, `control` or `default`")
    bucket: int = Field(description="the customer's control bucket, 0-9999 (sticky)")
    content: dict[str, str] = Field(description="banner, top_bar, recommended, offer: HTML text")
    audience: str | None = Field(
        description="the experience the customer matched; for control, the one withheld"
    )
    active: bool = Field(description="false: the campaign is not active and shows its default")


class ViewIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    customer_id: Identifier
    experience: Name = Field(description="as the decision said: a name, `control` or `default`")
    at: Instant | None = Field(default=None, description="when it was shown; default now")
    version: int | None = Field(
        default=None, ge=1, le=MAX_VERSION, description="the decision's version; default active"
    )
    audience: Name | None = Field(
        default=None, description="for control, the decision's audience; worked out if absent"
    )


class ViewsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    views: list[ViewIn] = Field(min_length=1, max_length=MAX_REPORTED_VIEWS)


class ViewsAccepted(BaseModel):
    accepted: int = Field(description="views queued; they are stored within a second")


def _public(campaign: CampaignState) -> CampaignPublic:
    versions = None
    if campaign.versions is not None:
        versions = []
        for v in campaign.versions:
            if v.version == campaign.active_version:
                status = "active"
            elif v.activated_at is not None:
                status = "superseded"
            else:
                status = "draft"
            versions.append(CampaignVersionPublic(**v.model_dump(), status=status))
    return CampaignPublic(**campaign.model_dump(exclude={"versions"}), versions=versions)


def _changed(request: Request, slug: str) -> None:
    # This process decides with the new state at once; the others within a second.
    campaigns: CampaignCache = request.app.state.campaigns
    campaigns.forget(slug)


# --- decisions and views -------------------------------------------------------------------


@router.get(
    "/{slug}/decide",
    response_model=DecisionPublic,
    summary="What a customer is shown now (call it on every page view)",
)
async def get_decision(
    slug: SlugPath,
    request: Request,
    _: BrowserKey,
    customer_id: Annotated[str, Query(min_length=1, max_length=MAX_ID_LENGTH)],
) -> Response:
    """The first experience whose audience the customer is in, with its slots rendered;
    the default content for the control group (`experience: control`, `audience` naming
    the experience withheld), for customers in no audience and for unknown customers.
    Recorded as a view, asynchronously, while the campaign is active."""
    state = request.app.state
    campaigns: CampaignCache = state.campaigns
    live = campaigns.peek(slug) or await run_in_threadpool(campaigns.get, slug)
    body = await decision_body(state, live, customer_id)
    return Response(body, media_type="application/json")


async def decision_body(state: State, live: LiveCampaign, customer_id: str) -> bytes:
    """The decision's JSON (`DecisionPublic`), its view queued for the writer: what the
    route and `DecideFastPath` both answer."""
    statement = live.statement.at(time.time())
    reader: DecisionReader = state.decision_reader
    row = await reader.read(statement, customer_id)
    decision = live.decide_row(customer_id, row)
    body = orjson.dumps(
        {
            "campaign": decision.campaign,
            "version": decision.version,
            "experience": decision.experience,
            "bucket": decision.bucket,
            "content": decision.content,
            "audience": decision.audience,
            "active": decision.serving,
        }
    )
    if decision.serving:
        writer: ViewWriter = state.view_writer
        writer.record(
            ViewRecord(
                campaign=live.slug,
                version=decision.version,
                customer_id=customer_id,
                experience=decision.experience,
                audience=decision.audience,
                bucket=decision.bucket,
                at=utcnow(),
            )
        )
    return body


_DECIDE_ROUTE = re.compile(r"^/v1/personalizations/([^/]+)/decide$")


DECIDE_ROLES = frozenset({"admin", "ingest", "web"})
"""The roles `BrowserKey` lets through (tests hold the two to each other)."""
_JSON_HEADERS = (b"content-type", b"application/json")


class DecideFastPath:
    """ASGI middleware that answers an ordinary decision before FastAPI's routing,
    dependency solving and exception layers, which cost a decision half its CPU
    (measured with py-spy on SQLite); the answer is `decision_body`, as the route's.

    Ordinary: `GET /v1/personalizations/{slug}/decide` whose slug and query parameters
    pass the route's bounds (`api.boundary`, the route's own lengths) with exactly one
    `customer_id`, a bearer key this process verified recently (`KeyCache`) whose role
    the route allows, and a campaign the cache knows (checked again here once a second,
    as the route does). Anything else (no key or an unknown one, a refused role, a
    parameter out of bounds, an unknown campaign, an error while deciding) goes on to
    the route, which answers it as it always has: errors stay in one place. It
    sits inside `BrowserCors`, so CORS is the same for both. `state.decide_fast_path`
    turns it off (tests compare the two paths)."""

    def __init__(self, app: ASGIApp, *, state: State):
        self.app = app
        self.state = state
        self.route = next(r for r in router.routes if getattr(r, "endpoint", None) is get_decision)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == "GET"
            and not scope.get("root_path")
            and self.state.decide_fast_path
        ):
            route = _DECIDE_ROUTE.match(scope["path"])
            body = await self._ordinary(scope, route.group(1)) if route else None
            if body is not None:
                # As routing leaves them, for what wraps the app (metrics by route).
                scope["route"] = self.route
                scope["path_params"] = {"slug": route.group(1)}
                headers = [(b"content-length", str(len(body)).encode()), _JSON_HEADERS]
                await send({"type": "http.response.start", "status": 200, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)

    async def _ordinary(self, scope: Scope, slug: str) -> bytes | None:
        if len(slug) > MAX_SLUG_LENGTH or text_problem(slug, max_length=MAX_QUERY_LENGTH):
            return None
        customer_id = _one_customer_id(scope["query_string"])
        if customer_id is None:
            return None
        key = self._recent_key(scope["headers"])
        if key is None or key.role not in DECIDE_ROLES:
            return None
        campaigns: CampaignCache = self.state.campaigns
        try:
            # None from peek: this request is the one to check the campaign again.
            live = campaigns.peek(slug) or await run_in_threadpool(campaigns.get, slug)
            return await decision_body(self.state, live, customer_id)
        except Exception:  # the route tries again and answers the error as it always has
            return None

    def _recent_key(self, headers: list[tuple[bytes, bytes]]) -> VerifiedKey | None:
        """The caller's key as `api.deps.current_key` reads it, if its cache holds it."""
        for name, value in headers:
            if name == b"authorization":
                scheme, _, secret = value.decode("latin-1").partition(" ")
                secret = secret.strip()
                if scheme.lower() != "bearer" or not secret:
                    return None
                cache: KeyCache = self.state.key_cache
                return cache.get(hash_key(secret))
        return None


def _one_customer_id(query_string: bytes) -> str | None:
    """`customer_id` when it is the one value of that name and every parameter is within
    the boundary's bounds, read as Starlette reads a query string; else None."""
    customer_id = None
    for name, value in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):
        if text_problem(value, max_length=MAX_QUERY_LENGTH):
            return None
        if name == "customer_id":
            if customer_id is not None:
                return None
            customer_id = value
    if customer_id is None or not 1 <= len(customer_id) <= MAX_ID_LENGTH:
        return None
    return customer_id


def _reported_views(
    conn: Connection, *, slug: str, views: list[ViewIn], campaigns: CampaignCache
) -> list[ViewRecord]:
    """The reported views as records, each checked against its version: a known
    experience, a bucket that agrees with it, a time not in the future. Every error."""
    now = utcnow()
    live = campaigns.get(slug, conn)
    shown = activated_versions(conn, slug=slug)
    versions: dict[int, LiveCampaign] = {live.version: live}
    errors: list[ErrorDetail] = []
    records: list[ViewRecord] = []
    for i, view in enumerate(views):
        version = view.version or live.version
        if version not in shown:
            errors.append(
                ErrorDetail(
                    "not_shown",
                    f"version {version} of {slug!r} was never active: nobody was shown it",
                    f"views[{i}].version",
                )
            )
            continue
        campaign = versions.get(version)
        if campaign is None:
            campaign = versions[version] = LiveCampaign.build(
                slug=slug,
                version=version,
                state="active",
                stamp=(),
                dialect=conn.dialect,
                definition=version_definition(conn, slug=slug, version=version),
            )
        problem = _view_problem(view, campaign, now)
        if problem:
            errors.append(ErrorDetail("invalid", problem[1], f"views[{i}].{problem[0]}"))
            continue
        bucket = bucket_of(slug, view.customer_id)
        audience = view.audience
        if view.experience == CONTROL and audience is None:
            audience = campaign.decide(conn, customer_id=view.customer_id).audience
        elif view.experience != CONTROL:
            audience = None if view.experience == DEFAULT else view.experience
        records.append(
            ViewRecord(
                campaign=slug,
                version=version,
                customer_id=view.customer_id,
                experience=view.experience,
                audience=audience,
                bucket=bucket,
                at=view.at or now,
            )
        )
    if errors:
        raise ValidationFailed(errors)
    return records


def _view_problem(view: ViewIn, campaign: LiveCampaign, now: datetime) -> tuple[str, str] | None:
    definition: PersonalizationDefinition = campaign.definition
    names = {e.name for e in definition.experiences}
    if view.experience not in names | {CONTROL, DEFAULT}:
        return "experience", (
            f"version {campaign.version} has no experience {view.experience!r}"
            " (nor is it control or default)"
        )
    held_out = bucket_of(campaign.slug, view.customer_id) < campaign.threshold
    if view.experience == CONTROL and not held_out:
        return "experience", "this customer is not in the control group of this version"
    if view.experience in names and held_out:
        return "experience", "this customer is in the control group: they see the default"
    if view.audience is not None and (view.experience != CONTROL or view.audience not in names):
        return "audience", "audience names the experience a control customer would have seen"
    if view.at is not None and view.at > now + FUTURE_TOLERANCE:
        return "at", "a view cannot be in the future"
    return None


@router.post("/{slug}/views", response_model=ViewsAccepted, status_code=202)
def post_views(
    slug: SlugPath, body: ViewsIn, request: Request, session: SessionDep, _: BrowserKey
) -> ViewsAccepted:
    """Views shown by a storefront that caches decisions, stored as decisions' views are
    (in batches, within a second). A control view without `audience` gets the experience
    the customer matches now. 422 names every view that does not fit its version."""
    records = _reported_views(
        session.connection(), slug=slug, views=body.views, campaigns=request.app.state.campaigns
    )
    writer: ViewWriter = request.app.state.view_writer
    writer.record_many(records)
    return ViewsAccepted(accepted=len(records))


# --- definitions and lifecycle ----------------------------------------------------------------


@router.post("", response_model=CampaignPublic, status_code=201, responses={**CONFLICT})
def post_campaign(
    body: DefinitionBody, request: Request, session: SessionDep, _: MarketerKey
) -> CampaignPublic:
    """Create a campaign as draft version 1; 422 lists every error, each naming its field
    (slot templates are proven in the decision's sandbox)."""
    campaign = create_campaign(session, raw=body)
    _changed(request, campaign.slug)
    return _public(get_campaign(session, slug=campaign.slug))


@router.post("/validate", response_model=ValidationPublic)
def post_validate(body: DefinitionBody, session: SessionDep, _: MarketerKey) -> ValidationPublic:
    """Check a definition without storing it: every error, each naming its field."""
    _, errors = validate_campaign(session, raw=body)
    return ValidationPublic(valid=not errors, errors=[ErrorPublic(**e.as_dict()) for e in errors])


@router.get("", response_model=CampaignsPublic)
def get_campaigns(
    session: SessionDep,
    _: MarketerKey,
    state: Literal["draft", "active", "paused", "archived"] | None = None,
) -> CampaignsPublic:
    return CampaignsPublic(data=[_public(c) for c in list_campaigns(session, state=state)])


@router.get("/{slug}", response_model=CampaignPublic)
def get_one_campaign(slug: SlugPath, session: SessionDep, _: MarketerKey) -> CampaignPublic:
    """The campaign's state and every version, newest first."""
    return _public(get_campaign(session, slug=slug))


@router.put("/{slug}", response_model=CampaignPublic, responses={**CONFLICT})
def put_one_campaign(
    slug: SlugPath, body: DefinitionBody, request: Request, session: SessionDep, _: MarketerKey
) -> CampaignPublic:
    """Add a version; the active version keeps deciding, unchanged, until activate."""
    put_campaign(session, slug=slug, raw=body)
    _changed(request, slug)
    return _public(get_campaign(session, slug=slug))


@router.post("/{slug}/activate", response_model=CampaignPublic, responses={**CONFLICT})
def post_activate(
    slug: SlugPath, request: Request, session: SessionDep, _: MarketerKey
) -> CampaignPublic:
    """The latest version decides from now on (frozen); 422 if it is not valid now."""
    activate_campaign(session, slug=slug)
    _changed(request, slug)
    return _public(get_campaign(session, slug=slug))


@router.post("/{slug}/pause", response_model=CampaignPublic, responses={**CONFLICT})
def post_pause(
    slug: SlugPath, request: Request, session: SessionDep, _: MarketerKey
) -> CampaignPublic:
    """Everyone gets the default content, and no view is recorded, until activate."""
    pause_campaign(session, slug=slug)
    _changed(request, slug)
    return _public(get_campaign(session, slug=slug))


@router.post("/{slug}/archive", response_model=CampaignPublic, responses={**CONFLICT})
def post_archive(
    slug: SlugPath, request: Request, session: SessionDep, _: MarketerKey
) -> CampaignPublic:
    """For good: the default content for everyone; views and analytics stay."""
    archive_campaign(session, slug=slug)
    _changed(request, slug)
    return _public(get_campaign(session, slug=slug))


# --- analytics -------------------------------------------------------------------------------


@router.get(
    "/{slug}/analytics",
    response_model=CampaignAnalytics,
    summary="Viewers, conversions, value and lift over control, per experience",
)
def get_analytics(
    slug: SlugPath,
    session: SessionDep,
    _: SupportKey,
    version: Annotated[int | None, Query(ge=1, le=MAX_VERSION)] = None,
    viewed_from: Annotated[
        Instant | None, Query(alias="from", description="Viewers first shown at or after.")
    ] = None,
    viewed_to: Annotated[
        Instant | None,
        Query(alias="to", description="Viewers first shown, and conversions, before."),
    ] = None,
) -> CampaignAnalytics:
    """Per experience: unique viewers, views, conversions (once per customer, within the
    window after their first view), conversion rate and value, and against the control
    customers of the same audience: lift, its 95% interval, a two-proportion z-test
    p-value, significance and an always-valid (mSPRT) interval, with a warning when a
    group is too small. Version: the active one by default."""
    if viewed_from and viewed_to and viewed_from >= viewed_to:
        raise ValidationFailed([ErrorDetail("invalid", "from must be before to", "from")])
    return campaign_analytics(
        session.connection(),
        slug=slug,
        version=version,
        viewed_from=viewed_from,
        viewed_to=viewed_to,
    )
