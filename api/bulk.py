"""Reading a bulk body: NDJSON or a JSON array, at most `max_bulk_lines` records."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel

from core.errors import ErrorDetail, JourneysError
from core.events import LineRejection
from core.records import ParsedBatch, parse_body

BULK_TYPES = ("application/x-ndjson", "application/json", "application/jsonl", "text/plain", "")


class BulkResult(BaseModel):
    accepted: int
    duplicates: int = 0
    rejected: list[LineRejection]


class PartlyRejected(JourneysError):
    """Some lines were rejected: 422 whose body still reports what was stored (like
    Mixpanel's strict import), so a client that only looks at the status sees the problem."""

    status_code = 422
    code = "invalid_lines"

    def __init__(self, result: BulkResult):
        first = result.rejected[0]
        super().__init__(
            f"{len(result.rejected)} line(s) rejected; the valid ones were stored",
            field=f"line {first.line}" + (f": {first.field}" if first.field else ""),
        )
        self.result = result

    def details(self) -> list[ErrorDetail]:
        return [ErrorDetail(self.code, self.message, self.field)] + [
            ErrorDetail("invalid_line", f"line {r.line}: {r.message}", r.field)
            for r in self.result.rejected[:100]
        ]

    def extra(self) -> dict[str, Any]:
        return self.result.model_dump()


async def read_batch(request: Request, model: type[Any], max_lines: int) -> ParsedBatch[Any]:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in BULK_TYPES:
        raise JourneysError(
            f"send application/x-ndjson or a JSON array, not {content_type}",
            field="content-type",
            code="unsupported_media_type",
        )
    body = await request.body()
    if not body.strip():
        raise JourneysError("the body is empty", field="body", code="empty_body")
    # Parsing a large batch is CPU work: keep it off the event loop.
    return await run_in_threadpool(_parse, body, model, max_lines)


def _parse(body: bytes, model: type[Any], max_lines: int) -> ParsedBatch[Any]:
    batch = parse_body(body, model)
    seen = len(batch.records) + len(batch.rejected)
    if seen > max_lines:
        raise JourneysError(
            f"at most {max_lines} records per request; got {seen}",
            field="body",
            code="too_many_records",
        )
    return batch
