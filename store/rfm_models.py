"""RFM models: versioned definitions, the label segments they own, and their scores.

Every write here runs in the caller's transaction. Creating or updating a model upserts
one `segments` row (kind `rfm`) per label of its map; labels a new version drops lose
their members (with exit transitions) and their segment row; deleting a model does the
same for all of its labels and removes its scores and passes.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

from pydantic import BaseModel
from sqlalchemy import delete, insert, select, update
from sqlalchemy.engine import Connection

from core.errors import Conflict, NotFound
from core.rfm import RfmModelCreate, RfmModelDefinition, RfmModelPublic, segment_slug
from core.tables import (
    RfmModel,
    RfmModelVersion,
    RfmPass,
    RfmScore,
    Segment,
    SegmentMembership,
)
from store.references import lock_for_removal, refuse_if_used, segment_users
from store.transitions import apply_membership

models = RfmModel.__table__
versions = RfmModelVersion.__table__
passes = RfmPass.__table__
scores = RfmScore.__table__
segments = Segment.__table__
memberships = SegmentMembership.__table__


class StoredModel(BaseModel):
    """A model as stored: its current definition and version."""

    slug: str
    version: int
    definition: RfmModelDefinition
    created_at: datetime
    updated_at: datetime

    def public(self) -> RfmModelPublic:
        return RfmModelPublic(
            slug=self.slug,
            version=self.version,
            segments=[segment_slug(self.slug, label) for label in self.definition.labels()],
            created_at=self.created_at,
            updated_at=self.updated_at,
            **_dump(self.definition),
        )


class CustomerScore(BaseModel):
    """One model's scores and label for one customer (shown in `GET /v1/customers/{id}`)."""

    model: str
    segment: str
    label: str
    r: int
    f: int
    m: int
    recency_days: int
    frequency: int
    monetary: float
    pass_id: int
    scored_at: datetime


def _dump(definition: RfmModelDefinition) -> dict[str, Any]:
    data = definition.model_dump(mode="json", by_alias=True)
    data.pop("slug", None)
    return data


@lru_cache(maxsize=256)
def _parse(definition_json: str) -> RfmModelDefinition:
    return RfmModelDefinition.model_validate(json.loads(definition_json))


def parse_definition(definition: dict[str, Any]) -> RfmModelDefinition:
    """A stored definition as a model (cached: real-time rescoring reads it on every call)."""
    return _parse(json.dumps(definition, sort_keys=True))


def stored_model(row: Any) -> StoredModel:
    """A model from a row of `rfm_models` (selected with Core, so types are processed)."""
    return StoredModel(
        slug=row.slug,
        version=row.version,
        definition=parse_definition(row.definition),
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def get_model(conn: Connection, *, slug: str, lock: bool = False) -> StoredModel:
    """The model `slug`; NotFound if there is none. `lock` holds its row until commit."""
    query = select(models).where(models.c.slug == slug)
    if lock and conn.dialect.name == "postgresql":
        query = query.with_for_update()
    row = conn.execute(query).first()
    if row is None:
        raise NotFound(f"no RFM model {slug!r}", field="slug")
    return stored_model(row)


def list_models(
    conn: Connection, *, limit: int = 100, after: str | None = None
) -> list[StoredModel]:
    """Models by slug, `limit` of them after the slug `after`."""
    query = select(models).order_by(models.c.slug).limit(limit)
    if after is not None:
        query = query.where(models.c.slug > after)
    return [stored_model(row) for row in conn.execute(query)]


def list_realtime_models(conn: Connection, *, lock: bool = False) -> list[StoredModel]:
    """Models with `realtime` on (few; read on every real-time rescoring). `lock` takes a
    share lock on their rows (PostgreSQL), which waits for a full pass in flight."""
    query = select(models).order_by(models.c.slug)
    if lock and conn.dialect.name == "postgresql":
        query = query.with_for_update(read=True)
    rows = conn.execute(query)
    return [m for m in (stored_model(row) for row in rows) if m.definition.realtime]


def create_model(conn: Connection, *, model: RfmModelCreate, now: datetime) -> StoredModel:
    """Store version 1 of a new model and its label segments; Conflict if the slug is taken."""
    exists = conn.execute(select(models.c.slug).where(models.c.slug == model.slug)).first()
    if exists is not None:
        raise Conflict(f"RFM model {model.slug!r} already exists", field="slug")
    definition = _dump(model)
    _check_segment_slugs(conn, slug=model.slug, labels=model.labels())
    _check_targeting(conn, slug=model.slug, definition=model)
    conn.execute(
        insert(models).values(
            slug=model.slug, version=1, definition=definition, created_at=now, updated_at=now
        )
    )
    conn.execute(
        insert(versions).values(slug=model.slug, version=1, definition=definition, created_at=now)
    )
    _sync_label_segments(conn, slug=model.slug, definition=model, now=now)
    return get_model(conn, slug=model.slug)


def update_model(
    conn: Connection, *, slug: str, definition: RfmModelDefinition, now: datetime
) -> StoredModel:
    """Store a new version; the label segments follow the new map.

    Existing scores keep their labels until the next pass (or real-time rescoring); the
    members of labels the new map no longer has exit now. Conflict `in_use` (field
    `segment_map`) naming every user when a label the new map drops is still used
    (`store.references`); nothing is written then.
    """
    current = get_model(conn, slug=slug, lock=True)
    new_definition = RfmModelDefinition.model_validate(_dump(definition))
    data = _dump(new_definition)
    kept = {segment_slug(slug, label) for label in new_definition.labels()}
    dropped = sorted(set(_owned_segments(conn, slug=slug)) - kept)
    lock_for_removal(conn, table="segments", column="slug", keys=dropped)
    refuse_if_used(segment_users(conn, slugs=dropped, except_model=slug), field="segment_map")
    _check_segment_slugs(conn, slug=slug, labels=new_definition.labels())
    _check_targeting(conn, slug=slug, definition=new_definition)
    version = current.version + 1
    conn.execute(
        update(models)
        .where(models.c.slug == slug)
        .values(version=version, definition=data, updated_at=now)
    )
    conn.execute(
        insert(versions).values(slug=slug, version=version, definition=data, created_at=now)
    )
    _sync_label_segments(conn, slug=slug, definition=new_definition, now=now)
    return get_model(conn, slug=slug)


def delete_model(conn: Connection, *, slug: str, now: datetime) -> int:
    """Remove a model, its versions, passes and scores; its segments' members exit.

    Returns how many customers left a segment. Conflict `in_use` naming every user while
    a label segment is used by another segment, another model's targeting or a journey
    not archived (`store.references`); nothing is removed then. Pass ids are not given
    out again (migration 0007).
    """
    get_model(conn, slug=slug, lock=True)
    owned = _owned_segments(conn, slug=slug)
    lock_for_removal(conn, table="segments", column="slug", keys=owned)
    refuse_if_used(segment_users(conn, slugs=owned, except_model=slug), field="slug")
    exits = _empty_segments(conn, slugs=owned, source=f"rfm-delete:{slug}", now=now)
    conn.execute(delete(segments).where(segments.c.slug.in_(owned)))
    conn.execute(delete(scores).where(scores.c.model_slug == slug))
    conn.execute(delete(passes).where(passes.c.model_slug == slug))
    conn.execute(delete(versions).where(versions.c.slug == slug))
    conn.execute(delete(models).where(models.c.slug == slug))
    return exits


def get_version(conn: Connection, *, slug: str, version: int) -> RfmModelDefinition:
    row = conn.execute(
        select(versions.c.definition).where(versions.c.slug == slug, versions.c.version == version)
    ).first()
    if row is None:
        raise NotFound(f"RFM model {slug!r} has no version {version}", field="version")
    return parse_definition(row.definition)


def customer_scores(conn: Connection, *, customer_id: str) -> list[CustomerScore]:
    """Each model's scores and label for a customer (models that did not score them omitted)."""
    # Naming the models lets both databases read the (model, customer) primary key; by
    # customer alone they scanned every score (340 ms at a million customers).
    rows = conn.execute(
        select(scores)
        .where(scores.c.model_slug.in_(select(models.c.slug)), scores.c.customer_id == customer_id)
        .order_by(scores.c.model_slug)
    )
    return [
        CustomerScore(
            model=row.model_slug,
            segment=segment_slug(row.model_slug, row.label),
            label=row.label,
            r=row.r,
            f=row.f,
            m=row.m,
            recency_days=row.recency_days,
            frequency=row.frequency,
            monetary=row.monetary,
            pass_id=row.pass_id,
            scored_at=row.scored_at,
        )
        for row in rows
    ]


# --- label segments -------------------------------------------------------------------


def _owned_segments(conn: Connection, *, slug: str) -> list[str]:
    return list(
        conn.execute(
            select(segments.c.slug)
            .where(segments.c.kind == "rfm", segments.c.model_slug == slug)
            .order_by(segments.c.slug)
        ).scalars()
    )


def _check_segment_slugs(conn: Connection, *, slug: str, labels: list[str]) -> None:
    wanted = [segment_slug(slug, label) for label in labels]
    taken = conn.execute(
        select(segments.c.slug, segments.c.kind, segments.c.model_slug).where(
            segments.c.slug.in_(wanted)
        )
    ).all()
    for row in taken:
        if row.kind != "rfm" or row.model_slug != slug:
            raise Conflict(
                f"segment {row.slug!r} already exists and is not this model's",
                field="segment_map",
            )


def _check_targeting(conn: Connection, *, slug: str, definition: RfmModelDefinition) -> None:
    """Every segment the targeting names must exist (errors name `targeting...`)."""
    if definition.targeting is None:
        return
    from store.segments import validate_definition

    validate_definition(
        conn,
        slug=f"rfm-model:{slug}",
        condition=definition.model_dump(mode="json", by_alias=True)["targeting"],
        path="targeting",
    )


def _sync_label_segments(
    conn: Connection, *, slug: str, definition: RfmModelDefinition, now: datetime
) -> None:
    wanted = {segment_slug(slug, label): label for label in definition.labels()}
    owned = set(_owned_segments(conn, slug=slug))
    dropped = sorted(owned - set(wanted))
    if dropped:
        _empty_segments(conn, slugs=dropped, source=f"rfm-update:{slug}", now=now)
        conn.execute(delete(segments).where(segments.c.slug.in_(dropped)))
    for seg_slug, label in wanted.items():
        name = f"{definition.name}: {label}"
        if seg_slug in owned:
            conn.execute(
                update(segments)
                .where(segments.c.slug == seg_slug)
                .values(name=name, updated_at=now)
            )
        else:
            conn.execute(
                insert(segments).values(
                    slug=seg_slug,
                    name=name,
                    kind="rfm",
                    condition=None,
                    model_slug=slug,
                    schedule=None,
                    version=1,
                    created_at=now,
                    updated_at=now,
                )
            )


def _empty_segments(conn: Connection, *, slugs: list[str], source: str, now: datetime) -> int:
    if not slugs:
        return 0
    diff = apply_membership(
        conn,
        segment_slugs=slugs,
        staged_sql="SELECT slug AS segment_slug, slug AS customer_id FROM segments WHERE 1 = 0",
        params={},
        source=source,
        now=now,
    )
    return diff.exits


def latest_pass(conn: Connection, *, slug: str) -> dict[str, Any] | None:
    """The newest committed full pass of a model (its cut-points included)."""
    row = (
        conn.execute(
            select(passes).where(passes.c.model_slug == slug).order_by(passes.c.id.desc()).limit(1)
        )
        .mappings()
        .first()
    )
    return dict(row) if row else None
