"""A real worker process for the crash test: runs the send_message activity with the
real SendGrid client, and after the provider has answered (before the send is recorded
as sent) writes a marker file and hangs, so the test can SIGKILL it at that point.

    python -m tests.utils.messaging_worker ADDRESS TASK_QUEUE DATABASE_URL STUB_URL MARKER
"""

from __future__ import annotations

import asyncio
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Worker

from activities.messaging import MessagingActivities
from core.db import make_engine
from providers.outgoing import OutgoingEmail, ProviderAccepted
from providers.sendgrid import SendGridEmailProvider
from tests.utils.messaging import provider_settings


class HangAfterProviderCall(SendGridEmailProvider):
    def __init__(self, settings, marker: Path) -> None:  # noqa: ANN001
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
    worker = Worker(
        client,
        task_queue=task_queue,
        activities=messaging.all(),
        activity_executor=ThreadPoolExecutor(4),
    )
    print("polling", flush=True)
    await worker.run()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:6]))
