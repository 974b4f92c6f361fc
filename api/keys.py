"""API keys (admin only): the secret is shown once, at creation."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field

from api.boundary import resource_router
from api.deps import AdminKey, SessionDep
from store.keys import create_key, list_keys, revoke_key

router = resource_router(prefix="/v1/keys", tags=["keys"])

Role = Literal["admin", "marketer", "ingest", "support", "web"]


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Role
    name: str = Field(min_length=1, max_length=255)


class KeyPublic(BaseModel):
    id: str
    name: str
    role: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None = None


class KeyCreated(KeyPublic):
    key: str = Field(description="The secret; shown only in this response.")


class KeysPublic(BaseModel):
    data: list[KeyPublic]


@router.post("", response_model=KeyCreated, status_code=201)
def post_key(body: KeyCreate, session: SessionDep, _: AdminKey) -> KeyCreated:
    row, secret = create_key(session, role=body.role, name=body.name)
    return KeyCreated(**row.model_dump(), key=secret)


@router.get("", response_model=KeysPublic)
def get_keys(session: SessionDep, _: AdminKey) -> KeysPublic:
    return KeysPublic(data=[KeyPublic(**row.model_dump()) for row in list_keys(session)])


@router.delete("/{key_id}", response_model=KeyPublic)
def delete_key(key_id: str, request: Request, session: SessionDep, _: AdminKey) -> KeyPublic:
    """Revoke a key: this process forgets it at once, others within the key cache's lifetime."""
    row = revoke_key(session, key_id=key_id)
    request.app.state.key_cache.forget(key_id)
    return KeyPublic(**row.model_dump())
