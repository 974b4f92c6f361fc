"""The local outbox: with no provider configured, a message is only stored (provider
`outbox`, status sent) and shown by `GET /v1/outbox`."""

from __future__ import annotations

from providers.outgoing import OutgoingEmail, OutgoingSms, ProviderAccepted

OUTBOX = "outbox"


class OutboxProvider:
    """Accepts everything; the message row itself is the outbox."""

    name = OUTBOX

    def send_email(self, email: OutgoingEmail) -> ProviderAccepted:
        return ProviderAccepted(
            provider=OUTBOX, provider_message_id=f"outbox:{email.idempotency_key}"
        )

    def send_sms(self, sms: OutgoingSms) -> ProviderAccepted:
        return ProviderAccepted(
            provider=OUTBOX, provider_message_id=f"outbox:{sms.idempotency_key}"
        )
