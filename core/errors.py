"""Domain errors: each carries its HTTP status, a code and the field it names."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class ErrorDetail:
    code: str
    message: str
    field: str | None = None

    def as_dict(self) -> dict[str, str | None]:
        return {"code": self.code, "message": self.message, "field": self.field}


class JourneysError(Exception):
    """Base of every error the API turns into a 4xx body."""

    status_code = 400
    code = "bad_request"

    def __init__(self, message: str, *, field: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        if code:
            self.code = code

    def details(self) -> list[ErrorDetail]:
        return [ErrorDetail(self.code, self.message, self.field)]

    def extra(self) -> dict[str, object]:
        """Members the error body carries beside `error` (e.g. a bulk result)."""
        return {}


class ValidationFailed(JourneysError):
    status_code = 422
    code = "invalid"

    def __init__(self, errors: list[ErrorDetail]):
        first = errors[0] if errors else ErrorDetail("invalid", "invalid input")
        super().__init__(first.message, field=first.field, code=first.code)
        self.errors = errors or [first]

    def details(self) -> list[ErrorDetail]:
        return self.errors


class NotFound(JourneysError):
    status_code = 404
    code = "not_found"


class Conflict(JourneysError):
    """409. `errors` carries every conflict when there are several (as ValidationFailed
    does); `message`, `field` and `code` are then the first one's."""

    status_code = 409
    code = "conflict"

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        code: str | None = None,
        errors: Sequence[ErrorDetail] = (),
    ):
        super().__init__(message, field=field, code=code)
        self.errors = list(errors)

    def details(self) -> list[ErrorDetail]:
        return self.errors or super().details()


class Unauthorized(JourneysError):
    status_code = 401
    code = "unauthorized"


class Forbidden(JourneysError):
    status_code = 403
    code = "forbidden"
