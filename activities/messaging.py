"""The `send_message` activity: render a template, send one email or SMS exactly once,
record it, and write the run's timeline line, in one activity per send.

Exactly once, or in doubt, never silently twice: the send is committed as `sending`
under its idempotency key before the provider call and as `sent` after it. A retry that
finds `sent` returns the stored result; one that finds `sending` does not know whether
the provider took the message, so it follows the journey's in-doubt policy (`skip`:
record `in_doubt`, the provider's webhook resolves it; `resend`: send again).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from sqlalchemy.engine import Engine
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.heartbeats import heartbeating, uninterrupted
from activities.send_policy import frequency_cap_release, quiet_hours_end
from core.db import sqlite_writer_role
from core.errors import NotFound
from core.journeys import FrequencyCap
from core.messages import SEND_MESSAGE_ACTIVITY, SendMessageInput, SendMessageResult
from core.rendering import (
    TemplateProblem,
    customer_context,
    is_email_template,
    render_email,
    render_sms,
    template_context,
)
from core.settings import Settings
from core.tokens import (
    MessageOpen,
    TrackedLink,
    Unsubscribe,
    make_link_token,
    make_open_token,
    make_unsubscribe_token,
)
from providers.outbox import OutboxProvider
from providers.outgoing import (
    OutgoingEmail,
    OutgoingSms,
    ProviderAccepted,
    ProviderOutcomeUnknown,
    ProviderRefused,
)
from providers.sendgrid import SendGridEmailProvider
from providers.twilio import TwilioSmsProvider, status_callback_url
from store import messages as message_store
from store import runs as run_store
from store.templates import load_template
from store.writer import group_writer


class EmailProvider(Protocol):
    name: str

    def send_email(self, email: OutgoingEmail) -> ProviderAccepted: ...


class SmsProvider(Protocol):
    name: str

    def send_sms(self, sms: OutgoingSms) -> ProviderAccepted: ...


def email_provider_for(settings: Settings) -> EmailProvider:
    """SendGrid when an API key is configured, else the local outbox."""
    return SendGridEmailProvider(settings) if settings.email_enabled else OutboxProvider()


def sms_provider_for(settings: Settings) -> SmsProvider:
    """Twilio when an account and token are configured, else the local outbox."""
    return TwilioSmsProvider(settings) if settings.sms_enabled else OutboxProvider()


def journey_step_of(step_id: str) -> str:
    """The definition's step id of a send key (`welcome#2`, a second visit, -> `welcome`)."""
    return step_id.partition("#")[0]


def mask_address(address: str) -> str:
    """`a***@example.com` / `+1***4567`: enough for support to recognise, not to copy."""
    if "@" in address:
        local, _, domain = address.partition("@")
        return f"{local[:1]}***@{domain}"
    return f"{address[:2]}***{address[-4:]}" if len(address) > 6 else "***"


@dataclass(frozen=True)
class PreparedSend:
    """A claimed send with its content, ready for the provider."""

    message_id: int
    to: str
    subject: str | None
    email: OutgoingEmail | None = None
    sms: OutgoingSms | None = None


class MessagingActivities:
    """The messaging activity, bound to one store, the settings and the providers."""

    def __init__(
        self,
        *,
        engine: Engine,
        settings: Settings,
        email_provider: EmailProvider | None = None,
        sms_provider: SmsProvider | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.email_provider = email_provider or email_provider_for(settings)
        self.sms_provider = sms_provider or sms_provider_for(settings)
        self.clock = clock or (lambda: datetime.now(UTC))
        # Every write of a send goes through the process's one writer (store/writer.py).
        self.writer = group_writer(engine)

    def all(self) -> list[Callable[..., Any]]:
        return [self.send_message]

    @activity.defn(name=SEND_MESSAGE_ACTIVITY)
    def send_message(self, send: SendMessageInput) -> SendMessageResult:
        """Send the step's message at most once (see the module docstring).

        Returns sent / skipped / failed / in_doubt / deferred. A provider that refused
        with 5xx / 429 or did not answer raises a retryable ApplicationError so Temporal
        retries with backoff; a permanent refusal is recorded and returned as failed.
        Heartbeats while it runs, so an attempt whose worker died is retried within the
        heartbeat timeout the journey gives it; a cancellation that a heartbeat brings
        waits until the send is recorded.
        """
        role = sqlite_writer_role.set("send")
        try:
            with heartbeating(), uninterrupted():
                return SendOnce(self, send).run()
        finally:
            sqlite_writer_role.reset(role)


class SendOnce:
    """One attempt of one send."""

    def __init__(self, owner: MessagingActivities, send: SendMessageInput) -> None:
        self.owner = owner
        self.settings = owner.settings
        self.send = send
        # The workflow's clock wins when it is ahead (the time-skipping test server), so
        # quiet hours, caps and the times recorded for them agree with the workflow's timers.
        self.now = self._clock()
        self.decide_at = self.now
        self.provider_name = (
            owner.email_provider.name if send.channel == "email" else owner.sms_provider.name
        )

    def _clock(self) -> datetime:
        now = self.owner.clock()
        scheduled = self.send.scheduled_at
        return max(now, scheduled) if scheduled is not None else now

    # --- the flow ---------------------------------------------------------------------

    def run(self) -> SendMessageResult:
        prepared = self.owner.writer.run(self._before_provider)
        if isinstance(prepared, SendMessageResult):
            return prepared
        return self._call_provider(prepared)

    def _before_provider(self, session: Any) -> PreparedSend | SendMessageResult:
        """Decide, claim and render in one transaction, committed before the provider call."""
        progress = self.send.progress
        if progress is not None:
            # The run's bookkeeping since its last write, in this send's transaction:
            # insert-if-absent lines and a position that a retry writes again unchanged.
            run_store.record_progress(
                session, run=progress.run, lines=progress.lines, position=progress.position
            )
        existing = message_store.find_message(session, idempotency_key=self.send.idempotency_key)
        if existing is not None:
            earlier = self._after_earlier_attempt(session, existing)
            if earlier is not None:
                return earlier
        decided = self._decide_before_send(session)
        if decided is not None:
            return decided
        return self._claim_and_render(session, existing)

    def _after_earlier_attempt(
        self, session: Any, existing: message_store.MessageRecord
    ) -> SendMessageResult | None:
        """The result of an earlier attempt under this key, or None to (re)send."""
        status = existing.status
        if status in message_store.PROVIDER_TOOK_IT:
            return SendMessageResult(
                status="sent", message_id=existing.id, subject=existing.subject, reason=None
            )
        if status in ("failed", "skipped"):
            return SendMessageResult(
                status=status,
                message_id=existing.id,
                subject=existing.subject,
                reason=existing.error,
            )
        if status == "retrying":
            return None
        # `sending` (an attempt died or timed out after the request) or `in_doubt`.
        if self.send.in_doubt_policy == "resend":
            return None
        reason = (
            "Outcome unknown: an earlier attempt reached the provider but did not record"
            " its answer (worker stopped or provider timed out); not resent under the"
            " journey's in-doubt policy 'skip'. The provider's webhook will confirm it."
        )
        if status == "sending":
            message_store.mark_send_status(
                session,
                message_id=existing.id,
                status="in_doubt",
                error=existing.error or reason,
                now=self.now,
            )
        self._timeline(session, "in_doubt", reason, existing.id, existing.subject)
        return SendMessageResult(
            status="in_doubt", message_id=existing.id, subject=existing.subject, reason=reason
        )

    def _decide_before_send(self, session: Any) -> SendMessageResult | None:
        """Skip (no customer, no address, unsubscribed, suppressed, capped) or defer."""
        send = self.send
        customer = message_store.customer_for_send(session, customer_id=send.customer_id)
        if customer is None:
            return self._skip(
                session, None, f"Not sent: customer {send.customer_id} does not exist."
            )
        self.customer = customer
        address = customer.email if send.channel == "email" else customer.phone
        self.address = address
        if not address:
            what = "email address" if send.channel == "email" else "phone number"
            return self._skip(session, None, f"Not sent: the customer has no {what}.")
        unsubscribed_at = (
            customer.email_unsubscribed_at
            if send.channel == "email"
            else customer.sms_unsubscribed_at
        )
        if unsubscribed_at is not None:
            return self._skip(
                session,
                address,
                f"Not sent: the customer unsubscribed from {send.channel} on"
                f" {unsubscribed_at:%Y-%m-%d %H:%M} UTC.",
            )
        suppressed = message_store.suppression_reason(session, address=address)
        if suppressed is not None:
            return self._skip(
                session,
                address,
                f"Not sent: {mask_address(address)} is suppressed ({_SUPPRESSION_WORDS.get(suppressed, suppressed)}).",
            )
        if send.quiet_hours is not None:
            until = quiet_hours_end(self.decide_at, send.quiet_hours, customer.attributes)
            if until is not None:
                reason = (
                    f"Waiting: quiet hours {send.quiet_hours.start}-{send.quiet_hours.end} in the"
                    f" customer's time zone; sending after {until:%Y-%m-%d %H:%M} UTC."
                )
                return self._defer(session, until, reason)
        return self._check_frequency_cap(session)

    def _check_frequency_cap(self, session: Any) -> SendMessageResult | None:
        cap = self.send.frequency_cap
        if cap is None and self.settings.frequency_cap_max > 0:
            cap = FrequencyCap(
                max_messages=self.settings.frequency_cap_max,
                per=self.settings.frequency_cap_period,
                action="skip" if self.settings.frequency_cap_action == "skip" else "defer",
            )
        if cap is None:
            return None
        sent_times = message_store.counted_send_times(
            session,
            customer_id=self.send.customer_id,
            channel=self.send.channel,
            since=self.decide_at - cap.per,
            exclude_key=self.send.idempotency_key,
        )
        release = frequency_cap_release(
            self.decide_at, max_messages=cap.max_messages, per=cap.per, sent_times=sent_times
        )
        if release is None:
            return None
        limit = f"at most {cap.max_messages} {self.send.channel} per {_human_period(cap.per)}"
        if cap.action == "skip":
            return self._skip(session, self.address, f"Not sent: frequency cap ({limit}) reached.")
        return self._defer(
            session,
            release,
            f"Waiting: frequency cap ({limit}) reached; sending after {release:%Y-%m-%d %H:%M} UTC.",
        )

    def _message_identity(self) -> message_store.MessageIdentity:
        send = self.send
        return message_store.MessageIdentity(
            idempotency_key=send.idempotency_key,
            workflow_id=send.workflow_id,
            run_id=send.run_id,
            step=send.step_id,
            journey_slug=send.journey_slug,
            version=send.version,
            customer_id=send.customer_id,
            channel=send.channel,
            template=send.template,
        )

    def _claim_and_render(
        self, session: Any, existing: message_store.MessageRecord | None
    ) -> PreparedSend | SendMessageResult:
        send = self.send
        if existing is None:
            message_id = message_store.claim_send(
                session,
                self._message_identity(),
                to=self.address,
                provider=self.provider_name,
                now=self.now,
            )
            if message_id is None:
                # Another attempt claimed the key a moment ago: its outcome is unknown.
                raise ApplicationError(
                    "another attempt holds this send; retrying to learn its outcome",
                    type="SendInProgress",
                )
        else:
            if not message_store.reclaim_send(
                session,
                message_id=existing.id,
                expected_status=existing.status,
                to=self.address,
                provider=self.provider_name,
                now=self.now,
            ):
                raise ApplicationError(
                    "another attempt changed this send; retrying to learn its outcome",
                    type="SendInProgress",
                )
            message_id = existing.id
        try:
            return self._render(session, message_id)
        except (TemplateProblem, NotFound) as exc:
            problem = exc.message
            reason = f"Not sent: the template {send.template} could not be rendered: {problem}"
            message_store.mark_send_status(
                session, message_id=message_id, status="failed", error=reason, now=self.now
            )
            self._timeline(session, "failed", reason, message_id, None)
            return SendMessageResult(status="failed", message_id=message_id, reason=reason)

    def _render(self, session: Any, message_id: int) -> PreparedSend:
        send = self.send
        settings = self.settings
        source = load_template(session, path=send.template)
        customer = customer_context(
            customer_id=self.customer.id,
            email=self.customer.email,
            phone=self.customer.phone,
            attributes=self.customer.attributes,
        )
        public = settings.public_url.rstrip("/")
        unsubscribe_url = f"{public}/u/" + make_unsubscribe_token(
            settings.secret_key,
            Unsubscribe(customer_id=send.customer_id, channel=send.channel, message_id=message_id),
        )
        context = template_context(
            customer,
            journey=send.journey_slug,
            step=journey_step_of(send.step_id),
            unsubscribe_url=unsubscribe_url,
        )
        if send.channel == "email":
            if not is_email_template(send.template):
                raise TemplateProblem(f"{send.template} is an SMS template, not an email")
            tracked: list[dict[str, str]] = []

            def track(url: str) -> str:
                token = make_link_token(
                    settings.secret_key,
                    TrackedLink(
                        workflow_id=send.workflow_id,
                        run_id=send.run_id,
                        step=journey_step_of(send.step_id),
                        message_id=message_id,
                        url=url,
                    ),
                )
                tracked_url = f"{public}/t/{token}"
                tracked.append({"url": url, "tracked_url": tracked_url})
                return tracked_url

            rendered = render_email(source, context, track_link=track)
            html = _with_open_pixel(rendered.html, public, settings.secret_key, send, message_id)
            headers = {
                "List-Unsubscribe": f"<{unsubscribe_url}>",
                "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
            }
            message_store.set_message_content(
                session,
                message_id=message_id,
                subject=rendered.subject,
                body=html,
                text_body=rendered.text,
                headers=headers,
                links=tracked,
            )
            email = OutgoingEmail(
                to=self.address,
                from_email=settings.email_from,
                subject=rendered.subject,
                html=html,
                text=rendered.text,
                idempotency_key=send.idempotency_key,
                headers=headers,
                custom_args={"journey": send.journey_slug, "step": send.step_id},
                categories=[f"journey:{send.journey_slug}"],
            )
            return PreparedSend(
                message_id=message_id, to=self.address, subject=rendered.subject, email=email
            )
        if is_email_template(send.template):
            raise TemplateProblem(f"{send.template} is an email template, not an SMS")
        sms = render_sms(source, context)
        message_store.set_message_content(
            session,
            message_id=message_id,
            subject=None,
            body=sms.body,
            text_body=sms.body,
            headers={"segments": str(sms.segments), "encoding": sms.encoding},
            links=[],
        )
        outgoing = OutgoingSms(
            to=self.address,
            from_number=settings.twilio_from,
            body=sms.body,
            idempotency_key=send.idempotency_key,
            status_callback=status_callback_url(public, send.idempotency_key),
        )
        return PreparedSend(message_id=message_id, to=self.address, subject=None, sms=outgoing)

    def _call_provider(self, prepared: PreparedSend) -> SendMessageResult:
        owner = self.owner
        try:
            if prepared.email is not None:
                accepted = owner.email_provider.send_email(prepared.email)
            else:
                assert prepared.sms is not None
                accepted = owner.sms_provider.send_sms(prepared.sms)
        except ProviderRefused as exc:
            return self._refused(prepared, exc)
        except ProviderOutcomeUnknown as exc:
            error = str(exc)

            def still_sending(session: Any) -> None:
                message_store.mark_send_status(
                    session,
                    message_id=prepared.message_id,
                    status="sending",
                    error=error,
                    now=self._clock(),
                )

            owner.writer.run(still_sending)
            raise ApplicationError(str(exc), type="ProviderOutcomeUnknown") from exc

        def sent(session: Any) -> None:
            message_store.mark_sent(
                session,
                message_id=prepared.message_id,
                provider=accepted.provider,
                provider_message_id=accepted.provider_message_id,
                now=self._clock(),
            )
            reason = (
                f"Sent {self.send.channel}"
                + (f" \u201c{prepared.subject}\u201d" if prepared.subject else "")
                + f" to {mask_address(prepared.to)} via {accepted.provider}."
            )
            self._timeline(session, "sent", reason, prepared.message_id, prepared.subject)

        owner.writer.run(sent)
        return SendMessageResult(
            status="sent", message_id=prepared.message_id, subject=prepared.subject
        )

    def _refused(self, prepared: PreparedSend, exc: ProviderRefused) -> SendMessageResult:
        reason = f"Not sent: the provider refused the message for good ({exc.message})."

        def record(session: Any) -> None:
            if exc.retryable:
                message_store.mark_send_status(
                    session,
                    message_id=prepared.message_id,
                    status="retrying",
                    error=exc.message,
                    now=self._clock(),
                )
                return
            message_store.mark_send_status(
                session,
                message_id=prepared.message_id,
                status="failed",
                error=reason,
                now=self._clock(),
            )
            self._timeline(session, "failed", reason, prepared.message_id, prepared.subject)

        self.owner.writer.run(record)
        if exc.retryable:
            # Raised after the commit above: the next attempt sees `retrying` and resends.
            raise ApplicationError(exc.message, type="ProviderUnavailable")
        return SendMessageResult(
            status="failed", message_id=prepared.message_id, subject=prepared.subject, reason=reason
        )

    # --- recording ----------------------------------------------------------------------

    def _skip(self, session: Any, address: str | None, reason: str) -> SendMessageResult:
        send = self.send
        message_id = message_store.record_unsent(
            session,
            self._message_identity(),
            to=address,
            status="skipped",
            reason=reason,
            now=self.now,
        )
        if message_id is None:
            # A `retrying` row under this key: the reason to skip arrived between attempts.
            existing = message_store.find_message(session, idempotency_key=send.idempotency_key)
            assert existing is not None
            message_id = existing.id
            message_store.mark_send_status(
                session, message_id=message_id, status="skipped", error=reason, now=self.now
            )
        self._timeline(session, "skipped", reason, message_id, None)
        return SendMessageResult(status="skipped", message_id=message_id, reason=reason)

    def _defer(self, session: Any, until: datetime, reason: str) -> SendMessageResult:
        self._timeline(session, "deferred", reason, None, None, deferred_until=until)
        return SendMessageResult(status="deferred", reason=reason, deferred_until=until)

    def _timeline(
        self,
        session: Any,
        kind: str,
        reason: str,
        message_id: int | None,
        subject: str | None,
        *,
        deferred_until: datetime | None = None,
    ) -> None:
        send = self.send
        detail: dict[str, Any] = {
            "channel": send.channel,
            "subject": subject,
            "message_id": message_id,
            "template": send.template,
        }
        if deferred_until is not None:
            detail["deferred_until"] = deferred_until.isoformat()
        message_store.record_run_event(
            session,
            workflow_id=send.workflow_id,
            run_id=send.run_id,
            seq=send.seq,
            journey_slug=send.journey_slug,
            version=send.version,
            customer_id=send.customer_id,
            step=journey_step_of(send.step_id),
            kind=kind,
            reason=reason,
            detail=detail,
            now=self.now,
        )


_SUPPRESSION_WORDS = {
    "bounce": "an earlier email bounced",
    "spamreport": "the customer reported an email as spam",
    "stop": "the customer replied STOP",
    "dropped": "the provider dropped an earlier email",
}


def _human_period(period: Any) -> str:
    days = period.days
    if days and not period.seconds:
        return f"{days} day" + ("s" if days != 1 else "")
    hours = int(period.total_seconds() // 3600)
    return f"{hours} hours" if hours else f"{int(period.total_seconds())} seconds"


def _with_open_pixel(
    html: str, public: str, secret_key: str, send: SendMessageInput, message_id: int
) -> str:
    token = make_open_token(
        secret_key,
        MessageOpen(
            workflow_id=send.workflow_id,
            run_id=send.run_id,
            step=journey_step_of(send.step_id),
            message_id=message_id,
        ),
    )
    pixel = f'<img src="{public}/o/{token}.gif" width="1" height="1" alt="" style="display:none">'
    index = html.lower().rfind("</body>")
    return html[:index] + pixel + html[index:] if index >= 0 else html + pixel
