"""The send_message activity against the real SendGrid and Twilio clients pointed at a
stub HTTP server on 127.0.0.1, on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session
from temporalio.exceptions import ApplicationError

from activities.messaging import MessagingActivities
from core.db import session_scope
from core.runs import RecordRunProgressInput, RunIdentity, RunLine, RunPosition
from core.tokens import read_link_token, read_unsubscribe_token
from store import messages as message_store
from store import runs as run_store
from store.templates import save_template
from tests.utils.messaging import (
    SENDGRID_KEY,
    TWILIO_SID,
    TWILIO_TOKEN,
    ProviderStub,
    add_customer,
    message_rows,
    provider_settings,
    run_events,
    send_input,
)


@pytest.fixture
def stub() -> Iterator[ProviderStub]:
    server = ProviderStub().start()
    yield server
    server.stop()


def _messenger(engine: Engine, stub: ProviderStub, **overrides: object) -> MessagingActivities:
    return MessagingActivities(engine=engine, settings=provider_settings(stub, **overrides))


def test_email_goes_through_the_real_sendgrid_client(
    store_engine: Engine, stub: ProviderStub
) -> None:
    add_customer(store_engine, "c-1", attributes={"first_name": "Grace"})
    result = _messenger(store_engine, stub).send_message(send_input("c-1"))

    assert result.status == "sent"
    assert result.subject == "You're First in Line: Exclusive Preview Just for Our Top Shoppers!"
    [request] = stub.of_path("/v3/mail/send")
    assert request.headers["authorization"] == f"Bearer {SENDGRID_KEY}"
    body = request.json()
    assert body["personalizations"] == [{"to": [{"email": "ada@example.com"}]}]
    assert body["from"] == {"email": "hello@shop.example.com"}
    assert body["subject"] == result.subject
    assert body["custom_args"]["idempotency_key"] == "journey:champions:c-1:run-1:welcome"
    headers = body["headers"]
    assert headers["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    unsubscribe_url = headers["List-Unsubscribe"].strip("<>")
    assert unsubscribe_url.startswith("https://journeys.example.com/u/")
    token = read_unsubscribe_token("test-secret", unsubscribe_url.rsplit("/", 1)[1])
    assert (token.customer_id, token.channel, token.message_id) == (
        "c-1",
        "email",
        result.message_id,
    )
    kinds = {part["type"]: part["value"] for part in body["content"]}
    assert "Hi Grace," in kinds["text/plain"]
    # Every shop link is a signed tracked link carrying run, step and target.
    tracked = [part.split('"')[0] for part in kinds["text/html"].split('href="')[1:]]
    link_tokens = [url.rsplit("/", 1)[1] for url in tracked if "/t/" in url]
    assert link_tokens, kinds["text/html"]
    link = read_link_token("test-secret", link_tokens[0])
    assert (link.workflow_id, link.run_id, link.step, link.message_id) == (
        "journey:champions:c-1",
        "run-1",
        "welcome",
        result.message_id,
    )
    assert link.url.startswith("https://shop.example.com/collections/preview")
    assert unsubscribe_url in tracked

    [row] = message_rows(store_engine)
    assert row["status"] == "sent" and row["provider"] == "sendgrid"
    assert row["provider_message_id"].startswith("sgmsg")
    [line] = run_events(store_engine)
    assert line["kind"] == "sent" and line["seq"] == 1 and "a***@example.com" in line["reason"]


def test_a_retry_after_sent_sends_nothing(store_engine: Engine, stub: ProviderStub) -> None:
    add_customer(store_engine, "c-1")
    messenger = _messenger(store_engine, stub)
    first = messenger.send_message(send_input("c-1"))
    again = messenger.send_message(send_input("c-1"))
    assert again.status == "sent" and again.message_id == first.message_id
    assert len(stub.of_path("/v3/mail/send")) == 1
    assert len(run_events(store_engine)) == 1


def test_503_is_retried_then_sent_once(store_engine: Engine, stub: ProviderStub) -> None:
    add_customer(store_engine, "c-1")
    answers = iter([503, 429, 202])
    stub.decide = lambda request: next(answers)
    messenger = _messenger(store_engine, stub)
    for expected in (503, 429):
        with pytest.raises(ApplicationError) as caught:
            messenger.send_message(send_input("c-1"))
        assert not caught.value.non_retryable and str(expected) in str(caught.value)
        assert message_rows(store_engine)[0]["status"] == "retrying"
    assert messenger.send_message(send_input("c-1")).status == "sent"
    assert len(stub.of_path("/v3/mail/send")) == 3
    assert sum(stub.accepted.values()) == 1
    assert [line["kind"] for line in run_events(store_engine)] == ["sent"]


def test_400_is_permanent_recorded_failed_and_not_retried(
    store_engine: Engine, stub: ProviderStub
) -> None:
    add_customer(store_engine, "c-1")
    stub.decide = lambda request: 400
    messenger = _messenger(store_engine, stub)
    result = messenger.send_message(send_input("c-1"))
    assert result.status == "failed" and "400" in (result.reason or "")
    again = messenger.send_message(send_input("c-1"))
    assert again.status == "failed"
    assert len(stub.of_path("/v3/mail/send")) == 1
    assert message_rows(store_engine)[0]["status"] == "failed"
    assert [line["kind"] for line in run_events(store_engine)] == ["failed"]


def test_timeout_leaves_the_send_in_doubt_and_a_retry_does_not_resend(
    store_engine: Engine, stub: ProviderStub
) -> None:
    add_customer(store_engine, "c-1")
    stub.delay_seconds = 1.5
    messenger = _messenger(store_engine, stub, provider_timeout_seconds=0.5)
    with pytest.raises(ApplicationError) as caught:
        messenger.send_message(send_input("c-1"))
    assert not caught.value.non_retryable
    stub.delay_seconds = 0
    result = messenger.send_message(send_input("c-1", seq=1))
    assert result.status == "in_doubt"
    assert len(stub.of_path("/v3/mail/send")) == 1
    assert message_rows(store_engine)[0]["status"] == "in_doubt"
    assert [line["kind"] for line in run_events(store_engine)] == ["in_doubt"]


def test_in_doubt_with_resend_policy_sends_again(store_engine: Engine, stub: ProviderStub) -> None:
    add_customer(store_engine, "c-1")
    stub.delay_seconds = 1.5
    messenger = _messenger(store_engine, stub, provider_timeout_seconds=0.5)
    with pytest.raises(ApplicationError):
        messenger.send_message(send_input("c-1", in_doubt_policy="resend"))
    stub.delay_seconds = 0
    result = messenger.send_message(send_input("c-1", in_doubt_policy="resend"))
    assert result.status == "sent"
    assert len(stub.of_path("/v3/mail/send")) == 2


def test_sms_goes_through_the_real_twilio_client(store_engine: Engine, stub: ProviderStub) -> None:
    add_customer(store_engine, "c-1", attributes={"first_name": "Grace"})
    send = send_input(
        "c-1", channel="sms", template="at_risk/winback.sms.txt", step_id="winback_sms"
    )
    result = _messenger(store_engine, stub).send_message(send)
    assert result.status == "sent"
    [request] = stub.of_path("/Messages.json")
    assert request.path == f"/2010-04-01/Accounts/{TWILIO_SID}/Messages.json"
    expected_auth = base64.b64encode(f"{TWILIO_SID}:{TWILIO_TOKEN}".encode()).decode()
    assert request.headers["authorization"] == f"Basic {expected_auth}"
    form = request.form()
    assert form["To"] == "+15555550123" and form["From"] == "+15550001111"
    assert form["Body"].startswith("Shop: Hi Grace,")
    assert form["StatusCallback"] == (
        "https://journeys.example.com/webhooks/twilio/status?key="
        "journey%3Achampions%3Ac-1%3Arun-1%3Awinback_sms"
    )
    [row] = message_rows(store_engine)
    assert row["provider"] == "twilio" and row["provider_message_id"].startswith("SM")


def test_twilio_400_is_permanent(store_engine: Engine, stub: ProviderStub) -> None:
    add_customer(store_engine, "c-1")
    stub.decide = lambda request: 400
    send = send_input(
        "c-1", channel="sms", template="at_risk/winback.sms.txt", step_id="winback_sms"
    )
    assert _messenger(store_engine, stub).send_message(send).status == "failed"


def test_without_credentials_messages_go_to_the_outbox(
    store_engine: Engine, stub: ProviderStub
) -> None:
    add_customer(store_engine, "c-1")
    messenger = _messenger(store_engine, stub, sendgrid_api_key="", twilio_account_sid="")
    assert messenger.send_message(send_input("c-1")).status == "sent"
    sms = send_input("c-1", channel="sms", template="at_risk/winback.sms.txt", step_id="sms")
    assert messenger.send_message(sms).status == "sent"
    assert stub.requests == []
    with session_scope(store_engine) as session:
        outbox = message_store.list_outbox(session)
    assert [(m.channel, m.provider, m.status) for m in outbox] == [
        ("email", "outbox", "sent"),
        ("sms", "outbox", "sent"),
    ]
    assert outbox[0].headers["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


def test_unsubscribed_and_suppressed_customers_are_skipped(
    store_engine: Engine, stub: ProviderStub
) -> None:
    add_customer(store_engine, "c-1")
    add_customer(store_engine, "c-2", email="bounced@example.com")
    now = datetime.now(UTC)
    with session_scope(store_engine) as session:
        message_store.set_unsubscribed(session, customer_id="c-1", channel="email", at=now)
        message_store.suppress_address(
            session, address="bounced@example.com", channel="email", reason="bounce", now=now
        )
    messenger = _messenger(store_engine, stub)
    first = messenger.send_message(send_input("c-1"))
    second = messenger.send_message(send_input("c-2"))
    assert first.status == "skipped" and "unsubscribed" in (first.reason or "")
    assert second.status == "skipped" and "bounced" in (second.reason or "")
    assert stub.requests == []
    assert {row["status"] for row in message_rows(store_engine)} == {"skipped"}
    assert {line["kind"] for line in run_events(store_engine)} == {"skipped"}


def test_sandbox_escape_is_recorded_as_failed(store_engine: Engine, stub: ProviderStub) -> None:
    add_customer(store_engine, "c-1")
    with Session(store_engine) as session:
        save_template(
            session,
            path="evil/escape.html",
            source="{% block subject %}hi{% endblock %}{% block html %}{{ ''.__class__.__mro__[1].__subclasses__() }}{% endblock %}",
        )
        session.commit()
    result = _messenger(store_engine, stub).send_message(
        send_input("c-1", template="evil/escape.html")
    )
    assert result.status == "failed" and "unsafe" in (result.reason or "")
    assert stub.requests == []
    assert message_rows(store_engine)[0]["status"] == "failed"
    assert run_events(store_engine)[0]["kind"] == "failed"


def test_a_template_runtime_error_is_recorded_as_failed_with_its_line(
    store_engine: Engine, stub: ProviderStub
) -> None:
    # Saved straight into the store, as a template from before templates were proven.
    add_customer(store_engine, "c-1")
    with Session(store_engine) as session:
        save_template(
            session,
            path="broken/divide.html",
            source="{% block subject %}hi{% endblock %}\n{% block html %}\n{{ 1 / 0 }}{% endblock %}",
        )
        session.commit()
    result = _messenger(store_engine, stub).send_message(
        send_input("c-1", template="broken/divide.html")
    )
    assert result.status == "failed"
    assert "line 3: ZeroDivisionError" in (result.reason or "")
    assert stub.requests == []
    assert message_rows(store_engine)[0]["status"] == "failed"


def test_frequency_cap_defers_then_skips(store_engine: Engine, stub: ProviderStub) -> None:
    add_customer(store_engine, "c-1")
    messenger = _messenger(store_engine, stub)
    cap = {"max_messages": 2, "per": "P7D", "action": "defer"}
    for seq, step in enumerate(("a", "b"), start=1):
        assert (
            messenger.send_message(
                send_input("c-1", step_id=step, seq=seq, frequency_cap=cap)
            ).status
            == "sent"
        )
    deferred = messenger.send_message(send_input("c-1", step_id="c", seq=3, frequency_cap=cap))
    assert deferred.status == "deferred"
    assert deferred.deferred_until is not None
    assert (
        timedelta(days=6, hours=23)
        < deferred.deferred_until - datetime.now(UTC)
        <= timedelta(days=7)
    )
    skip_cap = {**cap, "action": "skip"}
    skipped = messenger.send_message(send_input("c-1", step_id="d", seq=4, frequency_cap=skip_cap))
    assert skipped.status == "skipped" and "frequency cap" in (skipped.reason or "")
    assert len(stub.requests) == 2
    assert [line["kind"] for line in run_events(store_engine)] == [
        "sent",
        "sent",
        "deferred",
        "skipped",
    ]


def test_global_frequency_cap_from_settings(store_engine: Engine, stub: ProviderStub) -> None:
    add_customer(store_engine, "c-1")
    messenger = _messenger(store_engine, stub, frequency_cap_max=1)
    assert messenger.send_message(send_input("c-1", step_id="a", seq=1)).status == "sent"
    assert messenger.send_message(send_input("c-1", step_id="b", seq=2)).status == "deferred"


def test_quiet_hours_defer_until_they_end_in_the_customers_zone(
    store_engine: Engine, stub: ProviderStub
) -> None:
    add_customer(store_engine, "c-1", attributes={"first_name": "Ada", "timezone": "Asia/Tokyo"})
    # 14:00 UTC is 23:00 in Tokyo: quiet until 08:00 Tokyo, 23:00 UTC.
    clock = datetime(2026, 11, 24, 14, 0, tzinfo=UTC)
    messenger = MessagingActivities(
        engine=store_engine, settings=provider_settings(stub), clock=lambda: clock
    )
    quiet = {"start": "22:00", "end": "08:00"}
    result = messenger.send_message(send_input("c-1", quiet_hours=quiet))
    assert result.status == "deferred"
    assert result.deferred_until == datetime(2026, 11, 24, 23, 0, tzinfo=UTC)
    assert "quiet hours" in (result.reason or "")
    assert stub.requests == [] and message_rows(store_engine) == []
    clock = datetime(2026, 11, 24, 23, 0, tzinfo=UTC)
    assert messenger.send_message(send_input("c-1", quiet_hours=quiet, seq=2)).status == "sent"
    assert [line["kind"] for line in run_events(store_engine)] == ["deferred", "sent"]


def test_missing_template_and_wrong_channel_fail(store_engine: Engine, stub: ProviderStub) -> None:
    add_customer(store_engine, "c-1")
    messenger = _messenger(store_engine, stub)
    missing = messenger.send_message(send_input("c-1", template="nope/none.html"))
    assert missing.status == "failed" and "nope/none.html" in (missing.reason or "")
    wrong = messenger.send_message(send_input("c-1", step_id="s2", seq=2, channel="sms"))
    assert wrong.status == "failed"
    assert stub.requests == []


def _progress(customer_id: str) -> RecordRunProgressInput:
    moment = datetime(2026, 11, 20, 10, 0, tzinfo=UTC)
    return RecordRunProgressInput(
        run=RunIdentity(
            workflow_id=f"journey:champions:{customer_id}",
            run_id="run-1",
            journey_slug="champions",
            version=1,
            customer_id=customer_id,
            entered_at=moment,
            entry_transition_id=7,
        ),
        lines=[RunLine(seq=0, kind="entered", reason="segment entry", occurred_at=moment)],
        position=RunPosition(step="welcome", step_since=moment),
    )


def test_the_send_writes_the_run_bookkeeping_it_is_handed_once(
    store_engine: Engine, stub: ProviderStub
) -> None:
    add_customer(store_engine, "c-1")
    messenger = _messenger(store_engine, stub)
    request = send_input("c-1", progress=_progress("c-1"))
    assert messenger.send_message(request).status == "sent"
    # A retry after the send writes nothing twice.
    assert messenger.send_message(request).status == "sent"
    assert [(line["seq"], line["kind"]) for line in run_events(store_engine)] == [
        (0, "entered"),
        (1, "sent"),
    ]
    with store_engine.connect() as conn:
        [run] = run_store.customer_runs(conn, customer_id="c-1")
    assert (run.status, run.step, run.entry_transition_id) == ("running", "welcome", 7)


def test_a_refused_claim_writes_no_bookkeeping(
    store_engine: Engine, stub: ProviderStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_customer(store_engine, "c-1")
    request = send_input("c-1", progress=_progress("c-1"))
    messenger = _messenger(store_engine, stub)
    # Another attempt holds the key as it is being claimed: this one's transaction rolls
    # back whole, its bookkeeping with it (the workflow hands it over again).
    monkeypatch.setattr(message_store, "claim_send", lambda *args, **kwargs: None)
    with pytest.raises(ApplicationError) as caught:
        messenger.send_message(request)
    assert caught.value.type == "SendInProgress"
    assert run_events(store_engine) == []
