"""Who uses a segment or a template: the references a delete or a change must not break.

A reference is held by something still in service:

- a rule segment's condition (`{"segment": slug}` at any depth);
- an RFM model's `targeting` condition;
- a journey that is not archived, through the versions that take new entries or can
  still be made to: the active version (journey `active` or `paused`) and the latest
  version when it is a draft (`activate` checks it again and would fail on a missing
  segment or template). In those versions: the trigger, a branch step's conditions and
  an email or SMS step's template. Superseded versions and archived journeys start no
  new run; their runs in flight that reach a step whose template has gone record the
  send as failed and go on;
- a personalisation campaign that is not archived, through its active version and its
  latest version when that is a draft: each experience's segment and the segments its
  condition names.

The store refuses a change that would leave a reference dangling with Conflict `in_use`,
one error per reference (`refuse_if_used`), before it writes anything. The rows being
removed are locked first (`lock_for_removal`), and on PostgreSQL whoever saves a new
reference takes a share lock on the row it names (`segment_exists`, `template_exists`,
segment validation), so the two wait for each other instead of both succeeding.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import bindparam, text
from sqlalchemy.engine import Connection
from sqlmodel import Session

from core.conditions import (
    CONDITION_ADAPTER,
    Condition,
    referenced_predictions,
    referenced_segments,
)
from core.db import take_sqlite_write_lock
from core.errors import Conflict, ErrorDetail
from core.journeys import BranchStep, EmailStep, JourneyDefinition, SmsStep
from core.personalization import PersonalizationDefinition, segments_named
from core.tables import JSONType

Store = Session | Connection
UserKind = Literal["segment", "rfm_model", "journey", "personalization"]


@dataclass(frozen=True)
class Reference:
    """One place that names a segment or a template, and who holds it."""

    target_kind: Literal["segment", "template", "prediction"]
    target: str  # the segment slug or template path named
    user_kind: UserKind
    user: str  # slug of the segment, RFM model or journey holding the reference
    path: str  # where in the user's definition: `condition.all[0]`, `trigger`, ...
    journey_state: str | None = None  # the version's standing: active | paused | draft
    journey_version: int | None = None

    def user_text(self) -> str:
        """`journey champions-nurture (active, v2) trigger`, `segment vip condition.all[0]`."""
        if self.user_kind in ("journey", "personalization"):
            kind = "journey" if self.user_kind == "journey" else "personalization campaign"
            return f"{kind} {self.user} ({self.journey_state}, v{self.journey_version}) {self.path}"
        kind = "segment" if self.user_kind == "segment" else "RFM model"
        return f"{kind} {self.user} {self.path}"

    def message(self) -> str:
        kind = "predictive model" if self.target_kind == "prediction" else self.target_kind
        return f"{kind} {self.target!r} is used by {self.user_text()}"


def refuse_if_used(references: Sequence[Reference], *, field: str) -> None:
    """Raise Conflict `in_use` with one error per reference (each naming its user) when
    there is any; `field` is the request field the refused change came through."""
    if not references:
        return
    errors = [ErrorDetail("in_use", r.message(), field) for r in references]
    raise Conflict(errors[0].message, field=field, code="in_use", errors=errors)


def _connection(session: Store) -> Connection:
    return session if isinstance(session, Connection) else session.connection()


# Row locks taken before the uses are read. PostgreSQL: FOR UPDATE on the rows (savers
# of a new reference take FOR KEY SHARE on the row they name, so whichever comes second
# waits and then sees the other's commit). SQLite: the database write lock, so no other
# writer commits between the read of the uses and the change.
_LOCK_ROWS = {
    "postgresql": "SELECT 1 FROM {table} WHERE {column} IN :keys FOR UPDATE",
    "sqlite": None,
}


def lock_for_removal(session: Store, *, table: str, column: str, keys: Sequence[str]) -> None:
    """Hold the rows of `table` whose `column` is in `keys` (constants of the store, never
    input) until commit, before their uses are read."""
    conn = _connection(session)
    statement = _LOCK_ROWS.get(conn.dialect.name)
    if statement is None:
        take_sqlite_write_lock(conn.connection.dbapi_connection)  # type: ignore[arg-type]
        return
    if keys:
        conn.execute(
            text(statement.format(table=table, column=column)).bindparams(
                bindparam("keys", expanding=True)
            ),
            {"keys": list(keys)},
        )


def share_lock_clause(session: Store) -> str:
    """What a read of a row about to be referenced appends (` FOR KEY SHARE` on
    PostgreSQL): a removal of that row waits for the referencing transaction."""
    return " FOR KEY SHARE" if _connection(session).dialect.name == "postgresql" else ""


# --- segments ---------------------------------------------------------------------------


def segment_users(
    session: Store, *, slugs: Collection[str], except_model: str | None = None
) -> list[Reference]:
    """Every reference to the segments `slugs`: rule segments' conditions, RFM models'
    targeting (but not the targeting of `except_model`) and journeys not archived.
    Segments first, then models, then journeys, each by slug and then document order."""
    wanted = set(slugs)
    if not wanted:
        return []
    conn = _connection(session)
    found = _segment_conditions(conn, wanted)
    found += [r for r in _model_targeting(conn, wanted) if r.user != except_model]
    found += [r for r in _journey_references(conn) if r.target_kind == "segment"]
    found += _campaign_references(conn)
    return [r for r in found if r.target in wanted]


def _segment_conditions(conn: Connection, wanted: set[str]) -> list[Reference]:
    rows = conn.execute(
        text("SELECT slug, condition FROM segments WHERE kind = 'rule' ORDER BY slug").columns(
            condition=JSONType
        )
    )
    return [
        Reference("segment", slug, "segment", user, path)
        for user, condition in rows
        if condition
        for path, slug in referenced_segments(CONDITION_ADAPTER.validate_python(condition))
        if slug in wanted
    ]


def _model_targeting(conn: Connection, wanted: set[str]) -> list[Reference]:
    rows = conn.execute(
        text("SELECT slug, definition FROM rfm_models ORDER BY slug").columns(definition=JSONType)
    )
    return [
        Reference("segment", slug, "rfm_model", user, path)
        for user, definition in rows
        if definition.get("targeting")
        for path, slug in referenced_segments(
            CONDITION_ADAPTER.validate_python(definition["targeting"]), "targeting"
        )
        if slug in wanted
    ]


# --- journeys ---------------------------------------------------------------------------


def _live_journey_versions(conn: Connection) -> list[tuple[str, str, int, dict[str, Any]]]:
    """(journey, standing, version, definition) of the active version and the latest
    draft of every journey not archived."""
    rows = conn.execute(
        text(
            "SELECT j.slug, j.state, j.active_version, v.version, v.definition FROM journeys j"
            " JOIN journey_versions v ON v.journey_slug = j.slug"
            " AND (v.version = j.active_version OR v.version = j.latest_version)"
            " WHERE j.state <> 'archived' ORDER BY j.slug, v.version"
        ).columns(definition=JSONType)
    )
    return [
        (slug, state if version == active else "draft", version, definition)
        for slug, state, active, version, definition in rows
    ]


def _journey_references(conn: Connection) -> list[Reference]:
    found: list[Reference] = []
    for journey, standing, version, raw in _live_journey_versions(conn):
        user: dict[str, Any] = {
            "user_kind": "journey",
            "user": journey,
            "journey_state": standing,
            "journey_version": version,
        }
        definition = JourneyDefinition.model_validate(raw)
        found.append(Reference("segment", definition.trigger.segment, path="trigger", **user))
        for step_id, step in definition.steps.items():
            if isinstance(step, EmailStep | SmsStep):
                at = f"steps.{step_id}.template"
                found.append(Reference("template", step.template, path=at, **user))
            elif isinstance(step, BranchStep):
                for i, case in enumerate(step.branches):
                    at = f"steps.{step_id}.branches[{i}].condition"
                    found += [
                        Reference("segment", slug, path=path, **user)
                        for path, slug in referenced_segments(case.condition, at)
                    ]
    return found


# --- personalisation campaigns --------------------------------------------------------


def _campaign_references(conn: Connection) -> list[Reference]:
    """Segments named by the active version and the latest draft of every campaign not
    archived (`experiences[0].segment`, `experiences[1].condition.all[0].segment`)."""
    rows = conn.execute(
        text(
            "SELECT p.slug, p.state, p.active_version, v.version, v.definition"
            " FROM personalizations p JOIN personalization_versions v"
            " ON v.campaign_slug = p.slug"
            " AND (v.version = p.active_version OR v.version = p.latest_version)"
            " WHERE p.state <> 'archived' ORDER BY p.slug, v.version"
        ).columns(definition=JSONType)
    )
    found: list[Reference] = []
    for slug, state, active, version, raw in rows:
        definition = PersonalizationDefinition.model_validate(raw)
        standing = state if version == active else "draft"
        found += [
            Reference(
                "segment",
                segment,
                "personalization",
                slug,
                path,
                journey_state=standing,
                journey_version=version,
            )
            for path, segment in segments_named(definition)
        ]
    return found


# --- templates --------------------------------------------------------------------------


def template_users(session: Store, *, path: str) -> list[Reference]:
    """Every email or SMS step naming template `path` in a journey not archived."""
    return [
        r
        for r in _journey_references(_connection(session))
        if r.target_kind == "template" and r.target == path
    ]


# --- predictive models ------------------------------------------------------------------


def prediction_users(session: Store, *, slug: str) -> list[Reference]:
    """Every condition naming predictive model `slug`: rule segments, RFM models'
    targeting, branch conditions of journeys not archived (their active version and
    latest draft), and audiences of campaigns not archived (the same versions)."""
    conn = _connection(session)
    found: list[Reference] = []

    def named(condition: Condition, path: str, **user: Any) -> None:
        found.extend(
            Reference("prediction", name, path=at, **user)
            for at, name in referenced_predictions(condition, path)
            if name == slug
        )

    rows = conn.execute(
        text("SELECT slug, condition FROM segments WHERE kind = 'rule' ORDER BY slug").columns(
            condition=JSONType
        )
    )
    for user, condition in rows:
        if condition:
            named(
                CONDITION_ADAPTER.validate_python(condition),
                "condition",
                user_kind="segment",
                user=user,
            )
    rows = conn.execute(
        text("SELECT slug, definition FROM rfm_models ORDER BY slug").columns(definition=JSONType)
    )
    for user, definition in rows:
        if definition.get("targeting"):
            named(
                CONDITION_ADAPTER.validate_python(definition["targeting"]),
                "targeting",
                user_kind="rfm_model",
                user=user,
            )
    for journey, standing, version, raw in _live_journey_versions(conn):
        steps = JourneyDefinition.model_validate(raw).steps
        for step_id, step in steps.items():
            if isinstance(step, BranchStep):
                for i, case in enumerate(step.branches):
                    named(
                        case.condition,
                        f"steps.{step_id}.branches[{i}].condition",
                        user_kind="journey",
                        user=journey,
                        journey_state=standing,
                        journey_version=version,
                    )
    rows = conn.execute(
        text(
            "SELECT p.slug, p.state, p.active_version, v.version, v.definition"
            " FROM personalizations p JOIN personalization_versions v"
            " ON v.campaign_slug = p.slug"
            " AND (v.version = p.active_version OR v.version = p.latest_version)"
            " WHERE p.state <> 'archived' ORDER BY p.slug, v.version"
        ).columns(definition=JSONType)
    )
    for campaign, state, active, version, raw in rows:
        definition = PersonalizationDefinition.model_validate(raw)
        for i, experience in enumerate(definition.experiences):
            if experience.condition is not None:
                named(
                    experience.condition,
                    f"experiences[{i}].condition",
                    user_kind="personalization",
                    user=campaign,
                    journey_state=state if version == active else "draft",
                    journey_version=version,
                )
    return found
