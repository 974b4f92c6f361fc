"""A real worker process for the crash test: the journey workflow with the real
send_message and run bookkeeping activities, built by worker.py's `build_worker`. Its
SendGrid client, after the provider has answered (before the send is recorded as sent),
writes a marker file and hangs, so the test can SIGKILL the process at that point.

    python -m tests.utils.messaging_worker ADDRESS TASK_QUEUE DATABASE_URL STUB_URL MARKER
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter

from activities.messaging import MessagingActivities
from activities.runs import RunActivities
from core.db import make_engine
from core.settings import Settings
from providers.outgoing import OutgoingEmail, ProviderAccepted
from providers.sendgrid import SendGridEmailProvider
from tests.utils.messaging import provider_settings
from worker import build_worker
from workflows.journey import JourneyWorkflow


class HangAfterProviderCall(SendGridEmailProvider):
    def __init__(self, settings: Settings, marker: Path) -> None:
        super().__init__(settings)
        self.marker = marker

    def send_email(self, email: OutgoingEmail) -> ProviderAccepted:
        accepted = super().send_email(email)
        self.marker.write_text(accepted.provider_message_id or "")
        time.sleep(3600)
        return accepted


async def main(
    address: str, task_queue: str, database_url: str, stub_url: str, marker: str
) -> None:
    settings = provider_settings(stub_url, database_url=database_url)
    engine = make_engine(database_url)
    messaging = MessagingActivities(
        engine=engine,
        settings=settings,
        email_provider=HangAfterProviderCall(settings, Path(marker)),
    )
    client = await Client.connect(address, data_converter=pydantic_data_converter)
    worker = build_worker(
        client,
        settings,
        engine,
        task_queue=task_queue,
        workflows=[JourneyWorkflow],
        activities=[*messaging.all(), *RunActivities(engine).all()],
    )
    print("polling", flush=True)
    await worker.run()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:6]))
