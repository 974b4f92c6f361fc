"""What every provider adapter takes and returns, and how it reports a refusal."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class OutgoingEmail:
    to: str
    from_email: str
    subject: str
    html: str
    text: str
    idempotency_key: str
    headers: dict[str, str] = field(default_factory=dict)
    # Sent as SendGrid custom_args: they come back on every event webhook.
    custom_args: dict[str, str] = field(default_factory=dict)
    categories: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class OutgoingSms:
    to: str
    from_number: str
    body: str
    idempotency_key: str
    status_callback: str | None = None


@dataclass(frozen=True)
class ProviderAccepted:
    """The provider took the message; `provider_message_id` is its id for it."""

    provider: str
    provider_message_id: str | None


class ProviderRefused(Exception):
    """The provider answered and did not take the message.

    `retryable` for 5xx, 429 and connection failures before the request was sent (the
    message was certainly not taken, so sending again is safe); otherwise permanent.
    """

    def __init__(self, message: str, *, retryable: bool, status: int | None = None):
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.status = status


class ProviderOutcomeUnknown(Exception):
    """The request may have reached the provider but no answer came back (a timeout)."""


def refusal_for_status(provider: str, status: int, detail: str) -> ProviderRefused:
    """Classify an HTTP error answer: 5xx and 429 retryable, any other 4xx permanent."""
    retryable = status >= 500 or status in (408, 429)
    return ProviderRefused(
        f"{provider} answered {status}: {detail[:500]}", retryable=retryable, status=status
    )
