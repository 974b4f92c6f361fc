"""What an unavailable database looks like from outside: the API answers 503 with
Retry-After (never 500), and the long-running activities try the step again. The end to
end form, with PostgreSQL connections really cut, is in test_faults.py."""

from __future__ import annotations

import sqlite3

import psycopg
import pytest
from sqlalchemy import exc as sa_exc

from activities.outages import riding_out_outages
from core.db import database_unavailable
from tests.utils.api import api_harness

CUT = sa_exc.OperationalError(
    "SELECT 1", {}, psycopg.errors.AdminShutdown("terminating connection")
)


@pytest.mark.parametrize(
    ("error", "unavailable"),
    [
        (CUT, True),
        (sa_exc.InterfaceError("SELECT 1", {}, psycopg.InterfaceError("closed")), True),
        (sa_exc.TimeoutError("QueuePool limit reached"), True),
        (psycopg.OperationalError("the connection is lost"), True),
        (sqlite3.OperationalError("database is locked"), True),
        (sa_exc.IntegrityError("INSERT", {}, psycopg.errors.UniqueViolation("dup")), False),
        (sa_exc.ProgrammingError("SELECT", {}, psycopg.errors.SyntaxError("bad")), False),
        (ValueError("not the database"), False),
    ],
)
def test_which_errors_mean_the_database_is_away(error: Exception, unavailable: bool) -> None:
    assert database_unavailable(error) is unavailable


def _raising(error: Exception):  # noqa: ANN202
    def route() -> None:
        raise error

    return route


def test_the_api_answers_503_with_retry_after_while_the_database_is_away(sqlite_engine) -> None:
    with api_harness(sqlite_engine) as api:
        api.client.app.add_api_route("/test/cut", _raising(CUT))
        api.client.app.add_api_route(
            "/test/bug",
            _raising(sa_exc.IntegrityError("INSERT", {}, sqlite3.IntegrityError("dup"))),
        )
        cut = api.get("/test/cut")
        bug = api.get("/test/bug")
    assert cut.status_code == 503
    assert cut.headers["retry-after"] == "1"
    assert cut.json()["error"]["code"] == "database_unavailable"
    # A statement the database refused is a bug: a 500, as before.
    assert bug.status_code == 500
    assert bug.json()["error"]["code"] == "internal"


async def test_a_step_is_tried_again_while_the_database_is_away() -> None:
    attempts = []

    async def step() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise CUT
        return "done"

    assert await riding_out_outages(step, "test") == "done"
    assert len(attempts) == 3


async def test_any_other_error_of_a_step_is_raised_at_once() -> None:
    attempts = []

    async def step() -> None:
        attempts.append(1)
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        await riding_out_outages(step, "test")
    assert len(attempts) == 1
