"""The segment condition language (shared by segments, RFM targeting and journey branches).

A condition is JSON, nestable to any depth:
  {"all": [c, ...]}, {"any": [c, ...]}, {"not": c}
  {"attribute": "plan", "op": "eq", "value": "pro"}
  {"segment": "default:champions"}
  {"event": "Purchase", "count": {"gte": 2}, "within": "P30D",
   "where": [{"property": "total_price", "op": "gte", "value": 100}]}
  {"event": "Purchase", "last": {"more_than": "P30D"}}   ("event": "*" = any event)
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from core.durations import Duration

AttributeOp = Literal[
    "eq", "ne", "gt", "gte", "lt", "lte", "in", "contains", "exists", "before", "after"
]
PropertyOp = Literal["eq", "ne", "gt", "gte", "lt", "lte", "in", "contains", "exists"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AllOf(_Strict):
    all: list[Condition] = Field(min_length=1)


class AnyOf(_Strict):
    any: list[Condition] = Field(min_length=1)


class NotOf(_Strict):
    not_: Condition = Field(alias="not")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class AttributeCondition(_Strict):
    attribute: str = Field(min_length=1)
    op: AttributeOp
    value: Any = None


class SegmentCondition(_Strict):
    segment: str = Field(min_length=1)


class CountRange(_Strict):
    eq: int | None = Field(default=None, ge=0)
    gte: int | None = Field(default=None, ge=0)
    gt: int | None = Field(default=None, ge=0)
    lte: int | None = Field(default=None, ge=0)
    lt: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _one_bound(self) -> CountRange:
        if all(v is None for v in (self.eq, self.gte, self.gt, self.lte, self.lt)):
            raise ValueError("count needs at least one of eq, gte, gt, lte, lt")
        return self


class LastRange(_Strict):
    more_than: Duration | None = None
    less_than: Duration | None = None

    @model_validator(mode="after")
    def _one_bound(self) -> LastRange:
        if self.more_than is None and self.less_than is None:
            raise ValueError("last needs more_than or less_than")
        return self


class PropertyFilter(_Strict):
    property: str = Field(min_length=1)
    op: PropertyOp
    value: Any = None


class EventCondition(_Strict):
    event: str = Field(min_length=1)
    count: CountRange | None = None
    within: Duration | None = None
    last: LastRange | None = None
    where: list[PropertyFilter] = Field(default_factory=list)

    @model_validator(mode="after")
    def _count_or_last(self) -> EventCondition:
        if (self.count is None) == (self.last is None):
            raise ValueError("an event condition takes exactly one of count or last")
        return self


def _kind(value: Any) -> str | None:
    if isinstance(value, BaseModel):
        return type(value).__name__
    if isinstance(value, dict):
        for key, name in (
            ("all", "AllOf"),
            ("any", "AnyOf"),
            ("not", "NotOf"),
            ("attribute", "AttributeCondition"),
            ("segment", "SegmentCondition"),
            ("event", "EventCondition"),
        ):
            if key in value:
                return name
    return None


Condition = Annotated[
    Annotated[AllOf, Tag("AllOf")]
    | Annotated[AnyOf, Tag("AnyOf")]
    | Annotated[NotOf, Tag("NotOf")]
    | Annotated[AttributeCondition, Tag("AttributeCondition")]
    | Annotated[SegmentCondition, Tag("SegmentCondition")]
    | Annotated[EventCondition, Tag("EventCondition")],
    Discriminator(
        _kind,
        custom_error_type="invalid_condition",
        custom_error_message=(
            "a condition is an object with one of: all, any, not, attribute, segment, event"
        ),
    ),
]

for _model in (AllOf, AnyOf, NotOf):
    _model.model_rebuild()
