"""Signed tokens for tracked links (`/t/{token}`), open pixels (`/o/{token}`) and
unsubscribe links (`/u/{token}`).

Tokens are signed with `Settings.secret_key` (itsdangerous, HMAC-SHA1 over a salted
key derivation, one salt per purpose): a token altered by one character, or made for one
purpose and used for another, does not verify. They carry ids, not secrets, and do not
expire, because an email may be opened months later.
"""

from __future__ import annotations

from itsdangerous import BadSignature, URLSafeSerializer
from pydantic import BaseModel, ValidationError

_LINK_SALT = "journeys.tracked-link"
_OPEN_SALT = "journeys.open-pixel"
_UNSUBSCRIBE_SALT = "journeys.unsubscribe"


class InvalidToken(Exception):
    """The token was not made by us with this secret, or was altered."""


class TrackedLink(BaseModel):
    """What a tracked link click tells: which run, step and message, and where to go."""

    workflow_id: str
    run_id: str
    step: str
    message_id: int
    url: str


class MessageOpen(BaseModel):
    workflow_id: str
    run_id: str
    step: str
    message_id: int


class Unsubscribe(BaseModel):
    customer_id: str
    channel: str
    message_id: int | None = None


def _serializer(secret_key: str, salt: str) -> URLSafeSerializer:
    return URLSafeSerializer(secret_key, salt=salt)


def _dump(secret_key: str, salt: str, payload: list[object]) -> str:
    return _serializer(secret_key, salt).dumps(payload)


def _load(secret_key: str, salt: str, token: str) -> list[object]:
    try:
        payload = _serializer(secret_key, salt).loads(token)
    except BadSignature as exc:
        raise InvalidToken("token signature does not match") from exc
    if not isinstance(payload, list):
        raise InvalidToken("token payload has the wrong shape")
    return payload


# A compact list rather than a dict keeps links short.
def make_link_token(secret_key: str, link: TrackedLink) -> str:
    """A signed token for a tracked link."""
    return _dump(
        secret_key,
        _LINK_SALT,
        [link.workflow_id, link.run_id, link.step, link.message_id, link.url],
    )


def read_link_token(secret_key: str, token: str) -> TrackedLink:
    """The link a token carries; raises InvalidToken when forged or altered."""
    payload = _load(secret_key, _LINK_SALT, token)
    try:
        workflow_id, run_id, step, message_id, url = payload
        return TrackedLink(
            workflow_id=workflow_id, run_id=run_id, step=step, message_id=message_id, url=url
        )
    except (ValueError, ValidationError) as exc:
        raise InvalidToken("token payload has the wrong shape") from exc


def make_open_token(secret_key: str, opened: MessageOpen) -> str:
    return _dump(
        secret_key,
        _OPEN_SALT,
        [opened.workflow_id, opened.run_id, opened.step, opened.message_id],
    )


def read_open_token(secret_key: str, token: str) -> MessageOpen:
    """The message an open pixel belongs to; raises InvalidToken when forged or altered."""
    payload = _load(secret_key, _OPEN_SALT, token)
    try:
        workflow_id, run_id, step, message_id = payload
        return MessageOpen(workflow_id=workflow_id, run_id=run_id, step=step, message_id=message_id)
    except (ValueError, ValidationError) as exc:
        raise InvalidToken("token payload has the wrong shape") from exc


def make_unsubscribe_token(secret_key: str, unsubscribe: Unsubscribe) -> str:
    """A signed token for a one-click unsubscribe link."""
    return _dump(
        secret_key,
        _UNSUBSCRIBE_SALT,
        [unsubscribe.customer_id, unsubscribe.channel, unsubscribe.message_id],
    )


def read_unsubscribe_token(secret_key: str, token: str) -> Unsubscribe:
    """Who unsubscribes from which channel; raises InvalidToken when forged or altered."""
    payload = _load(secret_key, _UNSUBSCRIBE_SALT, token)
    try:
        customer_id, channel, message_id = payload
        return Unsubscribe(customer_id=customer_id, channel=channel, message_id=message_id)
    except (ValueError, ValidationError) as exc:
        raise InvalidToken("token payload has the wrong shape") from exc
