"""SMS through Twilio's Messages API with the official client (`Client.messages.create`).

The API host comes from `Settings.twilio_base_url` (set on the client's `api` domain),
so tests point the real client at a stub server. The idempotency key travels as a
parameter of the status-callback URL, which Twilio calls back with the message status;
that is how an in-doubt send is resolved.
"""

from __future__ import annotations

from urllib.parse import urlencode

import requests
from twilio.base import values
from twilio.base.exceptions import TwilioRestException
from twilio.http.http_client import TwilioHttpClient
from twilio.rest import Client
from urllib3.exceptions import NewConnectionError

from core.settings import Settings
from providers.outgoing import (
    OutgoingSms,
    ProviderAccepted,
    ProviderOutcomeUnknown,
    ProviderRefused,
    refusal_for_status,
)

TWILIO = "twilio"
STATUS_CALLBACK_PATH = "/webhooks/twilio/status"


def status_callback_url(public_url: str, idempotency_key: str) -> str:
    """The status-callback URL carrying the send's idempotency key."""
    return f"{public_url.rstrip('/')}{STATUS_CALLBACK_PATH}?{urlencode({'key': idempotency_key})}"


class TwilioSmsProvider:
    """Sends one SMS per call; raises ProviderRefused / ProviderOutcomeUnknown."""

    name = TWILIO

    def __init__(self, settings: Settings):
        self.account_sid = settings.twilio_account_sid
        self.auth_token = settings.twilio_auth_token
        self.base_url = settings.twilio_base_url.rstrip("/")
        self.timeout = settings.provider_timeout_seconds

    def _client(self) -> Client:
        client = Client(
            self.account_sid,
            self.auth_token,
            http_client=TwilioHttpClient(timeout=self.timeout),
        )
        # The Api domain builds every Messages URL from its base_url.
        client.api.base_url = self.base_url
        return client

    def send_sms(self, sms: OutgoingSms) -> ProviderAccepted:
        try:
            message = self._client().messages.create(
                to=sms.to,
                from_=sms.from_number,
                body=sms.body,
                status_callback=sms.status_callback or values.unset,
            )
        except TwilioRestException as exc:
            raise refusal_for_status(TWILIO, int(exc.status), exc.msg or str(exc)) from exc
        except requests.exceptions.ConnectTimeout as exc:
            raise ProviderRefused(f"twilio unreachable: {exc}", retryable=True) from exc
        except requests.exceptions.Timeout as exc:
            raise ProviderOutcomeUnknown(f"twilio did not answer in {self.timeout}s") from exc
        except requests.exceptions.ConnectionError as exc:
            if _never_connected(exc):
                raise ProviderRefused(f"twilio unreachable: {exc}", retryable=True) from exc
            raise ProviderOutcomeUnknown(f"twilio connection failed mid-request: {exc}") from exc
        return ProviderAccepted(provider=TWILIO, provider_message_id=message.sid)


def _never_connected(exc: requests.exceptions.ConnectionError) -> bool:
    """True when no connection was made, so the request cannot have reached Twilio."""
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    return isinstance(reason, NewConnectionError)
