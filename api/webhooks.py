"""Provider webhooks: SendGrid's signed event webhook, Twilio's status callbacks and
inbound messages (STOP / START). Every request is verified before anything changes;
an unsigned or mis-signed one is a 403."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from pydantic import BaseModel
from pydantic_core import from_json
from sendgrid.helpers.eventwebhook import EventWebhook
from twilio.request_validator import RequestValidator

from api.boundary import resource_router
from api.deps import EngineDep, SettingsDep
from core.bounds import (
    MAX_INSTANT,
    MAX_KEY_LENGTH,
    MIN_INSTANT,
    JsonProblem,
    check_json,
    text_problem,
)
from core.db import session_scope
from core.errors import Forbidden, JourneysError
from core.settings import Settings
from core.tables import utcnow
from store import messages as message_store

log = logging.getLogger("journeys.webhooks")

router = resource_router(prefix="/webhooks", tags=["webhooks"])

SENDGRID_SIGNATURE_HEADER = "X-Twilio-Email-Event-Webhook-Signature"
SENDGRID_TIMESTAMP_HEADER = "X-Twilio-Email-Event-Webhook-Timestamp"
TWILIO_SIGNATURE_HEADER = "X-Twilio-Signature"

# Events that mean the address must not be mailed again.
SUPPRESSING_EVENTS = {"bounce": "bounce", "spamreport": "spamreport"}
UNSUBSCRIBE_EVENTS = {"unsubscribe", "group_unsubscribe"}
STOP_KEYWORDS = {"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "REVOKE", "OPTOUT"}
START_KEYWORDS = {"START", "UNSTOP", "YES", "OPTIN"}


class WebhookAccepted(BaseModel):
    received: int
    recorded: int
    set_aside: int = 0


class BadWebhook(JourneysError):
    status_code = 400
    code = "bad_webhook"


# --- SendGrid ---------------------------------------------------------------------------


def verify_sendgrid(settings: Settings, *, payload: str, signature: str, timestamp: str) -> None:
    """Raise Forbidden unless the event webhook signature and timestamp check out."""
    if not settings.sendgrid_webhook_public_key:
        raise Forbidden("the SendGrid webhook public key is not configured", field="signature")
    if not signature or not timestamp:
        raise Forbidden("missing SendGrid signature headers", field="signature")
    try:
        sent_at = int(timestamp)
    except ValueError as exc:
        raise Forbidden("bad SendGrid webhook timestamp", field="timestamp") from exc
    if abs(time.time() - sent_at) > settings.webhook_tolerance_seconds:
        raise Forbidden("SendGrid webhook timestamp outside the tolerance", field="timestamp")
    try:
        verifier = EventWebhook(settings.sendgrid_webhook_public_key)
        valid = verifier.verify_signature(payload, signature, timestamp)
    except (ValueError, TypeError) as exc:
        raise Forbidden("SendGrid signature could not be checked", field="signature") from exc
    if not valid:
        raise Forbidden("SendGrid signature does not match", field="signature")


def _event_time(event: dict[str, Any]) -> datetime:
    stamp = event.get("timestamp")
    if isinstance(stamp, int | float) and not isinstance(stamp, bool):
        try:
            at = datetime.fromtimestamp(stamp, UTC)
        except (ValueError, OverflowError, OSError):
            return utcnow()
        if MIN_INSTANT <= at < MAX_INSTANT:
            return at
    return utcnow()


def storable_events(events: list[Any]) -> list[dict[str, Any]]:
    """The events within the input bounds; each other one is logged and set aside, so one
    bad event never makes SendGrid retry (and us refuse) the whole batch."""
    kept = []
    for index, event in enumerate(events):
        try:
            if not isinstance(event, dict):
                raise JsonProblem("", "an event is a JSON object")
            check_json(event)
        except JsonProblem as problem:
            log.warning("SendGrid event %d set aside: %s", index, problem)
            continue
        kept.append(event)
    return kept


def _find_message(session: Any, key: Any, provider_message_id: str | None) -> Any:
    if isinstance(key, str) and key:
        found = message_store.find_message(session, idempotency_key=key)
        if found is not None:
            return found
    if provider_message_id:
        return message_store.find_message_by_provider_id(
            session, provider_message_id=provider_message_id
        )
    return None


def record_sendgrid_events(engine: Any, events: list[dict[str, Any]]) -> int:
    """Record each event against its message (found by the idempotency key in
    custom_args, else the SendGrid message id); returns how many were new."""
    recorded = 0
    now = utcnow()
    with session_scope(engine) as session:
        for event in events:
            kind = str(event.get("event") or "")
            sg_message_id = str(event.get("sg_message_id") or "").split(".", 1)[0] or None
            message = _find_message(session, event.get("idempotency_key"), sg_message_id)
            dedupe = f"sendgrid:{event['sg_event_id']}" if event.get("sg_event_id") else None
            occurred_at = _event_time(event)
            detail = {
                key: event[key]
                for key in ("email", "reason", "status", "url", "type", "response", "sg_message_id")
                if key in event
            }
            is_new = message_store.record_message_event(
                session,
                message_id=message.id if message else None,
                kind=kind,
                detail=detail,
                occurred_at=occurred_at,
                dedupe_key=dedupe,
            )
            if not is_new:
                continue
            recorded += 1
            if message is not None:
                message_store.apply_delivery_report(
                    session,
                    message_id=message.id,
                    report=kind,
                    provider_message_id=sg_message_id,
                    now=now,
                )
            address = event.get("email")
            if kind in SUPPRESSING_EVENTS and isinstance(address, str) and address:
                message_store.suppress_address(
                    session,
                    address=address,
                    channel="email",
                    reason=SUPPRESSING_EVENTS[kind],
                    now=now,
                )
            if kind in UNSUBSCRIBE_EVENTS and message is not None:
                message_store.set_unsubscribed(
                    session, customer_id=message.customer_id, channel="email", at=occurred_at
                )
    return recorded


@router.post(
    "/sendgrid",
    response_model=WebhookAccepted,
    summary="SendGrid signed event webhook",
    responses={403: {"description": "Unsigned or mis-signed"}},
)
async def sendgrid_events(
    request: Request, engine: EngineDep, settings: SettingsDep
) -> WebhookAccepted:
    raw = await request.body()
    payload = raw.decode("utf-8", "replace")
    verify_sendgrid(
        settings,
        payload=payload,
        signature=request.headers.get(SENDGRID_SIGNATURE_HEADER, ""),
        timestamp=request.headers.get(SENDGRID_TIMESTAMP_HEADER, ""),
    )
    try:
        events = from_json(raw, allow_inf_nan=False)
    except ValueError as exc:
        raise BadWebhook("the event webhook body is not JSON", field="body") from exc
    if not isinstance(events, list):
        raise BadWebhook("the event webhook body is a JSON array of events", field="body")
    kept = storable_events(events)
    recorded = await run_in_threadpool(record_sendgrid_events, engine, kept)
    return WebhookAccepted(
        received=len(events), recorded=recorded, set_aside=len(events) - len(kept)
    )


# --- Twilio -----------------------------------------------------------------------------


def public_request_url(settings: Settings, request: Request) -> str:
    """The URL Twilio called (and signed): the public base URL, path and query."""
    url = settings.public_url.rstrip("/") + request.url.path
    return f"{url}?{request.url.query}" if request.url.query else url


async def verified_twilio_form(request: Request, settings: Settings) -> dict[str, str]:
    """The form Twilio posted, after checking X-Twilio-Signature; Forbidden otherwise."""
    if not settings.twilio_auth_token:
        raise Forbidden("the Twilio auth token is not configured", field="signature")
    signature = request.headers.get(TWILIO_SIGNATURE_HEADER, "")
    if not signature:
        raise Forbidden("missing X-Twilio-Signature", field="signature")
    body = (await request.body()).decode("utf-8", "replace")
    form = dict(parse_qsl(body, keep_blank_values=True))
    validator = RequestValidator(settings.twilio_auth_token)
    if not validator.validate(public_request_url(settings, request), form, signature):
        raise Forbidden("X-Twilio-Signature does not match", field="signature")
    for name, value in form.items():
        problem = text_problem(name, max_length=MAX_KEY_LENGTH) or text_problem(value)
        if problem:
            raise BadWebhook(f"form field {name[:40]!r} {problem}", field=name[:40])
    return form


_TWILIO_REPORTS = {"delivered": "delivered", "undelivered": "undelivered", "failed": "failed"}


def record_twilio_status(engine: Any, *, key: str | None, form: dict[str, str]) -> int:
    sid = form.get("MessageSid") or form.get("SmsSid")
    status = form.get("MessageStatus") or form.get("SmsStatus") or ""
    now = utcnow()
    with session_scope(engine) as session:
        message = _find_message(session, key, sid)
        is_new = message_store.record_message_event(
            session,
            message_id=message.id if message else None,
            kind=status or "status",
            detail={k: form[k] for k in ("MessageStatus", "ErrorCode", "To") if k in form},
            occurred_at=now,
            dedupe_key=f"twilio:{sid}:{status}" if sid else None,
        )
        if is_new and message is not None:
            message_store.apply_delivery_report(
                session,
                message_id=message.id,
                report=_TWILIO_REPORTS.get(status, status),
                provider_message_id=sid,
                now=now,
            )
    return 1 if is_new else 0


@router.post(
    "/twilio/status",
    response_model=WebhookAccepted,
    summary="Twilio message status callback",
    responses={403: {"description": "Unsigned or mis-signed"}},
)
async def twilio_status(
    request: Request, engine: EngineDep, settings: SettingsDep
) -> WebhookAccepted:
    form = await verified_twilio_form(request, settings)
    key = request.query_params.get("key")
    recorded = await run_in_threadpool(record_twilio_status, engine, key=key, form=form)
    return WebhookAccepted(received=1, recorded=recorded)


def apply_inbound_keyword(engine: Any, *, phone: str, body: str) -> str | None:
    """STOP opts the phone out of SMS, START back in; returns what was done."""
    keyword = body.strip().upper()
    if keyword not in STOP_KEYWORDS and keyword not in START_KEYWORDS:
        return None
    with session_scope(engine) as session:
        message_store.set_phone_opt_out(
            session, phone=phone, opted_out=keyword in STOP_KEYWORDS, now=utcnow()
        )
    return "opted_out" if keyword in STOP_KEYWORDS else "opted_in"


@router.post(
    "/twilio/inbound",
    response_class=Response,
    response_model=None,
    summary="Twilio inbound SMS (STOP / START)",
    responses={
        200: {"content": {"application/xml": {}}},
        403: {"description": "Unsigned or mis-signed"},
    },
)
async def twilio_inbound(request: Request, engine: EngineDep, settings: SettingsDep) -> Response:
    form = await verified_twilio_form(request, settings)
    phone = form.get("From", "")
    if phone:
        done = await run_in_threadpool(
            apply_inbound_keyword, engine, phone=phone, body=form.get("Body", "")
        )
        if done:
            log.info("inbound %s from %s***", done, phone[:4])
    # An empty TwiML response: Twilio itself answers STOP / START with its own text.
    return Response(
        '<?xml version="1.0" encoding="UTF-8"?><Response/>', media_type="application/xml"
    )
