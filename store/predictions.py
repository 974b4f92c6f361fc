"""Predictive models: definitions, trainings, scores, and real-time rescoring.

Every function runs in the caller's transaction. A model's scores are one row per
customer (`prediction_scores`): the probability of the model's direction and its level
under the model's current thresholds; changing the thresholds relabels the rows at once.
Training lives in `store.prediction_training`, the feature SQL in
`store.prediction_features`.
"""

from __future__ import annotations

import pickle
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from pydantic import BaseModel
from sqlalchemy import bindparam, delete, func, insert, select, text, update
from sqlalchemy.engine import Connection

from core.conditions import CONDITION_ADAPTER, referenced_predictions
from core.errors import Conflict, NotFound
from core.prediction_learning import FittedModel
from core.predictions import (
    CustomerPrediction,
    PredictionLevels,
    PredictiveModelCreate,
    PredictiveModelDefinition,
    PredictiveModelPublic,
    TrainingPublic,
    TrainingReport,
)
from core.tables import PredictionModel, PredictionScore, PredictionTraining, UTCDateTime
from store.failures import FailureSubject, clear_failures, failing_keys, record_failure
from store.references import lock_for_removal, prediction_users, refuse_if_used

models = PredictionModel.__table__
trainings = PredictionTraining.__table__
scores = PredictionScore.__table__

USABLE = ("ok", "worse_than_rfm")
"""Statuses of a training whose estimator scores customers."""


class StoredPredictiveModel(BaseModel):
    slug: str
    version: int
    definition: PredictiveModelDefinition
    created_at: datetime
    updated_at: datetime

    def public(self, latest: TrainingRecord | None) -> PredictiveModelPublic:
        return PredictiveModelPublic(
            slug=self.slug,
            version=self.version,
            created_at=self.created_at,
            updated_at=self.updated_at,
            status=latest.status if latest else "untrained",
            latest_training=latest.public() if latest else None,
            **_dump(self.definition),
        )


@dataclass(frozen=True)
class TrainingRecord:
    id: int
    model_slug: str
    model_version: int
    definition: PredictiveModelDefinition
    as_of: datetime
    started_at: datetime
    finished_at: datetime | None
    status: str
    report: TrainingReport | None
    scored: int
    error: str | None

    def public(self) -> TrainingPublic:
        return TrainingPublic(
            id=self.id,
            model_version=self.model_version,
            as_of=self.as_of,
            status=self.status,
            started_at=self.started_at,
            finished_at=self.finished_at,
            scored=self.scored,
            error=self.error,
            report=self.report,
        )


def _dump(definition: PredictiveModelDefinition) -> dict[str, Any]:
    data = PredictiveModelDefinition.model_validate(
        definition.model_dump(mode="json", by_alias=True, exclude={"slug"})
    ).model_dump(mode="json", by_alias=True)
    data.pop("slug", None)
    return data


def _stored(row: Any) -> StoredPredictiveModel:
    return StoredPredictiveModel(
        slug=row.slug,
        version=row.version,
        definition=PredictiveModelDefinition.model_validate(row.definition),
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


_TRAINING_COLUMNS = [c for c in trainings.c if c.name != "artifact"]


def _training(row: Any) -> TrainingRecord:
    return TrainingRecord(
        id=row.id,
        model_slug=row.model_slug,
        model_version=row.model_version,
        definition=PredictiveModelDefinition.model_validate(row.definition),
        as_of=row.as_of,
        started_at=row.started_at,
        finished_at=row.finished_at,
        status=row.status,
        report=TrainingReport.model_validate(row.report) if row.report else None,
        scored=row.scored,
        error=row.error,
    )


# --- models -----------------------------------------------------------------------------


def get_model(conn: Connection, *, slug: str, lock: bool = False) -> StoredPredictiveModel:
    """The model `slug`; NotFound if there is none. `lock` holds its row until commit."""
    query = select(models).where(models.c.slug == slug)
    if lock and conn.dialect.name == "postgresql":
        query = query.with_for_update()
    row = conn.execute(query).first()
    if row is None:
        raise NotFound(f"no predictive model {slug!r}", field="slug")
    return _stored(row)


def list_models(
    conn: Connection, *, limit: int = 100, after: str | None = None
) -> list[StoredPredictiveModel]:
    query = select(models).order_by(models.c.slug).limit(limit)
    if after is not None:
        query = query.where(models.c.slug > after)
    return [_stored(row) for row in conn.execute(query)]


def create_model(
    conn: Connection, *, model: PredictiveModelCreate, now: datetime
) -> StoredPredictiveModel:
    """Store version 1 of a new model; Conflict if the slug is taken."""
    if conn.execute(select(models.c.slug).where(models.c.slug == model.slug)).first():
        raise Conflict(f"predictive model {model.slug!r} already exists", field="slug")
    conn.execute(
        insert(models).values(
            slug=model.slug, version=1, definition=_dump(model), created_at=now, updated_at=now
        )
    )
    return get_model(conn, slug=model.slug)


def update_model(
    conn: Connection, *, slug: str, definition: PredictiveModelDefinition, now: datetime
) -> StoredPredictiveModel:
    """Store a new version. Scores keep their probabilities until the next training,
    and take the new levels at once."""
    current = get_model(conn, slug=slug, lock=True)
    conn.execute(
        update(models)
        .where(models.c.slug == slug)
        .values(version=current.version + 1, definition=_dump(definition), updated_at=now)
    )
    if definition.levels != current.definition.levels:
        relevel(conn, slug=slug, levels=definition.levels)
    return get_model(conn, slug=slug)


def delete_model(conn: Connection, *, slug: str) -> None:
    """Remove a model, its trainings and scores. Conflict `in_use` naming every user
    while a segment, an RFM model's targeting, a journey or a campaign names it."""
    get_model(conn, slug=slug, lock=True)
    lock_for_removal(conn, table="prediction_models", column="slug", keys=[slug])
    refuse_if_used(prediction_users(conn, slug=slug), field="slug")
    conn.execute(delete(scores).where(scores.c.model_slug == slug))
    conn.execute(delete(trainings).where(trainings.c.model_slug == slug))
    conn.execute(delete(models).where(models.c.slug == slug))


def _level_case(
    levels: PredictionLevels, column: str = "probability"
) -> tuple[str, dict[str, Any]]:
    return (
        f"CASE WHEN {column} >= :lvl_high THEN 'high'"
        f" WHEN {column} >= :lvl_medium THEN 'medium' ELSE 'low' END",
        {"lvl_high": levels.high, "lvl_medium": levels.medium},
    )


def relevel(conn: Connection, *, slug: str, levels: PredictionLevels) -> None:
    """Give every score of the model its level under `levels`."""
    case, params = _level_case(levels)
    conn.execute(
        text(
            f"UPDATE prediction_scores SET level = {case}"
            f" WHERE model_slug = :slug AND level <> {case}"
        ),
        {**params, "slug": slug},
    )


# --- trainings ----------------------------------------------------------------------------


def start_training(
    conn: Connection, *, model: StoredPredictiveModel, as_of: datetime, now: datetime
) -> int:
    return conn.execute(
        insert(trainings)
        .values(
            model_slug=model.slug,
            model_version=model.version,
            definition=_dump(model.definition),
            as_of=as_of,
            started_at=now,
            status="training",
            report={},
            scored=0,
        )
        .returning(trainings.c.id)
    ).scalar_one()


def finish_training(
    conn: Connection,
    *,
    training_id: int,
    status: str,
    now: datetime,
    report: TrainingReport | None = None,
    fitted: FittedModel | None = None,
    scored: int = 0,
    error: str | None = None,
) -> None:
    conn.execute(
        update(trainings)
        .where(trainings.c.id == training_id)
        .values(
            status=status,
            finished_at=now,
            report=report.model_dump(mode="json") if report else {},
            artifact=pickle.dumps(fitted, protocol=pickle.HIGHEST_PROTOCOL) if fitted else None,
            scored=scored,
            error=error,
        )
    )


def get_training(conn: Connection, *, training_id: int) -> TrainingRecord:
    row = conn.execute(select(*_TRAINING_COLUMNS).where(trainings.c.id == training_id)).first()
    if row is None:
        raise NotFound(f"no training {training_id}", field="training_id")
    return _training(row)


def latest_training(conn: Connection, *, slug: str, usable: bool = False) -> TrainingRecord | None:
    """The newest training of a model (`usable`: the newest whose estimator scores)."""
    query = select(*_TRAINING_COLUMNS).where(trainings.c.model_slug == slug)
    if usable:
        query = query.where(trainings.c.status.in_(USABLE))
    row = conn.execute(query.order_by(trainings.c.id.desc()).limit(1)).first()
    return _training(row) if row else None


def latest_trainings(conn: Connection, *, slugs: Sequence[str]) -> dict[str, TrainingRecord]:
    """The newest training of each of `slugs` (those with one), in one read."""
    if not slugs:
        return {}
    newest = (
        select(func.max(trainings.c.id))
        .where(trainings.c.model_slug.in_(list(slugs)))
        .group_by(trainings.c.model_slug)
    )
    rows = conn.execute(select(*_TRAINING_COLUMNS).where(trainings.c.id.in_(newest)))
    return {row.model_slug: _training(row) for row in rows}


def list_trainings(conn: Connection, *, slug: str, limit: int = 20) -> list[TrainingRecord]:
    rows = conn.execute(
        select(*_TRAINING_COLUMNS)
        .where(trainings.c.model_slug == slug)
        .order_by(trainings.c.id.desc())
        .limit(limit)
    )
    return [_training(row) for row in rows]


class _EstimatorCache:
    """Unpickled estimators by training id: a training's estimator never changes, and
    real-time rescoring applies it on every batch."""

    def __init__(self, size: int = 16):
        self.size = size
        self.items: OrderedDict[int, FittedModel] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, conn: Connection, training_id: int) -> FittedModel:
        with self.lock:
            if training_id in self.items:
                self.items.move_to_end(training_id)
                return self.items[training_id]
        blob = conn.execute(
            select(trainings.c.artifact).where(trainings.c.id == training_id)
        ).scalar_one_or_none()
        if blob is None:
            raise NotFound(f"training {training_id} has no estimator", field="training_id")
        # The store's own rows: written by `finish_training`, never taken from a request.
        fitted = pickle.loads(blob)  # noqa: S301
        with self.lock:
            self.items[training_id] = fitted
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        return fitted


estimators = _EstimatorCache()


# --- scores -------------------------------------------------------------------------------


def direction_probability(definition: PredictiveModelDefinition, p_do: np.ndarray) -> np.ndarray:
    """The stored probability: of doing the target (`will_do`) or of not doing it (`churn`)."""
    return 1.0 - p_do if definition.direction == "churn" else p_do


def levels_of(levels: PredictionLevels, probabilities: np.ndarray) -> list[str]:
    return np.where(
        probabilities >= levels.high,
        "high",
        np.where(probabilities >= levels.medium, "medium", "low"),
    ).tolist()


def replace_scores(
    conn: Connection,
    *,
    slug: str,
    training_id: int,
    customer_ids: Sequence[str],
    probabilities: np.ndarray,
    levels: PredictionLevels,
    now: datetime,
) -> int:
    """Make the model's scores exactly these (customers not given lose theirs), staged
    through a temporary table; returns how many customers are scored."""
    pg = conn.dialect.name == "postgresql"
    level_names = levels_of(levels, probabilities)
    rows = zip(customer_ids, probabilities.tolist(), level_names, strict=True)
    if pg:
        conn.execute(
            text(
                'CREATE TEMP TABLE prediction_stage (customer_id VARCHAR(255) COLLATE "C"'
                " PRIMARY KEY, probability DOUBLE PRECISION, level VARCHAR(10)) ON COMMIT DROP"
            )
        )
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        with cursor.copy(
            "COPY prediction_stage (customer_id, probability, level) FROM STDIN"
        ) as copy:
            for row in rows:
                copy.write_row(row)
        conn.execute(text("ANALYZE prediction_stage"))
    else:
        conn.execute(text("DROP TABLE IF EXISTS temp.prediction_stage"))
        conn.execute(
            text(
                "CREATE TEMP TABLE prediction_stage (customer_id TEXT PRIMARY KEY,"
                " probability REAL, level TEXT)"
            )
        )
        conn.connection.dbapi_connection.executemany(  # type: ignore[union-attr]
            "INSERT INTO prediction_stage VALUES (?, ?, ?)", rows
        )
    params = {"slug": slug, "training_id": training_id, "now": now}
    conn.execute(
        text(
            "DELETE FROM prediction_scores WHERE model_slug = :slug AND NOT EXISTS"
            " (SELECT 1 FROM prediction_stage t"
            " WHERE t.customer_id = prediction_scores.customer_id)"
        ),
        params,
    )
    conn.execute(
        text(
            "INSERT INTO prediction_scores"
            " (model_slug, customer_id, probability, level, training_id, scored_at)"
            " SELECT CAST(:slug AS VARCHAR(100)), t.customer_id, t.probability, t.level,"
            " CAST(:training_id AS BIGINT), :now FROM prediction_stage t WHERE 1 = 1"
            " ON CONFLICT (model_slug, customer_id) DO UPDATE SET"
            " probability = excluded.probability, level = excluded.level,"
            " training_id = excluded.training_id, scored_at = excluded.scored_at"
        ).bindparams(bindparam("now", type_=UTCDateTime())),
        params,
    )
    conn.execute(text("DROP TABLE prediction_stage"))
    return len(level_names)


def upsert_scores(
    conn: Connection,
    *,
    slug: str,
    training_id: int,
    customer_ids: Sequence[str],
    probabilities: np.ndarray,
    levels: PredictionLevels,
    now: datetime,
) -> None:
    """Write these customers' scores (a few: real-time rescoring)."""
    if not len(customer_ids):
        return
    from sqlalchemy.dialects.postgresql import insert as pg_insert
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    insert_ = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    statement = insert_(scores).values(
        [
            {
                "model_slug": slug,
                "customer_id": cid,
                "probability": p,
                "level": level,
                "training_id": training_id,
                "scored_at": now,
            }
            for cid, p, level in zip(
                customer_ids, probabilities.tolist(), levels_of(levels, probabilities), strict=True
            )
        ]
    )
    conn.execute(
        statement.on_conflict_do_update(
            index_elements=["model_slug", "customer_id"],
            set_={
                name: statement.excluded[name]
                for name in ("probability", "level", "training_id", "scored_at")
            },
        )
    )


class ScoreRow(BaseModel):
    customer_id: str
    probability: float
    level: str


def page_scores(
    conn: Connection, *, slug: str, limit: int, after: str | None = None
) -> list[ScoreRow]:
    """The model's scores by customer id, `limit` rows after customer `after`."""
    query = (
        select(scores.c.customer_id, scores.c.probability, scores.c.level)
        .where(scores.c.model_slug == slug)
        .order_by(scores.c.customer_id)
        .limit(limit)
    )
    if after is not None:
        query = query.where(scores.c.customer_id > after)
    return [ScoreRow(customer_id=r[0], probability=r[1], level=r[2]) for r in conn.execute(query)]


def customer_predictions(conn: Connection, *, customer_id: str) -> list[CustomerPrediction]:
    """The customer's score on every model that scored them, by model."""
    rows = conn.execute(
        select(scores)
        .where(scores.c.model_slug.in_(select(models.c.slug)), scores.c.customer_id == customer_id)
        .order_by(scores.c.model_slug)
    )
    return [
        CustomerPrediction(
            model=row.model_slug,
            probability=row.probability,
            level=row.level,
            training_id=row.training_id,
            scored_at=row.scored_at,
        )
        for row in rows
    ]


# --- who follows a model ------------------------------------------------------------------


def segments_following(conn: Connection, *, slug: str) -> list[str]:
    """Rule segments that name the model, then those naming them, each after the
    segments it names: what a new set of scores must re-evaluate."""
    from store.segments import dependents_in_order, list_segments

    direct = sorted(
        segment.slug
        for segment in list_segments(conn, kind="rule")
        if segment.condition
        and any(
            name == slug
            for _, name in referenced_predictions(
                CONDITION_ADAPTER.validate_python(segment.condition)
            )
        )
    )
    later = dependents_in_order(conn, segment_slugs=direct)
    return [s for s in direct if s not in later] + later


# --- real-time rescoring --------------------------------------------------------------------


def _realtime_models(conn: Connection) -> list[tuple[StoredPredictiveModel, TrainingRecord]]:
    """Real-time models with a usable training, and that training, in two reads."""
    realtime = [m for m in list_models(conn, limit=10_000) if m.definition.realtime]
    if not realtime:
        return []
    newest = (
        select(func.max(trainings.c.id))
        .where(
            trainings.c.model_slug.in_([m.slug for m in realtime]),
            trainings.c.status.in_(USABLE),
        )
        .group_by(trainings.c.model_slug)
    )
    rows = conn.execute(select(*_TRAINING_COLUMNS).where(trainings.c.id.in_(newest)))
    usable = {row.model_slug: _training(row) for row in rows}
    return [(m, usable[m.slug]) for m in realtime if m.slug in usable]


def rescore_customers(conn: Connection, *, customer_ids: Sequence[str], now: datetime) -> int:
    """Real time: recompute these customers' features as of `now` on every real-time
    model with a usable training and write their scores (levels from the model's current
    thresholds). A model whose rescoring fails whoever the customers are is set aside
    (quarantine kind `prediction_model`); a failure of these customers' data is raised
    for the caller to find the customer. Returns how many scores were written."""
    ids = sorted(set(customer_ids))
    if not ids:
        return 0
    failing = failing_keys(conn, kind="prediction_model", stage="realtime")
    written = 0
    for model, training in _realtime_models(conn):
        if failing.get(model.slug, now) > now:
            continue
        try:
            with conn.begin_nested():
                written += _rescore(conn, model, training, ids, now)
        except Exception:  # noqa: BLE001 - the model's own failure, or the customers'?
            if _rescores_nobody(conn, model, training, now):
                raise
            continue
        if model.slug in failing:
            clear_failures(conn, kind="prediction_model", stage="realtime", keys=[model.slug])
    return written


def _rescore(
    conn: Connection,
    model: StoredPredictiveModel,
    training: TrainingRecord,
    ids: list[str],
    now: datetime,
) -> int:
    from store.prediction_features import read_features

    fitted = estimators.get(conn, training.id)
    frame = read_features(conn, training.definition, cutoff=now, customer_ids=ids)
    probabilities = direction_probability(training.definition, fitted.predict(frame))
    upsert_scores(
        conn,
        slug=model.slug,
        training_id=training.id,
        customer_ids=frame.customer_ids,
        probabilities=probabilities,
        levels=model.definition.levels,
        now=now,
    )
    return len(frame)


def _rescores_nobody(
    conn: Connection, model: StoredPredictiveModel, training: TrainingRecord, now: datetime
) -> bool:
    try:
        with conn.begin_nested():
            _rescore(conn, model, training, [""], now)  # no customer has an empty id
        return True
    except Exception as exc:  # noqa: BLE001 - the model is the poison
        record_failure(
            conn,
            subject=FailureSubject("prediction_model", model.slug, "realtime"),
            error=exc,
            now=now,
        )
        return False
