"""The production stack's files, checked without a Docker engine: docker-compose.yml
against the app's settings model and routes, .env.example against both, the Dockerfile's
stages and user."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from api.app import create_app
from core.settings import REQUIRED_IN_PRODUCTION, SECRET_SETTINGS, Settings
from tests.utils.api import settings_for_tests

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
PRODUCT = ("api", "worker")
# ${NAME}, ${NAME:-default}, ${NAME:?message}
REFERENCE = re.compile(r"\$\{([A-Z0-9_]+)(?:(:-|:\?)([^}]*))?\}")
SECRET_ENV = {f"JOURNEYS_{name.upper()}" for name in SECRET_SETTINGS} | {
    "POSTGRES_PASSWORD",
    "POSTGRES_PWD",
}


def _env_example() -> dict[str, str]:
    pairs = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            pairs[name.strip()] = value.strip()
    return pairs


def _interpolate(value: str, values: dict[str, str]) -> str:
    """What compose makes of `value` with `values` as the .env file."""

    def one(match: re.Match[str]) -> str:
        name, how, default = match.groups()
        if values.get(name):
            return values[name]
        if how == ":?":
            raise KeyError(name)
        return default or ""

    return REFERENCE.sub(one, value)


def _filled_env_example() -> dict[str, str]:
    """.env.example as a user fills it in: every required secret given a value."""
    values = _env_example()
    for name, value in values.items():
        if not value:
            values[name] = f"filled-{name.lower()}-0123456789"
    return values


def _healthcheck_url(service: dict[str, Any]) -> str:
    command = " ".join(str(part) for part in service["healthcheck"]["test"])
    (url,) = re.findall(r"https?://[^'\" ]+", command)
    return url


def test_the_stack_has_every_part_on_pinned_images() -> None:
    assert set(SERVICES) == {"postgres", "temporal", "temporal-ui", "api", "worker"}
    for name, service in SERVICES.items():
        image = service["image"]
        if name in PRODUCT:
            assert service["build"] == "." and image == "journeys:local"
            continue
        repository, _, tag = image.partition(":")
        assert re.fullmatch(r"\d+\.\d+(\.\d+)?(-[a-z0-9]+)?", tag), f"{name}: {image} not pinned"
    assert SERVICES["temporal"]["image"].split(":")[0] in {
        "temporalio/auto-setup",
        "temporalio/server",
    }
    assert SERVICES["temporal-ui"]["image"].startswith("temporalio/ui:")
    assert SERVICES["postgres"]["image"].startswith("postgres:")


def test_temporal_keeps_its_state_in_the_stacks_postgresql() -> None:
    temporal = SERVICES["temporal"]["environment"]
    assert temporal["DB"] == "postgres12" and temporal["POSTGRES_SEEDS"] == "postgres"
    assert SERVICES["temporal"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert SERVICES["temporal-ui"]["environment"]["TEMPORAL_ADDRESS"] == "temporal:7233"
    assert "postgres-data:/var/lib/postgresql/data" in SERVICES["postgres"]["volumes"]


@pytest.mark.parametrize("name", PRODUCT)
def test_the_product_is_configured_only_by_settings_it_has(name: str) -> None:
    environment = SERVICES[name]["environment"]
    fields = {f"JOURNEYS_{field.upper()}" for field in Settings.model_fields}
    assert set(environment) <= fields, set(environment) - fields
    required = {f"JOURNEYS_{field.upper()}" for field in REQUIRED_IN_PRODUCTION}
    assert required <= set(environment), required - set(environment)
    assert environment["JOURNEYS_ENVIRONMENT"] == "production"
    # What the containers receive with .env.example filled in is a valid production
    # configuration (the model refuses missing required settings and placeholder secrets).
    filled = {k: _interpolate(str(v), _filled_env_example()) for k, v in environment.items()}
    settings = Settings(**{k.removeprefix("JOURNEYS_").lower(): v for k, v in filled.items()})
    assert settings.resolved_database_url.startswith("postgresql+psycopg://journeys:")
    assert settings.temporal_address == "temporal:7233"
    assert settings.worker_metrics_address and settings.log_format == "json"


def test_production_refuses_to_start_without_what_it_requires() -> None:
    with pytest.raises(ValueError, match="JOURNEYS_DATABASE_URL"):
        Settings(environment="production", secret_key="a-real-secret-0123456789")
    with pytest.raises(ValueError, match="JOURNEYS_SECRET_KEY"):
        Settings(environment="production", secret_key="change-me")


def test_no_secret_has_a_value_in_the_files() -> None:
    for name, service in SERVICES.items():
        for key, value in (service.get("environment") or {}).items():
            text = str(value)
            if key == "JOURNEYS_DATABASE_URL":  # its secret is the password inside
                password = text.split("://", 1)[1].rsplit("@", 1)[0].split(":", 1)[1]
                assert REFERENCE.fullmatch(password), f"{name}.{key} has a literal password"
            elif key in SECRET_ENV:
                assert REFERENCE.fullmatch(text), f"{name}.{key} has a literal value"
            # A secret's value is never interpolated with a default.
            for reference, how, default in REFERENCE.findall(text):
                if reference in SECRET_ENV and how == ":-":
                    assert default == "", f"{name}.{key} defaults {reference}"
    for required in ("JOURNEYS_SECRET_KEY", "POSTGRES_PASSWORD"):
        assert f"${{{required}:?" in (ROOT / "docker-compose.yml").read_text()
    example = _env_example()
    for key in SECRET_ENV & set(example):
        assert example[key] == "", f".env.example gives {key} a value"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert not re.search(r"^\s*(ENV|ARG)\b.*JOURNEYS_", dockerfile, re.MULTILINE)
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert ".env" in ignored and ".journeys" in ignored


def test_env_example_names_what_compose_reads_and_only_real_settings() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    referenced = {match[0] for match in REFERENCE.findall(text)}
    example = _env_example()
    assert referenced <= set(example), referenced - set(example)
    fields = {f"JOURNEYS_{field.upper()}" for field in Settings.model_fields}
    ours = {key for key in example if key.startswith("JOURNEYS_")}
    assert ours <= fields, ours - fields


def test_health_checks_ask_real_routes_and_ports() -> None:
    paths = create_app(settings_for_tests()).openapi()["paths"]
    get_routes = {path for path, methods in paths.items() if "get" in methods}
    api = SERVICES["api"]
    url = urlparse(_healthcheck_url(api))
    assert url.path in get_routes and url.path == "/readyz"
    assert str(url.port) == api["command"][api["command"].index("--port") + 1]
    assert f"{url.port}:{url.port}" in api["ports"]
    worker = SERVICES["worker"]
    url = urlparse(_healthcheck_url(worker))
    metrics_address = worker["environment"]["JOURNEYS_WORKER_METRICS_ADDRESS"]
    assert url.path == "/metrics" and metrics_address.endswith(f":{url.port}")
    assert SERVICES["temporal"]["healthcheck"]["test"][1] == "temporal"
    assert "pg_isready" in SERVICES["postgres"]["healthcheck"]["test"][1]
    for name in PRODUCT:
        assert SERVICES[name]["depends_on"]["temporal"]["condition"] == "service_healthy"
        assert SERVICES[name]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_workers_are_replicas_and_the_api_runs_several_processes() -> None:
    assert REFERENCE.fullmatch(str(SERVICES["worker"]["deploy"]["replicas"]))
    assert SERVICES["worker"]["command"] == ["journeys", "worker"]
    processes = SERVICES["api"]["environment"]["JOURNEYS_API_PROCESSES"]
    assert int(_interpolate(processes, _env_example())) > 1
    assert "--workers" not in SERVICES["api"]["command"]  # JOURNEYS_API_PROCESSES decides


def test_the_image_is_built_in_stages_and_runs_as_a_user() -> None:
    lines = [
        line.strip()
        for line in (ROOT / "Dockerfile").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    stages = [i for i, line in enumerate(lines) if line.startswith("FROM ")]
    assert len(stages) >= 2
    for i in stages:
        image = lines[i].split()[1]
        assert re.search(r":\d+\.\d+\.\d+", image), f"{image} not pinned"
    final = lines[stages[-1] :]
    users = [line.split()[1] for line in final if line.startswith("USER ")]
    assert users, "the final stage sets no USER: it would run as root"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"} and user.isdigit()  # numeric: runAsNonRoot can check it
    assert any(line.startswith("COPY --from=") for line in final)
    assert not [line for line in final if line.startswith("RUN") and "pip install" in line]
    assert final[-1].startswith("CMD") and "journeys" in final[-1]
