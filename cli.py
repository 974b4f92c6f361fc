"""The `journeys` command."""

from __future__ import annotations

import os
import sys

import typer

app = typer.Typer(
    help="Journey orchestrator for lifecycle marketing: RFM, segments, durable journeys.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
keys_app = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)
events_app = typer.Typer(help="Import events from a file.", no_args_is_help=True)
customers_app = typer.Typer(help="Import customers from a file.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(events_app, name="events")
app.add_typer(customers_app, name="customers")


def finish(code: int = 0) -> None:
    """Flush and leave without interpreter finalisation (temporalio's threads, DESIGN.md)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# --- foundation commands: dev, api, worker, keys, events, customers ---

# --- rfm commands ---

# --- segment commands ---

# --- journey commands ---

# --- message commands ---

# --- inspection commands ---


if __name__ == "__main__":
    app()
