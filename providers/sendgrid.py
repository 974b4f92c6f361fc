"""Email through SendGrid's v3 API with the official client (`SendGridAPIClient`).

The host comes from `Settings.sendgrid_base_url`, so tests point the real client at a
stub server. The idempotency key travels in `custom_args`, which SendGrid returns on
every event webhook; that is how an in-doubt send is resolved.
"""

from __future__ import annotations

import socket
from typing import Any
from urllib.error import URLError

from python_http_client.exceptions import HTTPError
from sendgrid import SendGridAPIClient

from core.settings import Settings
from providers.outgoing import (
    OutgoingEmail,
    ProviderAccepted,
    ProviderOutcomeUnknown,
    ProviderRefused,
    refusal_for_status,
)

SENDGRID = "sendgrid"


def mail_body(email: OutgoingEmail) -> dict[str, Any]:
    """The v3 `mail/send` request body for one email."""
    body: dict[str, Any] = {
        "personalizations": [{"to": [{"email": email.to}]}],
        "from": {"email": email.from_email},
        "subject": email.subject,
        "content": [
            {"type": "text/plain", "value": email.text},
            {"type": "text/html", "value": email.html},
        ],
        "custom_args": {"idempotency_key": email.idempotency_key, **email.custom_args},
        # Links are already tracked by us; SendGrid's rewriting would hide our tokens.
        "tracking_settings": {"click_tracking": {"enable": False, "enable_text": False}},
    }
    if email.headers:
        body["headers"] = dict(email.headers)
    if email.categories:
        body["categories"] = list(email.categories)[:10]
    return body


class SendGridEmailProvider:
    """Sends one email per call; raises ProviderRefused / ProviderOutcomeUnknown."""

    name = SENDGRID

    def __init__(self, settings: Settings):
        self.api_key = settings.sendgrid_api_key
        self.host = settings.sendgrid_base_url.rstrip("/")
        self.timeout = settings.provider_timeout_seconds

    def _client(self) -> SendGridAPIClient:
        client = SendGridAPIClient(api_key=self.api_key, host=self.host)
        client.client.timeout = self.timeout
        return client

    def send_email(self, email: OutgoingEmail) -> ProviderAccepted:
        try:
            response = self._client().client.mail.send.post(request_body=mail_body(email))
        except HTTPError as exc:
            detail = (
                exc.body.decode("utf-8", "replace")
                if isinstance(exc.body, bytes)
                else str(exc.body)
            )
            raise refusal_for_status(SENDGRID, int(exc.status_code), detail) from exc
        except TimeoutError as exc:
            raise ProviderOutcomeUnknown(f"sendgrid did not answer in {self.timeout}s") from exc
        except URLError as exc:
            if isinstance(exc.reason, (TimeoutError, socket.timeout)):
                raise ProviderOutcomeUnknown(f"sendgrid did not answer in {self.timeout}s") from exc
            # No connection was made (refused, DNS): the request never left.
            raise ProviderRefused(f"sendgrid unreachable: {exc.reason}", retryable=True) from exc
        except (ConnectionError, OSError) as exc:
            raise ProviderOutcomeUnknown(f"sendgrid connection failed mid-request: {exc}") from exc
        message_id = response.headers.get("X-Message-Id") if response.headers else None
        return ProviderAccepted(provider=SENDGRID, provider_message_id=message_id)
