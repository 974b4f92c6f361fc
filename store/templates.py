"""Message templates: shipped files under the repository's `templates/` folder, and
templates added through the API (the `templates` table), which win over a shipped file
of the same path.

A template path is relative, uses `/`, and ends in `.html` (email) or `.txt` (SMS,
by convention `.sms.txt`), e.g. `champions/welcome.html`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import bindparam, text
from sqlalchemy.engine import Connection
from sqlmodel import Session

from core.errors import ErrorDetail, NotFound, ValidationFailed
from core.tables import UTCDateTime, utcnow
from store.references import lock_for_removal, refuse_if_used, share_lock_clause, template_users

SHIPPED_TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "templates"
TEMPLATE_SUFFIXES = (".html", ".txt")
# Journey and campaign definitions shipped beside the templates are not message templates.
NOT_TEMPLATE_FOLDERS = ("journeys/", "personalizations/")

_PATH_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*$")

Store = Session | Connection


@dataclass(frozen=True)
class StoredTemplate:
    path: str
    source: str
    origin: str  # "shipped" | "api"
    updated_at: datetime | None = None


def template_path_problem(path: str) -> str | None:
    """Why `path` is not a valid template path, or None when it is."""
    if not path or len(path) > 300:
        return "a template path is 1 to 300 characters"
    if not _PATH_PATTERN.match(path) or ".." in path.split("/"):
        return "a template path is relative, like champions/welcome.html (letters, digits, _ . -)"
    if not path.endswith(TEMPLATE_SUFFIXES):
        return "a template path ends in .html (email) or .txt (SMS, e.g. winback.sms.txt)"
    if path.startswith(NOT_TEMPLATE_FOLDERS):
        return "templates/journeys/ holds journey definitions, not message templates"
    return None


def channel_of(path: str) -> str:
    """`email` for an .html template, `sms` for a .txt one."""
    return "email" if path.endswith(".html") else "sms"


def _shipped_file(path: str) -> Path | None:
    if template_path_problem(path):
        return None
    candidate = (SHIPPED_TEMPLATES_DIR / path).resolve()
    # The pattern already forbids `..`; this guards against symlinks leaving the folder.
    if SHIPPED_TEMPLATES_DIR not in candidate.parents or not candidate.is_file():
        return None
    return candidate


def _stored_source(session: Store, path: str, *, hold: bool = False) -> str | None:
    # `hold`: the row is about to be referenced; a delete waits for this transaction.
    lock = share_lock_clause(session) if hold else ""
    row = session.execute(
        text(f"SELECT source FROM templates WHERE path = :path{lock}"), {"path": path}
    ).first()
    return None if row is None else row[0]


def template_exists(session: Store, *, path: str) -> bool:
    """True when `path` names a shipped template file or one added through the API."""
    if template_path_problem(path):
        return False
    return _stored_source(session, path, hold=True) is not None or _shipped_file(path) is not None


def load_template(session: Store, *, path: str) -> str:
    """The source of template `path` (an API-added one first, else the shipped file).

    Raises NotFound when neither exists.
    """
    problem = template_path_problem(path)
    if problem:
        raise NotFound(f"template {path!r} not found: {problem}", field="template")
    source = _stored_source(session, path)
    if source is not None:
        return source
    shipped = _shipped_file(path)
    if shipped is None:
        raise NotFound(f"template {path!r} not found", field="template")
    return shipped.read_text(encoding="utf-8")


def get_template(session: Store, *, path: str) -> StoredTemplate:
    """One template with where it comes from; NotFound when it does not exist."""
    row = session.execute(
        text("SELECT path, source, updated_at FROM templates WHERE path = :path").columns(
            updated_at=UTCDateTime()
        ),
        {"path": path},
    ).first()
    if row is not None:
        return StoredTemplate(path=row[0], source=row[1], origin="api", updated_at=row[2])
    return StoredTemplate(path=path, source=load_template(session, path=path), origin="shipped")


def save_template(session: Store, *, path: str, source: str) -> StoredTemplate:
    """Create or replace the API-added template `path` (the caller validates the source)."""
    problem = template_path_problem(path)
    if problem:
        raise ValidationFailed([ErrorDetail("invalid", problem, "path")])
    now = utcnow()
    params = {"path": path, "source": source, "now": now}
    updated = session.execute(
        text(
            "UPDATE templates SET source = :source, updated_at = :now WHERE path = :path"
        ).bindparams(bindparam("now", type_=UTCDateTime())),
        params,
    )
    if updated.rowcount == 0:
        session.execute(
            text(
                "INSERT INTO templates (path, source, created_at, updated_at)"
                " VALUES (:path, :source, :now, :now)"
            ).bindparams(bindparam("now", type_=UTCDateTime())),
            params,
        )
    return StoredTemplate(path=path, source=source, origin="api", updated_at=now)


def list_templates(session: Store) -> list[StoredTemplate]:
    """Every template, shipped and API-added, by path; an API-added one hides a shipped one."""
    found: dict[str, StoredTemplate] = {}
    if SHIPPED_TEMPLATES_DIR.is_dir():
        for file in sorted(SHIPPED_TEMPLATES_DIR.rglob("*")):
            path = file.relative_to(SHIPPED_TEMPLATES_DIR).as_posix()
            if file.is_file() and template_path_problem(path) is None:
                found[path] = StoredTemplate(
                    path=path, source=file.read_text(encoding="utf-8"), origin="shipped"
                )
    rows = session.execute(
        text("SELECT path, source, updated_at FROM templates ORDER BY path").columns(
            updated_at=UTCDateTime()
        )
    ).all()
    for path, source, updated_at in rows:
        found[path] = StoredTemplate(path=path, source=source, origin="api", updated_at=updated_at)
    return [found[path] for path in sorted(found)]


def delete_template(session: Store, *, path: str) -> None:
    """Delete the API-added template `path`; shipped files cannot be deleted (NotFound).

    Conflict `in_use` naming every journey step that uses it (`store.references`), unless
    a shipped file of the same path takes its place.
    """
    if _shipped_file(path) is None and _stored_source(session, path) is not None:
        lock_for_removal(session, table="templates", column="path", keys=[path])
        refuse_if_used(template_users(session, path=path), field="path")
    deleted = session.execute(text("DELETE FROM templates WHERE path = :path"), {"path": path})
    if deleted.rowcount == 0:
        raise NotFound(
            f"no API-added template {path!r} (shipped templates cannot be deleted)", field="path"
        )
