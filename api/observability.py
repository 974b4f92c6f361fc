"""HTTP metrics on `/metrics` (Prometheus), and the trace hand-off of stored events.

Requests are counted by method, route template (`/v1/customers/{customer_id}`, never the
raw path) and status, so the number of series is bounded by the routes, whatever callers
send. With several API processes (`journeys api --workers N`) prometheus-client runs in
its multiprocess mode: each process writes its samples to files in
`PROMETHEUS_MULTIPROC_DIR` (the command makes a fresh folder) and `/metrics`, answered by
any process, adds them all up.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping

from fastapi import Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.boundary import resource_router
from core import metrics as product_metrics
from core.metrics import MetricSpec
from core.observability import sampled_traceparent
from core.tables import utcnow
from store.trace_handoffs import record_handoff

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "unmatched"

REQUESTS = Counter(
    "journeys_http_requests",
    "HTTP requests answered, by method, route template and status",
    ["method", "route", "status"],
)
LATENCY = Histogram(
    "journeys_http_request_duration_seconds",
    "time from request to the end of the answer, by method and route template",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
ERRORS = Counter(
    "journeys_http_errors",
    "answers of class 4xx or 5xx (an unhandled exception counts as 5xx), by route template",
    ["method", "route", "status_class"],
)

router = resource_router(tags=["health"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
    summary="Prometheus metrics of the API processes",
)
def metrics() -> Response:
    """Requests, latency and errors by route template, summed over every API process."""
    if os.environ.get(MULTIPROCESS_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        body = generate_latest(registry)
    else:
        body = generate_latest(REGISTRY)
    return Response(content=body, media_type=CONTENT_TYPE_LATEST)


def route_template(scope: Scope) -> str:
    """The template of the route that served (or would have served) this request."""
    path = getattr(scope.get("route"), "path", None)
    if isinstance(path, str):
        return path
    # Answered before routing (413 from the size limit, a CORS preflight) or by no route:
    # match the path against the documented templates.
    app = scope.get("app")
    if app is None:
        return UNMATCHED
    templates = getattr(app.state, "route_templates", None)
    if templates is None:
        templates = [(compile_path(t)[0], t) for t in app.openapi().get("paths", {})]
        app.state.route_templates = templates
    for pattern, template in templates:
        if pattern.match(scope["path"]):
            return template
    return UNMATCHED


class HttpMetrics:
    """Outermost middleware: counts and times every HTTP request by route template."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        except BaseException:
            status = status or 500
            raise
        finally:
            self._observe(scope, status or 500, time.perf_counter() - started)

    @staticmethod
    def _observe(scope: Scope, status: int, seconds: float) -> None:
        method = scope["method"] if scope["method"] in METHODS else "other"
        route = route_template(scope)
        REQUESTS.labels(method, route, str(status)).inc()
        LATENCY.labels(method, route).observe(seconds)
        if status >= 400:
            ERRORS.labels(method, route, f"{status // 100}xx").inc()


class PrometheusClientSink:
    """The product metrics recorded in an API process (core/metrics.py), on `/metrics`."""

    def __init__(self) -> None:
        self._instruments: dict[str, Counter | Histogram] = {}
        for spec in product_metrics.ALL:
            if spec.kind == "counter":
                self._instruments[spec.name] = Counter(spec.name, spec.description, spec.labels)
            else:
                self._instruments[spec.name] = Histogram(
                    spec.name, spec.description, spec.labels, buckets=spec.buckets
                )

    def record(self, spec: MetricSpec, value: float, labels: Mapping[str, str]) -> None:
        instrument = self._instruments[spec.name]
        series = instrument.labels(**labels) if spec.labels else instrument
        if isinstance(series, Counter):
            series.inc(value)
        else:
            series.observe(value)


async def remember_trace(request: Request, customer_id: str) -> None:
    """With tracing on, record the trace this customer's event was stored in, so the
    journeys it leads to continue it (store/trace_handoffs.py)."""
    if not request.app.state.tracing:
        return
    traceparent = sampled_traceparent()
    if traceparent is None:
        return
    engine = request.app.state.engine

    def record() -> None:
        with engine.begin() as conn:
            record_handoff(conn, customer_id=customer_id, traceparent=traceparent, now=utcnow())

    await asyncio.to_thread(record)
