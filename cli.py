"""The `journeys` command."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine


def _console(*, stderr: bool = False) -> Console:
    # Piped or captured output is read whole: rich would otherwise wrap tables at 80
    # columns and cut ids and timestamps in two.
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() or os.environ.get("COLUMNS") else 200
    return Console(stderr=stderr, width=width)


console = _console()
err_console = _console(stderr=True)

# Exit codes (README, "The `journeys` command"): 2 is Typer's and ours for usage errors.
EXIT_FAILED = 1  # the command ran and failed: an unknown slug, rejected lines, invalid input
EXIT_USAGE = 2
EXIT_STORE = 3  # the database: not reachable, locked, not a database, not migrated, newer
EXIT_TEMPORAL = 4  # the Temporal server: not reachable or refusing


class JourneysTyper(typer.Typer):
    """The command: a failure of the store, Temporal or the domain is one line on stderr
    and an exit code, never a traceback (anything else is a bug, and shows one)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except Exception as exc:
            failure = explain_failure(exc)
            if failure is None:
                raise
            code, message = failure
            sys.stderr.write(f"journeys: {message}\n")
            finish(code)


app = JourneysTyper(
    help="Journey orchestrator for lifecycle marketing: RFM, segments, durable journeys.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
keys_app = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)
events_app = typer.Typer(help="Import events from a file.", no_args_is_help=True)
customers_app = typer.Typer(help="Import customers from a file.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")

# These start a stack of their own (or part of one) from the environment as given.
STACK_COMMANDS = {"dev", "api", "worker"}


@app.callback()
def use_running_dev_stack(ctx: typer.Context) -> None:
    """Commands run from another shell or folder act on the running `journeys dev` stack."""
    from stackrecord import adopt_running_stack

    if ctx.invoked_subcommand in STACK_COMMANDS:
        return
    stack = adopt_running_stack(os.environ)
    if stack is not None:
        err_console.print(
            f"[dim]using the running dev stack: data in {stack.data_dir}, API {stack.api_url}"
            " (set JOURNEYS_DATA_DIR or JOURNEYS_DATABASE_URL to choose another store)[/dim]",
            highlight=False,
        )


app.add_typer(events_app, name="events")
app.add_typer(customers_app, name="customers")


class StoreUnreachable(Exception):
    """The configured database cannot even be opened: a bad URL, a folder we cannot make."""


def store_engine() -> Engine:
    """The configured store's engine, not yet connected."""
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    from core.db import get_engine

    try:
        return get_engine()
    except (ArgumentError, NoSuchModuleError, ImportError) as exc:  # ImportError: no driver
        raise StoreUnreachable(f"is not a database URL this version can use ({exc})") from exc
    except OSError as exc:
        raise StoreUnreachable(
            f"is not reachable: cannot create the folder {exc.filename} ({exc.strerror})"
        ) from exc


def migrated_engine() -> Engine:
    """The configured store, migrated: every command that writes to it starts here."""
    from core.migrate import migrate

    engine = store_engine()
    try:
        migrate(engine)
    except OSError as exc:  # the migration lock file beside a SQLite database
        raise StoreUnreachable(f"is not reachable: {exc.strerror} ({exc.filename})") from exc
    return engine


def current_engine() -> Engine:
    """The configured store for commands that only read: already at this code's schema."""
    from core.migrate import require_current_schema

    engine = store_engine()
    require_current_schema(engine)
    return engine


def finish(code: int = 0) -> None:
    """Flush and leave without interpreter finalisation (temporalio's threads, see
    docs/architecture.md)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def explain_failure(exc: BaseException) -> tuple[int, str] | None:
    """The exit code and one line for a failure the user can act on; None for a bug."""
    from core.errors import JourneysError, ValidationFailed

    if isinstance(exc, ValidationFailed):
        return EXIT_FAILED, "; ".join(
            f"{detail.message} ({detail.field})" if detail.field else detail.message
            for detail in exc.details()
        )
    if isinstance(exc, JourneysError):
        return EXIT_FAILED, exc.message
    problem = _store_problem(exc)
    if problem is not None:
        return EXIT_STORE, f"the database at {_shown_database_url()} {problem}"
    problem = _temporal_problem(exc)
    if problem is not None:
        from core.settings import get_settings

        return EXIT_TEMPORAL, f"Temporal at {get_settings().temporal_address} {problem}"
    return None


def _store_problem(exc: BaseException) -> str | None:
    from alembic.util import CommandError
    from sqlalchemy.exc import DBAPIError

    from core.migrate import SchemaMismatch, SchemaNotMigrated

    if isinstance(exc, SchemaNotMigrated):
        return f"{exc}: `journeys api` or `journeys worker` migrates it on start"
    if isinstance(exc, StoreUnreachable | SchemaMismatch):
        return str(exc)
    if isinstance(exc, DBAPIError):
        return _driver_problem(exc.orig) or f"answered an error: {_first_line(exc.orig)}"
    if isinstance(exc, CommandError):
        return f"cannot be migrated: {_first_line(exc)}"
    return _driver_problem(exc)  # the few raw driver calls (SQLite's write lock, COPY)


def _driver_problem(error: BaseException) -> str | None:
    import sqlite3

    if isinstance(error, sqlite3.Error):
        return _sqlite_problem(error)
    psycopg = sys.modules.get("psycopg")
    if psycopg is not None and isinstance(error, psycopg.Error):
        return _postgres_problem(error)
    return None


def _sqlite_problem(error: Exception) -> str:
    import sqlite3

    from core.db import sqlite_busy_timeout_ms

    reason = _first_line(error)
    code = getattr(error, "sqlite_errorcode", 0) & 0xFF  # the primary code of an extended one
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) or "locked" in reason:
        return (
            f"is locked: another process held it for longer than"
            f" {sqlite_busy_timeout_ms() / 1000:g} s (JOURNEYS_SQLITE_BUSY_TIMEOUT_MS)"
        )
    if code == sqlite3.SQLITE_NOTADB:
        return f"is not a SQLite database: {reason}"
    if code == sqlite3.SQLITE_CORRUPT:
        return f"is damaged: {reason}"
    if code in (sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM, sqlite3.SQLITE_IOERR):
        return f"is not reachable: {reason}"
    return f"answered an error: {reason}"


def _postgres_problem(error: Any) -> str:
    import psycopg

    # libpq's message names host and port, which the URL shows already: keep its reason.
    reason = _first_line(error).rsplit(" failed: ", 1)[-1]
    state = error.sqlstate or ""
    # No SQLSTATE: the client could not connect; 08 connection, 28 authorization,
    # 3D no such database, 57P the server shutting down or starting.
    if isinstance(error, psycopg.OperationalError) and (
        not state or state[:2] in ("08", "28", "3D") or state.startswith("57P")
    ):
        return f"is not reachable: {reason}"
    if state in ("55P03", "40P01"):
        return f"is locked: {reason}"
    return f"answered an error: {reason}"


def _temporal_problem(exc: BaseException) -> str | None:
    if isinstance(exc, RuntimeError) and str(exc).startswith("Failed client connect"):
        # The Rust core's message is a nested debug print; its innermost text is the reason.
        reasons = re.findall(r'(?:message|error): "([^"]+)"', str(exc))
        return f"is not reachable: {reasons[-1] if reasons else _first_line(exc)}"
    service = sys.modules.get("temporalio.service")
    if service is not None and isinstance(exc, service.RPCError):
        unreachable = (service.RPCStatusCode.UNAVAILABLE, service.RPCStatusCode.DEADLINE_EXCEEDED)
        if exc.status in unreachable:
            return f"is not reachable: {exc.message}"
        return f"answered an error: {exc.message}"
    return None


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return re.sub(r"\s+", " ", lines[0]) if lines else type(error).__name__


def _shown_database_url() -> str:
    from sqlalchemy.engine import make_url

    from core.settings import get_settings

    url = get_settings().resolved_database_url
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL at all: hide whatever sits between ':' and '@'
        return re.sub(r":[^:/@]*@", ":***@", url)


# --- running it: dev, api, worker; keys; imports ---


@app.command()
def dev(
    data_dir: Annotated[
        Path, typer.Option(help="Where the SQLite files, logs and admin key live.")
    ] = Path(".journeys"),
    port: Annotated[int, typer.Option(help="API port.")] = 8000,
    temporal_port: Annotated[int, typer.Option(help="Temporal gRPC port.")] = 7233,
    ui_port: Annotated[
        int | None,
        typer.Option(help="Temporal UI port (default: the Temporal port + 1000, so 8233)."),
    ] = None,
    workers: Annotated[
        int, typer.Option(min=1, max=16, help="Worker processes (they share the task queue).")
    ] = 1,
) -> None:
    """Run everything on the embedded default: Temporal dev server, one worker, the API.

    A child that dies is started again (after 1 s, doubling while it keeps dying, at most
    30 s) on the same data; only Ctrl-C or SIGTERM stops the stack."""
    from devstack import DevStack, PortBusy
    from stackrecord import StackRecord, remove_record, write_record

    def say(line: str) -> None:
        console.print(f"{time.strftime('%H:%M:%S')} {line}", highlight=False, soft_wrap=True)

    # The Temporal CLI's own rule (7233 -> 8233), so its default UI address is ours too.
    stack = DevStack(
        data_dir, port, temporal_port, ui_port or temporal_port + 1000, workers=workers, say=say
    )
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    code = 0
    recorded: Path | None = None
    try:
        stack.start()
        env = stack.environment("")
        recorded = write_record(
            StackRecord(
                pid=os.getpid(),
                data_dir=str(data_dir.resolve()),
                database_url=env["JOURNEYS_DATABASE_URL"],
                temporal_address=env["JOURNEYS_TEMPORAL_ADDRESS"],
                temporal_ui_url=env["JOURNEYS_TEMPORAL_UI_URL"],
                api_url=env["JOURNEYS_PUBLIC_URL"],
            )
        )
        console.print(
            f"ready api={stack.api_url} ui={stack.ui_url}", highlight=False, soft_wrap=True
        )
        console.print(
            f"[dim]admin key in {data_dir / 'admin-key'} (or $JOURNEYS_BOOTSTRAP_ADMIN_KEY); "
            f"logs in {data_dir / 'logs'}; Ctrl-C stops everything[/dim]"
        )
        while True:
            stack.heal()
            time.sleep(0.25)
    except KeyboardInterrupt:
        console.print("stopping..." if stopping else "\nstopping...")
    except PortBusy as exc:
        console.print(f"[red]error:[/red] {exc}")
        code = EXIT_USAGE
    except RuntimeError as exc:
        console.print(f"[red]error:[/red] {exc}")
        code = EXIT_FAILED
    finally:
        if recorded is not None:  # never another stack's record (a busy port, say)
            remove_record(data_dir)
        stack.stop()
    finish(code)


@app.command()
def api(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    workers: Annotated[
        int | None,
        typer.Option(help="Server processes (default: JOURNEYS_API_PROCESSES, else 1)."),
    ] = None,
) -> None:
    """Run the API alone against JOURNEYS_DATABASE_URL and JOURNEYS_TEMPORAL_ADDRESS."""
    import uvicorn

    from core.observability import uvicorn_log_config
    from core.settings import get_settings

    settings = get_settings()
    processes = workers or settings.api_processes
    # The app migrates on start too, but a failure there is a traceback in uvicorn's log.
    migrated_engine().dispose()
    with _metrics_folder(processes):
        uvicorn.run(
            "api.app:serve",
            factory=True,
            host=host,
            port=port,
            workers=processes,
            log_level="warning",
            log_config=uvicorn_log_config(settings),
            access_log=False,
        )


@contextlib.contextmanager
def _metrics_folder(processes: int) -> Iterator[None]:
    """Several API processes share their metrics through files in one folder
    (prometheus-client's multiprocess mode): one made for this run, or the operator's
    PROMETHEUS_MULTIPROC_DIR emptied of an earlier run's files."""
    import shutil
    import tempfile

    if processes < 2:
        yield
        return
    configured = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if configured:
        for stale in Path(configured).glob("*.db"):
            stale.unlink(missing_ok=True)
        yield
        return
    folder = tempfile.mkdtemp(prefix="journeys-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    try:
        yield
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@app.command()
def worker() -> None:
    """Run one Temporal worker (workflows, activities, dispatcher) against the configured stack."""
    from core.settings import get_settings
    from worker import run_worker

    migrated_engine().dispose()  # a store that cannot serve is one line, before any logging
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_worker(get_settings()))
    finish(0)


@keys_app.command("create")
def keys_create(
    role: Annotated[str, typer.Option(help="admin | marketer | ingest | support | web")],
    name: Annotated[str, typer.Option(help="What the key is for.")] = "cli",
) -> None:
    """Create an API key in the configured store and print it (shown once)."""
    from core.db import session_scope
    from store.keys import ROLES, create_key

    if role not in ROLES:
        console.print(f"[red]error:[/red] --role must be one of {', '.join(ROLES)}")
        finish(EXIT_USAGE)
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
    from store.keys import revoke_key

    with session_scope(migrated_engine()) as session:
        revoke_key(session, key_id=key_id)
    console.print(f"revoked {key_id}")
    finish(0)


def _import_file(path: Path, kind: str, batch_size: int, realtime: bool = True) -> None:
    from core.importing import import_records

    if not path.exists():
        console.print(f"[red]error:[/red] no file {path}")
        finish(EXIT_USAGE)
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
    finish(EXIT_FAILED if summary.rejected else 0)


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

    from store.rfm_models import get_model
    from store.scoring import PASS_STEPS, score_model, summarize

    when = datetime.now(UTC)
    if as_of is not None:
        try:
            when = datetime.fromisoformat(as_of.replace("Z", "+00:00"))
        except ValueError:
            console.print(f"[red]error:[/red] --as-of {as_of!r} is not an ISO 8601 instant")
            finish(EXIT_USAGE)
        if when.tzinfo is None:
            console.print("[red]error:[/red] --as-of needs a zone, e.g. 2026-11-20T10:00:00Z")
            finish(EXIT_USAGE)
    engine = migrated_engine()
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.elapsed:.1f}s"),
        console=console,
    )
    with progress:
        task = progress.add_task(PASS_STEPS[0], total=len(PASS_STEPS))

        def advance(done: int, total: int, step: str) -> None:
            progress.update(task, completed=done, total=total, description=step)

        with engine.begin() as conn:
            result = score_model(conn, model_slug=model, as_of=when, progress=advance)
    with engine.connect() as conn:
        labels = get_model(conn, slug=model).definition.labels()
        totals = summarize(conn, model_slug=model)
    table = Table("label", "customers", "share", "monetary", title=f"RFM model {model!r}")
    for label in labels + sorted(set(totals["labels"]) - set(labels)):
        item = totals["labels"].get(label, {"count": 0, "monetary": 0.0})
        share = item["count"] / result.scored if result.scored else 0.0
        table.add_row(label, f"{item['count']:,}", f"{share:.1%}", f"{item['monetary']:,.2f}")
    console.print(table)
    grid = Table("", *(f"F{f}" for f in range(1, 6)), title="customers by R (rows) and F")
    for r in (5, 4, 3, 2, 1):
        grid.add_row(f"R{r}", *(f"{count:,}" for count in totals["grid"][r - 1]))
    console.print(grid)
    console.print(
        f"pass {result.pass_id} as of {result.as_of.isoformat()}: {result.scored:,} scored,"
        f" {result.entries:,} entries, {result.exits:,} exits in {result.duration_ms:,} ms"
    )
    finish(0)


# --- predictive models ---

predictions_app = typer.Typer(
    help="Predictive models: train, validate against baselines, score everyone.",
    no_args_is_help=True,
)
app.add_typer(predictions_app, name="predictions")


@predictions_app.command("train")
def predictions_train(
    model: Annotated[str, typer.Argument(help="The predictive model's slug.")],
    as_of: Annotated[
        str | None,
        typer.Option(
            "--as-of",
            help="Train on history before this ISO 8601 instant with a zone (default now).",
        ),
    ] = None,
) -> None:
    """Train MODEL as of an instant, score everyone, and print the holdout's figures
    beside the RFM heuristic's and BG/NBD's."""
    from datetime import UTC, datetime

    from store.prediction_training import train_and_score

    when = _instant_option(as_of, "as-of") or datetime.now(UTC)
    engine = migrated_engine()
    with console.status("starting") as status:
        outcome = train_and_score(
            engine, slug=model, as_of=when, progress=lambda step: status.update(step)
        )
    report = outcome.report
    table = Table("method", "AUC", "Brier", title=f"holdout of {model!r} ({report.horizon})")
    for figures in (report.model, *report.baselines):
        auc = "-" if figures.auc is None else f"{figures.auc:.3f}"
        table.add_row(figures.method, auc, f"{figures.brier:.4f}")
    console.print(table)
    calibration = Table("predicted", "customers", "mean predicted", "observed", title="calibration")
    for row in report.model.calibration:
        if row.customers:
            calibration.add_row(
                f"{row.lower:.1f}-{row.upper:.1f}",
                f"{row.customers:,}",
                f"{row.mean_predicted:.3f}",
                f"{row.observed_rate:.3f}",
            )
    console.print(calibration)
    colour = "green" if outcome.status == "ok" else "yellow"
    console.print(f"[{colour}]{report.message}[/{colour}]", highlight=False)
    console.print(
        f"training {outcome.training_id} as of {when.isoformat()}: {outcome.scored:,} scored"
        f" in {outcome.duration_ms:,} ms"
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

    from store.failures import FailureRecord
    from store.segments import evaluate_dependents, evaluate_segment

    engine = migrated_engine()
    now = datetime.now(UTC)
    started = time.monotonic()
    with engine.begin() as conn:
        diff = evaluate_segment(conn, slug=slug, now=now)
        dependents = evaluate_dependents(conn, segment_slugs=[slug], now=now)
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
    help="The seed's five RFM journeys (templates/journeys/) and its personalisation campaign"
    " (templates/personalizations/).",
    no_args_is_help=True,
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
    and the homepage personalisation campaign (an experience for each of those segments)
    into the configured store, as drafts (or active with --activate)."""
    from store.journeys import install_shipped_journeys, missing_trigger_segments
    from store.personalization import install_shipped_campaigns

    with migrated_engine().begin() as conn:
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
            finish(EXIT_FAILED)
        outcomes = install_shipped_journeys(conn, model=model, activate=activate)
        campaigns = install_shipped_campaigns(conn, model=model, activate=activate)
    table = Table("journey", "file", "action", "state", "version")
    for o in outcomes:
        table.add_row(o.slug, o.file, o.action, o.state, str(o.version))
    console.print(table)
    table = Table("personalisation campaign", "file", "action", "state", "version")
    for c in campaigns:
        table.add_row(c.slug, f"personalizations/{c.file}", c.action, c.state, str(c.version))
    console.print(table)
    finish(0)


# --- inspection ---


@app.command("inspect")
def inspect_customer(
    customer: Annotated[str, typer.Argument(help="The customer id.")],
) -> None:
    """A customer's journeys: each run's status and its timeline, with the reasons."""
    from core.settings import get_settings
    from store.inspection import customer_journeys

    settings = get_settings()
    with current_engine().connect() as conn:
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
    from core.errors import NotFound
    from store.analytics import journey_analytics, journey_exists

    with current_engine().connect() as conn:
        if not journey_exists(conn, journey_slug=journey):
            raise NotFound(f"no journey {journey!r}")
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


# --- personalisation ---

personalize_app = typer.Typer(
    help="Personalisation campaigns: an experience per segment, a control group.",
    no_args_is_help=True,
)
app.add_typer(personalize_app, name="personalize")


def _instant_option(value: str | None, name: str) -> Any:
    from datetime import datetime

    if value is None:
        return None
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        when = None
    if when is None or when.tzinfo is None:
        console.print(f"[red]error:[/red] --{name} takes an ISO 8601 time with a zone")
        finish(EXIT_USAGE)
    return when


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def _interval(value: tuple[float, float] | None) -> str:
    return "-" if value is None else f"[{value[0]:+.1%}, {value[1]:+.1%}]"


@personalize_app.command("analytics")
def personalize_analytics(
    slug: Annotated[str, typer.Argument(help="The campaign's slug.")],
    version: Annotated[
        int | None, typer.Option(help="This version (default: the active one).")
    ] = None,
    viewed_from: Annotated[
        str | None, typer.Option("--from", help="Viewers first shown at or after (ISO).")
    ] = None,
    viewed_to: Annotated[
        str | None, typer.Option("--to", help="Viewers first shown, and conversions, before.")
    ] = None,
) -> None:
    """A campaign's results: per experience and its control group, viewers, conversions,
    conversion rate and value, and lift with its 95% and always-valid intervals."""
    from store.personalization import campaign_analytics

    start, end = _instant_option(viewed_from, "from"), _instant_option(viewed_to, "to")
    with current_engine().connect() as conn:
        result = campaign_analytics(
            conn, slug=slug, version=version, viewed_from=start, viewed_to=end
        )
    goal = result.goal
    console.print(
        f"[bold]{slug}[/bold] v{result.version}: goal {goal.event} within {goal.within}"
        f"{f' (value: {goal.value_property})' if goal.value_property else ''},"
        f" control share {result.control_share:.0%}"
    )
    table = Table(
        "experience",
        "group",
        "viewers",
        "conversions",
        "conv. %",
        "value",
        "value/viewer",
        "lift",
        "95% CI",
        "p",
        "always-valid CI",
        "significant",
    )

    def arm_cells(arm: Any) -> list[str]:
        per_viewer = "-" if arm.value_per_viewer is None else f"{arm.value_per_viewer:,.2f}"
        return [
            f"{arm.viewers:,}",
            f"{arm.conversions:,}",
            _share(arm.conversion_rate),
            f"{arm.conversion_value:,.2f}",
            per_viewer,
        ]

    for row in [*result.experiences, result.overall]:
        p_value = "-" if row.p_value is None else f"{row.p_value:.4f}"
        table.add_row(
            row.experience,
            "treatment",
            *arm_cells(row),
            "-" if row.lift is None else f"{row.lift:+.1%}",
            _interval(row.lift_ci),
            p_value,
            _interval(row.always_valid_ci),
            "yes" if row.significant else "no",
        )
        table.add_row("", "control", *arm_cells(row.control), "", "", "", "", "")
    table.add_row("(no audience)", "default", *arm_cells(result.default), "", "", "", "", "")
    console.print(table)
    for row in result.experiences:
        if row.warning:
            console.print(f"[yellow]{row.experience}: {row.warning}[/yellow]", highlight=False)
    finish(0)


if __name__ == "__main__":
    app()
