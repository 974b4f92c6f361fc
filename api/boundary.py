"""The one gate every request passes: JSON bodies, path and query parameters within bounds.

Every router is a `resource_router`, whose routes parse a JSON body once (pydantic-core's
parser, which refuses NaN and lone surrogates) and hold the whole document to
`core.bounds` before FastAPI validates it against the route's model. What fails answers
422 naming the JSON path (or 400 for text that is not JSON) before any handler runs, so a
refused request can have stored nothing. Bulk bodies are read by their handlers and
checked line by line (`core.records`), so one bad line never refuses the others.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.routing import APIRoute
from pydantic_core import from_json

from core.bounds import MAX_PAGE_SIZE, MAX_QUERY_LENGTH, JsonProblem, check_json, text_problem
from core.errors import ErrorDetail, JourneysError, ValidationFailed

Handler = Callable[[Request], Coroutine[Any, Any, Response]]

NDJSON = "application/x-ndjson"


def wants_ndjson(request: Request) -> bool:
    """Whether the client asked for every row as NDJSON rather than a page of JSON."""
    return NDJSON in request.headers.get("accept", "")


PageLimit = Annotated[
    int, Query(ge=1, le=MAX_PAGE_SIZE, description=f"rows per page, 1 to {MAX_PAGE_SIZE:,}")
]


class MalformedJson(JourneysError):
    status_code = 400
    code = "malformed_json"


def json_field(prefix: str, path: str) -> str:
    """`body` + `.a.b[2]` -> `a.b[2]`: fields are named from the body's root."""
    joined = f"{prefix}{path}" if prefix else path
    return joined.lstrip(".") or "body"


def parse_json_document(body: bytes, *, field_prefix: str = "") -> Any:
    """The decoded document, held to `core.bounds`; `ValidationFailed` / `MalformedJson`."""
    try:
        value = from_json(body, allow_inf_nan=False)
    except ValueError as exc:
        raise _located_problem(body, field_prefix) or MalformedJson(
            f"malformed JSON: {exc}", field="body"
        ) from None
    try:
        check_json(value)
    except JsonProblem as problem:
        raise _refusal(problem, field_prefix) from None
    return value


def _located_problem(body: bytes, field_prefix: str) -> JourneysError | None:
    # pydantic-core says where in the text it stopped; Python's lenient parser takes NaN,
    # lone surrogates and any depth, so the walk can name the JSON path instead.
    try:
        value = json.loads(body)
    except RecursionError:
        return ValidationFailed(
            [ErrorDetail("too_deep", "nested too deeply", json_field(field_prefix, ""))]
        )
    except ValueError:
        return None
    try:
        check_json(value)
    except JsonProblem as problem:
        return _refusal(problem, field_prefix)
    return None


def _refusal(problem: JsonProblem, field_prefix: str) -> ValidationFailed:
    return ValidationFailed(
        [ErrorDetail("out_of_bounds", problem.message, json_field(field_prefix, problem.path))]
    )


def _is_json(request: Request) -> bool:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    return content_type in ("", "application/json") or content_type.endswith("+json")


def _parameter_problems(request: Request) -> list[ErrorDetail]:
    problems = []
    for name, value in [*request.path_params.items(), *request.query_params.multi_items()]:
        if isinstance(value, str):
            problem = text_problem(value, max_length=MAX_QUERY_LENGTH)
            if problem:
                problems.append(ErrorDetail("out_of_bounds", f"{name} {problem}", name))
    return problems


ERROR_SCHEMA_REF = "#/components/schemas/ErrorBody"
JOURNEY_DEFINITION_MARK = "x-journey-definition"
"""Marks a body read as raw JSON whose documented schema is `JourneyDefinition`."""
PERSONALIZATION_DEFINITION_MARK = "x-personalization-definition"
"""Marks a body read as raw JSON whose documented schema is `PersonalizationDefinition`."""
_MARKED_SCHEMAS = {
    JOURNEY_DEFINITION_MARK: "JourneyDefinition",
    PERSONALIZATION_DEFINITION_MARK: "PersonalizationDefinition",
}


def typed_request_bodies(document: dict[str, Any]) -> None:
    """Point every marked request body of an OpenAPI document at its definition schema
    (`JourneyDefinition`, `PersonalizationDefinition`)."""
    for item in document.get("paths", {}).values():
        for operation in item.values():
            content = operation.get("requestBody", {}).get("content", {})
            for media in content.values():
                for mark, schema in _MARKED_SCHEMAS.items():
                    if media.get("schema", {}).get(mark):
                        media["schema"] = {"$ref": f"#/components/schemas/{schema}"}


_DESCRIPTIONS = {
    400: "Malformed JSON, or a body the route cannot read",
    401: "Missing, unknown or revoked API key",
    403: "The key's role may not do this",
    404: "No such resource",
    409: "The request conflicts with the resource's state (see the message)",
    413: "The body is larger than the size limit",
    422: "A field is invalid or out of bounds; `field` names it",
    503: "A part the route needs (Temporal, the database) is not reachable",
}


CONFLICT: dict[int | str, dict[str, Any]] = {409: {}}
"""A route's `responses=` entry: it may answer 409 (the error body is filled in)."""
NEEDS_TEMPORAL: dict[int | str, dict[str, Any]] = {503: {}}
"""A route's `responses=` entry: it answers 503 while Temporal cannot be reached."""


def error_response(status: int) -> dict[str, Any]:
    """An OpenAPI response answering the contract's error body."""
    return {
        "description": _DESCRIPTIONS.get(status, "Refused"),
        "content": {"application/json": {"schema": {"$ref": ERROR_SCHEMA_REF}}},
    }


class BoundedRoute(APIRoute):
    """An APIRoute whose parameters and JSON body pass `core.bounds` before the handler.

    Its OpenAPI lists the 4xx it answers: 401 and 403 behind a key, 422 for any
    parameter or body, 400 and 413 for a body, 404 for a path naming a resource, and
    what the route declares itself (409, 503), each with the contract's error body.
    """

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        for status in sorted(self._errors_answered()):
            current = self.responses.get(status) or self.responses.get(str(status))
            if current is None or "content" not in current:
                description = (current or {}).get("description")
                self.responses[status] = error_response(status)
                if description:
                    self.responses[status]["description"] = description

    def _errors_answered(self) -> set[int]:
        answered = {int(s) for s in self.responses if str(s).isdigit() and int(s) >= 400}
        calls = [d.call for d in self.dependant.dependencies]
        if any(_is_role_check(call) for call in calls):
            answered |= {401, 403}
        if any(getattr(call, "__name__", "") == "get_temporal" for call in calls):
            answered.add(503)
        params = self.dependant.path_params + self.dependant.query_params
        if params or self.body_field is not None:
            answered.add(422)
        if self.dependant.path_params:
            answered.add(404)
        if self.methods & {"POST", "PUT", "PATCH"}:
            answered.add(413)
            if self.body_field is not None:
                answered.add(400)
        return answered

    def get_route_handler(self) -> Handler:
        handler = super().get_route_handler()
        reads_json = self.body_field is not None and not _is_form(self)

        async def bounded(request: Request) -> Response:
            problems = _parameter_problems(request)
            if problems:
                raise ValidationFailed(problems)
            if reads_json and _is_json(request):
                body = await request.body()
                if body:
                    # Starlette keeps the decoded body here; FastAPI reads it, not the bytes.
                    request._json = parse_json_document(body)
            return await handler(request)

        return bounded


def _is_role_check(call: Any) -> bool:
    return "require_role" in getattr(call, "__qualname__", "")


def _is_form(route: APIRoute) -> bool:
    from fastapi.params import Form

    return isinstance(getattr(route.body_field, "field_info", None), Form)


def resource_router(**kwargs: Any) -> APIRouter:
    """The APIRouter every resource uses: its routes are `BoundedRoute`s."""
    return APIRouter(route_class=BoundedRoute, **kwargs)
