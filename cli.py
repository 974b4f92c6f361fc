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


def migrated_engine():  # noqa: ANN201
    """The configured store, migrated: every command that touches it starts here."""
    from core.db import get_engine
    from core.migrate import migrate

    engine = get_engine()
    migrate(engine)
    return engine


def finish(code: int = 0) -> None:
    """Flush and leave without interpreter finalisation (temporalio's threads, DESIGN.md)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# --- running it: dev, api, worker; keys; imports ---


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
    from core.db import session_scope
    from store.keys import ROLES, create_key

    if role not in ROLES:
        console.print(f"[red]error:[/red] --role must be one of {', '.join(ROLES)}")
        finish(2)
    with session_scope(migrated_engine()) as session:
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
    with session_scope(migrated_engine()) as session:
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
        with session_scope(migrated_engine()) as session:
            revoke_key(session, key_id=key_id)
    except NotFound as exc:
        console.print(f"[red]error:[/red] {exc.message}")
        finish(1)
    console.print(f"revoked {key_id}")
    finish(0)


def _import_file(path: Path, kind: str, batch_size: int, realtime: bool = True) -> None:
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
            migrated_engine(),
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


# --- RFM ---


@app.command("score")
def score(
    model: Annotated[str, typer.Argument(help="The RFM model's slug.")],
    as_of: Annotated[
        str | None,
        typer.Option(
            "--as-of", help="Score as of this ISO 8601 instant with a zone (default now)."
        ),
    ] = None,
) -> None:
    """Run a full RFM scoring pass of MODEL against the configured database."""
    from datetime import UTC, datetime

    from core.errors import JourneysError
    from store.rfm_models import get_model
    from store.scoring import PASS_STEPS, score_model, summarize

    when = datetime.now(UTC)
    if as_of is not None:
        try:
            when = datetime.fromisoformat(as_of.replace("Z", "+00:00"))
        except ValueError:
            console.print(f"[red]error:[/red] --as-of {as_of!r} is not an ISO 8601 instant")
            finish(2)
        if when.tzinfo is None:
            console.print("[red]error:[/red] --as-of needs a zone, e.g. 2026-11-20T10:00:00Z")
            finish(2)
    engine = migrated_engine()
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.elapsed:.1f}s"),
        console=console,
    )
    try:
        with progress:
            task = progress.add_task(PASS_STEPS[0], total=len(PASS_STEPS))

            def advance(done: int, total: int, step: str) -> None:
                progress.update(task, completed=done, total=total, description=step)

            with engine.begin() as conn:
                result = score_model(conn, model_slug=model, as_of=when, progress=advance)
        with engine.connect() as conn:
            labels = get_model(conn, slug=model).definition.labels()
            totals = summarize(conn, model_slug=model)
    except JourneysError as exc:
        console.print(f"[red]error:[/red] {exc.message}")
        finish(1)
    table = Table("label", "customers", "share", "monetary", title=f"RFM model {model!r}")
    for label in labels + sorted(set(totals["labels"]) - set(labels)):
        item = totals["labels"].get(label, {"count": 0, "monetary": 0.0})
        share = item["count"] / result.scored if result.scored else 0.0
        table.add_row(label, f"{item['count']:,}", f"{share:.1%}", f"{item['monetary']:,.2f}")
    console.print(table)
    console.print(
        f"pass {result.pass_id} as of {result.as_of.isoformat()}: {result.scored:,} scored,"
        f" {result.entries:,} entries, {result.exits:,} exits in {result.duration_ms:,} ms"
    )
    finish(0)


# --- segments ---

segments_app = typer.Typer(help="Evaluate rule-based segments.", no_args_is_help=True)
app.add_typer(segments_app, name="segments")


@segments_app.command("evaluate")
def segments_evaluate(
    slug: Annotated[str, typer.Argument(help="The rule segment's slug.")],
) -> None:
    """Evaluate rule segment SLUG now, then the rule segments that depend on it."""
    import time
    from datetime import UTC, datetime

    from core.errors import JourneysError
    from store.failures import FailureRecord
    from store.segments import evaluate_dependents, evaluate_segment

    engine = migrated_engine()
    now = datetime.now(UTC)
    started = time.monotonic()
    try:
        with engine.begin() as conn:
            diff = evaluate_segment(conn, slug=slug, now=now)
            dependents = evaluate_dependents(conn, segment_slugs=[slug], now=now)
    except JourneysError as exc:
        console.print(f"[red]error:[/red] {exc.message}")
        finish(1)
    console.print(f"{slug}: {diff.entries:,} entries, {diff.exits:,} exits")
    for dependent, change in dependents.items():
        if isinstance(change, FailureRecord):
            console.print(f"  then {dependent}: [red]set aside[/red]: {change.error}")
        else:
            console.print(f"  then {dependent}: {change.entries:,} entries, {change.exits:,} exits")
    console.print(f"done in {(time.monotonic() - started) * 1000:,.0f} ms")
    finish(0)


# --- journeys ---

journey_templates_app = typer.Typer(
    help="The seed's five RFM journeys shipped in templates/journeys/.", no_args_is_help=True
)
app.add_typer(journey_templates_app, name="templates")


def _rfm_model_hint(model: str, missing: list[str]) -> None:
    from core.settings import get_settings

    body = (
        f'{{"slug": "{model}", "name": "Lifecycle RFM", "recency_event": "Purchase", '
        '"frequency_event": "Purchase", "monetary_event": "Purchase", '
        '"monetary_property": "total_price", "timeframe": "P90D", "segment_map": "seed5", '
        '"realtime": true}'
    )
    console.print(
        f"[red]error:[/red] the journeys' trigger segments do not exist: {', '.join(missing)}.\n"
        f"They are the label segments of the seed5 RFM model {model!r}. Create it with\n"
        f"  journeys templates install --create-model{'' if model == 'default' else f' --model {model}'}\n"
        "or through the API (a marketer or admin key):"
    )
    print(
        f"curl -X POST {get_settings().public_url}/v1/rfm-models "
        '-H "Authorization: Bearer $JOURNEYS_KEY" -H "Content-Type: application/json" '
        f"-d '{body}'"
    )


@journey_templates_app.command("install")
def journey_templates_install(
    activate: Annotated[bool, typer.Option(help="Activate each journey after installing.")] = False,
    model: Annotated[
        str, typer.Option(help="The seed5 RFM model whose segments trigger them.")
    ] = "default",
    create_model: Annotated[
        bool,
        typer.Option(help="Create the seed5 model (Purchase / total_price over P90D) if missing."),
    ] = False,
) -> None:
    """Install the Champions, Regulars, Promising, Needs Attention and At Risk journeys
    into the configured store, as drafts (or active with --activate)."""
    from core.db import get_engine
    from core.errors import JourneysError
    from core.migrate import migrate
    from store.journeys import install_shipped_journeys, missing_trigger_segments

    engine = get_engine()
    migrate(engine)
    try:
        with engine.begin() as conn:
            missing = missing_trigger_segments(conn, model=model)
            if missing and create_model:
                from datetime import UTC, datetime

                from core.rfm import RfmModelCreate
                from store.rfm_models import create_model as create_rfm_model

                seed5 = RfmModelCreate(
                    slug=model,
                    name="Lifecycle RFM",
                    recency_event="Purchase",
                    frequency_event="Purchase",
                    monetary_event="Purchase",
                    monetary_property="total_price",
                    timeframe="P90D",
                    segment_map="seed5",
                    realtime=True,
                )
                create_rfm_model(conn, model=seed5, now=datetime.now(UTC))
                console.print(f"created RFM model {model!r} (seed5, Purchase / total_price, P90D)")
                missing = missing_trigger_segments(conn, model=model)
            if missing:
                _rfm_model_hint(model, missing)
                finish(1)
            outcomes = install_shipped_journeys(conn, model=model, activate=activate)
    except JourneysError as exc:
        for detail in exc.details():
            console.print(f"[red]error:[/red] {detail.message} [dim]({detail.field})[/dim]")
        finish(1)
    table = Table("journey", "file", "action", "state", "version")
    for o in outcomes:
        table.add_row(o.slug, o.file, o.action, o.state, str(o.version))
    console.print(table)
    finish(0)


# --- inspection ---


@app.command("inspect")
def inspect_customer(
    customer: Annotated[str, typer.Argument(help="The customer id.")],
) -> None:
    """A customer's journeys: each run's status and its timeline, with the reasons."""
    from core.db import get_engine
    from core.settings import get_settings
    from store.inspection import customer_journeys

    settings = get_settings()
    with get_engine().connect() as conn:
        runs = customer_journeys(
            conn,
            customer_id=customer,
            ui_base=settings.temporal_ui_url,
            namespace=settings.temporal_namespace,
        )
    if not runs:
        console.print(f"customer {customer!r} has no journey runs")
        finish(0)
    for run in runs:
        where = f"at {run.step}" if run.step else ""
        if run.waiting_for:
            until = f" until {run.waiting_until:%Y-%m-%d %H:%M} UTC" if run.waiting_until else ""
            where += f", waiting for {run.waiting_for}{until}"
        console.rule(
            f"[bold]{run.journey}[/bold] v{run.version} · [cyan]{run.status}[/cyan] {where}"
        )
        table = Table("time (UTC)", "what happened", "why", show_edge=False, expand=True)
        for line in run.timeline:
            table.add_row(f"{line.at:%Y-%m-%d %H:%M:%S}", line.text, f"[dim]{line.reason}[/dim]")
        console.print(table)
        console.print(f"[dim]workflow {run.workflow_id} run {run.run_id}\n{run.ui_url}[/dim]")
    finish(0)


def _bar(value: int, top: int, width: int = 30) -> str:
    filled = round(width * value / top) if top else 0
    return "█" * filled + "·" * (width - filled)


@app.command("analytics")
def journey_analytics_command(
    journey: Annotated[str, typer.Argument(help="The journey slug.")],
    version: Annotated[int | None, typer.Option(help="Only runs of this version.")] = None,
) -> None:
    """A journey's funnel: runs, conversions and, per step, reach and message outcomes."""
    from core.db import get_engine
    from store.analytics import journey_analytics, journey_exists

    with get_engine().connect() as conn:
        if not journey_exists(conn, journey_slug=journey):
            console.print(f"[red]error:[/red] no journey {journey!r}")
            finish(1)
        result = journey_analytics(conn, journey_slug=journey, version=version)
    avg = (
        f"{result.avg_days_to_convert:.1f} days" if result.avg_days_to_convert is not None else "-"
    )
    console.print(
        f"[bold]{journey}[/bold]{f' v{version}' if version else ''}: triggered"
        f" {result.triggered}, converted {result.converted}"
        f" ({result.conversion_rate:.1%}), avg {avg} to convert, in progress"
        f" {result.in_progress}, completed {result.completed}, exited early"
        f" {result.exited_early}, failed {result.failed}"
    )
    columns = ("step", "type", "entered", "", "sent", "delivered", "opened", "clicked")
    table = Table(*columns, "failed", "skipped", "exits")
    top = max([result.triggered, *(s.entered for s in result.steps)], default=0)
    for step in result.steps:
        exits = ", ".join(f"{e.exit}→{e.next or 'end'} {e.share:.0%}" for e in (step.exits or []))
        counts = (step.sent, step.delivered, step.opened, step.clicked, step.failed, step.skipped)
        table.add_row(
            step.step,
            step.type or "?",
            str(step.entered),
            _bar(step.entered, top),
            *(str(count) for count in counts),
            exits,
        )
    console.print(table)
    finish(0)


if __name__ == "__main__":
    app()
