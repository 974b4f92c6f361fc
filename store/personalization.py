"""Personalisation campaigns in the store: definitions and their lifecycle, the decision
query, views, and analytics.

Lifecycle (as journeys): `create` stores draft version 1; each `put` adds a version;
`activate` makes the latest version the one decisions use (from then on it is frozen:
edits make a new version, and analytics keep versions apart); `pause` shows everyone the
default content until the next `activate`; `archive` is final.

Deciding for one customer is one statement (`DecisionStatement`): the customer's row
and, in a CASE over the experiences in order, the index of the first one whose target
matches, each target compiled by the segment language (`store.segments.compile_condition`:
a segment is an indexed lookup of one membership). Views are upserted in batches
(`record_views`) into one row per (campaign, version, customer, experience).

Analytics (`campaign_analytics`) take each viewer's first view of the version: its
experience (or control, with the audience it was held out of) is the customer's arm, and
a conversion is the goal event, within the window after that first view, found in
`events` when the report is asked for (one indexed range read per viewer, in a join),
so a customer converts at most once per version and nothing is counted twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
from pydantic import BaseModel, Field
from sqlalchemy import bindparam, text
from sqlalchemy.engine import Connection, Engine
from sqlmodel import Session

from core.conditions import AttributeCondition, Condition, EventCondition, iter_nodes
from core.db import (
    make_engine,
    sqlite_busy_timeout,
    sqlite_busy_timeout_ms,
    take_sqlite_write_lock,
)
from core.errors import Conflict, ErrorDetail, NotFound, ValidationFailed
from core.personalization import (
    CONTROL,
    DEFAULT,
    SLOTS,
    PersonalizationDefinition,
    bucket_of,
    parse_definition,
    segments_named,
    slot_sources,
    stored_form,
)
from core.rendering import (
    SlotTemplate,
    TemplateProblem,
    compile_slot,
    customer_context,
    customer_field,
    prove_slot,
    render_slot_lazily,
    slot_context,
)
from core.statistics import Arm, compare
from core.tables import JSONType, UTCDateTime, utcnow
from store.customers import sample_attributes
from store.journeys import segment_exists
from store.segments import compile_condition, compile_property_filters
from store.templates import SHIPPED_TEMPLATES_DIR

Store = Session | Connection
CampaignStateName = Literal["draft", "active", "paused", "archived"]


def _connection(session: Store) -> Connection:
    return session if isinstance(session, Connection) else session.connection()


def _ts(name: str) -> Any:
    return bindparam(name, type_=UTCDateTime())


# --- definitions and lifecycle ---------------------------------------------------------


class CampaignVersionInfo(BaseModel):
    version: int
    definition: dict[str, Any]
    created_at: datetime
    activated_at: datetime | None = None


class CampaignState(BaseModel):
    """A campaign as the API shows it; `versions` (newest first) by `get_campaign`."""

    slug: str
    name: str
    state: CampaignStateName
    latest_version: int
    active_version: int | None
    created_at: datetime
    updated_at: datetime
    versions: list[CampaignVersionInfo] | None = None


def _within(field_name: str | None, parent: str) -> bool:
    return field_name is not None and (
        field_name == parent or field_name.startswith((f"{parent}.", f"{parent}["))
    )


def validate_campaign(
    session: Store, *, raw: Any
) -> tuple[PersonalizationDefinition | None, list[ErrorDetail]]:
    """The definition when valid against this store, else None and every error, each
    naming its field: the model's rules, every slot template proven in the decision's
    sandbox (`core.rendering.prove_slot`, with the attributes stored customers hold), and
    every segment named existing."""
    conn = _connection(session)
    definition, errors = parse_definition(raw)
    known: dict[str, Any] | None = None
    for slot_field, source in slot_sources(raw):
        if any(_within(e.field, slot_field) for e in errors):
            continue  # pydantic said why already (too long, NUL)
        if known is None:
            known = sample_attributes(conn)
        try:
            prove_slot(source, known_attributes=known)
        except TemplateProblem as exc:
            errors.append(ErrorDetail(exc.code, exc.message, slot_field))
    if definition is not None:
        for slug_field, slug in segments_named(definition):
            if not segment_exists(conn, slug=slug):
                errors.append(ErrorDetail("unknown_segment", f"no segment {slug!r}", slug_field))
    return (None, errors) if errors else (definition, [])


def _valid_definition(session: Store, raw: Any) -> PersonalizationDefinition:
    definition, errors = validate_campaign(session, raw=raw)
    if errors or definition is None:
        raise ValidationFailed(errors)
    return definition


_CAMPAIGN_COLUMNS = "slug, name, state, latest_version, active_version, created_at, updated_at"


def _campaign_row(conn: Connection, slug: str, *, for_update: bool = False) -> CampaignState:
    lock = " FOR UPDATE" if for_update and conn.dialect.name == "postgresql" else ""
    row = (
        conn.execute(
            text(
                f"SELECT {_CAMPAIGN_COLUMNS} FROM personalizations WHERE slug = :slug{lock}"
            ).columns(created_at=UTCDateTime(), updated_at=UTCDateTime()),
            {"slug": slug},
        )
        .mappings()
        .first()
    )
    if row is None:
        raise NotFound(f"no personalisation campaign {slug!r}", field="slug")
    return CampaignState(**row)


def _insert_version(
    conn: Connection,
    *,
    slug: str,
    version: int,
    definition: PersonalizationDefinition,
    now: datetime,
) -> None:
    conn.execute(
        text(
            "INSERT INTO personalization_versions (campaign_slug, version, definition, created_at)"
            " VALUES (:slug, :version, :definition, :now)"
        ).bindparams(bindparam("definition", type_=JSONType), _ts("now")),
        {"slug": slug, "version": version, "definition": stored_form(definition), "now": now},
    )


def create_campaign(session: Store, *, raw: Any, now: datetime | None = None) -> CampaignState:
    """Store a valid definition as draft version 1 of a new campaign; ValidationFailed
    with every error, or Conflict `campaign_exists`."""
    conn = _connection(session)
    now = now or utcnow()
    definition = _valid_definition(conn, raw)
    taken = conn.execute(
        text("SELECT 1 FROM personalizations WHERE slug = :slug"), {"slug": definition.slug}
    ).first()
    if taken:
        raise Conflict(
            f"campaign {definition.slug!r} exists; PUT /v1/personalizations/{definition.slug}"
            " adds a version",
            field="slug",
            code="campaign_exists",
        )
    conn.execute(
        text(
            "INSERT INTO personalizations (slug, name, state, latest_version, active_version,"
            " created_at, updated_at) VALUES (:slug, :name, 'draft', 1, NULL, :now, :now)"
        ).bindparams(_ts("now")),
        {"slug": definition.slug, "name": definition.name, "now": now},
    )
    _insert_version(conn, slug=definition.slug, version=1, definition=definition, now=now)
    return _campaign_row(conn, definition.slug)


def _refuse_archived(campaign: CampaignState, action: str) -> None:
    if campaign.state == "archived":
        raise Conflict(
            f"campaign {campaign.slug!r} is archived and cannot {action}",
            field="slug",
            code="campaign_archived",
        )


def put_campaign(
    session: Store, *, slug: str, raw: Any, now: datetime | None = None
) -> CampaignState:
    """Store a valid definition as a new version (latest + 1). The active version keeps
    serving decisions, unchanged, until `activate_campaign`. The body's slug may be left
    out; if given it must equal `slug`."""
    conn = _connection(session)
    now = now or utcnow()
    campaign = _campaign_row(conn, slug, for_update=True)
    _refuse_archived(campaign, "take a new version")
    if isinstance(raw, dict) and "slug" not in raw:
        raw = {**raw, "slug": slug}
    definition = _valid_definition(conn, raw)
    if definition.slug != slug:
        raise ValidationFailed(
            [
                ErrorDetail(
                    "invalid", f"slug {definition.slug!r} differs from the path's {slug!r}", "slug"
                )
            ]
        )
    version = campaign.latest_version + 1
    _insert_version(conn, slug=slug, version=version, definition=definition, now=now)
    conn.execute(
        text(
            "UPDATE personalizations SET latest_version = :version, name = :name,"
            " updated_at = :now WHERE slug = :slug"
        ).bindparams(_ts("now")),
        {"slug": slug, "version": version, "name": definition.name, "now": now},
    )
    return _campaign_row(conn, slug)


def version_definition(session: Store, *, slug: str, version: int) -> PersonalizationDefinition:
    """The stored definition of one version; NotFound when there is no such version."""
    row = (
        _connection(session)
        .execute(
            text(
                "SELECT definition FROM personalization_versions"
                " WHERE campaign_slug = :slug AND version = :version"
            ).columns(definition=JSONType),
            {"slug": slug, "version": version},
        )
        .first()
    )
    if row is None:
        raise NotFound(f"campaign {slug!r} has no version {version}", field="version")
    return PersonalizationDefinition.model_validate(row[0])


def activate_campaign(session: Store, *, slug: str, now: datetime | None = None) -> CampaignState:
    """Make the latest version the one decisions use, and the campaign active (a paused
    campaign resumes). The version is checked again (a segment may have gone since it
    was saved): an invalid one raises ValidationFailed and nothing changes."""
    conn = _connection(session)
    now = now or utcnow()
    campaign = _campaign_row(conn, slug, for_update=True)
    _refuse_archived(campaign, "be activated")
    version = campaign.latest_version
    stored = version_definition(conn, slug=slug, version=version)
    _valid_definition(conn, stored_form(stored))
    conn.execute(
        text(
            "UPDATE personalization_versions SET activated_at = :now"
            " WHERE campaign_slug = :slug AND version = :version AND activated_at IS NULL"
        ).bindparams(_ts("now")),
        {"slug": slug, "version": version, "now": now},
    )
    conn.execute(
        text(
            "UPDATE personalizations SET state = 'active', active_version = :version,"
            " name = :name, updated_at = :now WHERE slug = :slug"
        ).bindparams(_ts("now")),
        {"slug": slug, "version": version, "name": stored.name, "now": now},
    )
    return _campaign_row(conn, slug)


def _set_state(conn: Connection, slug: str, state: CampaignStateName, now: datetime) -> None:
    conn.execute(
        text(
            "UPDATE personalizations SET state = :state, updated_at = :now WHERE slug = :slug"
        ).bindparams(_ts("now")),
        {"slug": slug, "state": state, "now": now},
    )


def pause_campaign(session: Store, *, slug: str, now: datetime | None = None) -> CampaignState:
    """Everyone gets the default content (and no view is recorded) until `activate`."""
    conn = _connection(session)
    campaign = _campaign_row(conn, slug, for_update=True)
    _refuse_archived(campaign, "be paused")
    if campaign.state == "draft":
        raise Conflict(
            f"campaign {slug!r} was never activated", field="slug", code="campaign_not_active"
        )
    if campaign.state == "active":
        _set_state(conn, slug, "paused", now or utcnow())
    return _campaign_row(conn, slug)


def archive_campaign(session: Store, *, slug: str, now: datetime | None = None) -> CampaignState:
    """Final: decisions show the default content; its views and analytics stay."""
    conn = _connection(session)
    campaign = _campaign_row(conn, slug, for_update=True)
    if campaign.state != "archived":
        _set_state(conn, slug, "archived", now or utcnow())
    return _campaign_row(conn, slug)


def get_campaign(session: Store, *, slug: str) -> CampaignState:
    """The campaign and every version, newest first."""
    conn = _connection(session)
    campaign = _campaign_row(conn, slug)
    rows = conn.execute(
        text(
            "SELECT version, definition, created_at, activated_at FROM personalization_versions"
            " WHERE campaign_slug = :slug ORDER BY version DESC"
        ).columns(definition=JSONType, created_at=UTCDateTime(), activated_at=UTCDateTime()),
        {"slug": slug},
    ).mappings()
    campaign.versions = [CampaignVersionInfo(**row) for row in rows]
    return campaign


def list_campaigns(
    session: Store, *, state: CampaignStateName | None = None
) -> list[CampaignState]:
    """Every campaign (in `state`), by slug."""
    sql = f"SELECT {_CAMPAIGN_COLUMNS} FROM personalizations"
    params: dict[str, Any] = {}
    if state is not None:
        sql += " WHERE state = :state"
        params["state"] = state
    rows = _connection(session).execute(
        text(sql + " ORDER BY slug").columns(created_at=UTCDateTime(), updated_at=UTCDateTime()),
        params,
    )
    return [CampaignState(**row) for row in rows.mappings()]


def activated_versions(session: Store, *, slug: str) -> set[int]:
    """The versions of a campaign that were active at some time (decided, had views)."""
    rows = _connection(session).execute(
        text(
            "SELECT version FROM personalization_versions"
            " WHERE campaign_slug = :slug AND activated_at IS NOT NULL"
        ),
        {"slug": slug},
    )
    return {int(row[0]) for row in rows}


def campaign_exists(session: Store, *, slug: str) -> bool:
    return (
        _connection(session)
        .execute(text("SELECT 1 FROM personalizations WHERE slug = :slug"), {"slug": slug})
        .first()
        is not None
    )


# --- deciding ------------------------------------------------------------------------------


def _reads_the_clock(condition: Condition) -> bool:
    """Whether the condition's SQL depends on the evaluation instant."""
    for _, node in iter_nodes(condition):
        if isinstance(node, EventCondition):
            return True
        if isinstance(node, AttributeCondition) and node.op in ("before", "after"):
            return True
    return False


@dataclass(frozen=True, eq=False)
class DriverStatement:
    """SQL in the driver's own parameter style, and the parameters besides the customer:
    a list with a None where the customer goes (SQLite, `?`) or a dict (psycopg).
    `many_sql` (psycopg) reads many customers at once, each row led by the customer's id
    (`decide_customers`: a list of ids). Compared by identity: a batch of decisions is
    read with one compiled statement."""

    sql: str
    positional: list[Any] | None
    customer_at: int
    named: dict[str, Any] | None
    many_sql: str | None = None

    def call_many(self, customer_ids: list[str]) -> tuple[str, dict[str, Any]]:
        """(sql, parameters) for many customers (psycopg)."""
        if self.many_sql is None:
            raise ValueError("this statement reads one customer at a time")
        return self.many_sql, {**(self.named or {}), "decide_customers": customer_ids}

    def call(self, customer_id: str) -> tuple[str, Any]:
        """(sql, parameters) for one customer."""
        if self.positional is not None:
            params = list(self.positional)
            params[self.customer_at] = customer_id
            return self.sql, tuple(params)
        return self.sql, {**(self.named or {}), "decide_customer": customer_id}


@dataclass
class DecisionStatement:
    """The one SELECT that reads a customer and the index of their first matching
    experience (-1: none), compiled once per version to the driver's own SQL (a decision
    then costs the driver's execute, not SQLAlchemy's). A campaign whose conditions read
    the clock (event conditions, before / after) is compiled again at most once a second,
    as of the end of that second."""

    definition: PersonalizationDefinition
    dialect: Any  # the engine's SQLAlchemy dialect
    reads_clock: bool
    _compiled: tuple[int, DriverStatement] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def at(self, now: float) -> DriverStatement:
        second = int(now) if self.reads_clock else 0
        compiled = self._compiled
        if compiled is None or compiled[0] != second:
            with self._lock:
                compiled = self._compiled
                if compiled is None or compiled[0] != second:
                    compiled = (second, self._compile(second + 1))
                    self._compiled = compiled
        return compiled[1]

    def _compile(self, epoch: int) -> DriverStatement:
        as_of = datetime.fromtimestamp(epoch, UTC) if self.reads_clock else utcnow()
        cases, params = [], {}
        for index, experience in enumerate(self.definition.experiences):
            compiled = compile_condition(
                experience.target(),
                dialect=self.dialect.name,
                now=as_of,
                param_prefix=f"x{index}_",
            )
            cases.append(f"WHEN {compiled.sql} THEN {index}")
            params.update(compiled.params)
        columns = f"c.email, c.phone, c.attributes, CASE {' '.join(cases)} ELSE -1 END AS matched"
        sql = f"SELECT {columns} FROM customers c WHERE c.id = :decide_customer"
        compiled_sql = text(sql).compile(dialect=self.dialect)
        order = compiled_sql.positiontup
        if order:  # a positional driver (SQLite's qmark)
            return DriverStatement(
                sql=compiled_sql.string,
                positional=[None if n == "decide_customer" else params[n] for n in order],
                customer_at=order.index("decide_customer"),
                named=None,
            )
        many = f"SELECT c.id, {columns} FROM customers c WHERE c.id = ANY(:decide_customers)"
        return DriverStatement(
            sql=compiled_sql.string,
            positional=None,
            customer_at=-1,
            named=params,
            many_sql=text(many).compile(dialect=self.dialect).string,
        )


@dataclass(frozen=True)
class Decision:
    """What one customer is shown: `experience` is an experience's name, `control` or
    `default`; `audience` the experience they matched (for control: would have seen)."""

    campaign: str
    version: int
    experience: str
    audience: str | None
    bucket: int
    content: dict[str, str]
    serving: bool


@dataclass
class LiveCampaign:
    """A campaign version ready to decide: targets compiled to SQL, slots compiled."""

    slug: str
    version: int
    state: str
    stamp: tuple[Any, ...]
    definition: PersonalizationDefinition
    statement: DecisionStatement
    slots: list[dict[str, SlotTemplate]]
    default_slots: dict[str, SlotTemplate]
    threshold: int
    origins: frozenset[str]
    checked_at: float = 0.0

    @property
    def serving(self) -> bool:
        """Only an active campaign shows experiences and records views."""
        return self.state == "active"

    @classmethod
    def build(
        cls,
        *,
        slug: str,
        version: int,
        state: str,
        stamp: tuple[Any, ...],
        dialect: Any,
        definition: PersonalizationDefinition,
    ) -> LiveCampaign:
        compiled: dict[str, SlotTemplate] = {}

        def slot(source: str) -> SlotTemplate:
            if source not in compiled:
                compiled[source] = compile_slot(source)
            return compiled[source]

        return cls(
            slug=slug,
            version=version,
            state=state,
            stamp=stamp,
            definition=definition,
            statement=DecisionStatement(
                definition,
                dialect,
                any(_reads_the_clock(e.target()) for e in definition.experiences),
            ),
            slots=[
                {name: slot(source) for name, source in definition.content_of(e).items()}
                for e in definition.experiences
            ],
            default_slots={
                name: slot(source) for name, source in definition.content_of(None).items()
            },
            threshold=definition.control_threshold,
            origins=frozenset(definition.cors_origins),
        )

    def decide(self, conn: Connection, *, customer_id: str) -> Decision:
        """One statement: the customer and their first matching experience; unknown
        customers and customers in no audience get the default content."""
        sql, params = self.statement.at(time.time()).call(customer_id)
        return self.decide_row(customer_id, conn.exec_driver_sql(sql, params).first())

    def decide_row(self, customer_id: str, row: Sequence[Any] | None) -> Decision:
        """The decision for a customer whose row (email, phone, attributes, index of the
        first matching experience) the decision statement read; None: unknown."""
        bucket = bucket_of(self.slug, customer_id)
        matched = -1 if row is None else int(row[3])
        audience = self.definition.experiences[matched].name if matched >= 0 else None
        if audience is None:
            experience, slots = DEFAULT, self.default_slots
        elif bucket < self.threshold:
            experience, slots = CONTROL, self.default_slots
        else:
            experience, slots = audience, self.slots[matched]
        if not self.serving:
            experience, slots = DEFAULT, self.default_slots
        email = phone = None
        attributes: Any = {}
        if row is not None:
            email, phone, attributes = row[0], row[1], row[2]
            if isinstance(attributes, str | bytes):
                attributes = orjson.loads(attributes)
            attributes = attributes or {}
        built: list[dict[str, Any]] = []

        def context() -> dict[str, Any]:
            if not built:
                customer = customer_context(
                    customer_id=customer_id, email=email, phone=phone, attributes=attributes
                )
                built.append(slot_context(customer, campaign=self.slug, experience=experience))
            return built[0]

        def field(name: str) -> Any:
            return customer_field(
                name, customer_id=customer_id, email=email, phone=phone, attributes=attributes
            )

        return Decision(
            campaign=self.slug,
            version=self.version,
            experience=experience,
            audience=audience,
            bucket=bucket,
            content={
                name: render_slot_lazily(
                    slots[name], experience=experience, field=field, context=context
                )
                for name in SLOTS
            },
            serving=self.serving,
        )


class DecisionReader:
    """Driver connections kept for decisions, outside the engine's pool, so that a
    decision costs the driver's execute and nothing else (measured on SQLite: 15 us
    where a pooled SQLAlchemy connection and `execute` cost 120 us).

    PostgreSQL: asynchronous psycopg connections in autocommit, read on the event loop,
    in batches: the decisions that wait for a statement while its previous batch is
    read go together in the next one (`WHERE c.id = ANY(...)`), one batch of a statement
    in flight at a time. A round trip through psycopg cost 120 us of API CPU and the
    server 40 us more than the bare one-row read; a batch shares both among its
    decisions, and waits no longer than one round trip to form. psycopg prepares the
    statement after its fifth run on a connection.

    SQLite: connections of a dedicated engine (tuned as every other, see `core.db`), made
    read-only (`query_only`), read on the event loop too. A hand-off to the thread pool
    and back cost more than the read itself (measured: 100 us of CPU a decision, a fifth
    of it), and a read in WAL mode does not wait for writers: it begins no transaction
    and takes no lock a writer holds. What could still make it wait (the recovery of a
    crashed writer's log) it waits for at most `LOOP_WAIT_MS` on the event loop; then the
    read is tried again in a thread with the usual busy timeout. A read of a page not in
    the OS cache blocks the loop for that disk read: the customers and memberships a
    storefront asks about are read on every page view and stay cached.

    A connection whose execute fails is closed and replaced by the next decision.
    """

    LOOP_WAIT_MS = 20

    def __init__(self, engine: Engine, *, size: int = 8):
        self.is_async = engine.dialect.name == "postgresql"
        self._url = engine.url
        self._size = size
        self._engine: Engine | None = None
        self._idle: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._open = 0
        self._lock = threading.Lock()
        self._async_idle: list[Any] = []
        self._async_waiters: deque[asyncio.Future[Any]] = deque()
        self._batches: dict[DriverStatement, list[tuple[str, asyncio.Future[Any]]]] = {}
        self._pumps: dict[DriverStatement, asyncio.Task[None]] = {}

    async def read(self, statement: DriverStatement, customer_id: str) -> Sequence[Any] | None:
        """The customer's row as the decision statement reads it, or None (see above for
        where it is read)."""
        if self.is_async:
            return await self.fetch_async(statement, customer_id)
        try:
            return self.fetch(statement, customer_id)
        except sqlite3.OperationalError as exc:
            if not _sqlite_busy(exc):
                raise
        return await asyncio.to_thread(self.fetch, statement, customer_id, patient=True)

    def fetch(
        self, statement: DriverStatement, customer_id: str, *, patient: bool = False
    ) -> Sequence[Any] | None:
        """`read` on a synchronous connection: SQLite waits for a lock at most
        `LOOP_WAIT_MS`, or the usual busy timeout when `patient`."""
        fairy = self._checkout()
        raw = fairy.dbapi_connection
        try:
            sql, params = statement.call(customer_id)
            if patient and not self.is_async:
                with sqlite_busy_timeout(raw, sqlite_busy_timeout_ms()):
                    row = raw.execute(sql, params).fetchone()
                raw.execute(f"PRAGMA busy_timeout={self.LOOP_WAIT_MS}")
            else:
                row = raw.execute(sql, params).fetchone()
        except sqlite3.OperationalError as exc:
            if _sqlite_busy(exc):
                self._idle.put(fairy)
            else:
                self._discard(fairy)
            raise
        except BaseException:
            self._discard(fairy)
            raise
        self._idle.put(fairy)
        return row

    def _checkout(self) -> Any:
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            create = self._open < self._size
            if create:
                self._open += 1
        if not create:
            return self._idle.get()
        try:
            if self._engine is None:
                self._engine = make_engine(self._url.render_as_string(hide_password=False))
            fairy = self._engine.raw_connection()
            raw = fairy.dbapi_connection
            if self.is_async:
                raw.autocommit = True
            else:
                raw.execute("PRAGMA query_only=ON")
                raw.execute(f"PRAGMA busy_timeout={self.LOOP_WAIT_MS}")
            return fairy
        except BaseException:
            with self._lock:
                self._open -= 1
            raise

    def _discard(self, fairy: Any) -> None:
        with self._lock:
            self._open -= 1
        with contextlib.suppress(Exception):
            fairy.invalidate()

    # -- PostgreSQL, on the event loop --
    MAX_BATCH = 500

    async def fetch_async(
        self, statement: DriverStatement, customer_id: str
    ) -> Sequence[Any] | None:
        """`read` on PostgreSQL: joins the statement's next batch."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Sequence[Any] | None] = loop.create_future()
        self._batches.setdefault(statement, []).append((customer_id, future))
        if statement not in self._pumps:
            # Started at the loop's next turn: what arrives meanwhile joins the batch.
            self._pumps[statement] = loop.create_task(self._pump(statement))
        return await future

    async def _pump(self, statement: DriverStatement) -> None:
        """Read the statement's waiting decisions, batch after batch, until none wait."""
        try:
            while waiting := self._batches.pop(statement, None):
                if len(waiting) > self.MAX_BATCH:
                    self._batches[statement] = waiting[self.MAX_BATCH :] + self._batches.get(
                        statement, []
                    )
                    waiting = waiting[: self.MAX_BATCH]
                try:
                    rows = await self._fetch_many(
                        statement, list(dict.fromkeys(c for c, _ in waiting))
                    )
                except BaseException as exc:
                    for _, future in waiting:
                        if future.done():
                            continue
                        if isinstance(exc, Exception):
                            future.set_exception(exc)
                        else:
                            future.cancel()
                    if not isinstance(exc, Exception):
                        raise
                    continue
                found = {row[0]: row[1:] for row in rows}
                for customer_id, future in waiting:
                    if not future.done():
                        future.set_result(found.get(customer_id))
        finally:
            self._pumps.pop(statement, None)
            for _, future in self._batches.pop(statement, []):  # only when cancelled
                future.cancel()

    async def _fetch_many(
        self, statement: DriverStatement, customer_ids: list[str]
    ) -> list[Sequence[Any]]:
        conn = await self._async_checkout()
        try:
            sql, params = statement.call_many(customer_ids)
            cursor = await conn.execute(sql, params)
            rows = await cursor.fetchall()
        except BaseException:
            self._open -= 1
            with contextlib.suppress(Exception):
                await conn.close()
            raise
        self._async_checkin(conn)
        return rows

    async def _async_checkout(self) -> Any:
        if self._async_idle:
            return self._async_idle.pop()
        if self._open < self._size:
            self._open += 1
            try:
                import psycopg

                return await psycopg.AsyncConnection.connect(
                    self._url.set(drivername="postgresql").render_as_string(hide_password=False),
                    autocommit=True,
                )
            except BaseException:
                self._open -= 1
                raise
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._async_waiters.append(waiter)
        return await waiter

    def _async_checkin(self, conn: Any) -> None:
        while self._async_waiters:
            waiter = self._async_waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        self._async_idle.append(conn)

    async def aclose(self) -> None:
        """Close every connection (the API's shutdown)."""
        for pump in list(self._pumps.values()):
            pump.cancel()
        while self._async_idle:
            with contextlib.suppress(Exception):
                await self._async_idle.pop().close()
        self.close()

    def close(self) -> None:
        while True:
            try:
                fairy = self._idle.get_nowait()
            except queue.Empty:
                break
            with contextlib.suppress(Exception):
                fairy.close()
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
        self._open = 0


def _sqlite_busy(error: sqlite3.OperationalError) -> bool:
    code = getattr(error, "sqlite_errorcode", 0) & 0xFF
    return code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) or "locked" in str(error)


def campaign_stamp(conn: Connection, *, slug: str) -> tuple[Any, ...] | None:
    """What changes whenever a campaign's decisions may: its state, versions and
    `updated_at` (None: no such campaign). One primary-key read."""
    row = conn.execute(
        text(
            "SELECT state, active_version, latest_version, updated_at FROM personalizations"
            " WHERE slug = :slug"
        ),
        {"slug": slug},
    ).first()
    return None if row is None else tuple(row)


def load_live_campaign(conn: Connection, *, slug: str) -> LiveCampaign:
    """The version decisions use now: the active one (active, paused or archived), else
    the latest draft (which shows its default content). NotFound for an unknown slug."""
    stamp = campaign_stamp(conn, slug=slug)
    if stamp is None:
        raise NotFound(f"no personalisation campaign {slug!r}", field="slug")
    state, active_version, latest_version, _ = stamp
    version = active_version or latest_version
    return LiveCampaign.build(
        slug=slug,
        version=version,
        state=state,
        stamp=stamp,
        dialect=conn.dialect,
        definition=version_definition(conn, slug=slug, version=version),
    )


class CampaignCache:
    """Live campaigns per process. Each is checked against its store row (one indexed
    read) at most once every `check_seconds`, and rebuilt when the row changed; the
    process that changes a campaign forgets it at once. An unknown slug is remembered as
    such for as long, so a storefront asking for one costs no read per request.

    On the event loop, `peek` answers from memory or tells its caller to `get` (in a
    thread). Once a second one caller is told so; while its check runs (at most
    `REFRESH_GRACE` seconds) the others are answered the campaign as it was, instead of
    every request of that moment going to the thread pool and queuing on the lock."""

    MAX_CAMPAIGNS = 1_000
    REFRESH_GRACE = 5.0

    def __init__(self, engine: Engine, *, check_seconds: float = 1.0):
        self._engine = engine
        self.check_seconds = check_seconds
        self._live: dict[str, LiveCampaign | tuple[float, NotFound]] = {}
        self._refreshing: dict[str, float] = {}
        self._lock = threading.Lock()

    def forget(self, slug: str) -> None:
        self._live.pop(slug, None)

    def peek(self, slug: str) -> LiveCampaign | None:
        """The campaign if it was checked recently enough, or is being checked again by
        another caller; None: the caller must `get` it (one caller a check)."""
        entry = self._live.get(slug)
        if not isinstance(entry, LiveCampaign):
            return None
        now = time.monotonic()
        if now - entry.checked_at < self.check_seconds:
            return entry
        started = self._refreshing.get(slug)
        if started is not None and now - started < self.REFRESH_GRACE:
            return entry
        self._refreshing[slug] = now
        return None

    def get(self, slug: str, conn: Connection | None = None) -> LiveCampaign:
        """The campaign as decisions should use it now; NotFound for an unknown slug."""
        entry = self._live.get(slug)
        now = time.monotonic()
        if isinstance(entry, LiveCampaign) and now - entry.checked_at < self.check_seconds:
            return entry
        if isinstance(entry, tuple) and now - entry[0] < self.check_seconds:
            raise entry[1]
        try:
            if conn is None:
                with self._engine.connect() as own:
                    return self._refresh(own, slug, entry, now)
            return self._refresh(conn, slug, entry, now)
        finally:
            self._refreshing.pop(slug, None)

    def _refresh(self, conn: Connection, slug: str, entry: Any, now: float) -> LiveCampaign:
        with self._lock:  # one rebuild at a time; the others then find it fresh
            current = self._live.get(slug)
            if isinstance(current, LiveCampaign) and now - current.checked_at < self.check_seconds:
                return current
            try:
                if (
                    isinstance(entry, LiveCampaign)
                    and campaign_stamp(conn, slug=slug) == entry.stamp
                ):
                    entry.checked_at = now
                    return entry
                live = load_live_campaign(conn, slug=slug)
            except NotFound as missing:
                self._store(slug, (now, missing))
                raise
            live.checked_at = now
            self._store(slug, live)
            return live

    def _store(self, slug: str, value: LiveCampaign | tuple[float, NotFound]) -> None:
        if len(self._live) >= self.MAX_CAMPAIGNS and slug not in self._live:
            self._live.clear()
        self._live[slug] = value


# --- views -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ViewRecord:
    """One view (or `views` views) of a campaign version by a customer."""

    campaign: str
    version: int
    customer_id: str
    experience: str
    audience: str | None
    bucket: int
    at: datetime
    views: int = 1


ViewKey = tuple[str, int, str, str]


def merge_views(views: Sequence[ViewRecord]) -> list[tuple[ViewKey, list[Any]]]:
    """One row per (campaign, version, customer, experience) as (key, [audience, bucket,
    first view, last view, views]): the audience of the first view, the count; sorted by
    key, so concurrent writers lock rows in the same order."""
    rows: dict[ViewKey, list[Any]] = {}
    for view in views:
        key = (view.campaign, view.version, view.customer_id, view.experience)
        row = rows.get(key)
        if row is None:
            rows[key] = [view.audience, view.bucket, view.at, view.at, view.views]
            continue
        if view.at < row[2]:
            row[0], row[2] = view.audience, view.at
        if view.at > row[3]:
            row[3] = view.at
        row[4] += view.views
    return sorted(rows.items())


_VIEWS_UPSERT = (
    " ON CONFLICT (campaign_slug, version, customer_id, experience) DO UPDATE SET"
    " audience = CASE WHEN excluded.first_viewed_at < personalization_views.first_viewed_at"
    " THEN excluded.audience ELSE personalization_views.audience END,"
    " first_viewed_at = {least}(personalization_views.first_viewed_at, excluded.first_viewed_at),"
    " last_viewed_at = {greatest}(personalization_views.last_viewed_at, excluded.last_viewed_at),"
    " views = personalization_views.views + excluded.views"
)
_VIEW_COLUMNS = (
    "campaign_slug, version, customer_id, experience, audience, bucket, first_viewed_at,"
    " last_viewed_at, views"
)
_SQLITE_VIEWS = (
    f"INSERT INTO personalization_views ({_VIEW_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
    + _VIEWS_UPSERT.format(least="MIN", greatest="MAX")
)
# One statement for the whole batch, given as one JSON array of rows: psycopg adapts a
# JSON text at once, where arrays of thousands of values cost 20 us of client CPU a row.
_POSTGRES_VIEWS = (
    f"INSERT INTO personalization_views ({_VIEW_COLUMNS})"
    " SELECT r->>0, CAST(r->>1 AS integer), r->>2, r->>3, r->>4, CAST(r->>5 AS integer),"
    " CAST(r->>6 AS timestamptz), CAST(r->>7 AS timestamptz), CAST(r->>8 AS bigint)"
    " FROM jsonb_array_elements(CAST(%s AS jsonb)) r"
    + _VIEWS_UPSERT.format(least="LEAST", greatest="GREATEST")
)


def _sqlite_time(value: datetime) -> str:
    """A time as SQLite keeps them (naive UTC text, see core.tables)."""
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def record_views(conn: Connection, *, views: Sequence[ViewRecord]) -> int:
    """Add these views to the store, merged, in the caller's transaction; returns how
    many views they were. Written through the driver: a batch of thousands of rows cost
    SQLAlchemy's per-row parameter handling more than the database's upserts."""
    rows = merge_views(views)
    if not rows:
        return 0
    raw = conn.connection.dbapi_connection
    if conn.dialect.name == "postgresql":
        batch = orjson.dumps([(*key, *row) for key, row in rows]).decode()
        with raw.cursor() as cursor:  # type: ignore[union-attr]
            cursor.execute(_POSTGRES_VIEWS, (batch,))
    else:
        take_sqlite_write_lock(raw)  # type: ignore[arg-type]
        raw.executemany(  # type: ignore[union-attr]
            _SQLITE_VIEWS,
            [
                (*key, audience, bucket, _sqlite_time(first), _sqlite_time(last), count)
                for key, (audience, bucket, first, last, count) in rows
            ],
        )
    return sum(row[4] for _, row in rows)


def count_views(conn: Connection, *, slug: str, version: int | None = None) -> int:
    """Every view recorded for the campaign (one version)."""
    sql = "SELECT COALESCE(SUM(views), 0) FROM personalization_views WHERE campaign_slug = :slug"
    params: dict[str, Any] = {"slug": slug}
    if version is not None:
        sql += " AND version = :version"
        params["version"] = version
    return int(conn.execute(text(sql), params).scalar_one())


# --- analytics -------------------------------------------------------------------------------


class ArmFigures(BaseModel):
    """One group of viewers, each counted in the arm of their first view of the version."""

    viewers: int = Field(description="unique customers whose first view was in this group")
    views: int = Field(description="every view of those customers (page views)")
    conversions: int = Field(description="viewers who did the goal within the window, once each")
    conversion_rate: float | None = Field(description="conversions / viewers")
    conversion_value: float = Field(description="the value property of each conversion, summed")
    value_per_viewer: float | None


class ExperienceFigures(ArmFigures):
    """An experience's viewers against the control customers of the same audience."""

    experience: str
    control: ArmFigures = Field(description="held-out customers who would have seen it")
    lift: float | None = Field(description="(treatment rate - control rate) / control rate")
    lift_ci: tuple[float, float] | None = Field(
        description="95% interval for the lift (delta method on the log rate ratio)"
    )
    p_value: float | None = Field(description="two-sided, pooled two-proportion z-test")
    significant: bool = Field(
        description="p < 0.05, lift_ci excludes 0 and neither group is too small to read"
    )
    always_valid_ci: tuple[float, float] | None = Field(
        description="95% mSPRT interval for the lift: valid however often it is read"
    )
    warning: str | None = Field(description="why the figures are too small to read")


class GoalPublic(BaseModel):
    event: str
    within: str
    value_property: str | None


class CampaignAnalytics(BaseModel):
    campaign: str
    version: int
    control_share: float
    goal: GoalPublic
    viewed_from: datetime | None = Field(description="first views at or after (from)")
    viewed_to: datetime | None = Field(description="first views and conversions before (to)")
    experiences: list[ExperienceFigures] = Field(description="in the campaign's order")
    overall: ExperienceFigures = Field(
        description="every experience's viewers against every control customer with an audience"
    )
    control: ArmFigures = Field(description="every held-out customer")
    default: ArmFigures = Field(description="customers in no audience, who saw the default")


def _window_end(dialect: str) -> str:
    if dialect == "postgresql":
        return "f.first_viewed_at + make_interval(secs => :window_seconds)"
    # Stored times are `YYYY-MM-DD HH:MM:SS.ffffff`: whole seconds added, fraction kept.
    return (
        "strftime('%Y-%m-%d %H:%M:%S', f.first_viewed_at, '+' || :window_seconds || ' seconds')"
        " || substr(f.first_viewed_at, 20)"
    )


def _json_number(dialect: str, source: str, path: str, bind: Callable[[Any], str]) -> str:
    """The numeric JSON value at a dotted `path` of `source`, NULL when it is no number."""
    parts = path.split(".")
    if dialect == "postgresql":
        chain = source + "".join(f" -> CAST({bind(part)} AS text)" for part in parts)
        return f"CASE WHEN jsonb_typeof({chain}) = 'number' THEN CAST({chain} #>> '{{}}' AS numeric) END"
    json_path = bind("$" + "".join(f'."{part}"' for part in parts))
    return (
        f"CASE WHEN json_type({source}, {json_path}) IN ('integer', 'real')"
        f" THEN json_extract({source}, {json_path}) END"
    )


def _figures(viewers: int, views: int, conversions: int, value: float) -> ArmFigures:
    return ArmFigures(
        viewers=viewers,
        views=views,
        conversions=conversions,
        conversion_rate=conversions / viewers if viewers else None,
        conversion_value=value,
        value_per_viewer=value / viewers if viewers else None,
    )


def _add(*arms: ArmFigures) -> ArmFigures:
    return _figures(
        sum(a.viewers for a in arms),
        sum(a.views for a in arms),
        sum(a.conversions for a in arms),
        sum(a.conversion_value for a in arms),
    )


def _compared(name: str, treatment: ArmFigures, control: ArmFigures) -> ExperienceFigures:
    result = compare(
        Arm(treatment.viewers, treatment.conversions), Arm(control.viewers, control.conversions)
    )
    return ExperienceFigures(
        **treatment.model_dump(),
        experience=name,
        control=control,
        lift=result.lift,
        lift_ci=result.lift_ci,
        p_value=result.p_value,
        significant=result.significant,
        always_valid_ci=result.always_valid_ci,
        warning=result.warning,
    )


def default_analytics_version(conn: Connection, *, slug: str) -> int:
    campaign = _campaign_row(conn, slug)
    return campaign.active_version or campaign.latest_version


def campaign_analytics(
    conn: Connection,
    *,
    slug: str,
    version: int | None = None,
    viewed_from: datetime | None = None,
    viewed_to: datetime | None = None,
    now: datetime | None = None,
) -> CampaignAnalytics:
    """Per experience and for control: viewers, views, conversions, rate, value, and the
    lift over the control customers of the same audience with its intervals and test.

    Each customer counts once per version, in the group of their first view of it (a
    customer whose segment changes later stays where they were first shown). A viewer
    converts when the goal event (its filters met) occurs between their first view and
    the end of the window, and before `viewed_to` when given; the value is the goal
    event's value property (first qualifying event). `viewed_from` / `viewed_to` select
    viewers by their first view."""
    now = now or utcnow()
    version = version or default_analytics_version(conn, slug=slug)
    definition = version_definition(conn, slug=slug, version=version)
    goal = definition.conversion
    dialect = conn.dialect.name
    filters = compile_property_filters(goal.where, dialect=dialect, now=now, param_prefix="gf_")
    params: dict[str, Any] = {
        **filters.params,
        "slug": slug,
        "version": version,
        "goal": goal.event,
        "window_seconds": int(goal.within.total_seconds()),
        "now": now,
    }
    binds = [_ts("now")]
    names = iter(range(1_000_000))

    def bind(value: Any) -> str:
        name = f"vp_{next(names)}"
        params[name] = value
        return f":{name}"

    first_filter, event_filter = "", ""
    if viewed_from is not None:
        first_filter += " AND first_viewed_at >= :viewed_from"
        params["viewed_from"] = viewed_from
        binds.append(_ts("viewed_from"))
    if viewed_to is not None:
        first_filter += " AND first_viewed_at < :viewed_to"
        event_filter = " AND e.occurred_at < :viewed_to"
        params["viewed_to"] = viewed_to
        binds.append(_ts("viewed_to"))
    value = (
        _json_number(dialect, "e.properties", goal.value_property, bind)
        if goal.value_property
        else "NULL"
    )
    # Linear on both databases, whatever statistics the planner has: one sort of the
    # version's view rows gives each viewer's first view and total views; then one
    # indexed range read of ix_events_customer_name_time per viewer (the outer side of
    # a LEFT JOIN) finds the goal events in their window, and one more sort keeps the
    # first. (A correlated lookup per viewer, joined to a second grouping of the views,
    # had SQLite without ANALYZE nest a scan of one inside the other: minutes at
    # 100,000 viewers.)
    sql = f"""
        WITH firsts AS (
            SELECT customer_id, experience, audience, first_viewed_at, views FROM (
                SELECT customer_id, experience, audience, first_viewed_at,
                       ROW_NUMBER() OVER viewer AS place,
                       SUM(views) OVER (viewer ROWS BETWEEN UNBOUNDED PRECEDING
                                        AND UNBOUNDED FOLLOWING) AS views
                FROM personalization_views
                WHERE campaign_slug = :slug AND version = :version
                WINDOW viewer AS (PARTITION BY customer_id ORDER BY first_viewed_at, experience)
            ) ranked
            WHERE place = 1{first_filter}
        ),
        matched AS (
            SELECT f.experience, f.audience, f.views, e.id AS event_id, {value} AS value,
                   ROW_NUMBER() OVER (PARTITION BY f.customer_id
                                      ORDER BY e.occurred_at, e.id) AS nth
            FROM firsts f LEFT JOIN events e
              ON e.customer_id = f.customer_id AND e.name = :goal
             AND e.occurred_at >= f.first_viewed_at AND e.occurred_at <= {_window_end(dialect)}
             AND e.occurred_at <= :now{event_filter} AND {filters.sql}
        )
        SELECT experience, audience, COUNT(*) AS viewers, SUM(views) AS views,
               COUNT(event_id) AS conversions, COALESCE(SUM(value), 0) AS value
        FROM matched WHERE nth = 1
        GROUP BY experience, audience
    """
    rows = conn.execute(text(sql).bindparams(*binds), params).all()
    cells: dict[tuple[str, str | None], ArmFigures] = {
        (row.experience, row.audience): _figures(
            int(row.viewers), int(row.views or 0), int(row.conversions), float(row.value or 0)
        )
        for row in rows
    }
    empty = _figures(0, 0, 0, 0.0)
    experiences = [
        _compared(e.name, cells.get((e.name, e.name), empty), cells.get((CONTROL, e.name), empty))
        for e in definition.experiences
    ]
    treated = _add(*(cells.get((e.name, e.name), empty) for e in definition.experiences))
    held_out = _add(*(cells.get((CONTROL, e.name), empty) for e in definition.experiences))
    return CampaignAnalytics(
        campaign=slug,
        version=version,
        control_share=definition.control_share,
        goal=GoalPublic(
            event=goal.event,
            within=stored_form(definition)["conversion"]["within"],
            value_property=goal.value_property,
        ),
        viewed_from=viewed_from,
        viewed_to=viewed_to,
        experiences=experiences,
        overall=_compared("all", treated, held_out),
        control=_add(*(v for (name, _), v in cells.items() if name == CONTROL)),
        default=_add(*(v for (name, _), v in cells.items() if name == DEFAULT)),
    )


# --- the shipped campaign ------------------------------------------------------------------

SHIPPED_CAMPAIGNS_DIR = SHIPPED_TEMPLATES_DIR / "personalizations"
SHIPPED_MODEL = "default"


class CampaignInstall(BaseModel):
    slug: str
    file: str
    action: Literal["created", "new_version", "unchanged", "archived_skipped"]
    state: CampaignStateName
    version: int


def shipped_campaign_definitions(*, model: str = SHIPPED_MODEL) -> dict[str, dict[str, Any]]:
    """The shipped campaigns by file name, their experiences on RFM model `model`'s label
    segments (`<model>:champions`); for another model than `default` the slug gets
    `-<model>` appended, as the shipped journeys' do."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(SHIPPED_CAMPAIGNS_DIR.glob("*.json")):
        raw = json.loads(path.read_text())
        if model != SHIPPED_MODEL:
            for experience in raw.get("experiences", []):
                if "segment" in experience:
                    label = experience["segment"].split(":", 1)[1]
                    experience["segment"] = f"{model}:{label}"
            raw["slug"] = f"{raw['slug']}-{model}"
        out[path.name] = raw
    return out


def missing_campaign_segments(session: Store, *, model: str = SHIPPED_MODEL) -> list[str]:
    """Segments the shipped campaigns name that this store does not hold."""
    conn = _connection(session)
    named = sorted(
        {
            e["segment"]
            for raw in shipped_campaign_definitions(model=model).values()
            for e in raw.get("experiences", [])
            if "segment" in e
        }
    )
    return [slug for slug in named if not segment_exists(conn, slug=slug)]


def install_shipped_campaigns(
    session: Store,
    *,
    model: str = SHIPPED_MODEL,
    activate: bool = False,
    now: datetime | None = None,
) -> list[CampaignInstall]:
    """Install the shipped campaigns: new ones as draft version 1, changed ones as a new
    version, identical ones untouched; with `activate` each ends active on its latest
    version. ValidationFailed (every error, before anything is written) when a segment is
    missing; archived campaigns are left alone."""
    conn = _connection(session)
    now = now or utcnow()
    shipped = shipped_campaign_definitions(model=model)
    problems: list[ErrorDetail] = []
    for file, raw in shipped.items():
        _, errors = validate_campaign(conn, raw=raw)
        problems += [ErrorDetail(e.code, f"{file}: {e.message}", e.field) for e in errors]
    if problems:
        raise ValidationFailed(problems)
    outcomes: list[CampaignInstall] = []
    for file, raw in shipped.items():
        slug = raw["slug"]
        if not campaign_exists(conn, slug=slug):
            campaign = create_campaign(conn, raw=raw, now=now)
            action = "created"
        else:
            campaign = _campaign_row(conn, slug)
            if campaign.state == "archived":
                outcomes.append(
                    CampaignInstall(
                        slug=slug,
                        file=file,
                        action="archived_skipped",
                        state=campaign.state,
                        version=campaign.latest_version,
                    )
                )
                continue
            latest = version_definition(conn, slug=slug, version=campaign.latest_version)
            if stored_form(latest) == stored_form(PersonalizationDefinition.model_validate(raw)):
                action = "unchanged"
            else:
                campaign = put_campaign(conn, slug=slug, raw=raw, now=now)
                action = "new_version"
        if activate and not (
            campaign.state == "active" and campaign.active_version == campaign.latest_version
        ):
            campaign = activate_campaign(conn, slug=slug, now=now)
        outcomes.append(
            CampaignInstall(
                slug=slug,
                file=file,
                action=action,
                state=campaign.state,
                version=campaign.latest_version,
            )
        )
    return outcomes
