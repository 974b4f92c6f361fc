"""The segment condition language (shared by segments, RFM targeting and journey branches).

A condition is JSON; groups nest at most 10 deep and a condition has at most 200 nodes
(core.bounds):
  {"all": [c, ...]}, {"any": [c, ...]}, {"not": c}
  {"attribute": "plan", "op": "eq", "value": "pro"}
  {"segment": "default:champions"}
  {"event": "Purchase", "count": {"gte": 2}, "within": "P30D",
   "where": [{"property": "total_price", "op": "gte", "value": 100}]}
  {"event": "Purchase", "last": {"more_than": "P30D"}}   ("event": "*" = any event)
  {"event": "Purchase", "count": {"gte": 1},
   "between": ["2023-05-15T00:00:00Z", "2023-06-01T00:00:00Z"]}   (a fixed window: from <=
   occurred_at < to, both with a zone, from before to; instead of within)
  {"prediction": "buy-90d", "level": "high"}   (a predictive model's level: low, medium, high)
  {"prediction": "buy-90d", "op": "gte", "value": 0.6}   (its probability: gt, gte, lt, lte)

Value types per operator (checked on parse):
  eq, ne          a string, a number or a boolean
  gt, gte, lt, lte  a number or a string (strings compare by code point)
  in              a non-empty list (at most 1,000) of strings, numbers or booleans
  contains        a string (substring of a string attribute, or element of a list
                  attribute) or a number / boolean (element of a list attribute)
  exists          true (the default) or false; null counts as absent
  before, after   a timestamp with a zone (`2026-11-01T00:00:00Z`) or an ISO duration
                  meaning "that long before now" (`P30D`); the attribute must hold a
                  timestamp with a zone

Attribute paths may be dotted (`address.city`). Three names are customer columns, not
attributes: `email` and `phone` (strings) and `created_at` (a timestamp).
`parse_condition` checks raw JSON and names the offending node by its JSON path.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from core.bounds import (
    MAX_CONDITION_DEPTH,
    MAX_CONDITION_NODES,
    MAX_INSTANT,
    MIN_INSTANT,
    Instant,
    number_problem,
    text_problem,
)
from core.durations import Duration, parse_duration
from core.errors import ErrorDetail, ValidationFailed

AttributeOp = Literal[
    "eq", "ne", "gt", "gte", "lt", "lte", "in", "contains", "exists", "before", "after"
]
PropertyOp = AttributeOp

ATTRIBUTE_OPS: tuple[str, ...] = AttributeOp.__args__  # type: ignore[attr-defined]
COUNT_BOUNDS = ("eq", "gte", "gt", "lte", "lt")
PREDICTION_LEVELS = ("low", "medium", "high")
PREDICTION_OPS = ("gt", "gte", "lt", "lte")
PredictionLevel = Literal["low", "medium", "high"]
PredictionOp = Literal["gt", "gte", "lt", "lte"]
LAST_BOUNDS = ("more_than", "less_than")
MAX_IN_VALUES = 1_000

COLUMN_ATTRIBUTES: dict[str, str] = {
    "email": "string",
    "phone": "string",
    "created_at": "timestamp",
}
"""Attribute names read from customer columns rather than the attributes JSON."""

# Path segments end up inside SQLite JSON paths (`$."a"."b"`), so quotes and path syntax
# are kept out of them.
_PATH_SEGMENT = re.compile(r'^[^."\\\[\]$*\x00]{1,255}$')


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

    @model_validator(mode="after")
    def _typed_value(self) -> AttributeCondition:
        problem = attribute_path_error(self.attribute) or value_error(
            self.op, self.value, column_kind(self.attribute)
        )
        if problem:
            raise ValueError(problem)
        return self


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

    @model_validator(mode="after")
    def _typed_value(self) -> PropertyFilter:
        problem = attribute_path_error(self.property) or value_error(self.op, self.value, None)
        if problem:
            raise ValueError(problem)
        return self


class EventCondition(_Strict):
    event: str = Field(min_length=1)
    count: CountRange | None = None
    within: Duration | None = None
    between: tuple[Instant, Instant] | None = None
    last: LastRange | None = None
    where: list[PropertyFilter] = Field(default_factory=list)

    @model_validator(mode="after")
    def _count_or_last(self) -> EventCondition:
        if (self.count is None) == (self.last is None):
            raise ValueError("an event condition takes exactly one of count or last")
        if self.within is not None and self.count is None:
            raise ValueError("within goes with count; last carries its own durations")
        if self.between is not None:
            problem = between_error(self.between, has_count=self.count is not None)
            if problem or self.within is not None:
                raise ValueError(problem or "an event condition takes within or between, not both")
        return self


class PredictionCondition(_Strict):
    """A customer's score on a predictive model: its level, or its probability compared."""

    prediction: str = Field(min_length=1, max_length=100)
    level: PredictionLevel | None = None
    op: PredictionOp | None = None
    value: float | None = None

    @model_validator(mode="after")
    def _level_or_comparison(self) -> PredictionCondition:
        problem = prediction_error(
            level=self.level, op=self.op, value=self.value, has_value=self.value is not None
        )
        if problem:
            raise ValueError(problem)
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
            ("prediction", "PredictionCondition"),
        ):
            if key in value:
                return name
    return None


def condition_size(node: Any) -> tuple[int, int]:
    """(group depth, node count) of a parsed condition: groups are all / any / not."""
    if isinstance(node, AllOf | AnyOf):
        children = node.all if isinstance(node, AllOf) else node.any
        sizes = [condition_size(child) for child in children]
        return 1 + max(d for d, _ in sizes), 1 + sum(n for _, n in sizes)
    if isinstance(node, NotOf):
        depth, count = condition_size(node.not_)
        return depth + 1, count + 1
    return 0, 1


def size_problem(depth: int, nodes: int) -> str | None:
    if depth > MAX_CONDITION_DEPTH:
        return f"groups (all, any, not) nest at most {MAX_CONDITION_DEPTH} deep"
    if nodes > MAX_CONDITION_NODES:
        return f"a condition has at most {MAX_CONDITION_NODES} nodes"
    return None


def _bounded(node: Any) -> Any:
    problem = size_problem(*condition_size(node))
    if problem:
        raise PydanticCustomError("condition_size", problem)
    return node


Condition = Annotated[
    Annotated[AllOf, Tag("AllOf")]
    | Annotated[AnyOf, Tag("AnyOf")]
    | Annotated[NotOf, Tag("NotOf")]
    | Annotated[AttributeCondition, Tag("AttributeCondition")]
    | Annotated[SegmentCondition, Tag("SegmentCondition")]
    | Annotated[EventCondition, Tag("EventCondition")]
    | Annotated[PredictionCondition, Tag("PredictionCondition")],
    Discriminator(
        _kind,
        custom_error_type="invalid_condition",
        custom_error_message=(
            "a condition is an object with one of: all, any, not, attribute, segment, event,"
            " prediction"
        ),
    ),
    AfterValidator(_bounded),
]

for _model in (AllOf, AnyOf, NotOf):
    _model.model_rebuild()

CONDITION_ADAPTER: TypeAdapter[Any] = TypeAdapter(Condition)


# --- value rules shared by the models and parse_condition ------------------------------


def column_kind(attribute: str) -> str | None:
    """`string` / `timestamp` for the attribute names that are customer columns, else None."""
    return COLUMN_ATTRIBUTES.get(attribute)


def attribute_path_error(path: str) -> str | None:
    if not isinstance(path, str) or not path:
        return "must be a non-empty string"
    for segment in path.split("."):
        if not _PATH_SEGMENT.match(segment):
            return (
                f"{path[:80]!r} is not an attribute path: dot-separated names of at most "
                '255 characters without NUL " \\ [ ] $ * or empty parts'
            )
    return None


def _is_number(value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and number_problem(value) is None
    )


def _is_scalar(value: Any) -> bool:
    if isinstance(value, str):
        return text_problem(value) is None
    return isinstance(value, bool) or _is_number(value)


def parse_instant(text: str) -> datetime:
    """An ISO 8601 timestamp that carries a zone; naive ones are refused."""
    try:
        value = datetime.fromisoformat(text)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{text!r} is not an ISO 8601 timestamp") from exc
    if value.tzinfo is None:
        raise ValueError(f"{text!r} has no zone: write it like 2026-11-01T00:00:00Z")
    return value


def resolve_moment(value: str, now: datetime) -> datetime:
    """The instant a `before` / `after` value names: itself, or `now` minus a duration."""
    if value.strip().upper().startswith("P"):
        return now - parse_duration(value)
    return parse_instant(value)


def between_error(window: Any, *, has_count: bool) -> str | None:
    """Why `window` is not a fixed window [from, to) for an event count, or None."""
    if not has_count:
        return "between goes with count"
    if not isinstance(window, list | tuple) or len(window) != 2:
        return "between takes [from, to]: two timestamps with a zone"
    moments = []
    for value in window:
        if isinstance(value, datetime):
            moment = value
            if moment.tzinfo is None:
                return "between takes timestamps with a zone"
        elif isinstance(value, str):
            try:
                moment = parse_instant(value)
            except ValueError as exc:
                return f"between takes timestamps with a zone: {exc}"
        else:
            return "between takes [from, to]: two timestamps with a zone"
        if not MIN_INSTANT <= moment < MAX_INSTANT:
            return "between takes times from 1900-01-01 to 2200-01-01 (UTC)"
        moments.append(moment)
    if moments[0] >= moments[1]:
        return "between takes [from, to] with from before to"
    return None


def prediction_error(*, level: Any, op: Any, value: Any, has_value: bool) -> str | None:
    """Why a prediction condition's level / op / value do not fit, or None."""
    if level is not None:
        if op is not None or has_value:
            return "a prediction condition takes a level, or an op and a value, not both"
        if level not in PREDICTION_LEVELS:
            return f"level is one of {', '.join(PREDICTION_LEVELS)}"
        return None
    if op is None:
        return "a prediction condition takes a level, or an op and a value"
    if op not in PREDICTION_OPS:
        return f"op is one of {', '.join(PREDICTION_OPS)}"
    if not _is_number(value) or not 0 <= value <= 1:
        return "value is a probability, a number from 0 to 1"
    return None


def value_error(op: str, value: Any, kind: str | None) -> str | None:
    """Why `value` does not suit `op` on an attribute of `kind` (None: JSON), or None."""
    if op in ("before", "after"):
        if kind == "string":
            return f"{op} compares timestamps; this attribute holds text"
        if not isinstance(value, str):
            return f"{op} takes a timestamp with a zone or an ISO duration such as P30D"
        try:
            resolve_moment(value, datetime.now().astimezone())
        except ValueError as exc:
            return f"{op} takes a timestamp with a zone or an ISO duration: {exc}"
        return None
    if op == "exists":
        return None if value is None or isinstance(value, bool) else "exists takes true or false"
    if kind == "timestamp":
        return f"{op} does not apply to a timestamp column; use before, after or exists"
    scalar_ok = (lambda v: isinstance(v, str)) if kind == "string" else _is_scalar
    what = "a string" if kind == "string" else "a string, a number or a boolean"
    if op in ("eq", "ne", "contains"):
        return None if scalar_ok(value) else f"{op} takes {what}"
    if op in ("gt", "gte", "lt", "lte"):
        if kind == "string":
            return None if isinstance(value, str) else f"{op} takes a string here"
        return (
            None
            if _is_number(value) or isinstance(value, str)
            else f"{op} takes a number or a string"
        )
    if op == "in":
        if not isinstance(value, list) or not value:
            return f"in takes a non-empty list of {what.removeprefix('a ')}s"
        if len(value) > MAX_IN_VALUES:
            return f"in takes at most {MAX_IN_VALUES} values"
        if not all(scalar_ok(v) for v in value):
            return f"every value of in must be {what}"
        return None
    return f"unknown operator {op!r}"


# --- parse_condition: raw JSON to a Condition, every error with its JSON path ----------

_KIND_KEYS = ("all", "any", "not", "attribute", "segment", "event", "prediction")
_ALLOWED_KEYS = {
    "all": {"all"},
    "any": {"any"},
    "not": {"not"},
    "attribute": {"attribute", "op", "value"},
    "segment": {"segment"},
    "event": {"event", "count", "within", "between", "last", "where"},
    "prediction": {"prediction", "level", "op", "value"},
}


def parse_condition(raw: Any, *, path: str = "condition") -> Condition:
    """Validate raw JSON as a condition; `ValidationFailed` lists every problem found,
    each naming the JSON path of its node (`condition.all[1].any[0].op`)."""
    errors: list[ErrorDetail] = []
    problem = size_problem(*_raw_size(raw))
    if problem:
        raise ValidationFailed([ErrorDetail("too_large", problem, path)])
    _check_node(raw, path, errors)
    if errors:
        raise ValidationFailed(errors)
    try:
        return CONDITION_ADAPTER.validate_python(raw)
    except ValidationError as exc:  # a rule the walk above missed: still name the node
        raise ValidationFailed(
            [ErrorDetail("invalid", e["msg"], _join(path, e.get("loc", ()))) for e in exc.errors()]
        ) from exc


def _raw_size(raw: Any, depth: int = 0) -> tuple[int, int]:
    """(group depth, node count) of raw JSON, stopping once past the bounds."""
    if depth > MAX_CONDITION_DEPTH or not isinstance(raw, dict):
        return depth, 1
    children: list[Any] = []
    for key in ("all", "any"):
        if isinstance(raw.get(key), list):
            children.extend(raw[key])
    if "not" in raw:
        children.append(raw["not"])
    if not children:
        return depth, 1
    deepest, count = depth + 1, 1
    for child in children:
        child_depth, child_count = _raw_size(child, depth + 1)
        deepest, count = max(deepest, child_depth), count + child_count
        if count > MAX_CONDITION_NODES:
            break
    return deepest, count


def _join(path: str, loc: Any) -> str:
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif isinstance(part, str) and not part[:1].isupper():
            path += f".{part}"
    return path


def _err(errors: list[ErrorDetail], code: str, message: str, field: str) -> None:
    errors.append(ErrorDetail(code, message, field))


def _check_node(raw: Any, path: str, errors: list[ErrorDetail]) -> None:
    if not isinstance(raw, dict):
        _err(
            errors,
            "invalid",
            "a condition is an object with one of: " + ", ".join(_KIND_KEYS),
            path,
        )
        return
    kinds = [k for k in _KIND_KEYS if k in raw]
    if not kinds:
        unknown = sorted(raw) or ["(empty object)"]
        _err(
            errors,
            "invalid",
            f"unknown condition {', '.join(map(str, unknown))}: one of {', '.join(_KIND_KEYS)} expected",
            path,
        )
        return
    if len(kinds) > 1:
        _err(errors, "invalid", f"a condition has one of {', '.join(kinds)}, not several", path)
        return
    kind = kinds[0]
    for key in sorted(set(raw) - _ALLOWED_KEYS[kind], key=str):
        _err(errors, "unknown_field", f"unknown key {key!r} in a {kind} condition", f"{path}.{key}")
    if kind in ("all", "any"):
        items = raw[kind]
        if not isinstance(items, list) or not items:
            _err(
                errors, "invalid", f"{kind} takes a non-empty list of conditions", f"{path}.{kind}"
            )
            return
        for i, item in enumerate(items):
            _check_node(item, f"{path}.{kind}[{i}]", errors)
    elif kind == "not":
        _check_node(raw["not"], f"{path}.not", errors)
    elif kind == "attribute":
        _check_comparison(raw, path, errors, name_key="attribute")
    elif kind == "segment":
        if not isinstance(raw["segment"], str) or not raw["segment"]:
            _err(errors, "invalid", "segment takes a segment slug", f"{path}.segment")
    elif kind == "prediction":
        _check_prediction(raw, path, errors)
    else:
        _check_event(raw, path, errors)


def _check_prediction(raw: dict[str, Any], path: str, errors: list[ErrorDetail]) -> None:
    slug = raw["prediction"]
    if not isinstance(slug, str) or not 1 <= len(slug) <= 100:
        _err(errors, "invalid", "prediction takes a predictive model's slug", f"{path}.prediction")
    if "level" not in raw and "op" not in raw:
        _err(
            errors,
            "missing_field",
            "a prediction condition takes a level, or an op and a value",
            path,
        )
        return
    if "op" in raw and "value" not in raw:
        _err(errors, "missing_field", f"{raw['op']} needs a value", f"{path}.value")
        return
    problem = prediction_error(
        level=raw.get("level"), op=raw.get("op"), value=raw.get("value"), has_value="value" in raw
    )
    if problem:
        field = "value" if problem.startswith("value") else "op" if "level" not in raw else "level"
        _err(errors, "invalid_value", problem, f"{path}.{field}")


def _check_comparison(
    raw: dict[str, Any], path: str, errors: list[ErrorDetail], *, name_key: str
) -> None:
    name = raw.get(name_key)
    problem = attribute_path_error(name) if name is not None else "is required"
    if problem:
        code = "missing_field" if name is None else "invalid"
        _err(errors, code, f"{name_key} {problem}", f"{path}.{name_key}")
    op = raw.get("op")
    if op is None:
        _err(errors, "missing_field", "op is required", f"{path}.op")
        return
    if not isinstance(op, str) or op not in ATTRIBUTE_OPS:
        _err(
            errors,
            "unknown_operator",
            f"unknown operator {op!r}: one of {', '.join(ATTRIBUTE_OPS)}",
            f"{path}.op",
        )
        return
    if op != "exists" and "value" not in raw:
        _err(errors, "missing_field", f"{op} needs a value", f"{path}.value")
        return
    kind = column_kind(name) if name_key == "attribute" and isinstance(name, str) else None
    problem = value_error(op, raw.get("value"), kind)
    if problem:
        _err(errors, "invalid_value", problem, f"{path}.value")


def _check_duration(value: Any, field: str, errors: list[ErrorDetail]) -> None:
    try:
        parse_duration(value)
    except ValueError as exc:
        _err(errors, "invalid_value", str(exc), field)


def _check_event(raw: dict[str, Any], path: str, errors: list[ErrorDetail]) -> None:
    if not isinstance(raw["event"], str) or not raw["event"]:
        _err(errors, "invalid", 'event takes an event name or "*"', f"{path}.event")
    has_count, has_last = "count" in raw, "last" in raw
    if has_count == has_last:
        _err(errors, "invalid", "an event condition takes exactly one of count or last", path)
    if "within" in raw:
        if not has_count:
            _err(errors, "invalid", "within goes with count", f"{path}.within")
        _check_duration(raw["within"], f"{path}.within", errors)
    if "between" in raw:
        problem = between_error(raw["between"], has_count=has_count)
        if problem is None and "within" in raw:
            problem = "an event condition takes within or between, not both"
        if problem:
            _err(errors, "invalid_value", problem, f"{path}.between")
    if has_count:
        _check_bounds(raw["count"], f"{path}.count", COUNT_BOUNDS, errors, durations=False)
    if has_last:
        _check_bounds(raw["last"], f"{path}.last", LAST_BOUNDS, errors, durations=True)
    where = raw.get("where", [])
    if not isinstance(where, list):
        _err(errors, "invalid", "where takes a list of property filters", f"{path}.where")
        return
    for i, item in enumerate(where):
        field = f"{path}.where[{i}]"
        if not isinstance(item, dict):
            _err(errors, "invalid", "a property filter is an object {property, op, value}", field)
            continue
        for key in sorted(set(item) - {"property", "op", "value"}, key=str):
            _err(
                errors,
                "unknown_field",
                f"unknown key {key!r} in a property filter",
                f"{field}.{key}",
            )
        _check_comparison(item, field, errors, name_key="property")


def _check_bounds(
    raw: Any, path: str, allowed: tuple[str, ...], errors: list[ErrorDetail], *, durations: bool
) -> None:
    if not isinstance(raw, dict) or not raw:
        _err(errors, "invalid", f"takes an object with one or more of {', '.join(allowed)}", path)
        return
    for key, value in raw.items():
        field = f"{path}.{key}"
        if key not in allowed:
            _err(
                errors,
                "unknown_operator",
                f"unknown bound {key!r}: one of {', '.join(allowed)}",
                field,
            )
        elif durations:
            _check_duration(value, field, errors)
        elif not isinstance(value, int) or isinstance(value, bool) or value < 0:
            _err(errors, "invalid_value", f"{key} takes a whole number >= 0", field)


# --- walking a parsed condition --------------------------------------------------------


def iter_nodes(condition: Condition, path: str = "condition") -> Iterator[tuple[str, Any]]:
    """Every node of `condition` with its JSON path, parents before children."""
    yield path, condition
    if isinstance(condition, AllOf):
        for i, child in enumerate(condition.all):
            yield from iter_nodes(child, f"{path}.all[{i}]")
    elif isinstance(condition, AnyOf):
        for i, child in enumerate(condition.any):
            yield from iter_nodes(child, f"{path}.any[{i}]")
    elif isinstance(condition, NotOf):
        yield from iter_nodes(condition.not_, f"{path}.not")


def referenced_segments(condition: Condition, path: str = "condition") -> list[tuple[str, str]]:
    """`(json path, slug)` of every segment the condition names, in document order."""
    return [
        (node_path, node.segment)
        for node_path, node in iter_nodes(condition, path)
        if isinstance(node, SegmentCondition)
    ]


def referenced_predictions(condition: Condition, path: str = "condition") -> list[tuple[str, str]]:
    """`(json path, slug)` of every predictive model the condition names, in document order."""
    return [
        (node_path, node.prediction)
        for node_path, node in iter_nodes(condition, path)
        if isinstance(node, PredictionCondition)
    ]
