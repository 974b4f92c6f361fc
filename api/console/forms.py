"""Reading the console's forms: URL-encoded bodies, bounded, into typed models.

The console's forms and htmx send `application/x-www-form-urlencoded`; a body is at most
`MAX_FORM_BYTES`, holds at most `MAX_FIELDS` fields, and every value passes the same text
bounds as the API (valid Unicode, no NUL, at most 65,536 characters). What fails is a
422 naming the field, before anything is stored.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qsl

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from api.errors import details_from_pydantic
from core.bounds import MAX_ID_LENGTH, JsonProblem, check_json, text_problem
from core.errors import ErrorDetail, JourneysError, ValidationFailed

MAX_FORM_BYTES = 1024 * 1024
MAX_FIELDS = 50


class FormTooLarge(JourneysError):
    status_code = 413
    code = "too_large"


async def read_form(request: Request) -> dict[str, str]:
    """The body's fields (a repeated field keeps its last value)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise FormTooLarge(f"a console form is at most {MAX_FORM_BYTES} bytes", field="body")
    if body and content_type != "application/x-www-form-urlencoded":
        raise ValidationFailed(
            [ErrorDetail("invalid", "the console reads URL-encoded forms", "content-type")]
        )
    try:
        pairs = parse_qsl(
            body.decode("utf-8"),
            keep_blank_values=True,
            strict_parsing=False,
            max_num_fields=MAX_FIELDS,
            errors="strict",
        )
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValidationFailed(
            [ErrorDetail("invalid", f"unreadable form: {exc}", "body")]
        ) from None
    fields: dict[str, str] = {}
    problems = []
    for name, value in pairs:
        problem = text_problem(name, max_length=100) or text_problem(value)
        if problem:
            problems.append(ErrorDetail("out_of_bounds", f"{name[:100]} {problem}", name[:100]))
        fields[name] = value
    if problems:
        raise ValidationFailed(problems)
    return fields


def typed(model: type[BaseModel], fields: dict[str, str]) -> Any:
    """The form as `model` (unknown fields ignored: the CSRF token rides along)."""
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        raise ValidationFailed(details_from_pydantic(exc.errors())) from None


def json_field(fields: dict[str, str], name: str) -> Any:
    """A form field holding JSON, parsed and held to the API's JSON bounds."""
    raw = fields.get(name, "")
    if not raw.strip():
        raise ValidationFailed([ErrorDetail("missing_field", f"{name} is empty", name)])
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ValidationFailed(
            [ErrorDetail("malformed_json", f"{name} is not JSON: {exc}", name)]
        ) from None
    try:
        check_json(value)
    except JsonProblem as problem:
        raise ValidationFailed(
            [ErrorDetail("out_of_bounds", problem.message, f"{name}{problem.path}")]
        ) from None
    return value


class _Form(BaseModel):
    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)


class SignInForm(_Form):
    key: str = Field(min_length=1, max_length=500)
    next: str = Field(default="", max_length=2_048)


class SegmentForm(_Form):
    slug: str = Field(pattern=r"^[a-z0-9][a-z0-9_.:\-]{0,199}$")
    name: str = Field(min_length=1, max_length=255)
    condition: str = Field(min_length=1)
    schedule: str = Field(default="", max_length=64)


class CustomerQuery(_Form):
    q: str = Field(default="", max_length=MAX_ID_LENGTH)
