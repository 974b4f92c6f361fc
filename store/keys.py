"""API keys: stored as SHA-256 of the secret (keys are 256-bit random, so a slow hash
buys nothing), shown once at creation."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from core.errors import NotFound
from core.tables import ApiKey, utcnow

ROLES = ("admin", "marketer", "ingest", "support", "web")
"""`web` keys live in storefront pages: they may ask for personalisation decisions,
report views and post single events, nothing else."""


@dataclass(frozen=True)
class VerifiedKey:
    id: str
    role: str
    name: str


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_key(
    session: Session, *, role: str, name: str, secret: str | None = None
) -> tuple[ApiKey, str]:
    """Create a key; returns the row and the secret, which is never stored."""
    secret = secret or f"jk_{role}_{secrets.token_urlsafe(32)}"
    row = ApiKey(
        id=f"key_{secrets.token_hex(8)}",
        name=name,
        role=role,
        key_hash=hash_key(secret),
        prefix=secret[:12],
    )
    session.add(row)
    session.flush()
    return row, secret


def ensure_key(session: Session, *, secret: str, role: str, name: str) -> ApiKey:
    """Make `secret` a live key with `role` (the bootstrap admin key)."""
    row = session.exec(select(ApiKey).where(ApiKey.key_hash == hash_key(secret))).first()
    if row is None:
        row, _ = create_key(session, role=role, name=name, secret=secret)
    elif row.revoked_at is not None or row.role != role:
        row.revoked_at = None
        row.role = role
        session.add(row)
    return row


def ensure_bootstrap_key(engine: Engine, *, secret: str) -> None:
    """The admin key of JOURNEYS_BOOTSTRAP_ADMIN_KEY, live, whatever the API processes
    starting at the same moment do (`journeys api --workers N` starts N at once)."""
    for attempt in range(2):
        try:
            with Session(engine) as session:
                ensure_key(session, secret=secret, role="admin", name="bootstrap")
                session.commit()
            return
        except IntegrityError:
            if attempt:  # the other process's row is there now: a second failure is real
                raise


def verify_key(session: Session, *, secret: str) -> VerifiedKey | None:
    row = session.exec(
        select(ApiKey).where(ApiKey.key_hash == hash_key(secret), ApiKey.revoked_at.is_(None))  # type: ignore[union-attr]
    ).first()
    return VerifiedKey(row.id, row.role, row.name) if row else None


def verify_key_id(session: Session, *, key_id: str) -> VerifiedKey | None:
    """The live (not revoked) key with this id: a console session names its key by id."""
    row = session.exec(
        select(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))  # type: ignore[union-attr]
    ).first()
    return VerifiedKey(row.id, row.role, row.name) if row else None


def list_keys(session: Session) -> list[ApiKey]:
    return list(session.exec(select(ApiKey).order_by(ApiKey.created_at)))  # type: ignore[arg-type]


def revoke_key(session: Session, *, key_id: str, now: datetime | None = None) -> ApiKey:
    row = session.get(ApiKey, key_id)
    if row is None:
        raise NotFound(f"no key {key_id}", field="id")
    if row.revoked_at is None:
        row.revoked_at = now or utcnow()
        session.add(row)
    return row
