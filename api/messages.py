"""The local outbox and message templates: list captured messages, add / edit / delete
templates (proven on save: they must render for sample customers), preview a template for
a sample customer."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Path, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.engine import Engine
from sqlmodel import Session

from api.boundary import CONFLICT, NDJSON, PageLimit, resource_router, wants_ndjson
from api.deps import EngineDep, MarketerKey, SessionDep, SettingsDep, SupportKey
from core.bounds import MAX_PAGE_SIZE
from core.cursors import MAX_POSITION
from core.errors import Conflict, ErrorDetail, NotFound, ValidationFailed
from core.rendering import (
    TemplateProblem,
    customer_context,
    is_email_template,
    prove_template,
    render_email,
    render_sms,
    template_context,
    validate_template,
)
from store import messages as message_store
from store import templates as template_store
from store.customers import sample_attributes

outbox_router = resource_router(prefix="/v1/outbox", tags=["messages"])
templates_router = resource_router(prefix="/v1/templates", tags=["templates"])

TemplatePath = Annotated[
    str, Path(min_length=1, max_length=300, description="e.g. champions/welcome.html")
]


# --- outbox -----------------------------------------------------------------------------


class OutboxMessage(BaseModel):
    id: int
    channel: str
    to: str | None
    subject: str | None
    body: str | None
    text_body: str | None
    headers: dict[str, Any]
    step: str | None
    journey: str | None
    version: int | None
    customer_id: str
    template: str | None
    idempotency_key: str
    links: list[Any]
    status: str
    created_at: datetime


class OutboxPage(BaseModel):
    data: list[OutboxMessage]
    next_cursor: str | None = Field(
        description="pass as ?cursor= for the next page; null at the end"
    )


@outbox_router.get(
    "",
    response_model=OutboxPage,
    summary="Messages captured without a provider",
    responses={
        200: {"content": {NDJSON: {"schema": {"$ref": "#/components/schemas/OutboxMessage"}}}}
    },
)
def list_outbox(
    request: Request,
    session: SessionDep,
    engine: EngineDep,
    _: SupportKey,
    customer_id: str | None = None,
    journey: str | None = None,
    channel: Literal["email", "sms"] | None = None,
    limit: PageLimit = 100,
    cursor: str | None = None,
) -> OutboxPage | StreamingResponse:
    """Oldest first, a page at a time; with `Accept: application/x-ndjson`, every message
    that matches the filters, one JSON object a line."""
    after_id: int | None = None
    if cursor:
        if not (cursor.isascii() and cursor.isdigit()) or int(cursor) > MAX_POSITION:
            raise ValidationFailed(
                [ErrorDetail("invalid", "cursor is not one we gave out", "cursor")]
            )
        after_id = int(cursor)
    where = OutboxFilter(customer_id=customer_id, journey=journey, channel=channel)
    if wants_ndjson(request):
        return StreamingResponse(_stream_outbox(engine, where, after_id), media_type=NDJSON)
    rows = message_store.list_outbox(
        session, **where.model_dump(), after_id=after_id, limit=limit + 1
    )
    page = rows[:limit]
    return OutboxPage(
        data=[_outbox_message(row) for row in page],
        next_cursor=str(page[-1].id) if len(rows) > limit else None,
    )


class OutboxFilter(BaseModel):
    customer_id: str | None
    journey: str | None
    channel: str | None


def _outbox_message(row: message_store.MessageRecord) -> OutboxMessage:
    return OutboxMessage(
        id=row.id,
        channel=row.channel,
        to=row.to,
        subject=row.subject,
        body=row.body,
        text_body=row.text_body,
        headers=row.headers,
        step=row.step,
        journey=row.journey_slug,
        version=row.version,
        customer_id=row.customer_id,
        template=row.template,
        idempotency_key=row.idempotency_key,
        links=row.links,
        status=row.status,
        created_at=row.created_at,
    )


def _stream_outbox(engine: Engine, where: OutboxFilter, after_id: int | None) -> Iterator[bytes]:
    # Its own session, page by page: the request's session is closed before the body is
    # streamed, and a whole outbox need not sit in memory.
    with Session(engine) as session:
        while True:
            rows = message_store.list_outbox(
                session, **where.model_dump(), after_id=after_id, limit=MAX_PAGE_SIZE
            )
            for row in rows:
                yield _outbox_message(row).model_dump_json().encode() + b"\n"
            if len(rows) < MAX_PAGE_SIZE:
                return
            after_id = rows[-1].id


# --- templates --------------------------------------------------------------------------


class TemplateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, max_length=300, examples=["champions/winter.html"])
    source: str = Field(min_length=1, max_length=512 * 1024)


class TemplateSourceIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str = Field(min_length=1, max_length=512 * 1024)


class TemplatePublic(BaseModel):
    path: str
    channel: Literal["email", "sms"]
    origin: Literal["shipped", "api"]
    source: str
    updated_at: datetime | None = None


class TemplatesPublic(BaseModel):
    data: list[TemplatePublic]


class SampleCustomer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = "sample-customer"
    email: str | None = "ada@example.com"
    phone: str | None = "+15555550100"
    attributes: dict[str, Any] = Field(default_factory=lambda: {"first_name": "Ada"})


class PreviewIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str | None = Field(None, description="A stored or shipped template to render")
    source: str | None = Field(None, description="Or a template source, with `channel`")
    channel: Literal["email", "sms"] = "email"
    customer: SampleCustomer = Field(default_factory=SampleCustomer)


class PreviewPublic(BaseModel):
    channel: Literal["email", "sms"]
    subject: str | None = None
    preheader: str | None = None
    html: str | None = None
    text: str
    links: list[str] = Field(default_factory=list)
    sms_encoding: str | None = None
    sms_segments: int | None = None


def _public(template: template_store.StoredTemplate) -> TemplatePublic:
    return TemplatePublic(
        path=template.path,
        channel="email" if is_email_template(template.path) else "sms",
        origin=template.origin,  # type: ignore[arg-type]
        source=template.source,
        updated_at=template.updated_at,
    )


def _validated(path: str, source: str) -> None:
    problem = template_store.template_path_problem(path)
    if problem:
        raise ValidationFailed([ErrorDetail("invalid", problem, "path")])
    try:
        validate_template(source, path=path)
    except TemplateProblem as exc:
        raise ValidationFailed([ErrorDetail(exc.code, exc.message, "source")]) from exc


def _proven(session: Session, path: str, source: str) -> None:
    """422 naming the line unless the template compiles and renders for the sample
    customers (one without attributes, one with those of the stored customers)."""
    _validated(path, source)
    try:
        prove_template(source, path=path, known_attributes=sample_attributes(session))
    except TemplateProblem as exc:
        raise ValidationFailed([ErrorDetail(exc.code, exc.message, "source")]) from exc


@templates_router.get("", response_model=TemplatesPublic, summary="Every template")
def list_templates(session: SessionDep, _: MarketerKey) -> TemplatesPublic:
    return TemplatesPublic(data=[_public(t) for t in template_store.list_templates(session)])


@templates_router.post(
    "",
    response_model=TemplatePublic,
    status_code=201,
    summary="Add a template (validated)",
    responses={**CONFLICT},
)
def create_template(body: TemplateIn, session: SessionDep, _: MarketerKey) -> TemplatePublic:
    _proven(session, body.path, body.source)
    if (
        template_store.template_exists(session, path=body.path)
        and template_store.get_template(session, path=body.path).origin == "api"
    ):
        raise Conflict(f"template {body.path!r} exists; PUT replaces it", field="path")
    return _public(template_store.save_template(session, path=body.path, source=body.source))


@templates_router.post(
    "/preview",
    response_model=PreviewPublic,
    summary="Render for a sample customer",
    responses={404: {"description": "no template at that path"}},
)
def preview_template(
    body: PreviewIn, session: SessionDep, settings: SettingsDep, _: MarketerKey
) -> PreviewPublic:
    if body.path:
        source = template_store.load_template(session, path=body.path)
        channel = "email" if is_email_template(body.path) else "sms"
        path = body.path
    elif body.source:
        source, channel = body.source, body.channel
        path = "preview.html" if channel == "email" else "preview.sms.txt"
    else:
        raise ValidationFailed(
            [ErrorDetail("missing_field", "give a template path or a source", "path")]
        )
    _validated(path, source)
    customer = customer_context(
        customer_id=body.customer.id,
        email=body.customer.email,
        phone=body.customer.phone,
        attributes=body.customer.attributes,
    )
    context = template_context(
        customer,
        journey="preview",
        step="preview",
        unsubscribe_url=f"{settings.public_url.rstrip('/')}/u/preview",
    )
    try:
        if channel == "email":
            email = render_email(source, context)
            return PreviewPublic(
                channel="email",
                subject=email.subject,
                preheader=email.preheader,
                html=email.html,
                text=email.text,
                links=email.links,
            )
        sms = render_sms(source, context)
    except TemplateProblem as exc:
        raise ValidationFailed([ErrorDetail("render_failed", exc.message, "source")]) from exc
    return PreviewPublic(
        channel="sms", text=sms.body, sms_encoding=sms.encoding, sms_segments=sms.segments
    )


@templates_router.get("/{path:path}", response_model=TemplatePublic, summary="One template")
def get_template(path: TemplatePath, session: SessionDep, _: MarketerKey) -> TemplatePublic:
    if not template_store.template_exists(session, path=path):
        raise NotFound(f"template {path!r} not found", field="path")
    return _public(template_store.get_template(session, path=path))


@templates_router.put("/{path:path}", response_model=TemplatePublic, summary="Create or replace")
def put_template(
    path: TemplatePath, body: TemplateSourceIn, session: SessionDep, _: MarketerKey
) -> TemplatePublic:
    _proven(session, path, body.source)
    return _public(template_store.save_template(session, path=path, source=body.source))


@templates_router.delete(
    "/{path:path}", status_code=204, response_class=Response, summary="Delete an API-added template"
)
def delete_template(path: TemplatePath, session: SessionDep, _: MarketerKey) -> Response:
    template_store.delete_template(session, path=path)
    return Response(status_code=204)


routers = (outbox_router, templates_router)
