"""Predictive models: what a model predicts, its levels, the features it may read, and the
validation report every training answers (docs/predictions.md).

A model predicts, for each customer, the probability that they do the **target** event
(its property filters met) within the **horizon** (`target.within`) after the instant
they are scored at (`will_do`), or that they do not (`churn`). Levels are configured
thresholds on that probability: `high` from `levels.high`, `medium` from
`levels.medium`, `low` below.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from core.bounds import Identifier, Name
from core.conditions import PropertyFilter, attribute_path_error
from core.durations import Duration

MODEL_SLUG_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
MAX_TARGET_FILTERS = 20
MAX_FEATURE_ATTRIBUTES = 20
MIN_HORIZON = timedelta(hours=1)
MIN_SCHEDULE = timedelta(hours=1)
DEFAULT_MEDIUM = 0.3
DEFAULT_HIGH = 0.6

Direction = Literal["will_do", "churn"]
Level = Literal["low", "medium", "high"]
TrainingStatus = Literal["training", "ok", "worse_than_rfm", "failed"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _attribute_path(value: str) -> str:
    problem = attribute_path_error(value)
    if problem:
        raise PydanticCustomError("attribute_path", "{problem}", {"problem": problem})
    return value


AttributePath = Annotated[str, AfterValidator(_attribute_path)]


class PredictionTarget(_Strict):
    """The event predicted: its name, optional property filters (the segment language's),
    and the horizon after the scoring instant it must happen within."""

    event: Identifier
    where: list[PropertyFilter] = Field(default_factory=list, max_length=MAX_TARGET_FILTERS)
    within: Duration = Field(description="the horizon, e.g. P90D")

    @field_validator("within")
    @classmethod
    def _long_enough(cls, value: timedelta) -> timedelta:
        if value < MIN_HORIZON:
            raise ValueError("the horizon is at least PT1H")
        return value


class PredictionLevels(_Strict):
    """Thresholds on the probability: `high` at or above `high`, `medium` at or above
    `medium`, `low` below."""

    medium: float = Field(default=DEFAULT_MEDIUM, gt=0, lt=1)
    high: float = Field(default=DEFAULT_HIGH, gt=0, lt=1)

    @model_validator(mode="after")
    def _ordered(self) -> PredictionLevels:
        if self.medium >= self.high:
            raise ValueError("levels.medium must be below levels.high")
        return self

    def level_of(self, probability: float) -> Level:
        if probability >= self.high:
            return "high"
        if probability >= self.medium:
            return "medium"
        return "low"


class PredictionFeatures(_Strict):
    """What the features read besides the target's own history and overall activity."""

    purchase_event: Identifier | None = Field(
        default=None,
        description="the event recency, frequency, monetary and purchase intervals read"
        " (default: the target event, without its filters)",
    )
    value_property: AttributePath | None = Field(
        default=None, description="a numeric property of the purchase event, summed as monetary"
    )
    attributes: list[AttributePath] = Field(
        default_factory=list,
        max_length=MAX_FEATURE_ATTRIBUTES,
        description="numeric or boolean customer attributes used as features, read as they"
        " are when the model trains or scores (attributes keep no history)",
    )


class PredictiveModelDefinition(_Strict):
    """Everything of a model but its slug (the body of `PUT /v1/predictive-models/{slug}`)."""

    name: Name
    target: PredictionTarget
    direction: Direction = "will_do"
    levels: PredictionLevels = PredictionLevels()
    features: PredictionFeatures = PredictionFeatures()
    snapshots: int = Field(
        default=2,
        ge=1,
        le=6,
        description="training cutoffs stacked, one horizon apart, each labelled by the"
        " horizon after it",
    )
    schedule: Duration | None = Field(default=None, description="retrain this often (>= PT1H)")
    realtime: StrictBool = Field(
        default=True, description="rescore a customer when they have a new event"
    )

    @field_validator("schedule")
    @classmethod
    def _not_too_often(cls, value: timedelta | None) -> timedelta | None:
        if value is not None and value < MIN_SCHEDULE:
            raise ValueError("schedule must be at least PT1H")
        return value

    @property
    def horizon(self) -> timedelta:
        return self.target.within

    @property
    def purchase_event(self) -> str:
        return self.features.purchase_event or self.target.event


class PredictiveModelCreate(PredictiveModelDefinition):
    """The body of `POST /v1/predictive-models`."""

    slug: str = Field(pattern=MODEL_SLUG_PATTERN, description="lower case letters, digits, - _")


class PredictiveModelUpdate(PredictiveModelDefinition):
    """The body of `PUT /v1/predictive-models/{slug}`; a slug, if given, must be the path's."""

    slug: str | None = None


# --- the validation report ----------------------------------------------------------------


class CalibrationBin(BaseModel):
    """Holdout customers whose predicted probability fell in [lower, upper)."""

    lower: float
    upper: float
    customers: int
    mean_predicted: float | None
    observed_rate: float | None


class MethodFigures(BaseModel):
    """One method's figures on the holdout: the model, or a baseline."""

    method: Literal["model", "rfm_heuristic", "bgnbd"]
    auc: float | None = Field(description="area under the ROC curve (None: one outcome only)")
    brier: float = Field(description="mean squared error of the probabilities")
    calibration: list[CalibrationBin]


class WindowFigures(BaseModel):
    cutoffs: list[datetime] = Field(description="feature cutoffs; labels are the horizon after")
    rows: int
    positives: int


class TrainingReport(BaseModel):
    """What a training measured. The holdout is time-based: a model fitted on the
    cutoffs one horizon earlier predicts the last horizon before `as_of`, beside the two
    baselines fitted on the same data."""

    as_of: datetime
    horizon: str
    direction: Direction
    learner: str
    features: list[str]
    train: WindowFigures = Field(description="what the model now in use was fitted on")
    holdout_train: WindowFigures = Field(description="what the holdout's model was fitted on")
    holdout: WindowFigures = Field(description="the customers and outcomes the figures read")
    model: MethodFigures
    baselines: list[MethodFigures]
    beats_rfm_heuristic: bool
    beats_bgnbd: bool
    message: str


class TrainingPublic(BaseModel):
    id: int
    model_version: int
    as_of: datetime
    status: TrainingStatus
    started_at: datetime
    finished_at: datetime | None
    scored: int
    error: str | None
    report: TrainingReport | None


class PredictiveModelPublic(PredictiveModelCreate):
    version: int
    created_at: datetime
    updated_at: datetime
    status: TrainingStatus | Literal["untrained"] = Field(
        description="the latest training's status; worse_than_rfm: it did not beat the RFM"
        " heuristic on its holdout"
    )
    latest_training: TrainingPublic | None = None


class CustomerPrediction(BaseModel):
    """One model's score of one customer (shown in `GET /v1/customers/{id}`)."""

    model: str
    probability: float
    level: Level
    training_id: int
    scored_at: datetime


# --- the Temporal contract of scheduled training ------------------------------------------


PREDICTION_TRAINING_WORKFLOW = "PredictionTrainingWorkflow"
TRAIN_PREDICTION_ACTIVITY = "train_prediction_model"


class PredictionTrainingInput(BaseModel):
    """Input of the training workflow and its activity; `as_of` defaults to the start."""

    model_slug: str
    as_of: AwareDatetime | None = None
    # Set by a save: the model version to train, which may not be committed yet.
    version: int | None = None


class PredictionTrainingSummary(BaseModel):
    training_id: int
    model_slug: str
    as_of: AwareDatetime
    status: TrainingStatus
    scored: int
    auc: float | None = None
    rfm_heuristic_auc: float | None = None
    bgnbd_auc: float | None = None
    duration_ms: int


def prediction_schedule_id(slug: str) -> str:
    """The Temporal Schedule of a model's trainings."""
    return f"prediction-train:{slug}"


def prediction_save_workflow_id(slug: str, version: int) -> str:
    """The first training a save starts: one per saved version (a repeat is a no-op)."""
    return f"prediction-save:{slug}:v{version}"
