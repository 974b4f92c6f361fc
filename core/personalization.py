"""Personalisation campaigns: an experience per audience, a sticky control group.

A campaign shows each audience its own content in four slots (`banner`, `top_bar`,
`recommended`, `offer`), Jinja2 text rendered in the sandbox with the customer. The first
experience (in order) whose target matches a customer is theirs; customers who match
none, and unknown customers, get the default content. A share of customers is held out
as a control group: they get the default content too, and are compared with the
customers of the experience they would have seen.

Control assignment is a pure function of (campaign, customer): a hash into 10,000
buckets, control when the bucket is below `control_share * 10,000`. It needs no state,
survives restarts, and changing the share moves only the buckets between the old and
the new threshold.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from datetime import timedelta
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from core.bounds import Identifier, Name, text_problem
from core.conditions import (
    Condition,
    PropertyFilter,
    SegmentCondition,
    attribute_path_error,
    referenced_segments,
)
from core.durations import Duration
from core.errors import ErrorDetail

SLOTS = ("banner", "top_bar", "recommended", "offer")
BUCKETS = 10_000
CONTROL = "control"
DEFAULT = "default"
RESERVED_EXPERIENCES = (CONTROL, DEFAULT)
MAX_EXPERIENCES = 50
MAX_GOAL_FILTERS = 20
MAX_ORIGINS = 50
MAX_SLOT_LENGTH = 16_384
SLUG_PATTERN = r"^[a-z0-9][a-z0-9_-]*$"
DEFAULT_WINDOW = timedelta(days=7)

_ORIGIN = re.compile(r"^https?://[A-Za-z0-9.\-]+(:\d{1,5})?$|^\*$")


def _slot_text(value: str) -> str:
    problem = text_problem(value, max_length=MAX_SLOT_LENGTH)
    if problem:
        raise PydanticCustomError("slot_text", "a slot {problem}", {"problem": problem})
    return value


SlotText = Annotated[str, AfterValidator(_slot_text)]
"""One slot's template source: text, at most 16,384 characters."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Content(_Strict):
    """Slot templates. In an experience a slot left out shows the default content's."""

    banner: SlotText | None = None
    top_bar: SlotText | None = None
    recommended: SlotText | None = None
    offer: SlotText | None = None

    def slots(self) -> dict[str, str | None]:
        return {slot: getattr(self, slot) for slot in SLOTS}


class Experience(_Strict):
    """Who sees it (a segment, or any condition of the segment language) and what."""

    name: Name
    segment: Identifier | None = None
    condition: Condition | None = None
    content: Content = Content()

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, name: str) -> str:
        if name.strip().lower() in RESERVED_EXPERIENCES:
            raise PydanticCustomError(
                "reserved_name", "control and default name the groups without an experience"
            )
        return name

    @model_validator(mode="after")
    def _one_target(self) -> Experience:
        if (self.segment is None) == (self.condition is None):
            raise PydanticCustomError(
                "one_target", "an experience targets exactly one of segment or condition"
            )
        return self

    def target(self) -> Condition:
        """The experience's audience as a condition (a segment is `{"segment": slug}`)."""
        if self.condition is not None:
            return self.condition
        return SegmentCondition(segment=self.segment or "")


def _property_path(value: str | None) -> str | None:
    if value is None:
        return None
    problem = attribute_path_error(value)
    if problem:
        raise PydanticCustomError("property_path", "{problem}", {"problem": problem})
    return value


def _whole_seconds(value: timedelta) -> timedelta:
    if value.microseconds:
        raise PydanticCustomError("window", "the attribution window is a whole number of seconds")
    if value < timedelta(minutes=1):
        raise PydanticCustomError("window", "the attribution window is at least a minute (PT1M)")
    return value


class ConversionGoal(_Strict):
    """The goal event (with optional property filters) by a viewer within `within` after
    their first view of the campaign version; `value_property` gives its value."""

    event: Identifier
    where: list[PropertyFilter] = Field(default_factory=list, max_length=MAX_GOAL_FILTERS)
    value_property: Annotated[str | None, AfterValidator(_property_path)] = None
    within: Annotated[Duration, AfterValidator(_whole_seconds)] = DEFAULT_WINDOW


def _origin(value: str) -> str:
    if not _ORIGIN.match(value):
        raise PydanticCustomError(
            "origin", "an origin is scheme://host[:port] without a path, or *"
        )
    return value


Origin = Annotated[str, Field(max_length=300), AfterValidator(_origin)]


class PersonalizationDefinition(_Strict):
    """A campaign version, as the API takes it and the store keeps it."""

    slug: str = Field(pattern=SLUG_PATTERN, min_length=1, max_length=200)
    name: Name
    control_share: float = Field(default=0.1, ge=0, lt=1)
    conversion: ConversionGoal
    default: Content = Content()
    experiences: list[Experience] = Field(min_length=1, max_length=MAX_EXPERIENCES)
    cors_origins: list[Origin] = Field(default_factory=list, max_length=MAX_ORIGINS)

    @property
    def control_threshold(self) -> int:
        return control_threshold(self.control_share)

    def experience_named(self, name: str) -> Experience | None:
        return next((e for e in self.experiences if e.name == name), None)

    def content_of(self, experience: Experience | None) -> dict[str, str]:
        """The slot templates shown: the experience's, each missing one the default's."""
        defaults = self.default.slots()
        own = experience.content.slots() if experience is not None else {}
        return {slot: own.get(slot) or defaults[slot] or "" for slot in SLOTS}


def stored_form(definition: PersonalizationDefinition) -> dict[str, Any]:
    """JSON that parses back to the same definition (durations as text, `not` by alias)."""
    return definition.model_dump(mode="json", by_alias=True, exclude_none=True)


# --- control assignment -------------------------------------------------------------------


def bucket_of(campaign: str, customer_id: str) -> int:
    """The customer's bucket in the campaign, 0-9999: the same in every process, forever."""
    digest = hashlib.sha256(f"{campaign}:{customer_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def control_threshold(control_share: float) -> int:
    """Buckets below this are the control group."""
    return round(control_share * BUCKETS)


def in_control(bucket: int, control_share: float) -> bool:
    return bucket < control_threshold(control_share)


# --- validation helpers ---------------------------------------------------------------------


def _field_of(loc: tuple[Any, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif isinstance(part, str) and (part[:1].isupper() or part.startswith("function-")):
            continue  # a union tag such as "AttributeCondition", not a field
        else:
            text += ("." if text else "") + str(part)
    return text


def _detail_of(error: dict[str, Any]) -> ErrorDetail:
    kind = error.get("type", "invalid")
    code = {"missing": "missing_field", "extra_forbidden": "unknown_field"}.get(kind, "invalid")
    field = _field_of(tuple(error.get("loc", ())))
    context = error.get("ctx") or {}
    if kind == "json_bounds" and context.get("path"):
        field += str(context["path"])
    return ErrorDetail(code, str(error.get("msg", "invalid value")), field or None)


def parse_definition(raw: Any) -> tuple[PersonalizationDefinition | None, list[ErrorDetail]]:
    """The definition, or None and every pydantic error naming its field
    (`experiences[2].content.offer`)."""
    if not isinstance(raw, dict):
        return None, [ErrorDetail("invalid", "a campaign definition is a JSON object", None)]
    try:
        definition = PersonalizationDefinition.model_validate(raw)
    except ValidationError as exc:
        return None, [_detail_of(err) for err in exc.errors()]
    seen: set[str] = set()
    errors = []
    for i, experience in enumerate(definition.experiences):
        if experience.name in seen:
            errors.append(
                ErrorDetail(
                    "duplicate_name",
                    f"experience {experience.name!r} is named twice",
                    f"experiences[{i}].name",
                )
            )
        seen.add(experience.name)
    return (None, errors) if errors else (definition, [])


def slot_sources(raw: Any) -> Iterator[tuple[str, str]]:
    """(field, template source) of every slot string in a definition's raw JSON, valid or
    not, so that templates are proven even when another field is wrong."""
    if not isinstance(raw, dict):
        return
    groups: list[tuple[str, Any]] = [("default", raw.get("default"))]
    experiences = raw.get("experiences")
    if isinstance(experiences, list):
        groups += [
            (f"experiences[{i}].content", e.get("content"))
            for i, e in enumerate(experiences)
            if isinstance(e, dict)
        ]
    for prefix, content in groups:
        if isinstance(content, dict):
            for slot in SLOTS:
                source = content.get(slot)
                if isinstance(source, str):
                    yield f"{prefix}.{slot}", source


def segments_named(definition: PersonalizationDefinition) -> list[tuple[str, str]]:
    """(field, slug) of every segment the campaign's experiences name, the field naming
    the slug itself (`experiences[1].condition.all[0].segment`)."""
    found: list[tuple[str, str]] = []
    for i, experience in enumerate(definition.experiences):
        if experience.segment is not None:
            found.append((f"experiences[{i}].segment", experience.segment))
        if experience.condition is not None:
            found += [
                (f"{path}.segment", slug)
                for path, slug in referenced_segments(
                    experience.condition, f"experiences[{i}].condition"
                )
            ]
    return found
