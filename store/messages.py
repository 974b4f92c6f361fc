"""Messages, their delivery events, suppressions and unsubscribes, and the run-timeline
line each send writes.

A send is a row keyed by its idempotency key (`{workflow id}:{run id}:{step id}`, unique).
Its status moves:

    sending -> sent -> delivered | bounced | dropped | undelivered   (provider webhooks)
    sending -> retrying -> sending ...      provider refused with 5xx / 429: safe to resend
    sending -> failed                       provider refused for good (4xx), or render failed
    sending -> in_doubt -> sent             outcome unknown; the provider's webhook resolves it
    skipped                                 unsubscribed, suppressed, no address, capped

`sending` is committed before the provider call, so a retry that finds it knows the
outcome of the earlier attempt is unknown.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import bindparam, text
from sqlalchemy.engine import Connection
from sqlmodel import Session

from core.tables import JSONType, UTCDateTime

Store = Session | Connection

# Rows whose send reached the provider (or may have): they count against a frequency cap.
COUNTED_STATUSES = ("sending", "sent", "in_doubt", "delivered", "bounced", "dropped", "undelivered")
# Stored statuses that mean the provider took the message.
PROVIDER_TOOK_IT = ("sent", "delivered", "bounced", "dropped", "undelivered")

_MESSAGE_COLUMNS = (
    "id, idempotency_key, workflow_id, run_id, step, journey_slug, version, customer_id,"
    ' channel, template, "to", subject, body, text_body, headers, links, status, provider,'
    " provider_message_id, error, attempts, created_at, updated_at, sent_at"
)


@dataclass(frozen=True)
class MessageRecord:
    id: int
    idempotency_key: str
    workflow_id: str | None
    run_id: str | None
    step: str | None
    journey_slug: str | None
    version: int | None
    customer_id: str
    channel: str
    template: str | None
    to: str | None
    subject: str | None
    body: str | None
    text_body: str | None
    headers: dict[str, Any]
    links: list[Any]
    status: str
    provider: str
    provider_message_id: str | None
    error: str | None
    attempts: int
    created_at: datetime
    updated_at: datetime
    sent_at: datetime | None


@dataclass(frozen=True)
class CustomerForSend:
    id: str
    email: str | None
    phone: str | None
    attributes: dict[str, Any]
    email_unsubscribed_at: datetime | None
    sms_unsubscribed_at: datetime | None


# Statements are built once: building one and computing its cache key cost more than
# running it, on the hot path of every send.
@lru_cache(maxsize=64)
def _select_messages(where: str) -> Any:
    return text(f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE {where}").columns(
        headers=JSONType,
        links=JSONType,
        created_at=UTCDateTime(),
        updated_at=UTCDateTime(),
        sent_at=UTCDateTime(),
    )


def _record(row: Any) -> MessageRecord:
    return MessageRecord(**row._mapping)


def _ts(*names: str) -> list[Any]:
    return [bindparam(name, type_=UTCDateTime()) for name in names]


# --- reading ----------------------------------------------------------------------------


def find_message(session: Store, *, idempotency_key: str) -> MessageRecord | None:
    """The send recorded under `idempotency_key`, if any."""
    row = session.execute(
        _select_messages("idempotency_key = :key"), {"key": idempotency_key}
    ).first()
    return None if row is None else _record(row)


def get_message(session: Store, *, message_id: int) -> MessageRecord | None:
    row = session.execute(_select_messages("id = :id"), {"id": message_id}).first()
    return None if row is None else _record(row)


def find_message_by_provider_id(
    session: Store, *, provider_message_id: str
) -> MessageRecord | None:
    row = session.execute(
        _select_messages("provider_message_id = :pmid ORDER BY id LIMIT 1"),
        {"pmid": provider_message_id},
    ).first()
    return None if row is None else _record(row)


def list_outbox(
    session: Store,
    *,
    customer_id: str | None = None,
    journey: str | None = None,
    channel: str | None = None,
    provider: str | None = "outbox",
    after_id: int | None = None,
    limit: int = 100,
) -> list[MessageRecord]:
    """Messages, oldest first, filtered by customer, journey, channel and provider."""
    clauses = ["1 = 1"]
    params: dict[str, Any] = {"limit": limit}
    for column, value in (
        ("customer_id", customer_id),
        ("journey_slug", journey),
        ("channel", channel),
        ("provider", provider),
    ):
        if value is not None:
            clauses.append(f"{column} = :{column}")
            params[column] = value
    if after_id is not None:
        clauses.append("id > :after_id")
        params["after_id"] = after_id
    where = " AND ".join(clauses) + " ORDER BY id LIMIT :limit"
    return [_record(row) for row in session.execute(_select_messages(where), params)]


@lru_cache(maxsize=1)
def _customer_for_send_sql() -> Any:
    return text(
        "SELECT id, email, phone, attributes, email_unsubscribed_at, sms_unsubscribed_at"
        " FROM customers WHERE id = :id"
    ).columns(
        attributes=JSONType,
        email_unsubscribed_at=UTCDateTime(),
        sms_unsubscribed_at=UTCDateTime(),
    )


def customer_for_send(session: Store, *, customer_id: str) -> CustomerForSend | None:
    """The customer's addresses, attributes and unsubscribe state."""
    row = session.execute(
        _customer_for_send_sql(),
        {"id": customer_id},
    ).first()
    return None if row is None else CustomerForSend(**row._mapping)


@lru_cache(maxsize=1)
def _suppression_sql() -> Any:
    return text("SELECT reason FROM suppressions WHERE address = :address")


def suppression_reason(session: Store, *, address: str) -> str | None:
    """Why `address` may not be sent to (bounce, spamreport, stop...), or None."""
    row = session.execute(_suppression_sql(), {"address": address}).first()
    return None if row is None else row[0]


def counted_send_times(
    session: Store, *, customer_id: str, channel: str, since: datetime, exclude_key: str
) -> list[datetime]:
    """When the customer's sends on `channel` since `since` happened, oldest first
    (the frequency cap counts them; this send's own row is left out)."""
    rows = session.execute(
        text(
            "SELECT COALESCE(sent_at, created_at) AS at FROM messages"
            " WHERE customer_id = :customer_id AND channel = :channel"
            " AND status IN :statuses AND idempotency_key <> :key"
            " AND COALESCE(sent_at, created_at) > :since ORDER BY at"
        )
        .bindparams(bindparam("statuses", expanding=True), *_ts("since"))
        .columns(at=UTCDateTime()),
        {
            "customer_id": customer_id,
            "channel": channel,
            "statuses": list(COUNTED_STATUSES),
            "key": exclude_key,
            "since": since,
        },
    ).all()
    return [row[0] for row in rows]


# --- the send's state changes -------------------------------------------------------------


@dataclass(frozen=True)
class MessageIdentity:
    """The columns that tie a message row to its send."""

    idempotency_key: str
    workflow_id: str
    run_id: str
    step: str
    journey_slug: str
    version: int
    customer_id: str
    channel: str
    template: str


def claim_send(
    session: Store, identity: MessageIdentity, *, to: str, provider: str, now: datetime
) -> int | None:
    """Record a new send as `sending` under its key; its id, or None if the key exists."""
    return _insert_message(
        session,
        identity,
        to=to,
        status="sending",
        provider=provider,
        error=None,
        attempts=1,
        now=now,
    )


@lru_cache(maxsize=1)
def _insert_message_sql() -> Any:
    return text(
        "INSERT INTO messages (idempotency_key, workflow_id, run_id, step, journey_slug,"
        ' version, customer_id, channel, template, "to", headers, links, status, provider,'
        " error, attempts, created_at, updated_at)"
        " VALUES (:idempotency_key, :workflow_id, :run_id, :step, :journey_slug, :version, :customer_id,"
        " :channel, :template, :to, :empty_headers, :empty_links, :status, :provider, :error,"
        " :attempts, :now, :now)"
        " ON CONFLICT (idempotency_key) DO NOTHING RETURNING id"
    ).bindparams(
        bindparam("empty_headers", type_=JSONType),
        bindparam("empty_links", type_=JSONType),
        *_ts("now"),
    )


def _insert_message(
    session: Store,
    identity: MessageIdentity,
    *,
    to: str | None,
    status: str,
    provider: str,
    error: str | None,
    attempts: int,
    now: datetime,
) -> int | None:
    """Insert a message row unless its idempotency key has one; its id, or None."""
    row = session.execute(
        _insert_message_sql(),
        {
            **asdict(identity),
            "to": to,
            "status": status,
            "provider": provider,
            "error": error,
            "attempts": attempts,
            "now": now,
            "empty_headers": {},
            "empty_links": [],
        },
    ).first()
    return None if row is None else int(row[0])


def reclaim_send(
    session: Store, *, message_id: int, expected_status: str, to: str, provider: str, now: datetime
) -> bool:
    """Move a `retrying` (or, under the resend policy, an in-doubt) send back to
    `sending` for another attempt; False if another attempt changed it first."""
    result = session.execute(
        text(
            "UPDATE messages SET status = 'sending', attempts = attempts + 1, \"to\" = :to,"
            " provider = :provider, updated_at = :now WHERE id = :id AND status = :expected"
        ).bindparams(*_ts("now")),
        {"id": message_id, "expected": expected_status, "to": to, "provider": provider, "now": now},
    )
    return result.rowcount == 1


@lru_cache(maxsize=1)
def _set_content_sql() -> Any:
    return text(
        "UPDATE messages SET subject = :subject, body = :body, text_body = :text_body,"
        " headers = :headers, links = :links WHERE id = :id"
    ).bindparams(bindparam("headers", type_=JSONType), bindparam("links", type_=JSONType))


def set_message_content(
    session: Store,
    *,
    message_id: int,
    subject: str | None,
    body: str,
    text_body: str | None,
    headers: dict[str, Any],
    links: list[Any],
) -> None:
    """Store what is about to be sent (links and unsubscribe tokens need the id first)."""
    session.execute(
        _set_content_sql(),
        {
            "id": message_id,
            "subject": subject,
            "body": body,
            "text_body": text_body,
            "headers": headers,
            "links": links,
        },
    )


@lru_cache(maxsize=1)
def _mark_sent_sql() -> Any:
    return text(
        "UPDATE messages SET"
        " status = CASE WHEN status IN ('sending', 'retrying', 'in_doubt') THEN 'sent'"
        " ELSE status END,"
        " provider = :provider,"
        " provider_message_id = COALESCE(:pmid, provider_message_id),"
        " sent_at = COALESCE(sent_at, :now), error = NULL, updated_at = :now"
        " WHERE id = :id"
    ).bindparams(*_ts("now"))


def mark_sent(
    session: Store,
    *,
    message_id: int,
    provider: str,
    provider_message_id: str | None,
    now: datetime,
) -> None:
    """The provider took the message. A webhook that got here first keeps its status."""
    session.execute(
        _mark_sent_sql(),
        {"id": message_id, "provider": provider, "pmid": provider_message_id, "now": now},
    )


def mark_send_status(
    session: Store, *, message_id: int, status: str, error: str | None, now: datetime
) -> None:
    """Set `retrying`, `failed`, `in_doubt` (or keep `sending` with a new error)."""
    session.execute(
        text(
            "UPDATE messages SET status = :status, error = :error, updated_at = :now"
            " WHERE id = :id AND status IN ('sending', 'retrying', 'in_doubt')"
        ).bindparams(*_ts("now")),
        {"id": message_id, "status": status, "error": error, "now": now},
    )


def record_unsent(
    session: Store,
    identity: MessageIdentity,
    *,
    to: str | None,
    status: str,
    reason: str,
    now: datetime,
) -> int | None:
    """Record a send that never reached a provider (`skipped` or `failed`) under its
    key; its id, or None when the key already had a row."""
    return _insert_message(
        session,
        identity,
        to=to,
        status=status,
        provider="none",
        error=reason,
        attempts=0,
        now=now,
    )


@lru_cache(maxsize=1)
def _run_event_sql() -> Any:
    return text(
        "INSERT INTO run_events (workflow_id, run_id, seq, journey_slug, version,"
        " customer_id, step, kind, reason, detail, occurred_at)"
        " VALUES (:workflow_id, :run_id, :seq, :journey_slug, :version, :customer_id,"
        " :step, :kind, :reason, :detail, :now)"
        " ON CONFLICT (workflow_id, run_id, seq) DO NOTHING RETURNING id"
    ).bindparams(bindparam("detail", type_=JSONType), *_ts("now"))


def record_run_event(
    session: Store,
    *,
    workflow_id: str,
    run_id: str,
    seq: int,
    journey_slug: str,
    version: int,
    customer_id: str,
    step: str | None,
    kind: str,
    reason: str,
    detail: dict[str, Any],
    now: datetime,
) -> bool:
    """Write one line of the run's timeline unless (workflow, run, seq) has one already."""
    row = session.execute(
        _run_event_sql(),
        {
            "workflow_id": workflow_id,
            "run_id": run_id,
            "seq": seq,
            "journey_slug": journey_slug,
            "version": version,
            "customer_id": customer_id,
            "step": step,
            "kind": kind,
            "reason": reason,
            "detail": detail,
            "now": now,
        },
    ).first()
    return row is not None


# --- what happened after the send ---------------------------------------------------------


def record_message_event(
    session: Store,
    *,
    message_id: int | None,
    kind: str,
    detail: dict[str, Any],
    occurred_at: datetime,
    dedupe_key: str | None = None,
) -> bool:
    """Record a delivery / open / click / bounce...; False when `dedupe_key` was seen.
    The event carries its message's journey, version and step (for journey analytics)."""
    row = session.execute(
        text(
            "INSERT INTO message_events (message_id, dedupe_key, kind, detail, occurred_at,"
            " journey_slug, version, step)"
            " VALUES (:message_id, :dedupe_key, :kind, :detail, :occurred_at,"
            " (SELECT journey_slug FROM messages WHERE id = :message_id),"
            " (SELECT version FROM messages WHERE id = :message_id),"
            " (SELECT step FROM messages WHERE id = :message_id))"
            " ON CONFLICT (dedupe_key) DO NOTHING RETURNING id"
        ).bindparams(bindparam("detail", type_=JSONType), *_ts("occurred_at")),
        {
            "message_id": message_id,
            "dedupe_key": dedupe_key,
            "kind": kind,
            "detail": detail,
            "occurred_at": occurred_at,
        },
    ).first()
    return row is not None


def message_events(session: Store, *, message_id: int) -> list[tuple[str, dict[str, Any]]]:
    """(kind, detail) of every event of a message, oldest first."""
    rows = session.execute(
        text("SELECT kind, detail FROM message_events WHERE message_id = :id ORDER BY id").columns(
            detail=JSONType
        ),
        {"id": message_id},
    ).all()
    return [(row[0], row[1]) for row in rows]


# What a provider's delivery report does to the stored status. Any report at all proves
# the provider took the message, so it also resolves `sending` / `in_doubt` to `sent`.
_STATUS_AFTER_REPORT = {
    "delivered": "delivered",
    "bounce": "bounced",
    "bounced": "bounced",
    "dropped": "dropped",
    "undelivered": "undelivered",
    "failed": "undelivered",
}


def apply_delivery_report(
    session: Store,
    *,
    message_id: int,
    report: str,
    provider_message_id: str | None,
    now: datetime,
) -> None:
    """Move a message's status on a provider report (delivered, bounce, dropped, ...)."""
    final = _STATUS_AFTER_REPORT.get(report)
    if final is not None:
        status_sql = (
            "CASE WHEN status IN ('sending', 'retrying', 'in_doubt', 'sent', 'delivered')"
            " THEN :final ELSE status END"
        )
    else:
        status_sql = (
            "CASE WHEN status IN ('sending', 'retrying', 'in_doubt') THEN 'sent' ELSE status END"
        )
    session.execute(
        text(
            f"UPDATE messages SET status = {status_sql},"
            " provider_message_id = COALESCE(provider_message_id, :pmid),"
            " sent_at = COALESCE(sent_at, :now), updated_at = :now"
            " WHERE id = :id"
        ).bindparams(*_ts("now")),
        {"id": message_id, "final": final, "pmid": provider_message_id, "now": now},
    )


# --- suppressions and unsubscribes --------------------------------------------------------


def suppress_address(
    session: Store, *, address: str, channel: str, reason: str, now: datetime
) -> None:
    """No further marketing message goes to `address` (kept reason: the first one)."""
    session.execute(
        text(
            "INSERT INTO suppressions (address, channel, reason, created_at)"
            " VALUES (:address, :channel, :reason, :now) ON CONFLICT (address) DO NOTHING"
        ).bindparams(*_ts("now")),
        {"address": address, "channel": channel, "reason": reason, "now": now},
    )


def unsuppress_address(session: Store, *, address: str, reasons: tuple[str, ...]) -> None:
    """Lift a suppression of `address` made for one of `reasons` (START lifts STOP only)."""
    session.execute(
        text("DELETE FROM suppressions WHERE address = :address AND reason IN :reasons").bindparams(
            bindparam("reasons", expanding=True)
        ),
        {"address": address, "reasons": list(reasons)},
    )


def set_unsubscribed(
    session: Store, *, customer_id: str, channel: str, at: datetime | None
) -> bool:
    """Mark the customer unsubscribed from `channel` at `at` (None re-subscribes);
    an existing unsubscribe time is kept. False when the customer does not exist."""
    column = "email_unsubscribed_at" if channel == "email" else "sms_unsubscribed_at"
    if at is None:
        statement = text(f"UPDATE customers SET {column} = NULL WHERE id = :id")
    else:
        statement = text(
            f"UPDATE customers SET {column} = COALESCE({column}, :at) WHERE id = :id"
        ).bindparams(*_ts("at"))
    result = session.execute(statement, {"id": customer_id, "at": at})
    return result.rowcount > 0


def set_phone_opt_out(session: Store, *, phone: str, opted_out: bool, now: datetime) -> int:
    """STOP / START from `phone`: (un)subscribe every customer with that number from SMS
    and add or lift the phone's suppression. Returns the number of customers changed."""
    if opted_out:
        statement = text(
            "UPDATE customers SET sms_unsubscribed_at = COALESCE(sms_unsubscribed_at, :now)"
            " WHERE phone = :phone"
        ).bindparams(*_ts("now"))
    else:
        statement = text("UPDATE customers SET sms_unsubscribed_at = NULL WHERE phone = :phone")
    result = session.execute(statement, {"phone": phone, "now": now})
    if opted_out:
        suppress_address(session, address=phone, channel="sms", reason="stop", now=now)
    else:
        unsuppress_address(session, address=phone, reasons=("stop",))
    return result.rowcount
