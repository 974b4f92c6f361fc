"""Training a predictive model as of an instant T, validating it, and scoring everyone.

With horizon H and S snapshots:

- the model in use is fitted on the features at T - H, T - 2H, ... T - S*H, each row
  labelled by whether the customer did the target in the horizon after its cutoff, so the
  last label window ends at T;
- the holdout is time-based: the same learner fitted on the cutoffs one horizon earlier
  (T - 2H ... T - (S+1)H) predicts the horizon (T - H, T] from the features at T - H.
  The RFM heuristic (its rates fitted on those same earlier rows) and BG/NBD (fitted on
  the target history up to T - H) predict the same horizon for the same customers;
- then every customer with an event at or before T is scored from their features at T.

Every read ends at T (`store.prediction_features`), so a training as of T is the same
whatever the store holds after T. Reads run outside any write transaction (a training
of a large store takes minutes and must not hold SQLite's write lock); the scores and
the training's record are written in one transaction at the end.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

from core.durations import format_duration
from core.errors import Conflict
from core.prediction_learning import (
    LEARNER,
    FeatureFrame,
    FittedModel,
    bgnbd_inputs,
    bgnbd_p_active,
    brier,
    calibration_table,
    design_matrix,
    fit_bgnbd,
    fit_model,
    fit_rate_table,
    rfm_heuristic,
    roc_auc,
)
from core.predictions import MethodFigures, PredictiveModelDefinition, TrainingReport, WindowFigures
from store import predictions as prediction_store
from store.failures import FailureSubject, clear_failures, describe_error, record_failure
from store.prediction_features import outcomes_of, read_features, read_outcomes

Progress = Callable[[str], None]
PASS_WORK_MEM = "256MB"


class NotEnoughHistory(Conflict):
    """The store holds too little before T to train and validate (said in words)."""

    code = "not_enough_history"

    def __init__(self, message: str):
        super().__init__(message, field="as_of")


@dataclass(frozen=True)
class Labelled:
    cutoff: datetime
    frame: FeatureFrame
    outcomes: np.ndarray


@dataclass(frozen=True)
class TrainedModel:
    fitted: FittedModel
    report: TrainingReport

    @property
    def status(self) -> str:
        return "ok" if self.report.beats_rfm_heuristic else "worse_than_rfm"


@dataclass(frozen=True)
class TrainingOutcome:
    training_id: int
    status: str
    report: TrainingReport
    scored: int
    duration_ms: int


def tune_for_reads(conn: Connection) -> None:
    """Sort and hash memory for whole-table feature reads (PostgreSQL's 4MB default
    spills the per-customer aggregate and the windows to disk)."""
    if conn.dialect.name == "postgresql":
        conn.execute(text(f"SET LOCAL work_mem = '{PASS_WORK_MEM}'"))


def labelled(
    conn: Connection, definition: PredictiveModelDefinition, *, cutoff: datetime
) -> Labelled:
    """Features as of `cutoff` and the outcome of the horizon after it."""
    frame = read_features(conn, definition, cutoff=cutoff)
    did = read_outcomes(conn, definition, cutoff=cutoff, end=cutoff + definition.horizon)
    return Labelled(cutoff=cutoff, frame=frame, outcomes=outcomes_of(frame, did))


def _window(sets: list[Labelled]) -> WindowFigures:
    return WindowFigures(
        cutoffs=[s.cutoff for s in sets],
        rows=sum(len(s.frame) for s in sets),
        positives=sum(int(s.outcomes.sum()) for s in sets),
    )


def _figures(method: str, outcomes: np.ndarray, probabilities: np.ndarray) -> MethodFigures:
    return MethodFigures(
        method=method,  # type: ignore[arg-type]
        auc=roc_auc(outcomes, probabilities),
        brier=brier(outcomes, probabilities),
        calibration=calibration_table(outcomes, probabilities),
    )


def rfm_baseline(train: list[Labelled], holdout: Labelled) -> np.ndarray:
    """P(target) by the RFM heuristic: each R + F + M sum (ranked within its cutoff) at
    the rate it had on the training rows."""
    scores = np.concatenate([rfm_heuristic(s.frame) for s in train])
    table = fit_rate_table(scores, np.concatenate([s.outcomes for s in train]))
    return table.apply(rfm_heuristic(holdout.frame))


def bgnbd_baseline(
    train: list[Labelled], holdout: Labelled, definition: PredictiveModelDefinition
) -> np.ndarray:
    """P(target) by BG/NBD fitted on the holdout customers' target history up to its
    cutoff; customers who never did the target get the rate such customers had on the
    training rows (BG/NBD describes only customers after their first event)."""
    seen, x, t_x, age = bgnbd_inputs(holdout.frame)
    horizon = definition.horizon.total_seconds() / 86_400
    probabilities = np.empty(len(holdout.frame))
    if seen.any():
        params = fit_bgnbd(x, t_x, age)
        probabilities[seen] = bgnbd_p_active(params, x, t_x, age, horizon)
    never = [s.outcomes[s.frame.column("target_count") == 0] for s in train]
    joined = np.concatenate(never) if never else np.zeros(0)
    probabilities[~seen] = float(joined.mean()) if len(joined) else 0.0
    return probabilities


def train(
    conn: Connection,
    definition: PredictiveModelDefinition,
    *,
    as_of: datetime,
    progress: Progress | None = None,
) -> TrainedModel:
    """Fit the model in use and measure it on the time-based holdout, reading nothing
    after `as_of`. `NotEnoughHistory` when the store cannot support it."""

    def step(what: str) -> None:
        if progress is not None:
            progress(what)

    horizon = definition.horizon
    count = definition.snapshots
    sets: dict[int, Labelled] = {}
    for k in range(1, count + 2):
        step(f"reading features as of cutoff {k}/{count + 1}")
        sets[k] = labelled(conn, definition, cutoff=as_of - k * horizon)
    current = [sets[k] for k in range(1, count + 1) if len(sets[k].frame)]
    earlier = [sets[k] for k in range(2, count + 2) if len(sets[k].frame)]
    holdout = sets[1]
    oldest = as_of - 2 * horizon
    if not earlier or not len(holdout.frame):
        raise NotEnoughHistory(
            f"training as of {as_of.isoformat()} with horizon {format_duration(horizon)} needs"
            f" customers with events before {oldest.isoformat()}; there are none"
        )
    if len(np.unique(holdout.outcomes)) < 2:
        raise NotEnoughHistory(
            "every holdout customer had the same outcome in the horizon before"
            f" {as_of.isoformat()}: there is nothing to validate against"
        )

    step("fitting the holdout model")
    holdout_model = fit_model([s.frame for s in earlier], [s.outcomes for s in earlier])
    step("measuring the holdout and the baselines")
    flip = definition.direction == "churn"
    observed = 1 - holdout.outcomes if flip else holdout.outcomes.astype(float)

    def directed(p_do: np.ndarray) -> np.ndarray:
        return 1.0 - p_do if flip else p_do

    model = _figures("model", observed, directed(holdout_model.predict(holdout.frame)))
    rfm = _figures("rfm_heuristic", observed, directed(rfm_baseline(earlier, holdout)))
    bgnbd = _figures("bgnbd", observed, directed(bgnbd_baseline(earlier, holdout, definition)))

    step("fitting the model")
    fitted = fit_model([s.frame for s in current], [s.outcomes for s in current])
    beats_rfm = _above(model.auc, rfm.auc)
    beats_bgnbd = _above(model.auc, bgnbd.auc) and model.brier < bgnbd.brier
    report = TrainingReport(
        as_of=as_of,
        horizon=format_duration(horizon),
        direction=definition.direction,
        learner=LEARNER,
        features=design_matrix(holdout.frame)[1],
        train=_window(current),
        holdout_train=_window(earlier),
        holdout=_window([holdout]),
        model=model,
        baselines=[rfm, bgnbd],
        beats_rfm_heuristic=beats_rfm,
        beats_bgnbd=beats_bgnbd,
        message=_verdict(model, rfm, bgnbd),
    )
    return TrainedModel(fitted=fitted, report=report)


def _above(value: float | None, other: float | None) -> bool:
    return value is not None and (other is None or value > other)


def _verdict(model: MethodFigures, rfm: MethodFigures, bgnbd: MethodFigures) -> str:
    def auc(f: MethodFigures) -> str:
        return "n/a" if f.auc is None else f"{f.auc:.3f}"

    figures = (
        f"holdout AUC {auc(model)} (RFM heuristic {auc(rfm)}, BG/NBD {auc(bgnbd)}),"
        f" Brier {model.brier:.4f} (RFM heuristic {rfm.brier:.4f}, BG/NBD {bgnbd.brier:.4f})"
    )
    if not _above(model.auc, rfm.auc):
        return (
            "the model does not beat the RFM heuristic on its holdout: "
            + figures
            + "; its scores are in use, but a rule on RFM labels would rank customers as well"
        )
    return "the model beats the RFM heuristic on its holdout: " + figures


def score_everyone(
    conn: Connection,
    *,
    slug: str,
    definition: PredictiveModelDefinition,
    fitted: FittedModel,
    training_id: int,
    as_of: datetime,
) -> int:
    """Score every customer with an event at or before `as_of` and replace the model's
    scores with them, in the caller's transaction; returns how many were scored."""
    tune_for_reads(conn)
    frame = read_features(conn, definition, cutoff=as_of)
    probabilities = prediction_store.direction_probability(definition, fitted.predict(frame))
    model = prediction_store.get_model(conn, slug=slug)
    return prediction_store.replace_scores(
        conn,
        slug=slug,
        training_id=training_id,
        customer_ids=frame.customer_ids,
        probabilities=probabilities,
        levels=model.definition.levels,
        now=datetime.now(UTC),
    )


def train_and_score(
    engine: Engine, *, slug: str, as_of: datetime, progress: Progress | None = None
) -> TrainingOutcome:
    """Train `slug` as of `as_of`, score everyone as of `as_of`, then re-evaluate the
    rule segments that name the model. A training that fails is recorded with its
    error (and in the quarantine) and the error raised; the scores in use stay."""
    if as_of.tzinfo is None:
        raise ValueError("as_of must carry a zone")
    started = time.perf_counter()
    with engine.begin() as conn:
        model = prediction_store.get_model(conn, slug=slug)
        training_id = prediction_store.start_training(
            conn, model=model, as_of=as_of, now=datetime.now(UTC)
        )
    subject = FailureSubject("prediction_model", slug, "training")
    try:
        with engine.begin() as conn:  # reads only: commits nothing but the work_mem setting
            tune_for_reads(conn)
            trained = train(conn, model.definition, as_of=as_of, progress=progress)
        if progress is not None:
            progress("scoring everyone")
        with engine.begin() as conn:
            scored = score_everyone(
                conn,
                slug=slug,
                definition=model.definition,
                fitted=trained.fitted,
                training_id=training_id,
                as_of=as_of,
            )
            prediction_store.finish_training(
                conn,
                training_id=training_id,
                status=trained.status,
                now=datetime.now(UTC),
                report=trained.report,
                fitted=trained.fitted,
                scored=scored,
            )
            clear_failures(conn, kind="prediction_model", stage="training", keys=[slug])
    except Exception as exc:
        with engine.begin() as conn:
            prediction_store.finish_training(
                conn,
                training_id=training_id,
                status="failed",
                now=datetime.now(UTC),
                error=describe_error(exc),
            )
            record_failure(conn, subject=subject, error=exc, now=datetime.now(UTC))
        raise
    if progress is not None:
        progress("re-evaluating the segments that name the model")
    follow_new_scores(engine, slug=slug)
    return TrainingOutcome(
        training_id=training_id,
        status=trained.status,
        report=trained.report,
        scored=scored,
        duration_ms=int((time.perf_counter() - started) * 1000),
    )


def follow_new_scores(engine: Engine, *, slug: str) -> None:
    """Re-evaluate, each in its own transaction, the rule segments that name the model
    and those that name them; one that fails is set aside and the others go on."""
    from store.segments import evaluate_set_aside_on_failure

    with engine.connect() as conn:
        slugs = prediction_store.segments_following(conn, slug=slug)
    for segment in slugs:
        with engine.begin() as conn:
            evaluate_set_aside_on_failure(conn, slug=segment, now=datetime.now(UTC))
