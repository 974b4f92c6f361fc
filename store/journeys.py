"""Journeys and their versions: draft -> activate (immutable version n) -> pause / resume
-> archive.

Every `create_journey` / `put_journey` writes a new version row; no version row is ever
changed afterwards except to stamp `activated_at`, so an active version is immutable and
a run that carries a snapshot of it can always be explained. A journey's state says
whether new entries start runs: only `active` journeys are returned to the dispatcher.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ValidationError
from sqlalchemy import bindparam, text
from sqlalchemy.engine import Connection
from sqlmodel import Session

from core.errors import Conflict, ErrorDetail, NotFound, ValidationFailed
from core.journeys import JourneyDefinition, TemplateCheck, validate_journey
from core.rendering import TemplateProblem, prove_template
from core.tables import JSONType, UTCDateTime, utcnow
from store.customers import sample_attributes
from store.references import share_lock_clause
from store.templates import SHIPPED_TEMPLATES_DIR, load_template, template_exists

Store = Session | Connection
JourneyStateName = Literal["draft", "active", "paused", "archived"]
RunsOnArchive = Literal["finish", "cancel"]


class JourneyVersionInfo(BaseModel):
    version: int
    definition: dict[str, Any]
    created_at: datetime
    activated_at: datetime | None = None


class JourneyState(BaseModel):
    """A journey as the API shows it; `versions` is filled by `get_journey`."""

    slug: str
    name: str
    state: JourneyStateName
    latest_version: int
    active_version: int | None
    trigger_segment: str
    created_at: datetime
    updated_at: datetime
    versions: list[JourneyVersionInfo] | None = None


class ActiveJourney(BaseModel):
    """What the dispatcher needs to start a run: the snapshot of the active version."""

    slug: str
    version: int
    definition: JourneyDefinition


class UnreadableJourney(BaseModel):
    """An active journey whose stored definition no longer validates (stored by an older
    version, or by hand): it starts no run until it is fixed."""

    slug: str
    version: int
    error: str


class RunningWorkflow(BaseModel):
    workflow_id: str
    run_id: str


class ArchiveResult(BaseModel):
    journey: JourneyState
    runs: RunsOnArchive
    running: list[RunningWorkflow]


def _dialect(session: Store) -> str:
    if isinstance(session, Connection):
        return session.dialect.name
    return session.get_bind().dialect.name


def _ts(name: str) -> Any:
    return bindparam(name, type_=UTCDateTime())


def segment_exists(session: Store, *, slug: str) -> bool:
    """True when a segment row (rule, RFM label or external) has this slug. The row is
    share-locked on PostgreSQL: a journey is about to name it, and a delete waits."""
    row = session.execute(
        text(f"SELECT 1 FROM segments WHERE slug = :slug{share_lock_clause(session)}"),
        {"slug": slug},
    ).first()
    return row is not None


def _attributes_set_by(raw: Any) -> dict[str, Any]:
    """The attributes the journey's own update_attribute steps set, with their values."""
    steps = raw.get("steps") if isinstance(raw, dict) else None
    found: dict[str, Any] = {}
    for step in steps.values() if isinstance(steps, dict) else ():
        if isinstance(step, dict) and step.get("type") == "update_attribute":
            name = step.get("attribute")
            if isinstance(name, str) and name:
                found[name] = step.get("value")
    return found


def _template_prover(session: Store, raw: Any) -> TemplateCheck:
    """Proves each step's template as the send path would render it for this journey:
    for a customer without attributes, then for one with every attribute seen on the
    stored customers or set by the journey."""
    journey = raw.get("slug") if isinstance(raw, dict) else None
    known: dict[str, Any] | None = None

    def problem(path: str, step: str) -> TemplateProblem | None:
        nonlocal known
        if known is None:
            known = {**sample_attributes(session), **_attributes_set_by(raw)}
        try:
            prove_template(
                load_template(session, path=path),
                path=path,
                known_attributes=known,
                journey=journey if isinstance(journey, str) and journey else "sample-journey",
                step=step,
            )
        except TemplateProblem as exc:
            return exc
        return None

    return problem


def validate_definition(
    session: Store, *, raw: Any
) -> tuple[JourneyDefinition | None, list[ErrorDetail]]:
    """Parse and check `raw` against this store's templates and segments; every error.

    Every step's template must render for sample customers (`core.rendering.prove_template`).
    """
    return validate_journey(
        raw,
        template_exists=lambda path: template_exists(session, path=path),
        segment_exists=lambda slug: segment_exists(session, slug=slug),
        template_problem=_template_prover(session, raw),
    )


def _valid_definition(session: Store, raw: Any) -> JourneyDefinition:
    definition, errors = validate_definition(session, raw=raw)
    if errors or definition is None:
        raise ValidationFailed(errors)
    return definition


def _stored_form(definition: JourneyDefinition) -> dict[str, Any]:
    # Durations as ISO text and condition keys by alias ("not"), so it parses back as is.
    return definition.model_dump(mode="json", by_alias=True)


_JOURNEY_COLUMNS = (
    "slug, name, state, latest_version, active_version, trigger_segment, created_at, updated_at"
)


def _journey_row(session: Store, slug: str, *, for_update: bool = False) -> JourneyState:
    # Versions are numbered latest + 1: concurrent writers of one journey take turns.
    lock = " FOR UPDATE" if for_update and _dialect(session) == "postgresql" else ""
    row = (
        session.execute(
            text(f"SELECT {_JOURNEY_COLUMNS} FROM journeys WHERE slug = :slug{lock}").columns(
                created_at=UTCDateTime(), updated_at=UTCDateTime()
            ),
            {"slug": slug},
        )
        .mappings()
        .first()
    )
    if row is None:
        raise NotFound(f"no journey {slug!r}", field="slug")
    return JourneyState(**row)


def _insert_version(
    session: Store, *, slug: str, version: int, definition: JourneyDefinition, now: datetime
) -> None:
    session.execute(
        text(
            "INSERT INTO journey_versions (journey_slug, version, definition, created_at)"
            " VALUES (:slug, :version, :definition, :now)"
        ).bindparams(bindparam("definition", type_=JSONType), _ts("now")),
        {"slug": slug, "version": version, "definition": _stored_form(definition), "now": now},
    )


def create_journey(session: Store, *, raw: Any, now: datetime | None = None) -> JourneyState:
    """Store a valid definition as draft version 1 of a new journey.

    Raises ValidationFailed with every error, or Conflict when the slug is taken.
    """
    now = now or utcnow()
    definition = _valid_definition(session, raw)
    taken = session.execute(
        text("SELECT 1 FROM journeys WHERE slug = :slug"), {"slug": definition.slug}
    ).first()
    if taken:
        raise Conflict(
            f"journey {definition.slug!r} exists; PUT /v1/journeys/{definition.slug} adds a version",
            field="slug",
            code="journey_exists",
        )
    session.execute(
        text(
            "INSERT INTO journeys (slug, name, state, latest_version, active_version,"
            " trigger_segment, created_at, updated_at)"
            " VALUES (:slug, :name, 'draft', 1, NULL, :trigger, :now, :now)"
        ).bindparams(_ts("now")),
        {
            "slug": definition.slug,
            "name": definition.name,
            "trigger": definition.trigger.segment,
            "now": now,
        },
    )
    _insert_version(session, slug=definition.slug, version=1, definition=definition, now=now)
    return _journey_row(session, definition.slug)


def _refuse_archived(journey: JourneyState, action: str) -> None:
    if journey.state == "archived":
        raise Conflict(
            f"journey {journey.slug!r} is archived and cannot {action}",
            field="slug",
            code="journey_archived",
        )


def put_journey(
    session: Store, *, slug: str, raw: Any, now: datetime | None = None
) -> JourneyState:
    """Store a valid definition as a new draft version (latest + 1) of an existing journey.

    The active version, if any, stays active and unchanged until `activate_journey`.
    The body's slug may be left out; if given it must equal `slug`.
    """
    now = now or utcnow()
    journey = _journey_row(session, slug, for_update=True)
    _refuse_archived(journey, "take a new version")
    if isinstance(raw, dict) and "slug" not in raw:
        raw = {**raw, "slug": slug}
    definition = _valid_definition(session, raw)
    if definition.slug != slug:
        raise ValidationFailed(
            [
                ErrorDetail(
                    "invalid", f"slug {definition.slug!r} differs from the path's {slug!r}", "slug"
                )
            ]
        )
    version = journey.latest_version + 1
    _insert_version(session, slug=slug, version=version, definition=definition, now=now)
    # The trigger the dispatcher matches is the active version's; a never-activated
    # journey shows its latest draft's.
    trigger = journey.trigger_segment if journey.active_version else definition.trigger.segment
    session.execute(
        text(
            "UPDATE journeys SET latest_version = :version, name = :name,"
            " trigger_segment = :trigger, updated_at = :now WHERE slug = :slug"
        ).bindparams(_ts("now")),
        {
            "slug": slug,
            "version": version,
            "name": definition.name,
            "trigger": trigger,
            "now": now,
        },
    )
    return _journey_row(session, slug)


def _version_definition(session: Store, slug: str, version: int) -> dict[str, Any]:
    row = session.execute(
        text(
            "SELECT definition FROM journey_versions WHERE journey_slug = :slug AND version = :version"
        ).columns(definition=JSONType),
        {"slug": slug, "version": version},
    ).first()
    if row is None:
        raise NotFound(f"journey {slug!r} has no version {version}", field="version")
    return row[0]


def activate_journey(session: Store, *, slug: str, now: datetime | None = None) -> JourneyState:
    """Make the latest version the active one (new entries get it) and the journey active.

    The definition is checked again (a template or segment may have gone since the draft
    was saved); an invalid one raises ValidationFailed and nothing changes. Activating
    the version that is already active only makes the journey active again.
    """
    now = now or utcnow()
    journey = _journey_row(session, slug, for_update=True)
    _refuse_archived(journey, "be activated")
    version = journey.latest_version
    definition = _valid_definition(session, _version_definition(session, slug, version))
    session.execute(
        text(
            "UPDATE journey_versions SET activated_at = :now"
            " WHERE journey_slug = :slug AND version = :version AND activated_at IS NULL"
        ).bindparams(_ts("now")),
        {"slug": slug, "version": version, "now": now},
    )
    session.execute(
        text(
            "UPDATE journeys SET state = 'active', active_version = :version,"
            " trigger_segment = :trigger, name = :name, updated_at = :now WHERE slug = :slug"
        ).bindparams(_ts("now")),
        {
            "slug": slug,
            "version": version,
            "trigger": definition.trigger.segment,
            "name": definition.name,
            "now": now,
        },
    )
    return _journey_row(session, slug)


def _set_state(session: Store, slug: str, state: JourneyStateName, now: datetime) -> None:
    session.execute(
        text("UPDATE journeys SET state = :state, updated_at = :now WHERE slug = :slug").bindparams(
            _ts("now")
        ),
        {"slug": slug, "state": state, "now": now},
    )


def pause_journey(session: Store, *, slug: str, now: datetime | None = None) -> JourneyState:
    """Stop new entries; runs in flight carry on. Pausing a paused journey changes nothing."""
    journey = _journey_row(session, slug, for_update=True)
    _refuse_archived(journey, "be paused")
    if journey.state == "draft":
        raise Conflict(f"journey {slug!r} was never activated", field="slug", code="not_active")
    if journey.state == "active":
        _set_state(session, slug, "paused", now or utcnow())
    return _journey_row(session, slug)


def resume_journey(session: Store, *, slug: str, now: datetime | None = None) -> JourneyState:
    """Let new entries in again, on the active version. Resuming an active one changes nothing."""
    journey = _journey_row(session, slug, for_update=True)
    _refuse_archived(journey, "be resumed")
    if journey.state == "draft":
        raise Conflict(
            f"journey {slug!r} was never activated; activate it", field="slug", code="not_active"
        )
    if journey.state == "paused":
        _set_state(session, slug, "active", now or utcnow())
    return _journey_row(session, slug)


def running_runs(session: Store, *, slug: str) -> list[RunningWorkflow]:
    """The journey's runs still marked running, oldest first."""
    rows = session.execute(
        text(
            "SELECT workflow_id, run_id FROM journey_runs"
            " WHERE journey_slug = :slug AND status = 'running' ORDER BY id"
        ),
        {"slug": slug},
    )
    return [RunningWorkflow(workflow_id=r[0], run_id=r[1]) for r in rows]


def archive_journey(
    session: Store, *, slug: str, runs: RunsOnArchive, now: datetime | None = None
) -> ArchiveResult:
    """Archive: no new entries ever again; the journey can no longer change.

    Returns the runs still running. With `runs="finish"` they carry on to their end;
    with `runs="cancel"` the caller cancels each workflow through the Temporal client
    (the store cannot). Archiving an archived journey changes nothing.
    """
    journey = _journey_row(session, slug, for_update=True)
    if journey.state != "archived":
        _set_state(session, slug, "archived", now or utcnow())
    return ArchiveResult(
        journey=_journey_row(session, slug), runs=runs, running=running_runs(session, slug=slug)
    )


def get_journey(session: Store, *, slug: str) -> JourneyState:
    """The journey with every version, newest first."""
    journey = _journey_row(session, slug)
    rows = (
        session.execute(
            text(
                "SELECT version, definition, created_at, activated_at FROM journey_versions"
                " WHERE journey_slug = :slug ORDER BY version DESC"
            ).columns(definition=JSONType, created_at=UTCDateTime(), activated_at=UTCDateTime()),
            {"slug": slug},
        )
        .mappings()
        .all()
    )
    journey.versions = [JourneyVersionInfo(**row) for row in rows]
    return journey


def list_journeys(
    session: Store, *, limit: int = 100, cursor: str | None = None, state: str | None = None
) -> list[JourneyState]:
    """Journeys by slug, `limit` at a time after `cursor` (the last slug seen)."""
    where, params = [], {"limit": limit}
    if cursor is not None:
        where.append("slug > :cursor")
        params["cursor"] = cursor
    if state is not None:
        where.append("state = :state")
        params["state"] = state
    condition = f" WHERE {' AND '.join(where)}" if where else ""
    rows = (
        session.execute(
            text(
                f"SELECT {_JOURNEY_COLUMNS} FROM journeys{condition} ORDER BY slug LIMIT :limit"
            ).columns(created_at=UTCDateTime(), updated_at=UTCDateTime()),
            params,
        )
        .mappings()
        .all()
    )
    return [JourneyState(**row) for row in rows]


def get_journey_version(session: Store, *, slug: str, version: int) -> JourneyDefinition:
    """One stored version's definition (any state)."""
    return JourneyDefinition.model_validate(_version_definition(session, slug, version))


def active_journeys_for_segment(session: Store, *, segment_slug: str) -> list[ActiveJourney]:
    """Journeys that start a run when a customer enters `segment_slug`: state active and
    the active version's trigger is that segment. Paused, archived and draft ones are not
    returned. Each carries the active version's definition, the snapshot a run takes."""
    return [
        journey
        for journey in triggered_journeys(session, segment_slug=segment_slug)
        if isinstance(journey, ActiveJourney)
    ]


def triggered_journeys(
    session: Store, *, segment_slug: str
) -> list[ActiveJourney | UnreadableJourney]:
    """`active_journeys_for_segment`, and beside them each active journey whose stored
    definition no longer validates, with its error: one unreadable journey must not keep
    the others from starting."""
    rows = session.execute(
        text(
            "SELECT j.slug, v.version, v.definition FROM journeys j"
            " JOIN journey_versions v ON v.journey_slug = j.slug AND v.version = j.active_version"
            " WHERE j.trigger_segment = :segment AND j.state = 'active' ORDER BY j.slug"
        ).columns(definition=JSONType),
        {"segment": segment_slug},
    )
    found: list[ActiveJourney | UnreadableJourney] = []
    for slug, version, definition in rows:
        try:
            parsed = JourneyDefinition.model_validate(definition)
        except ValidationError as exc:
            found.append(UnreadableJourney(slug=slug, version=version, error=str(exc)))
            continue
        found.append(ActiveJourney(slug=slug, version=version, definition=parsed))
    return found


# --- the seed's five journeys, shipped in templates/journeys/ -------------------------

SHIPPED_JOURNEYS_DIR = SHIPPED_TEMPLATES_DIR / "journeys"
SHIPPED_MODEL = "default"


class InstallOutcome(BaseModel):
    slug: str
    file: str
    action: Literal["created", "new_version", "unchanged", "archived_skipped"]
    state: JourneyStateName
    version: int


def shipped_journey_definitions(*, model: str = SHIPPED_MODEL) -> dict[str, dict[str, Any]]:
    """The shipped definitions by file name, their triggers on RFM model `model`.

    For a model other than `default` the trigger becomes `<model>:<label>` and the slug
    gets `-<model>` appended, so the journeys of two models never share a slug.
    """
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(SHIPPED_JOURNEYS_DIR.glob("*.json")):
        raw = json.loads(path.read_text())
        if model != SHIPPED_MODEL:
            label = raw["trigger"]["segment"].split(":", 1)[1]
            raw["trigger"] = {**raw["trigger"], "segment": f"{model}:{label}"}
            raw["slug"] = f"{raw['slug']}-{model}"
        out[path.name] = raw
    return out


def missing_trigger_segments(session: Store, *, model: str = SHIPPED_MODEL) -> list[str]:
    """Trigger segments of the shipped journeys that do not exist in this store."""
    triggers = [
        raw["trigger"]["segment"] for raw in shipped_journey_definitions(model=model).values()
    ]
    return [slug for slug in triggers if not segment_exists(session, slug=slug)]


def install_shipped_journeys(
    session: Store,
    *,
    model: str = SHIPPED_MODEL,
    activate: bool = False,
    now: datetime | None = None,
) -> list[InstallOutcome]:
    """Install the five seed journeys: new ones as draft version 1, changed ones as a new
    version, identical ones untouched; with `activate`, each ends active on its latest
    version. Raises ValidationFailed (every error) when a trigger segment or template is
    missing, before anything is written; archived journeys are left alone."""
    now = now or utcnow()
    shipped = shipped_journey_definitions(model=model)
    problems: list[ErrorDetail] = []
    for file, raw in shipped.items():
        _, errors = validate_definition(session, raw=raw)
        problems += [ErrorDetail(e.code, f"{file}: {e.message}", e.field) for e in errors]
    if problems:
        raise ValidationFailed(problems)
    outcomes: list[InstallOutcome] = []
    for file, raw in shipped.items():
        slug = raw["slug"]
        exists = session.execute(
            text("SELECT 1 FROM journeys WHERE slug = :slug"), {"slug": slug}
        ).first()
        if not exists:
            journey = create_journey(session, raw=raw, now=now)
            action = "created"
        else:
            journey = _journey_row(session, slug)
            if journey.state == "archived":
                outcomes.append(
                    InstallOutcome(
                        slug=slug,
                        file=file,
                        action="archived_skipped",
                        state=journey.state,
                        version=journey.latest_version,
                    )
                )
                continue
            latest = _version_definition(session, slug, journey.latest_version)
            if latest == _stored_form(JourneyDefinition.model_validate(raw)):
                action = "unchanged"
            else:
                journey = put_journey(session, slug=slug, raw=raw, now=now)
                action = "new_version"
        if activate and not (
            journey.state == "active" and journey.active_version == journey.latest_version
        ):
            journey = activate_journey(session, slug=slug, now=now)
        outcomes.append(
            InstallOutcome(
                slug=slug,
                file=file,
                action=action,
                state=journey.state,
                version=journey.latest_version,
            )
        )
    return outcomes
