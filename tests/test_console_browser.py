"""The console in a real browser: Debian's Chromium driven by Playwright (never a browser
Playwright downloads: it cannot, offline). The API runs in a thread on a store that
looks like the seed's use case. Every page is screenshotted into tests/artifacts/console/
(git-ignored) for people to look at, checked with axe-core (vendored in tests/vendor) for
serious accessibility findings, and watched for console errors, which is where the
browser reports what the Content-Security-Policy refused."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session

from api.app import create_app
from store.keys import create_key
from tests.utils.api import settings_for_tests
from tests.utils.console import Seeded, seed_console_store

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts" / "console"
AXE = Path(__file__).resolve().parent / "vendor" / "axe-core" / "axe.min.js"

playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
if not CHROMIUM.exists():
    pytest.skip(
        "Debian's chromium is not installed (apt-get install chromium)", allow_module_level=True
    )


@dataclass
class Console:
    base: str
    keys: dict[str, str]
    seeded: Seeded
    browser: Any
    messages: list[str] = field(default_factory=list)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    import uvicorn

    from tests.conftest import new_store

    engine, _ = new_store("sqlite", tmp_path_factory.mktemp("browser"))
    seeded = seed_console_store(engine)
    keys = {}
    with Session(engine) as session:
        for role in ("marketer", "support"):
            _, keys[role] = create_key(session, role=role, name=f"{role} (browser test)")
        session.commit()
    app = create_app(settings_for_tests(), engine)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the API did not start"
        time.sleep(0.05)
    app.state.console.aggregates.wait_seconds = 10
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM))
        try:
            yield Console(f"http://127.0.0.1:{port}/console", keys, seeded, browser)
        finally:
            browser.close()
            server.should_exit = True
            thread.join(timeout=10)
            engine.dispose()


def _page(console: Console, role: str) -> Any:
    """A new browser session signed in with the role's key, by keyboard."""
    context = console.browser.new_context(viewport={"width": 1300, "height": 900})
    page = context.new_page()
    page.on(
        "console",
        lambda m: (
            console.messages.append(f"{page.url}: {m.text}")
            if m.type in ("error", "warning")
            else None
        ),
    )
    page.on("pageerror", lambda error: console.messages.append(f"{page.url}: {error}"))
    answer = page.goto(f"{console.base}/")
    assert answer is not None and page.url.startswith(f"{console.base}/sign-in")
    page.get_by_label("API key").fill(console.keys[role])
    page.keyboard.press("Enter")
    page.wait_for_url(f"{console.base}/")
    return page


def _settled(page: Any) -> None:
    """Wait until no section is still counting (htmx fills them in)."""
    page.wait_for_function("!document.body.innerText.includes('counting…')", timeout=15_000)


def _axe(page: Any) -> list[str]:
    if not page.evaluate("typeof window.axe !== 'undefined'"):
        page.evaluate(AXE.read_text())
    found = page.evaluate(
        "axe.run(document, {resultTypes: ['violations']}).then(r => r.violations"
        ".filter(v => v.impact === 'serious' || v.impact === 'critical')"
        ".map(v => v.id + ': ' + v.nodes.map(n => n.target.join(' ')).slice(0, 3).join(', ')))"
    )
    return list(found)


def _shot(page: Any, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


PAGES = [
    ("overview", "/", "Overview"),
    ("rfm", "/rfm/default", "RFM model"),
    ("segments", "/segments", "Segments"),
    ("segment", "/segments/high-value-champions", "High-value Champions"),
    ("segment-new", "/segments/new", "New segment"),
    ("journeys", "/journeys", "Journeys"),
    ("journey", "/journeys/champions-nurture", "Champions RFM campaign"),
    ("journey-branch", "/journeys/at-risk-winback", "At risk RFM campaign"),
    ("journey-new", "/journeys/new", "New journey"),
    ("campaigns", "/personalization", "Personalisation campaigns"),
    ("campaign", "/personalization/rfm-homepage", "Homepage by RFM segment"),
    ("customers", "/customers", "Customers"),
]


def test_every_page_reads_without_console_errors_or_serious_axe_findings(
    console: Console,
) -> None:
    page = _page(console, "marketer")
    findings = {}
    pages = [
        *PAGES,
        (
            "campaign-preview",
            f"/personalization/rfm-homepage?customer={console.seeded.champion}",
            "Homepage by RFM segment",
        ),
        ("customer", f"/customers/{console.seeded.champion}", "Customer"),
    ]
    for name, path, heading in pages:
        answer = page.goto(console.base + path)
        assert answer is not None and answer.status == 200, path
        policy = answer.headers["content-security-policy"]
        assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
        _settled(page)
        assert heading in page.locator("h1").inner_text(), path
        _shot(page, name)
        findings[path] = _axe(page)
    assert {path: found for path, found in findings.items() if found} == {}
    assert console.messages == []


def test_a_journey_is_edited_with_live_validation_then_activated(console: Console) -> None:
    page = _page(console, "marketer")
    page.goto(f"{console.base}/journeys/at-risk-winback")
    _settled(page)
    editor = page.get_by_label("Definition")
    source = editor.input_value()
    page.locator("#definition-check").get_by_text("Valid.").wait_for()
    editor.fill(source.replace('"start": "welcome"', '"start": "nowhere"'))
    problem = page.locator("#definition-check .errors")
    problem.wait_for()
    assert "nowhere" in problem.inner_text()
    _shot(page, "journey-invalid")
    edited = source.replace('"At risk RFM campaign"', '"At risk, edited in the browser"')
    editor.fill(edited)
    page.locator("#definition-check").get_by_text("Valid.").wait_for()
    page.get_by_role("button", name="Save as a new draft version").click()
    page.get_by_role("button", name="Activate version 2").wait_for()
    page.get_by_role("button", name="Activate version 2").click()
    page.wait_for_load_state()
    _settled(page)
    facts = page.locator("dl.facts").inner_text()
    assert "active 2, latest 2" in facts
    assert "At risk, edited in the browser" in page.locator("h1").inner_text()
    assert page.get_by_role("button", name=re.compile("Activate")).count() == 0
    _shot(page, "journey-activated")
    assert console.messages == []


def test_a_customer_is_followed_to_the_timeline_and_why(console: Console) -> None:
    page = _page(console, "support")
    page.get_by_role("link", name="Customers").click()
    page.get_by_label("Customer id or email").fill(console.seeded.at_risk)
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(rf".*/customers/{console.seeded.at_risk}$"))
    assert "at-risk-winback" in page.locator("main").inner_text()
    timeline = page.locator("table.timeline").first
    assert "sent welcome email" in timeline.inner_text()
    assert (
        page.get_by_role("link", name="Open in the Temporal UI")
        .first.get_attribute("href")
        .startswith("http://127.0.0.1:8233/namespaces/default/workflows/journey%3Aat-risk-winback")
    )
    _shot(page, "customer-timeline")
    page.get_by_role("link", name="why this way at by_channel?").first.click()
    page.wait_for_url(re.compile(r".*/why\?journey=at-risk-winback&step=by_channel$"))
    answer = page.locator("main").inner_text()
    assert "step by_channel" in answer and "sms_opt_in = true" in answer
    assert page.locator(".verdict").count() >= 2
    _shot(page, "why-branch")
    page.go_back()
    page.get_by_role("link", name="why?").first.click()
    page.wait_for_url(re.compile(r".*/why\?segment=.*"))
    assert "Why: segment" in page.locator("h1").inner_text()
    _shot(page, "why-segment")
    assert _axe(page) == []
    assert console.messages == []


def test_support_cannot_change_and_a_post_without_the_token_is_refused(
    console: Console,
) -> None:
    page = _page(console, "support")
    page.goto(f"{console.base}/journeys/champions-nurture")
    _settled(page)
    assert page.get_by_role("button", name="Save as a new draft version").count() == 0
    assert page.get_by_role("button", name=re.compile("Pause|Archive|Activate")).count() == 0
    assert page.get_by_label("Definition").get_attribute("readonly") is not None
    token = page.locator("input[name=csrf_token]").first.input_value()
    statuses = page.evaluate(
        """async (token) => {
            const post = (headers) => fetch('/console/journeys/champions-nurture/pause', {method: 'POST', headers,
                body: 'x=1', redirect: 'manual'}).then(r => r.status);
            const form = {'content-type': 'application/x-www-form-urlencoded'};
            return [await post({...form, 'x-csrf-token': token}), await post(form)];
        }""",
        token,
    )
    assert statuses == [403, 403]
    marketer = _page(console, "marketer")
    marketer.goto(f"{console.base}/journeys/champions-nurture")
    refused = marketer.evaluate(
        """() => fetch('/console/journeys/champions-nurture/pause', {method: 'POST', body: 'x=1',
            headers: {'content-type': 'application/x-www-form-urlencoded'}}).then(r => r.status)"""
    )
    assert refused == 403
    assert "active" in marketer.locator("dl.facts").inner_text()


def test_the_keyboard_reaches_everything(console: Console) -> None:
    page = _page(console, "marketer")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"
    page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement.id") == "main"
    page.goto(f"{console.base}/segments")
    _settled(page)
    seen = []
    for _ in range(12):
        page.keyboard.press("Tab")
        seen.append(page.evaluate("document.activeElement.textContent.trim()"))
    assert {"Overview", "RFM model", "Segments", "Journeys", "Sign out", "New segment"} <= set(seen)
    # Unlabelled controls would be axe findings; every input of the editors has a label.
    page.goto(f"{console.base}/segments/new")
    for control in page.locator("main input:not([type=hidden]), main textarea, main select").all():
        assert control.evaluate("e => e.labels.length") == 1
