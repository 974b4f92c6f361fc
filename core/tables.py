"""SQLModel tables: the whole store. Alembic migrations in migrations/ follow this file.

All times are stored in UTC. On SQLite they are kept as naive ISO text
(`YYYY-MM-DD HH:MM:SS.ffffff`), on PostgreSQL as `timestamptz`; `UTCDateTime` makes both
come back as aware datetimes.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel

JSONType = JSON().with_variant(JSONB(), "postgresql")
BigId = BigInteger().with_variant(Integer(), "sqlite")
# Customer and event ids (and event names) compare as bytes on PostgreSQL, as SQLite
# compares all text: they are opaque, and a locale's collation made every comparison in
# their indexes a strcoll call (migration 0003).
IdString = String(255).with_variant(String(255, collation="C"), "postgresql")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """Aware datetimes in, aware UTC datetimes out, on both databases."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; times must carry a zone")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _ts(nullable: bool = False, index: bool = False) -> Any:
    return Field(default=None, sa_column=Column(UTCDateTime(), nullable=nullable, index=index))


def _now_ts() -> Any:
    return Field(default_factory=utcnow, sa_column=Column(UTCDateTime(), nullable=False))


def _json(default: Any = dict) -> Any:
    return Field(default_factory=default, sa_column=Column(JSONType, nullable=False))


# --- customers and events -------------------------------------------------------------


class Customer(SQLModel, table=True):
    __tablename__ = "customers"
    __table_args__ = (
        Index(
            "ix_customers_pending",
            "id",
            sqlite_where=text("realtime_pending"),
            postgresql_where=text("realtime_pending"),
        ),
    )

    id: str = Field(sa_column=Column(IdString, primary_key=True))
    email: str | None = Field(default=None, sa_column=Column(String(320), index=True))
    phone: str | None = Field(default=None, sa_column=Column(String(32), index=True))
    attributes: dict[str, Any] = _json()
    email_unsubscribed_at: datetime | None = _ts(nullable=True)
    sms_unsubscribed_at: datetime | None = _ts(nullable=True)
    created_at: datetime = _now_ts()
    updated_at: datetime = _now_ts()
    # Set when attributes change, so real-time segment re-evaluation picks the customer up.
    realtime_pending: bool = Field(
        default=False, sa_column=Column(Boolean, nullable=False, server_default=text("false"))
    )


class Event(SQLModel, table=True):
    __tablename__ = "events"
    __table_args__ = (
        # One customer's events by name and time (real-time scoring, event conditions)
        # or by time alone ("any event"). One index, not one per read: every event pays
        # for each index on its way in (migration 0005).
        Index("ix_events_customer_name_time", "customer_id", "name", "occurred_at"),
        # Only rows the real-time processor has not seen yet sit in this index.
        Index(
            "ix_events_pending",
            "id",
            sqlite_where=text("realtime_pending"),
            postgresql_where=text("realtime_pending"),
        ),
    )

    id: int | None = Field(
        default=None, sa_column=Column(BigId, primary_key=True, autoincrement=True)
    )
    event_id: str = Field(sa_column=Column(IdString, nullable=False, unique=True))
    customer_id: str = Field(sa_column=Column(IdString, nullable=False))
    name: str = Field(sa_column=Column(IdString, nullable=False))
    occurred_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    properties: dict[str, Any] = _json()
    received_at: datetime = _now_ts()
    realtime_pending: bool = Field(
        default=True, sa_column=Column(Boolean, nullable=False, server_default=text("true"))
    )


# --- API keys -------------------------------------------------------------------------


class ApiKey(SQLModel, table=True):
    __tablename__ = "api_keys"

    id: str = Field(sa_column=Column(String(40), primary_key=True))
    name: str = Field(sa_column=Column(String(255), nullable=False))
    role: str = Field(sa_column=Column(String(20), nullable=False))
    key_hash: str = Field(sa_column=Column(String(64), nullable=False, unique=True))
    prefix: str = Field(sa_column=Column(String(16), nullable=False))
    created_at: datetime = _now_ts()
    revoked_at: datetime | None = _ts(nullable=True)


# --- RFM ------------------------------------------------------------------------------


class RfmModel(SQLModel, table=True):
    __tablename__ = "rfm_models"

    slug: str = Field(sa_column=Column(String(100), primary_key=True))
    version: int = Field(default=1, sa_column=Column(Integer, nullable=False))
    definition: dict[str, Any] = _json()
    created_at: datetime = _now_ts()
    updated_at: datetime = _now_ts()


class RfmModelVersion(SQLModel, table=True):
    __tablename__ = "rfm_model_versions"

    slug: str = Field(sa_column=Column(String(100), primary_key=True))
    version: int = Field(sa_column=Column(Integer, primary_key=True))
    definition: dict[str, Any] = _json()
    created_at: datetime = _now_ts()


class RfmPass(SQLModel, table=True):
    """One scoring pass; `cutpoints` keeps what real-time rescoring places customers on."""

    __tablename__ = "rfm_passes"
    __table_args__ = (
        # Real-time rescoring reads a model's newest pass on every call.
        Index("ix_rfm_passes_model_id", "model_slug", "id"),
        # Timelines cite passes by id after their model is deleted: SQLite must not give
        # a deleted pass's id again (PostgreSQL's sequence never does; migration 0007).
        {"sqlite_autoincrement": True},
    )

    id: int | None = Field(
        default=None, sa_column=Column(BigId, primary_key=True, autoincrement=True)
    )
    model_slug: str = Field(sa_column=Column(String(100), nullable=False))
    model_version: int = Field(sa_column=Column(Integer, nullable=False))
    as_of: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    started_at: datetime = _now_ts()
    finished_at: datetime | None = _ts(nullable=True)
    scored: int = Field(default=0, sa_column=Column(Integer, nullable=False))
    entries: int = Field(default=0, sa_column=Column(Integer, nullable=False))
    exits: int = Field(default=0, sa_column=Column(Integer, nullable=False))
    cutpoints: dict[str, Any] = _json()
    # What the pass counted: labels, the R-by-F grid, label moves (store.scoring).
    summary: dict[str, Any] | None = Field(default=None, sa_column=Column(JSONType, nullable=True))


class RfmScore(SQLModel, table=True):
    __tablename__ = "rfm_scores"
    __table_args__ = (
        Index("ix_rfm_scores_model_label", "model_slug", "label"),
        # Room for HOT updates: a pass rewrites most rows daily (migration 0002).
        {"postgresql_with": {"fillfactor": 50}},
    )

    model_slug: str = Field(sa_column=Column(String(100), primary_key=True))
    customer_id: str = Field(sa_column=Column(IdString, primary_key=True))
    recency_days: int = Field(sa_column=Column(Integer, nullable=False))
    frequency: int = Field(sa_column=Column(Integer, nullable=False))
    monetary: float = Field(sa_column=Column(Float, nullable=False))
    r: int = Field(sa_column=Column(Integer, nullable=False))
    f: int = Field(sa_column=Column(Integer, nullable=False))
    m: int = Field(sa_column=Column(Integer, nullable=False))
    label: str = Field(sa_column=Column(String(100), nullable=False))
    pass_id: int = Field(sa_column=Column(BigId, nullable=False))
    scored_at: datetime = _now_ts()


# --- segments and the transition outbox -----------------------------------------------


class Segment(SQLModel, table=True):
    """A segment: rule-based (`rule`), an RFM label (`rfm`) or owned outside (`external`)."""

    __tablename__ = "segments"

    slug: str = Field(sa_column=Column(String(200), primary_key=True))
    name: str = Field(sa_column=Column(String(255), nullable=False))
    kind: str = Field(default="rule", sa_column=Column(String(20), nullable=False))
    condition: dict[str, Any] | None = Field(
        default=None, sa_column=Column(JSONType, nullable=True)
    )
    model_slug: str | None = Field(default=None, sa_column=Column(String(100), nullable=True))
    schedule: str | None = Field(default=None, sa_column=Column(String(40), nullable=True))
    version: int = Field(default=1, sa_column=Column(Integer, nullable=False))
    created_at: datetime = _now_ts()
    updated_at: datetime = _now_ts()
    evaluated_at: datetime | None = _ts(nullable=True)
    # The version the last full pass evaluated: below `version`, the segment is evaluating.
    evaluated_version: int | None = Field(default=None, sa_column=Column(Integer, nullable=True))


class SegmentMembership(SQLModel, table=True):
    __tablename__ = "segment_memberships"
    __table_args__ = (Index("ix_memberships_customer", "customer_id"),)

    segment_slug: str = Field(sa_column=Column(String(200), primary_key=True))
    customer_id: str = Field(sa_column=Column(IdString, primary_key=True))
    since: datetime = _now_ts()


class SegmentTransition(SQLModel, table=True):
    """The outbox: written with the membership change, dispatched to journeys afterwards."""

    __tablename__ = "segment_transitions"
    __table_args__ = (
        Index("ix_transitions_segment_id", "segment_slug", "id"),
        Index("ix_transitions_customer", "customer_id", "id"),
        Index(
            "ix_transitions_undispatched",
            "id",
            sqlite_where=text("dispatched_at IS NULL"),
            postgresql_where=text("dispatched_at IS NULL"),
        ),
    )

    id: int | None = Field(
        default=None, sa_column=Column(BigId, primary_key=True, autoincrement=True)
    )
    segment_slug: str = Field(sa_column=Column(String(200), nullable=False))
    customer_id: str = Field(sa_column=Column(IdString, nullable=False))
    kind: str = Field(sa_column=Column(String(10), nullable=False))  # entered | exited
    source: str = Field(
        sa_column=Column(String(40), nullable=False)
    )  # rfm-pass:42, segment-pass:..
    context: dict[str, Any] = _json()
    occurred_at: datetime = _now_ts()
    dispatched_at: datetime | None = _ts(nullable=True)


# --- journeys and runs ----------------------------------------------------------------


class Journey(SQLModel, table=True):
    __tablename__ = "journeys"

    slug: str = Field(sa_column=Column(String(200), primary_key=True))
    name: str = Field(sa_column=Column(String(255), nullable=False))
    state: str = Field(default="draft", sa_column=Column(String(20), nullable=False))
    latest_version: int = Field(default=1, sa_column=Column(Integer, nullable=False))
    active_version: int | None = Field(default=None, sa_column=Column(Integer, nullable=True))
    trigger_segment: str = Field(sa_column=Column(String(200), nullable=False, index=True))
    created_at: datetime = _now_ts()
    updated_at: datetime = _now_ts()


class JourneyVersion(SQLModel, table=True):
    __tablename__ = "journey_versions"

    journey_slug: str = Field(sa_column=Column(String(200), primary_key=True))
    version: int = Field(sa_column=Column(Integer, primary_key=True))
    definition: dict[str, Any] = _json()
    created_at: datetime = _now_ts()
    activated_at: datetime | None = _ts(nullable=True)


class JourneyRun(SQLModel, table=True):
    __tablename__ = "journey_runs"
    __table_args__ = (
        UniqueConstraint("workflow_id", "run_id", name="uq_runs_workflow_run"),
        Index("ix_runs_customer", "customer_id", "entered_at"),
        Index("ix_runs_journey_status_step", "journey_slug", "status", "step"),
        # Journey analytics over an entry window.
        Index("ix_runs_journey_entered", "journey_slug", "entered_at"),
    )

    id: int | None = Field(
        default=None, sa_column=Column(BigId, primary_key=True, autoincrement=True)
    )
    workflow_id: str = Field(sa_column=Column(String(500), nullable=False))
    run_id: str = Field(sa_column=Column(String(64), nullable=False))
    journey_slug: str = Field(sa_column=Column(String(200), nullable=False))
    version: int = Field(sa_column=Column(Integer, nullable=False))
    customer_id: str = Field(sa_column=Column(IdString, nullable=False))
    # running | completed | converted | exited | failed | cancelled
    status: str = Field(default="running", sa_column=Column(String(20), nullable=False))
    step: str | None = Field(default=None, sa_column=Column(String(200), nullable=True))
    step_since: datetime | None = _ts(nullable=True)
    waiting_for: str | None = Field(default=None, sa_column=Column(String(200), nullable=True))
    waiting_until: datetime | None = _ts(nullable=True)
    entry_transition_id: int | None = Field(default=None, sa_column=Column(BigId, nullable=True))
    entered_at: datetime = _now_ts()
    ended_at: datetime | None = _ts(nullable=True)
    converted_at: datetime | None = _ts(nullable=True)


class RunEvent(SQLModel, table=True):
    """One line of a run's readable timeline, with the reason it happened."""

    __tablename__ = "run_events"
    __table_args__ = (
        Index("ix_run_events_run", "workflow_id", "run_id", "id"),
        Index("ix_run_events_journey_step", "journey_slug", "version", "step", "kind"),
        UniqueConstraint("workflow_id", "run_id", "seq", name="uq_run_events_seq"),
    )

    id: int | None = Field(
        default=None, sa_column=Column(BigId, primary_key=True, autoincrement=True)
    )
    workflow_id: str = Field(sa_column=Column(String(500), nullable=False))
    run_id: str = Field(sa_column=Column(String(64), nullable=False))
    # Position in the run, assigned by the workflow, so an activity retry is not a second line.
    seq: int = Field(sa_column=Column(Integer, nullable=False))
    journey_slug: str = Field(sa_column=Column(String(200), nullable=False))
    version: int = Field(sa_column=Column(Integer, nullable=False))
    customer_id: str = Field(sa_column=Column(IdString, nullable=False, index=True))
    step: str | None = Field(default=None, sa_column=Column(String(200), nullable=True))
    kind: str = Field(sa_column=Column(String(40), nullable=False))
    reason: str = Field(default="", sa_column=Column(Text, nullable=False))
    detail: dict[str, Any] = _json()
    occurred_at: datetime = _now_ts()


# --- messages -------------------------------------------------------------------------


class Message(SQLModel, table=True):
    """One send, keyed `{workflow id}:{run id}:{step id}`; the local outbox is provider `outbox`."""

    __tablename__ = "messages"
    __table_args__ = (
        Index("ix_messages_customer", "customer_id", "id"),
        # `id` last: journey analytics join message events to a journey's messages from
        # this index alone (no visit to the wide message rows).
        Index("ix_messages_journey_step", "journey_slug", "version", "step", "status", "id"),
    )

    id: int | None = Field(
        default=None, sa_column=Column(BigId, primary_key=True, autoincrement=True)
    )
    idempotency_key: str = Field(sa_column=Column(String(800), nullable=False, unique=True))
    workflow_id: str | None = Field(default=None, sa_column=Column(String(500), nullable=True))
    run_id: str | None = Field(default=None, sa_column=Column(String(64), nullable=True))
    step: str | None = Field(default=None, sa_column=Column(String(200), nullable=True))
    journey_slug: str | None = Field(default=None, sa_column=Column(String(200), nullable=True))
    version: int | None = Field(default=None, sa_column=Column(Integer, nullable=True))
    customer_id: str = Field(sa_column=Column(IdString, nullable=False))
    channel: str = Field(sa_column=Column(String(10), nullable=False))  # email | sms
    template: str | None = Field(default=None, sa_column=Column(String(300), nullable=True))
    to: str | None = Field(default=None, sa_column=Column(String(320), nullable=True))
    subject: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    body: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    text_body: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    headers: dict[str, Any] = _json()
    links: list[Any] = _json(list)
    # sending | sent | in_doubt | failed | skipped | delivered | bounced | dropped
    status: str = Field(sa_column=Column(String(20), nullable=False))
    provider: str = Field(sa_column=Column(String(20), nullable=False))  # outbox|sendgrid|twilio
    provider_message_id: str | None = Field(default=None, sa_column=Column(String(200), index=True))
    error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    attempts: int = Field(default=0, sa_column=Column(Integer, nullable=False))
    created_at: datetime = _now_ts()
    updated_at: datetime = _now_ts()
    sent_at: datetime | None = _ts(nullable=True)


class MessageEvent(SQLModel, table=True):
    """Delivery, open, click, bounce... for a message, from a webhook or a tracked link."""

    __tablename__ = "message_events"
    __table_args__ = (
        Index("ix_message_events_message", "message_id", "kind"),
        # Journey analytics count a journey's opens / clicks / deliveries per step from
        # this index alone, without joining every event to its message.
        Index(
            "ix_message_events_journey_kind",
            "journey_slug",
            "kind",
            "version",
            "step",
            "message_id",
        ),
    )

    id: int | None = Field(
        default=None, sa_column=Column(BigId, primary_key=True, autoincrement=True)
    )
    message_id: int | None = Field(default=None, sa_column=Column(BigId, nullable=True))
    # The message's journey, version and step (send key), copied when the event is
    # recorded; None for an event of no known message.
    journey_slug: str | None = Field(default=None, sa_column=Column(String(200), nullable=True))
    version: int | None = Field(default=None, sa_column=Column(Integer, nullable=True))
    step: str | None = Field(default=None, sa_column=Column(String(200), nullable=True))
    # A provider's own event id, so a webhook delivered twice is recorded once.
    dedupe_key: str | None = Field(default=None, sa_column=Column(String(300), unique=True))
    kind: str = Field(sa_column=Column(String(30), nullable=False))
    detail: dict[str, Any] = _json()
    occurred_at: datetime = _now_ts()


class Template(SQLModel, table=True):
    """A template added through the API; shipped ones live in templates/."""

    __tablename__ = "templates"

    path: str = Field(sa_column=Column(String(300), primary_key=True))
    source: str = Field(sa_column=Column(Text, nullable=False))
    created_at: datetime = _now_ts()
    updated_at: datetime = _now_ts()


class Suppression(SQLModel, table=True):
    """An address no marketing message may go to (bounce, spam report, STOP)."""

    __tablename__ = "suppressions"

    address: str = Field(sa_column=Column(String(320), primary_key=True))
    channel: str = Field(sa_column=Column(String(10), nullable=False))
    reason: str = Field(sa_column=Column(String(40), nullable=False))
    created_at: datetime = _now_ts()


# --- quarantine ---------------------------------------------------------------------------


class Failure(SQLModel, table=True):
    """A record background work could not process, set aside so the others go on.

    One row per (kind, key, stage): `attempts` counts the failures, `next_attempt_at` is
    when the stage may try it again (exponential backoff); a success deletes the row.
    """

    __tablename__ = "failures"
    __table_args__ = (
        UniqueConstraint("kind", "key", "stage", name="uq_failures_subject"),
        Index("ix_failures_stage_next", "stage", "kind", "next_attempt_at"),
    )

    id: int | None = Field(default=None, sa_column=Column(BigId, primary_key=True))
    kind: str = Field(sa_column=Column(String(20), nullable=False))
    key: str = Field(sa_column=Column(String(500), nullable=False))
    stage: str = Field(sa_column=Column(String(40), nullable=False))
    error: str = Field(sa_column=Column(Text, nullable=False))
    attempts: int = Field(sa_column=Column(Integer, nullable=False))
    first_failed_at: datetime = _now_ts()
    last_failed_at: datetime = _now_ts()
    next_attempt_at: datetime = _now_ts()


class TraceHandoff(SQLModel, table=True):
    """The trace a customer's latest traced event was stored in (only with tracing on):
    the dispatcher starts that customer's journeys inside it, so one trace runs from the
    API request to the send although the work crosses the store in between."""

    __tablename__ = "trace_handoffs"

    customer_id: str = Field(sa_column=Column(IdString, primary_key=True))
    traceparent: str = Field(sa_column=Column(String(100), nullable=False))
    recorded_at: datetime = _now_ts()


# --- personalisation ----------------------------------------------------------------------


class Personalization(SQLModel, table=True):
    """A campaign; its definitions are versions, `active_version` the one decisions use."""

    __tablename__ = "personalizations"

    slug: str = Field(sa_column=Column(String(200), primary_key=True))
    name: str = Field(sa_column=Column(String(255), nullable=False))
    state: str = Field(default="draft", sa_column=Column(String(20), nullable=False))
    latest_version: int = Field(default=1, sa_column=Column(Integer, nullable=False))
    active_version: int | None = Field(default=None, sa_column=Column(Integer, nullable=True))
    created_at: datetime = _now_ts()
    updated_at: datetime = _now_ts()


class PersonalizationVersion(SQLModel, table=True):
    __tablename__ = "personalization_versions"

    campaign_slug: str = Field(sa_column=Column(String(200), primary_key=True))
    version: int = Field(sa_column=Column(Integer, primary_key=True))
    definition: dict[str, Any] = _json()
    created_at: datetime = _now_ts()
    activated_at: datetime | None = _ts(nullable=True)


class PersonalizationView(SQLModel, table=True):
    """What a customer was shown by one campaign version: one row per experience seen
    (or `control` / `default`), with its first and last view and how many views.

    `audience` is the experience the customer matched when first shown this row: for
    `control` the one they would have seen, so analytics compare control and treatment
    within an audience without evaluating anyone again.
    """

    __tablename__ = "personalization_views"

    campaign_slug: str = Field(sa_column=Column(String(200), primary_key=True))
    version: int = Field(sa_column=Column(Integer, primary_key=True))
    customer_id: str = Field(sa_column=Column(IdString, primary_key=True))
    experience: str = Field(sa_column=Column(String(255), primary_key=True))
    audience: str | None = Field(default=None, sa_column=Column(String(255), nullable=True))
    bucket: int = Field(sa_column=Column(Integer, nullable=False))
    first_viewed_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    last_viewed_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    views: int = Field(default=1, sa_column=Column(BigInteger, nullable=False))


# --- predictive models --------------------------------------------------------------------


class PredictionModel(SQLModel, table=True):
    """A predictive model: target, direction, levels, features (core.predictions)."""

    __tablename__ = "prediction_models"

    slug: str = Field(sa_column=Column(String(100), primary_key=True))
    version: int = Field(default=1, sa_column=Column(Integer, nullable=False))
    definition: dict[str, Any] = _json()
    created_at: datetime = _now_ts()
    updated_at: datetime = _now_ts()


class PredictionTraining(SQLModel, table=True):
    """One training as of an instant: the definition it trained, its validation report
    and the fitted estimator (pickled) that scoring and real-time rescoring apply."""

    __tablename__ = "prediction_trainings"
    __table_args__ = (
        Index("ix_prediction_trainings_model_id", "model_slug", "id"),
        {"sqlite_autoincrement": True},
    )

    id: int | None = Field(
        default=None, sa_column=Column(BigId, primary_key=True, autoincrement=True)
    )
    model_slug: str = Field(sa_column=Column(String(100), nullable=False))
    model_version: int = Field(sa_column=Column(Integer, nullable=False))
    definition: dict[str, Any] = _json()
    as_of: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    started_at: datetime = _now_ts()
    finished_at: datetime | None = _ts(nullable=True)
    # training | ok | worse_than_rfm | failed
    status: str = Field(sa_column=Column(String(30), nullable=False))
    report: dict[str, Any] = _json()
    artifact: bytes | None = Field(default=None, sa_column=Column(LargeBinary, nullable=True))
    scored: int = Field(default=0, sa_column=Column(Integer, nullable=False))
    error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))


class PredictionScore(SQLModel, table=True):
    """A customer's latest probability on a model and its level (from the model's levels)."""

    __tablename__ = "prediction_scores"
    __table_args__ = (
        # Room for HOT updates: every training and real-time rescore rewrites rows.
        {"postgresql_with": {"fillfactor": 50}},
    )

    model_slug: str = Field(sa_column=Column(String(100), primary_key=True))
    customer_id: str = Field(sa_column=Column(IdString, primary_key=True))
    probability: float = Field(sa_column=Column(Float, nullable=False))
    level: str = Field(sa_column=Column(String(10), nullable=False))
    training_id: int = Field(sa_column=Column(BigId, nullable=False))
    scored_at: datetime = _now_ts()
