"""The `journeys` command."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

console = Console()

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


@app.command()
def dev(
    data_dir: Annotated[
        Path, typer.Option(help="Where the SQLite files, logs and admin key live.")
    ] = Path(".journeys"),
    port: Annotated[int, typer.Option(help="API port.")] = 8000,
    temporal_port: Annotated[int, typer.Option(help="Temporal gRPC port.")] = 7233,
    ui_port: Annotated[
        int | None, typer.Option(help="Temporal UI port (default: the next port).")
    ] = None,
) -> None:
    """Run everything on the embedded default: Temporal dev server, one worker, the API."""
    from devstack import DevStack, PortBusy

    stack = DevStack(data_dir, port, temporal_port, ui_port or temporal_port + 1)
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    code = 0
    try:
        stack.start()
        console.print(
            f"ready api={stack.api_url} ui={stack.ui_url}", highlight=False, soft_wrap=True
        )
        console.print(
            f"[dim]admin key in {data_dir / 'admin-key'} (or $JOURNEYS_BOOTSTRAP_ADMIN_KEY); "
            f"logs in {data_dir / 'logs'}; Ctrl-C stops everything[/dim]"
        )
        while True:
            stack.raise_if_a_child_died()
            time.sleep(0.5)
    except KeyboardInterrupt:
        console.print("stopping..." if stopping else "\nstopping...")
    except PortBusy as exc:
        console.print(f"[red]error:[/red] {exc}")
        code = 2
    except RuntimeError as exc:
        console.print(f"[red]error:[/red] {exc}")
        code = 1
    finally:
        stack.stop()
    finish(code)


@app.command()
def api(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    workers: Annotated[int, typer.Option(help="Server processes.")] = 1,
) -> None:
    """Run the API alone against JOURNEYS_DATABASE_URL and JOURNEYS_TEMPORAL_ADDRESS."""
    import uvicorn

    uvicorn.run(
        "api.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="warning",
        access_log=False,
    )


@app.command()
def worker() -> None:
    """Run one Temporal worker (workflows, activities, dispatcher) against the configured stack."""
    from core.settings import get_settings
    from worker import run_worker

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_worker(get_settings()))
    finish(0)


@keys_app.command("create")
def keys_create(
    role: Annotated[str, typer.Option(help="admin | marketer | ingest | support")],
    name: Annotated[str, typer.Option(help="What the key is for.")] = "cli",
) -> None:
    """Create an API key in the configured store and print it (shown once)."""
    from core.db import get_engine, session_scope
    from core.migrate import migrate
    from store.keys import ROLES, create_key

    if role not in ROLES:
        console.print(f"[red]error:[/red] --role must be one of {', '.join(ROLES)}")
        finish(2)
    migrate(get_engine())
    with session_scope() as session:
        row, secret = create_key(session, role=role, name=name)
    console.print(f"id={row.id} role={row.role}")
    print(secret)
    finish(0)


@keys_app.command("list")
def keys_list() -> None:
    """List keys (never their secrets)."""
    from core.db import session_scope
    from store.keys import list_keys

    table = Table("id", "name", "role", "prefix", "created", "revoked")
    with session_scope() as session:
        for row in list_keys(session):
            table.add_row(
                row.id,
                row.name,
                row.role,
                row.prefix,
                str(row.created_at),
                str(row.revoked_at or ""),
            )
    console.print(table)
    finish(0)


@keys_app.command("revoke")
def keys_revoke(key_id: str) -> None:
    """Revoke a key by id."""
    from core.db import session_scope
    from core.errors import NotFound
    from store.keys import revoke_key

    try:
        with session_scope() as session:
            revoke_key(session, key_id=key_id)
    except NotFound as exc:
        console.print(f"[red]error:[/red] {exc.message}")
        finish(1)
    console.print(f"revoked {key_id}")
    finish(0)


def _import_file(path: Path, kind: str, batch_size: int, realtime: bool = True) -> None:
    from core.db import get_engine
    from core.importing import import_records

    if not path.exists():
        console.print(f"[red]error:[/red] no file {path}")
        finish(2)
    progress = Progress(
        TextColumn(f"importing {kind}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("bytes"),
        TimeRemainingColumn(),
        console=console,
    )
    with progress:
        task = progress.add_task(kind, total=path.stat().st_size)
        summary = import_records(
            get_engine(),
            path=path,
            kind=kind,
            batch_size=batch_size,
            realtime=realtime,
            on_progress=lambda done: progress.update(task, completed=done),
        )
    table = Table("accepted", "duplicates", "rejected", title=f"{kind} from {path.name}")
    table.add_row(str(summary.accepted), str(summary.duplicates), str(len(summary.rejected)))
    console.print(table)
    for rejection in summary.rejected[:50]:
        field = f" {rejection.field}:" if rejection.field else ""
        console.print(f"  line {rejection.line}:{field} {rejection.message}", highlight=False)
    if len(summary.rejected) > 50:
        console.print(f"  ... and {len(summary.rejected) - 50} more")
    finish(1 if summary.rejected else 0)


@events_app.command("import")
def events_import(
    file: Annotated[Path, typer.Argument(help="NDJSON, or CSV with a header (.csv)")],
    batch_size: Annotated[int, typer.Option(help="Events per transaction.")] = 10_000,
    realtime: Annotated[
        bool, typer.Option(help="--no-realtime for history: no rescoring or journeys.")
    ] = True,
) -> None:
    """Import events from a file: accepted / duplicates / rejected with line numbers."""
    _import_file(file, "events", batch_size, realtime)


@customers_app.command("import")
def customers_import(
    file: Annotated[Path, typer.Argument(help="NDJSON, or CSV with a header (.csv)")],
    batch_size: Annotated[int, typer.Option(help="Customers per transaction.")] = 5_000,
) -> None:
    """Upsert customers from a file (attributes merged)."""
    _import_file(file, "customers", batch_size)


# --- rfm commands ---

# --- segment commands ---

# --- journey commands ---

# --- message commands ---

# --- inspection commands ---


if __name__ == "__main__":
    app()
