"""RFM model definitions: events and measures, timeframe, targeting, segment maps.

A segment map is an ordered list of rules over the three scores (and FM, the rounded-up
mean of F and M); the first rule that matches a cell (R, F, M) gives its label. The two
shipped maps, `seed5` and `rfm11`, are rule lists like any custom one (docs/rfm.md);
every map must label all 125 cells.
"""

from __future__ import annotations

from datetime import datetime
from functools import lru_cache
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    Tag,
    field_validator,
)
from pydantic_core import PydanticCustomError

from core.conditions import Condition
from core.durations import Duration

SCORES = (1, 2, 3, 4, 5)
MODEL_SLUG_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"


def fm_score(f: int, m: int) -> int:
    """FM = ceil((F + M) / 2)."""
    return (f + m + 1) // 2


def label_slug(label: str) -> str:
    """`Can't Lose Them` -> `can-t-lose-them`."""
    return label.strip().lower().replace(" ", "-").replace("'", "-")


def segment_slug(model_slug: str, label: str) -> str:
    """The segment a label of a model materialises as: `default:champions`."""
    return f"{model_slug}:{label_slug(label)}"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


ScoreRange = Annotated[
    tuple[Annotated[int, Field(ge=1, le=5)], Annotated[int, Field(ge=1, le=5)]],
    Field(description="inclusive [lo, hi], both 1..5"),
]


class SegmentRule(_Strict):
    """One rule: a label and inclusive ranges; a range left out means 1-5."""

    label: str = Field(min_length=1, max_length=100)
    r: ScoreRange | None = None
    f: ScoreRange | None = None
    m: ScoreRange | None = None
    fm: ScoreRange | None = Field(default=None, description="ceil((F + M) / 2)")

    @field_validator("r", "f", "m", "fm")
    @classmethod
    def _ordered(cls, value: tuple[int, int] | None) -> tuple[int, int] | None:
        if value is not None and value[0] > value[1]:
            raise ValueError(f"range [{value[0]}, {value[1]}] is empty: lo must be <= hi")
        return value

    @field_validator("label")
    @classmethod
    def _sluggable(cls, value: str) -> str:
        if not label_slug(value).strip("-"):
            raise ValueError("a label needs at least one letter or digit")
        return value

    def matches(self, r: int, f: int, m: int) -> bool:
        fm = fm_score(f, m)
        return all(
            bounds is None or bounds[0] <= value <= bounds[1]
            for bounds, value in ((self.r, r), (self.f, f), (self.m, m), (self.fm, fm))
        )


class CustomSegmentMap(_Strict):
    """`{"rules": [...]}`: first match wins, every (R, F, M) cell covered."""

    rules: list[SegmentRule] = Field(min_length=1, max_length=125)

    @field_validator("rules")
    @classmethod
    def _covers_every_cell(cls, rules: list[SegmentRule]) -> list[SegmentRule]:
        for r in SCORES:
            for f in SCORES:
                for m in SCORES:
                    if not any(rule.matches(r, f, m) for rule in rules):
                        raise PydanticCustomError(
                            "uncovered_cell",
                            "cell R{r} F{f} M{m} matches no rule",
                            {"r": r, "f": f, "m": m},
                        )
        slugs: dict[str, str] = {}
        for rule in rules:
            seen = slugs.setdefault(label_slug(rule.label), rule.label)
            if seen != rule.label:
                raise PydanticCustomError(
                    "label_clash",
                    "labels '{a}' and '{b}' would share one segment slug",
                    {"a": seen, "b": rule.label},
                )
        return rules


ShippedMap = Literal["seed5", "rfm11"]


def _map_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return "ShippedMap"
    if isinstance(value, dict | CustomSegmentMap):
        return "CustomSegmentMap"
    return None


SegmentMap = Annotated[
    Annotated[ShippedMap, Tag("ShippedMap")] | Annotated[CustomSegmentMap, Tag("CustomSegmentMap")],
    Discriminator(
        _map_kind,
        custom_error_type="invalid_segment_map",
        custom_error_message='a segment map is "seed5", "rfm11" or {"rules": [...]}',
    ),
]


class RfmModelDefinition(_Strict):
    """Everything of a model but its slug (the body of `PUT /v1/rfm-models/{slug}`)."""

    name: str = Field(min_length=1, max_length=255)
    recency_event: str = Field(min_length=1, max_length=255)
    frequency_event: str = Field(min_length=1, max_length=255)
    monetary_event: str = Field(min_length=1, max_length=255)
    monetary_property: str = Field(
        min_length=1,
        max_length=200,
        pattern=r'^[^"\\]+$',
        description="a top-level property of the monetary event; numbers are summed",
    )
    timeframe: Duration = Field(description="rolling window, e.g. P90D")
    targeting: Condition | None = None
    segment_map: SegmentMap = "seed5"
    schedule: Duration | None = Field(default=None, description="run a pass this often")
    realtime: StrictBool = False

    @field_validator("schedule")
    @classmethod
    def _schedule_not_too_often(cls, value: Any) -> Any:
        if value is not None and value.total_seconds() < 60:
            raise ValueError("schedule must be at least PT1M")
        return value

    def rules(self) -> tuple[SegmentRule, ...]:
        return map_rules(self.segment_map)

    def labels(self) -> list[str]:
        """Distinct labels, in the map's order."""
        return map_labels(self.segment_map)

    def label_for(self, r: int, f: int, m: int) -> str:
        return label_for(self.rules(), r, f, m)


class RfmModelCreate(RfmModelDefinition):
    """The body of `POST /v1/rfm-models`."""

    slug: str = Field(
        pattern=MODEL_SLUG_PATTERN,
        description="lower case letters, digits, - and _; segments are `slug:label`",
    )


class RfmModelUpdate(RfmModelDefinition):
    """The body of `PUT /v1/rfm-models/{slug}`; a slug, if given, must be the path's."""

    slug: str | None = None


class RfmModelPublic(RfmModelCreate):
    version: int
    segments: list[str] = Field(description="the slugs of the label segments")
    created_at: datetime
    updated_at: datetime


# --- shipped maps -----------------------------------------------------------------------


def _rule(label: str, **ranges: tuple[int, int]) -> SegmentRule:
    return SegmentRule(label=label, **ranges)


SEED5: tuple[SegmentRule, ...] = (
    _rule("Champions", r=(4, 5), f=(4, 5), m=(4, 5)),
    _rule("Needs Attention", r=(1, 2), f=(3, 5), m=(3, 5)),
    _rule("At Risk", r=(1, 2)),
    _rule("Regulars", f=(3, 5), m=(3, 5)),
    _rule("Promising"),
)

# The rfm11 grid of docs/rfm.md: R down, FM across. Rows R4 and R5 are identical.
RFM11: tuple[SegmentRule, ...] = (
    _rule("New Customers", r=(4, 5), fm=(1, 1)),
    _rule("Potential Loyalist", r=(4, 5), fm=(2, 2)),
    _rule("Loyal Customers", r=(4, 5), fm=(3, 3)),
    _rule("Champions", r=(4, 5), fm=(4, 5)),
    _rule("Promising", r=(3, 3), fm=(1, 1)),
    _rule("Potential Loyalist", r=(3, 3), fm=(2, 2)),
    _rule("Need Attention", r=(3, 3), fm=(3, 3)),
    _rule("Loyal Customers", r=(3, 3), fm=(4, 5)),
    _rule("Hibernating", r=(2, 2), fm=(1, 1)),
    _rule("About To Sleep", r=(2, 2), fm=(2, 2)),
    _rule("Need Attention", r=(2, 2), fm=(3, 3)),
    _rule("At Risk", r=(2, 2), fm=(4, 5)),
    _rule("Lost", r=(1, 1), fm=(1, 1)),
    _rule("Hibernating", r=(1, 1), fm=(2, 2)),
    _rule("At Risk", r=(1, 1), fm=(3, 3)),
    _rule("Can't Lose Them", r=(1, 1), fm=(4, 5)),
)

# The order segments are listed in (docs/rfm.md), best first.
RFM11_LABELS = (
    "Champions",
    "Loyal Customers",
    "Potential Loyalist",
    "New Customers",
    "Promising",
    "Need Attention",
    "About To Sleep",
    "At Risk",
    "Can't Lose Them",
    "Hibernating",
    "Lost",
)

SHIPPED_MAPS: dict[str, tuple[SegmentRule, ...]] = {"seed5": SEED5, "rfm11": RFM11}


def map_rules(segment_map: str | CustomSegmentMap) -> tuple[SegmentRule, ...]:
    if isinstance(segment_map, str):
        return SHIPPED_MAPS[segment_map]
    return tuple(segment_map.rules)


def map_labels(segment_map: str | CustomSegmentMap) -> list[str]:
    if segment_map == "rfm11":
        return list(RFM11_LABELS)
    return list(dict.fromkeys(rule.label for rule in map_rules(segment_map)))


def label_for(rules: tuple[SegmentRule, ...], r: int, f: int, m: int) -> str:
    """The label of the first rule matching (r, f, m)."""
    for rule in rules:
        if rule.matches(r, f, m):
            return rule.label
    raise ValueError(f"cell R{r} F{f} M{m} matches no rule")


@lru_cache(maxsize=64)
def cell_labels(rules: tuple[SegmentRule, ...]) -> dict[tuple[int, int, int], str]:
    """All 125 cells and their labels."""
    return {(r, f, m): label_for(rules, r, f, m) for r in SCORES for f in SCORES for m in SCORES}


# --- scoring workflow boundary ------------------------------------------------------------


class RfmScoringInput(BaseModel):
    """Input of `RfmScoringWorkflow` and of its activity; `as_of` defaults to the start time."""

    model_slug: str
    as_of: AwareDatetime | None = None
    # Set by a save: the model version to score, which may not be committed yet.
    version: int | None = None


class RfmPassSummary(BaseModel):
    """What one full scoring pass did."""

    pass_id: int
    model_slug: str
    as_of: AwareDatetime
    scored: int
    entries: int
    exits: int
    duration_ms: int


RFM_SCORING_WORKFLOW = "RfmScoringWorkflow"


def rfm_save_workflow_id(slug: str, version: int) -> str:
    """The first pass a save starts: one per saved version (a repeat start is a no-op)."""
    return f"rfm-save:{slug}:v{version}"


RUN_RFM_PASS_ACTIVITY = "run_rfm_pass"


def rfm_schedule_id(model_slug: str) -> str:
    """The Temporal Schedule (and scheduled workflow id prefix) of a model's passes."""
    return f"rfm-score:{model_slug}"
