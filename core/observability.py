"""Logs and traces: how every process of the product reports what it does.

Logs are text, or one JSON object a line (`JOURNEYS_LOG_FORMAT=json`) carrying the
workflow id, run id, activity and customer id of the work that logged, and the trace id
when tracing is on. Either way the values of secret settings are masked before a line
is written. Traces are OpenTelemetry spans, off by default (`JOURNEYS_TRACING`), sent to
an OTLP/HTTP collector or printed; docs/production.md says how to turn them on.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import IO, Any

import orjson
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from temporalio import activity

from core.settings import Settings, get_settings

MASK = "***"
JOURNEY_WORKFLOW_PREFIX = "journey:"
# Extras a log call may pass (`extra={"customer_id": ...}`) that a JSON line carries.
CONTEXT_FIELDS = ("customer_id", "workflow_id", "run_id", "journey", "segment", "task_queue")
# Libraries that log every HTTP request at INFO: kept to warnings unless debugging.
CHATTY_LOGGERS = ("httpx", "httpcore", "urllib3", "twilio.http_client", "python_http_client")

# A segment entry this long after a customer's traced event no longer continues its trace.
TRACE_HANDOFF_WINDOW = timedelta(minutes=10)

_propagator = TraceContextTextMapPropagator()


# --- logs -----------------------------------------------------------------------------


def mask_secrets(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def customer_of_workflow(workflow_id: str) -> str | None:
    """`journey:{slug}:{customer}` -> the customer (ids may hold ':', slugs do not)."""
    if not workflow_id.startswith(JOURNEY_WORKFLOW_PREFIX):
        return None
    parts = workflow_id.split(":", 2)
    return parts[2] if len(parts) == 3 else None


# The SDK's logger details (`temporal_workflow` / `temporal_activity`) -> our field names.
_TEMPORAL_DETAILS = {
    "workflow_id": "workflow_id",
    "run_id": "run_id",
    "workflow_run_id": "run_id",
    "activity_type": "activity",
    "attempt": "attempt",
    "task_queue": "task_queue",
}


def temporal_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The workflow and activity a record was logged from, if any."""
    fields: dict[str, Any] = {}
    details = getattr(record, "temporal_workflow", None) or getattr(
        record, "temporal_activity", None
    )
    if isinstance(details, dict):
        for key, name in _TEMPORAL_DETAILS.items():
            if key in details:
                fields[name] = details[key]
    elif activity.in_activity():
        # A plain `logging.getLogger(...)` call inside an activity (its thread or task).
        info = activity.info()
        fields.update(
            workflow_id=info.workflow_id,
            run_id=info.workflow_run_id,
            activity=info.activity_type,
            attempt=info.attempt,
        )
    workflow_id = fields.get("workflow_id")
    if isinstance(workflow_id, str):
        customer = customer_of_workflow(workflow_id)
        if customer is not None:
            fields["customer_id"] = customer
    return fields


def trace_fields() -> dict[str, str]:
    span = trace.get_current_span().get_span_context()
    if not span.is_valid:
        return {}
    return {"trace_id": format(span.trace_id, "032x"), "span_id": format(span.span_id, "016x")}


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message and the work's context."""

    def __init__(self, secrets: Sequence[str] = ()) -> None:
        super().__init__()
        self.secrets = list(secrets)

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": mask_secrets(record.getMessage(), self.secrets),
        }
        line.update(temporal_fields(record))
        line.update(trace_fields())
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exception"] = mask_secrets(self.formatException(record.exc_info), self.secrets)
        if record.stack_info:
            line["stack"] = mask_secrets(self.formatStack(record.stack_info), self.secrets)
        return orjson.dumps(line, default=str).decode()


class TextFormatter(logging.Formatter):
    """The plain format, with secrets masked like the JSON one."""

    def __init__(self, secrets: Sequence[str] = ()) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")
        self.secrets = list(secrets)

    def format(self, record: logging.LogRecord) -> str:
        return mask_secrets(super().format(record), self.secrets)


def formatter_for(settings: Settings) -> logging.Formatter:
    secrets = settings.secret_values()
    return JsonFormatter(secrets) if settings.log_format == "json" else TextFormatter(secrets)


def configured_formatter() -> logging.Formatter:
    """The formatter of the environment's settings (named by uvicorn's logging config,
    which each API process applies when it starts)."""
    return formatter_for(get_settings())


def configure_logging(settings: Settings, stream: IO[str] | None = None) -> None:
    """Route every logger of this process through one handler in the configured format."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter_for(settings))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    _quiet_chatty_loggers(settings)


def _quiet_chatty_loggers(settings: Settings) -> None:
    if settings.log_level != "debug":
        for name in CHATTY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)


def uvicorn_log_config(settings: Settings) -> dict[str, Any]:
    """uvicorn's `log_config`: its loggers and ours through the configured formatter."""
    _quiet_chatty_loggers(settings)
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"journeys": {"()": "core.observability.configured_formatter"}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "journeys",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"handlers": ["stderr"], "level": settings.log_level.upper()},
        "loggers": {
            name: {"handlers": [], "propagate": True}
            for name in ("uvicorn", "uvicorn.error", "uvicorn.access")
        },
    }


# --- traces ---------------------------------------------------------------------------


def tracer_provider_for(settings: Settings, service: str, exporter: Any = None) -> Any:
    """A TracerProvider exporting this process's spans (`service`: api or worker), or None
    when tracing is off. A test passes its own exporter (spans exported one by one)."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SimpleSpanProcessor,
    )

    if exporter is None and settings.tracing == "off":
        return None
    provider = TracerProvider(
        resource=Resource.create({"service.name": f"{settings.service_name}-{service}"})
    )
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    elif settings.tracing == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.otlp_endpoint))
        )
    return provider


def temporal_tracing_interceptors(provider: Any) -> list[Any]:
    """The SDK's tracing interceptor for a client (its workers inherit it), or none."""
    if provider is None:
        return []
    from temporalio.contrib.opentelemetry import TracingInterceptor

    return [TracingInterceptor(provider.get_tracer("journeys"))]


def client_traces(client: Any) -> bool:
    """Whether `client` carries the tracing interceptor (so a hand-off is worth reading)."""
    from temporalio.contrib.opentelemetry import TracingInterceptor

    config = getattr(client, "config", None)
    interceptors = config().get("interceptors") or [] if callable(config) else []
    return any(isinstance(i, TracingInterceptor) for i in interceptors)


def sampled_traceparent() -> str | None:
    """The W3C `traceparent` of the current span, if it is being recorded."""
    span = trace.get_current_span().get_span_context()
    if not span.is_valid or not span.trace_flags.sampled:
        return None
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier.get("traceparent")


@contextmanager
def continued_trace(traceparent: str | None) -> Iterator[None]:
    """Make `traceparent` the current trace context (nothing when None)."""
    if not traceparent:
        yield
        return
    token = otel_context.attach(_propagator.extract({"traceparent": traceparent}))
    try:
        yield
    finally:
        otel_context.detach(token)
