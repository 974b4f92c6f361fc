"""`/metrics` of the API: requests, latency and errors by route template, and the same
totals from every process when `journeys api --workers N` runs several."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from prometheus_client.mmap_dict import MmapedDict

from tests.utils.api import api_harness
from tests.utils.observability import free_port, samples, total

ROOT = Path(__file__).resolve().parent.parent


def test_requests_are_counted_by_route_template_never_by_raw_path(sqlite_engine) -> None:
    with api_harness(sqlite_engine, max_body_bytes=1_000) as api:
        before = samples(api.client.get("/metrics").text)
        for customer in ("ada", "bob", "cy"):
            assert api.get(f"/v1/customers/{customer}").status_code == 404
        assert api.get("/no/such/path/12345").status_code == 404
        too_large = api.post(
            "/v1/events/bulk", content=b"x" * 2_000, headers={"content-type": "text/plain"}
        )
        assert too_large.status_code == 413
        assert api.get("/healthz").status_code == 200
        after = samples(api.client.get("/metrics").text)

    def grew(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    customer = "/v1/customers/{customer_id}"
    assert grew("journeys_http_requests_total", route=customer, method="GET", status="404") == 3
    assert grew("journeys_http_errors_total", route=customer, status_class="4xx") == 3
    assert grew("journeys_http_request_duration_seconds_count", route=customer) == 3
    # Refused by the size limit before routing: still named by the route it was for.
    assert grew("journeys_http_requests_total", route="/v1/events/bulk", status="413") == 1
    assert grew("journeys_http_requests_total", route="unmatched", status="404") == 1
    assert grew("journeys_http_requests_total", route="/healthz", status="200") == 1
    assert grew("journeys_http_errors_total", route="/healthz") == 0
    routes = {dict(series).get("route") for _, series in after} - {None}
    assert not [r for r in routes if "ada" in r or "no/such" in r], routes


def _healthz_by_process(folder: Path) -> dict[str, float]:
    """Requests to /healthz each process counted, read from its own metric file."""
    counted: dict[str, float] = {}
    for path in folder.glob("counter_*.db"):
        for key, value, _, _ in MmapedDict.read_all_values_from_file(str(path)):
            _, name, labels, _ = json.loads(key)
            if name == "journeys_http_requests_total" and labels.get("route") == "/healthz":
                pid = path.stem.rsplit("_", 1)[-1]
                counted[pid] = counted.get(pid, 0) + value
    return counted


def _wait_until_up(url: str, process: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        try:
            if httpx.get(f"{url}/metrics", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("the API did not come up")


def test_every_api_process_answers_the_totals_of_all(tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "TMPDIR": str(tmp_path),
        "JOURNEYS_DATABASE_URL": f"sqlite:///{tmp_path / 'store.db'}",
        "JOURNEYS_TEMPORAL_ADDRESS": "127.0.0.1:1",
        "JOURNEYS_API_PROCESSES": "2",
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    api = subprocess.Popen(
        [sys.executable, "-m", "cli", "api", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(url, api)
        folder = next(tmp_path.glob("journeys-metrics-*"))
        pool = ThreadPoolExecutor(max_workers=16)

        def one(_: int) -> int:
            # A connection each, so the processes share the requests between them.
            return httpx.get(f"{url}/healthz", timeout=30).status_code

        # The second process may still be starting: ask until both have answered some.
        requests = 0
        deadline = time.monotonic() + 60
        while len(_healthz_by_process(folder)) < 2:
            assert time.monotonic() < deadline, _healthz_by_process(folder)
            assert set(pool.map(one, range(50))) == {200}
            requests += 50
        pool.shutdown()
        by_process = _healthz_by_process(folder)
        assert sum(by_process.values()) == requests
        scrapes = [samples(httpx.get(f"{url}/metrics", timeout=30).text) for _ in range(10)]
    finally:
        api.send_signal(signal.SIGTERM)
        api.wait(timeout=60)
    for found in scrapes:
        assert total(found, "journeys_http_requests_total", route="/healthz") == requests
        assert total(found, "journeys_http_request_duration_seconds_count", route="/healthz") == (
            requests
        )
    assert not folder.exists()  # the run's metric files go with it
