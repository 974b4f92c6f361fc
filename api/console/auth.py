"""Signing in to the console: an API key in, a signed session cookie out; CSRF tokens.

The key is checked against the same hashed-key store as the API (`store.keys`) and the
console takes the key's role: `admin` and `marketer` change things, `support` only reads;
`ingest` and `web` keys are refused. The cookie holds the key's id (never its secret) and
a random CSRF token, signed with `JOURNEYS_SECRET_KEY` (itsdangerous) and good for twelve
hours; it is HttpOnly, SameSite=Strict, Secure when the console is served over HTTPS,
and its key is checked again at most every `JOURNEYS_KEY_CACHE_SECONDS`, so revoking a
key signs its sessions out as the API forgets it. Every form carries the session's token
(htmx sends it as `X-CSRF-Token`); a POST without it, or with another, is refused 403.
The sign-in form, before any session, is guarded by a double-submit cookie.
"""

from __future__ import annotations

import hmac
import secrets
import time
from dataclasses import dataclass

from fastapi import Request, Response
from itsdangerous import BadSignature, URLSafeTimedSerializer
from sqlmodel import Session

from core.errors import Forbidden, JourneysError
from store.keys import VerifiedKey, verify_key, verify_key_id

SESSION_COOKIE = "journeys_console"
SIGN_IN_COOKIE = "journeys_console_sign_in"
SESSION_SECONDS = 12 * 3600
CONSOLE_ROLES = ("admin", "marketer", "support")
EDITING_ROLES = ("admin", "marketer")
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"


@dataclass(frozen=True)
class ConsoleUser:
    key_id: str
    role: str
    name: str
    csrf: str

    @property
    def can_edit(self) -> bool:
        return self.role in EDITING_ROLES


class NotSignedIn(JourneysError):
    status_code = 401
    code = "unauthorized"


class CsrfRefused(Forbidden):
    code = "csrf"


def _serializer(request: Request) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(
        request.app.state.settings.secret_key, salt="journeys-console-session"
    )


def _secure(request: Request) -> bool:
    settings = request.app.state.settings
    return request.url.scheme == "https" or settings.public_url.startswith("https://")


def _cookie_path(request: Request) -> str:
    return request.scope.get("root_path") or "/"


class KeyIdCache:
    """Live keys by id for a few seconds, as the API's `KeyCache` holds them by hash."""

    def __init__(self, ttl_seconds: float):
        self.ttl = ttl_seconds
        self._entries: dict[str, tuple[float, VerifiedKey | None]] = {}

    def get(self, key_id: str) -> tuple[bool, VerifiedKey | None]:
        hit = self._entries.get(key_id)
        if hit and hit[0] > time.monotonic():
            return True, hit[1]
        return False, None

    def put(self, key_id: str, key: VerifiedKey | None) -> None:
        if len(self._entries) > 10_000:
            self._entries.clear()
        self._entries[key_id] = (time.monotonic() + self.ttl, key)


def _live_key(request: Request, key_id: str) -> VerifiedKey | None:
    cache: KeyIdCache = request.app.state.console.keys
    known, key = cache.get(key_id)
    if not known:
        with Session(request.app.state.engine) as session:
            key = verify_key_id(session, key_id=key_id)
        cache.put(key_id, key)
    return key


def signed_in_user(request: Request) -> ConsoleUser | None:
    """The session's user, or None (no cookie, a forged or expired one, a revoked key,
    or a key whose role may no longer use the console)."""
    raw = request.cookies.get(SESSION_COOKIE)
    if not raw:
        return None
    try:
        data = _serializer(request).loads(raw, max_age=SESSION_SECONDS)
    except BadSignature:
        return None
    if not isinstance(data, dict):
        return None
    key_id, csrf = data.get("k"), data.get("c")
    if not isinstance(key_id, str) or not isinstance(csrf, str):
        return None
    key = _live_key(request, key_id)
    if key is None or key.role not in CONSOLE_ROLES:
        return None
    return ConsoleUser(key_id=key.id, role=key.role, name=key.name, csrf=csrf)


def require_user(request: Request) -> ConsoleUser:
    user = signed_in_user(request)
    if user is None:
        raise NotSignedIn("sign in with an API key", field="session")
    return user


def require_editor(user: ConsoleUser) -> None:
    if not user.can_edit:
        raise Forbidden(
            f"role {user.role!r} may look but not change; needs one of {sorted(EDITING_ROLES)}",
            field="session",
        )


def check_csrf(request: Request, user: ConsoleUser, form: dict[str, str]) -> None:
    """403 unless the form (or the X-CSRF-Token header) carries the session's token."""
    given = form.get(CSRF_FIELD) or request.headers.get(CSRF_HEADER) or ""
    if not hmac.compare_digest(given.encode(), user.csrf.encode()):
        raise CsrfRefused("missing or wrong CSRF token: reload the page", field=CSRF_FIELD)


def verify_sign_in_key(request: Request, secret: str) -> VerifiedKey | None:
    with Session(request.app.state.engine) as session:
        return verify_key(session, secret=secret.strip())


def start_session(request: Request, response: Response, key: VerifiedKey) -> None:
    token = _serializer(request).dumps({"k": key.id, "c": secrets.token_urlsafe(32)})
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=SESSION_SECONDS,
        path=_cookie_path(request),
        secure=_secure(request),
        httponly=True,
        samesite="strict",
    )
    response.delete_cookie(SIGN_IN_COOKIE, path=_cookie_path(request))


def end_session(request: Request, response: Response) -> None:
    response.delete_cookie(
        SESSION_COOKIE,
        path=_cookie_path(request),
        secure=_secure(request),
        httponly=True,
        samesite="strict",
    )


def sign_in_token(request: Request) -> str:
    """The sign-in form's token: the browser's current one while it is set, else new."""
    token = request.cookies.get(SIGN_IN_COOKIE) or ""
    return token if len(token) >= 32 else secrets.token_urlsafe(32)


def set_sign_in_cookie(request: Request, response: Response, token: str) -> None:
    """The token as a cookie too: the form's copy must match it (double submit)."""
    response.set_cookie(
        SIGN_IN_COOKIE,
        token,
        max_age=3600,
        path=_cookie_path(request),
        secure=_secure(request),
        httponly=True,
        samesite="strict",
    )


def check_sign_in_token(request: Request, form: dict[str, str]) -> None:
    cookie = request.cookies.get(SIGN_IN_COOKIE) or ""
    given = form.get(CSRF_FIELD) or ""
    if not cookie or not hmac.compare_digest(given.encode(), cookie.encode()):
        raise CsrfRefused("missing or wrong CSRF token: reload the sign-in page", field=CSRF_FIELD)
