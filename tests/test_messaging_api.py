"""Outbox, templates, tracked links, unsubscribe and provider webhooks through the API,
on a real store and (for click signals) a real Temporal dev server."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlmodel import Session
from temporalio.worker import Worker

from activities.messaging import MessagingActivities
from api.app import create_app
from api.deps import TemporalConnector
from core.db import session_scope
from core.settings import Settings
from core.tokens import TrackedLink, make_link_token
from store import messages as message_store
from store.keys import create_key
from tests.utils.journey_runtime import client_for
from tests.utils.messaging import (
    ClickWaiterWorkflow,
    ProviderStub,
    SendGridSigner,
    add_customer,
    message_rows,
    provider_settings,
    send_input,
    twilio_signature,
)

SIGNER = SendGridSigner.generate()


@pytest.fixture
def stub() -> Iterator[ProviderStub]:
    server = ProviderStub().start()
    yield server
    server.stop()


class Api:
    def __init__(
        self, client: httpx.AsyncClient, keys: dict[str, str], settings: Settings, engine: Engine
    ):
        self.client = client
        self.keys = keys
        self.settings = settings
        self.engine = engine

    def auth(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[role]}"}


async def _api(
    engine: Engine, settings: Settings, temporal_address: str = "127.0.0.1:1"
) -> AsyncIterator[Api]:
    app = create_app(settings, engine)
    app.state.temporal = TemporalConnector(temporal_address, "default")
    keys = {}
    with Session(engine) as session:
        for role in ("marketer", "support", "ingest"):
            keys[role] = create_key(session, role=role, name=role)[1]
        session.commit()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport, base_url="https://journeys.example.com"
    ) as client:
        yield Api(client, keys, settings, engine)


@pytest.fixture
async def api(store_engine: Engine, stub: ProviderStub) -> AsyncIterator[Api]:
    settings = provider_settings(stub, sendgrid_webhook_public_key=SIGNER.public_key_base64)
    async for harness in _api(store_engine, settings):
        yield harness


def _sent_email(api: Api, stub: ProviderStub, customer_id: str = "c-1", **changes: Any) -> int:
    add_customer(api.engine, customer_id)
    result = MessagingActivities(engine=api.engine, settings=api.settings).send_message(
        send_input(customer_id, **changes)
    )
    assert result.message_id is not None
    return result.message_id


def _events(engine: Engine) -> list[tuple[str, int | None]]:
    with engine.connect() as conn:
        return [
            tuple(row)
            for row in conn.execute(text("SELECT kind, message_id FROM message_events ORDER BY id"))
        ]


def _event_journeys(engine: Engine) -> list[tuple[str, str | None, int | None, str | None]]:
    """(kind, journey, version, step) of each event: what journey analytics count by."""
    with engine.connect() as conn:
        return [
            tuple(row)
            for row in conn.execute(
                text("SELECT kind, journey_slug, version, step FROM message_events ORDER BY id")
            )
        ]


# --- outbox and templates -----------------------------------------------------------------


async def test_outbox_lists_captured_messages_by_customer_and_channel(
    store_engine: Engine, stub: ProviderStub
) -> None:
    settings = provider_settings(stub, sendgrid_api_key="", twilio_account_sid="")
    async for api in _api(store_engine, settings):
        _sent_email(api, stub, "c-1")
        _sent_email(api, stub, "c-2")
        response = await api.client.get(
            "/v1/outbox?customer_id=c-2&channel=email", headers=api.auth("support")
        )
        assert response.status_code == 200, response.text
        [message] = response.json()["data"]
        assert message["to"] == "ada@example.com" and message["journey"] == "champions"
        assert message["idempotency_key"] == "journey:champions:c-2:run-1:welcome"
        assert message["subject"].startswith("You're First in Line")
        assert message["headers"]["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        assert message["links"][0]["url"].startswith("https://shop.example.com/")
        assert (await api.client.get("/v1/outbox", headers=api.auth("ingest"))).status_code == 403
        page = (await api.client.get("/v1/outbox?limit=1", headers=api.auth("support"))).json()
        assert len(page["data"]) == 1 and page["next_cursor"]
        rest = await api.client.get(
            f"/v1/outbox?cursor={page['next_cursor']}", headers=api.auth("support")
        )
        assert [m["customer_id"] for m in rest.json()["data"]] == ["c-2"]

        ndjson = {**api.auth("support"), "Accept": "application/x-ndjson"}
        streamed = await api.client.get("/v1/outbox?limit=1", headers=ndjson)
        assert streamed.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in streamed.text.splitlines()]
        # Every message, not a page: the stream ignores `limit`.
        assert [m["customer_id"] for m in lines] == ["c-1", "c-2"]
        assert lines[1] == message
        only_c1 = await api.client.get("/v1/outbox?customer_id=c-1", headers=ndjson)
        assert [json.loads(line)["customer_id"] for line in only_c1.text.splitlines()] == ["c-1"]


async def test_template_crud_validates_on_save_and_previews(api: Api) -> None:
    auth = api.auth("marketer")
    broken = "{% block subject %}Hi{% endblock %}\n{% block html %}\n<p>{{ customer.first_name }</p>\n{% endblock %}"
    response = await api.client.post(
        "/v1/templates", json={"path": "winter/sale.html", "source": broken}, headers=auth
    )
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["field"] == "source" and error["message"].startswith("line 3:")

    good = '{% block subject %}Winter, {{ customer.first_name | default("friend") }}{% endblock %}{% block html %}<p><a href="https://shop.example.com/winter">Shop</a></p>{% endblock %}'
    created = await api.client.post(
        "/v1/templates", json={"path": "winter/sale.html", "source": good}, headers=auth
    )
    assert created.status_code == 201 and created.json()["origin"] == "api"
    again = await api.client.post(
        "/v1/templates", json={"path": "winter/sale.html", "source": good}, headers=auth
    )
    assert again.status_code == 409
    one = await api.client.get("/v1/templates/winter/sale.html", headers=auth)
    assert one.json()["source"] == good
    listed = (await api.client.get("/v1/templates", headers=auth)).json()["data"]
    paths = {t["path"]: t["origin"] for t in listed}
    assert paths["winter/sale.html"] == "api" and paths["champions/welcome.html"] == "shipped"

    preview = await api.client.post(
        "/v1/templates/preview",
        json={"path": "winter/sale.html", "customer": {"attributes": {"first_name": "Lin"}}},
        headers=auth,
    )
    assert preview.status_code == 200, preview.text
    assert preview.json()["subject"] == "Winter, Lin"
    assert preview.json()["links"] == ["https://shop.example.com/winter"]
    sms = await api.client.post(
        "/v1/templates/preview", json={"path": "at_risk/winback.sms.txt"}, headers=auth
    )
    assert sms.json()["sms_segments"] == 1 and sms.json()["text"].startswith("Shop: Hi Ada")

    replaced = await api.client.put(
        "/v1/templates/winter/sale.html",
        json={"source": good.replace("Winter", "Snow")},
        headers=auth,
    )
    assert replaced.status_code == 200
    assert (
        await api.client.delete("/v1/templates/winter/sale.html", headers=auth)
    ).status_code == 204
    assert (await api.client.get("/v1/templates/winter/sale.html", headers=auth)).status_code == 404
    assert (
        await api.client.delete("/v1/templates/champions/welcome.html", headers=auth)
    ).status_code == 404
    assert (await api.client.get("/v1/templates", headers=api.auth("support"))).status_code == 403


async def test_preview_of_a_sandbox_escape_is_a_422(api: Api) -> None:
    source = (
        "{% block subject %}x{% endblock %}{% block html %}{{ ''.__class__.__mro__ }}{% endblock %}"
    )
    response = await api.client.post(
        "/v1/templates/preview", json={"source": source}, headers=api.auth("marketer")
    )
    assert response.status_code == 422 and "unsafe" in response.json()["error"]["message"]


# --- tracked links and unsubscribe --------------------------------------------------------


async def test_tracked_link_redirects_records_and_signals_the_run(
    store_engine: Engine, stub: ProviderStub, dev_server_env: Any
) -> None:
    client = client_for(dev_server_env)
    task_queue = f"clicks-{uuid.uuid4().hex[:8]}"
    settings = provider_settings(stub)
    async with Worker(client, task_queue=task_queue, workflows=[ClickWaiterWorkflow]):
        handle = await client.start_workflow(
            ClickWaiterWorkflow.run,
            id=f"journey:champions:{uuid.uuid4().hex[:8]}",
            task_queue=task_queue,
        )
        address = dev_server_env.client.service_client.config.target_host
        async for api in _api(store_engine, settings, temporal_address=address):
            message_id = _sent_email(
                api, stub, workflow_id=handle.id, run_id=handle.result_run_id, step_id="welcome#2"
            )
            [row] = message_rows(store_engine)
            tracked = _first_tracked_link(store_engine, message_id)
            response = await api.client.get(tracked.removeprefix("https://journeys.example.com"))
            assert response.status_code == 302
            assert response.headers["location"].startswith(
                "https://shop.example.com/collections/preview"
            )
            # The second visit of `welcome` is still the `welcome` step for the journey's wait.
            assert await handle.result() == "email_clicked:welcome"
            assert _events(store_engine) == [("click", row["id"])]
            assert _event_journeys(store_engine) == [("click", "champions", 1, "welcome#2")]


def _first_tracked_link(engine: Engine, message_id: int) -> str:
    with session_scope(engine) as session:
        message = message_store.get_message(session, message_id=message_id)
    assert message is not None
    return message.links[0]["tracked_url"]


async def test_forged_or_altered_link_is_404_and_records_nothing(
    api: Api, stub: ProviderStub
) -> None:
    message_id = _sent_email(api, stub)
    tracked = _first_tracked_link(api.engine, message_id).rsplit("/", 1)[1]
    altered = tracked[:-3] + ("AAA" if not tracked.endswith("AAA") else "BBB")
    forged = make_link_token(
        "not-our-secret",
        TrackedLink(
            workflow_id="w",
            run_id="r",
            step="welcome",
            message_id=message_id,
            url="https://evil.example",
        ),
    )
    for token in (altered, forged, "garbage"):
        response = await api.client.get(f"/t/{token}")
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"
    assert _events(api.engine) == []


async def test_click_redirects_even_when_temporal_is_unreachable(
    api: Api, stub: ProviderStub
) -> None:
    message_id = _sent_email(api, stub)
    tracked = _first_tracked_link(api.engine, message_id)
    response = await api.client.get(tracked.removeprefix("https://journeys.example.com"))
    assert response.status_code == 302
    assert _events(api.engine) == [("click", message_id)]
    assert _event_journeys(api.engine) == [("click", "champions", 1, "welcome")]


async def test_open_pixel_records_an_open(api: Api, stub: ProviderStub) -> None:
    message_id = _sent_email(api, stub)
    with session_scope(api.engine) as session:
        message = message_store.get_message(session, message_id=message_id)
    assert message is not None and message.body is not None
    pixel = message.body.split('<img src="https://journeys.example.com')[1].split('"')[0]
    response = await api.client.get(pixel)
    assert response.status_code == 200 and response.headers["content-type"] == "image/gif"
    assert (await api.client.get(pixel.replace(".gif", "x.gif"))).status_code == 404
    assert _events(api.engine) == [("open", message_id)]
    assert _event_journeys(api.engine) == [("open", "champions", 1, "welcome")]


async def test_one_click_unsubscribe_then_later_sends_are_skipped(
    api: Api, stub: ProviderStub
) -> None:
    _sent_email(api, stub)
    [request] = stub.of_path("/v3/mail/send")
    unsubscribe = request.json()["headers"]["List-Unsubscribe"].strip("<>")
    path = unsubscribe.removeprefix("https://journeys.example.com")
    response = await api.client.post(
        path,
        content=b"List-Unsubscribe=One-Click",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 200 and "unsubscribed" in response.text
    assert (await api.client.get(path)).status_code == 200
    assert (await api.client.get(path[:-2] + "xx")).status_code == 404
    later = MessagingActivities(engine=api.engine, settings=api.settings).send_message(
        send_input("c-1", step_id="vip", template="champions/vip_rewards.html", seq=2)
    )
    assert later.status == "skipped"
    assert len(stub.of_path("/v3/mail/send")) == 1


# --- SendGrid event webhook ---------------------------------------------------------------


def _sendgrid_events(key: str, *kinds: str, email: str = "ada@example.com") -> bytes:
    now = int(datetime.now(UTC).timestamp())
    return json.dumps(
        [
            {
                "event": kind,
                "email": email,
                "timestamp": now,
                "sg_event_id": f"ev-{kind}-{key}",
                "sg_message_id": "x.filter",
                "idempotency_key": key,
            }
            for kind in kinds
        ]
    ).encode()


async def test_signed_webhook_resolves_an_in_doubt_send(api: Api, stub: ProviderStub) -> None:
    add_customer(api.engine, "c-1")
    stub.delay_seconds = 1.0
    settings = api.settings.model_copy(update={"provider_timeout_seconds": 0.3})
    messenger = MessagingActivities(engine=api.engine, settings=settings)
    with pytest.raises(Exception, match="did not answer"):
        messenger.send_message(send_input("c-1"))
    stub.delay_seconds = 0
    assert messenger.send_message(send_input("c-1")).status == "in_doubt"
    key = "journey:champions:c-1:run-1:welcome"
    payload = _sendgrid_events(key, "processed", "delivered")
    response = await api.client.post(
        "/webhooks/sendgrid", content=payload, headers=SIGNER.headers(payload)
    )
    assert response.status_code == 200, response.text
    assert response.json() == {"received": 2, "recorded": 2, "set_aside": 0}
    [row] = message_rows(api.engine)
    assert row["status"] == "delivered"
    assert _event_journeys(api.engine) == [
        ("processed", "champions", 1, "welcome"),
        ("delivered", "champions", 1, "welcome"),
    ]
    # Delivered twice (SendGrid retries webhooks): recorded once.
    again = await api.client.post(
        "/webhooks/sendgrid", content=payload, headers=SIGNER.headers(payload)
    )
    assert again.json() == {"received": 2, "recorded": 0, "set_aside": 0}
    assert len(stub.of_path("/v3/mail/send")) == 1


async def test_a_hostile_webhook_event_is_set_aside_and_the_others_recorded(
    api: Api, stub: ProviderStub
) -> None:
    _sent_email(api, stub)
    key = "journey:champions:c-1:run-1:welcome"
    good = json.loads(_sendgrid_events(key, "delivered"))
    hostile = [
        {**good[0], "sg_event_id": "ev-far", "event": "open", "timestamp": 1e300},
        {**good[0], "sg_event_id": "ev-nul", "event": "open", "reason": "a\x00b"},
        {**good[0], "sg_event_id": "ev-big", "event": "open", "attempt": 2**70},
    ]
    payload = json.dumps([*hostile, *good]).encode()
    response = await api.client.post(
        "/webhooks/sendgrid", content=payload, headers=SIGNER.headers(payload)
    )
    assert response.status_code == 200, response.text
    assert response.json() == {"received": 4, "recorded": 2, "set_aside": 2}
    assert message_rows(api.engine)[0]["status"] == "delivered"


async def test_unsigned_mis_signed_or_stale_webhooks_are_403_and_change_nothing(
    api: Api, stub: ProviderStub
) -> None:
    message_id = _sent_email(api, stub)
    payload = _sendgrid_events("journey:champions:c-1:run-1:welcome", "bounce")
    other = SendGridSigner.generate()
    stale = int((datetime.now(UTC) - timedelta(hours=1)).timestamp())
    tampered = payload.replace(b"bounce", b"deliv")
    for headers, body in (
        ({"Content-Type": "application/json"}, payload),
        (other.headers(payload), payload),
        (SIGNER.headers(payload, timestamp=stale), payload),
        (SIGNER.headers(payload), tampered),
    ):
        response = await api.client.post("/webhooks/sendgrid", content=body, headers=headers)
        assert response.status_code == 403, response.text
    assert _events(api.engine) == []
    assert message_rows(api.engine)[0]["status"] == "sent"
    with session_scope(api.engine) as session:
        assert message_store.suppression_reason(session, address="ada@example.com") is None
    assert message_id


async def test_bounce_and_spam_report_suppress_the_address(api: Api, stub: ProviderStub) -> None:
    _sent_email(api, stub)
    payload = _sendgrid_events("journey:champions:c-1:run-1:welcome", "bounce")
    response = await api.client.post(
        "/webhooks/sendgrid", content=payload, headers=SIGNER.headers(payload)
    )
    assert response.status_code == 200
    assert message_rows(api.engine)[0]["status"] == "bounced"
    with session_scope(api.engine) as session:
        assert message_store.suppression_reason(session, address="ada@example.com") == "bounce"
    later = MessagingActivities(engine=api.engine, settings=api.settings).send_message(
        send_input("c-1", step_id="vip", template="champions/vip_rewards.html", seq=2)
    )
    assert later.status == "skipped" and "bounced" in (later.reason or "")


# --- Twilio -------------------------------------------------------------------------------


async def _twilio_post(
    api: Api, path: str, form: dict[str, str], signature: str | None = None
) -> httpx.Response:
    url = f"https://journeys.example.com{path}"
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    headers["X-Twilio-Signature"] = (
        signature if signature is not None else twilio_signature(url, form)
    )
    return await api.client.post(
        path, content=httpx.QueryParams(form).__str__().encode(), headers=headers
    )


async def test_stop_opts_out_and_start_opts_back_in(api: Api, stub: ProviderStub) -> None:
    add_customer(api.engine, "c-1")
    messenger = MessagingActivities(engine=api.engine, settings=api.settings)
    sms = dict(channel="sms", template="at_risk/winback.sms.txt")
    stop = {"From": "+15555550123", "To": "+15550001111", "Body": " stop ", "MessageSid": "SMin1"}
    forged = await _twilio_post(
        api, "/webhooks/twilio/inbound", stop, signature="bm90IGEgc2lnbmF0dXJl"
    )
    assert forged.status_code == 403
    assert messenger.send_message(send_input("c-1", step_id="s1", seq=1, **sms)).status == "sent"

    response = await _twilio_post(api, "/webhooks/twilio/inbound", stop)
    assert response.status_code == 200 and "<Response/>" in response.text
    skipped = messenger.send_message(send_input("c-1", step_id="s2", seq=2, **sms))
    assert skipped.status == "skipped" and "unsubscribed from sms" in (skipped.reason or "")

    start = {**stop, "Body": "START", "MessageSid": "SMin2"}
    assert (await _twilio_post(api, "/webhooks/twilio/inbound", start)).status_code == 200
    assert messenger.send_message(send_input("c-1", step_id="s3", seq=3, **sms)).status == "sent"
    assert len(stub.of_path("/Messages.json")) == 2


async def test_twilio_status_callback_is_verified_and_recorded(
    api: Api, stub: ProviderStub
) -> None:
    add_customer(api.engine, "c-1")
    MessagingActivities(engine=api.engine, settings=api.settings).send_message(
        send_input("c-1", channel="sms", template="at_risk/winback.sms.txt", step_id="sms")
    )
    [request] = stub.of_path("/Messages.json")
    callback = request.form()["StatusCallback"]
    path = callback.removeprefix("https://journeys.example.com")
    [row] = message_rows(api.engine)
    form = {
        "MessageSid": row["provider_message_id"],
        "MessageStatus": "delivered",
        "To": "+15555550123",
    }
    tampered = {**form, "MessageStatus": "undelivered"}
    bad = await _twilio_post(api, path, tampered, signature=twilio_signature(callback, form))
    assert bad.status_code == 403
    assert message_rows(api.engine)[0]["status"] == "sent"
    ok = await _twilio_post(api, path, form)
    assert ok.status_code == 200, ok.text
    assert message_rows(api.engine)[0]["status"] == "delivered"
    assert _events(api.engine) == [("delivered", row["id"])]
