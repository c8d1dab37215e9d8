"""The project's command line: sample data, the end-to-end demo, the UI."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import click

from pipeline_project.settings import Settings

# Alerts raised by the CLI log here (warnings and errors reach the terminal).
_CLI_LOG = logging.getLogger("pipeline_project.cli")

if TYPE_CHECKING:
    import dagster as dg


@click.group()
def main() -> None:
    """pipeline_project: a partitioned, validated AI data pipeline on Dagster and DuckDB."""


@main.command()
@click.option("--batches", default=2, show_default=True, help="Number of batch files.")
@click.option("--rows", default=1000, show_default=True, help="Customers per batch.")
@click.option("--bad-rate", default=0.03, show_default=True, help="Share of bad rows.")
@click.option("--seed", default=42, show_default=True, help="Same seed, same files.")
@click.option("--start", default=1, show_default=True, help="Number of the first batch (b001).")
@click.option(
    "--returning",
    default=0.3,
    show_default=True,
    help="Share of each later batch's lines that bring back a customer of the batch before.",
)
@click.option("--gzip", "use_gzip", is_flag=True, help="Write .jsonl.gz files.")
@click.option(
    "--landing-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Default: $PIPELINE_LANDING_DIR or data/landing.",
)
@click.option(
    "--catalog",
    type=click.Path(path_type=Path),
    default=None,
    help="Default: $PIPELINE_CATALOG_PATH or data/catalog.csv.",
)
def generate(
    batches: int, rows: int, bad_rate: float, seed: int, start: int, returning: float,
    use_gzip: bool, landing_dir: Path | None, catalog: Path | None,
) -> None:  # fmt: skip
    """Write deterministic sample batches and the product catalog."""
    settings = Settings.from_env().landing
    _generate(
        landing_dir or settings.landing_dir, catalog or settings.catalog_path,
        batches=batches, rows=rows, bad_rate=bad_rate, seed=seed, start=start,
        returning=returning, use_gzip=use_gzip,
    )  # fmt: skip


def _generate(
    landing_dir: Path, catalog_path: Path, *, batches: int, rows: int, bad_rate: float,
    seed: int, start: int = 1, returning: float = 0.3, use_gzip: bool = False,
) -> list[Path]:  # fmt: skip
    from pipeline_project.sample_data import (
        BAD_KINDS,
        RETURNING,
        BatchSpec,
        generate_batch,
        write_catalog,
    )

    catalog = write_catalog(catalog_path, seed=seed)
    click.echo(f"catalog: {catalog_path} ({len(catalog.product_ids)} products)")
    paths, previous = [], None
    for number in range(start, start + batches):
        path = landing_dir / f"b{number:03d}.jsonl{'.gz' if use_gzip else ''}"
        spec = BatchSpec(rows, bad_rate, seed + number, returning=returning, previous=previous)
        kinds = generate_batch(path, rows, bad_rate, spec.seed, catalog,
                               returning=spec.returning, previous=spec.previous)  # fmt: skip
        bad = sum(n for kind, n in kinds.items() if kind in BAD_KINDS)
        came_back = f", {kinds[RETURNING]:,} returning customers" if kinds[RETURNING] else ""
        click.echo(f"batch: {path} ({rows:,} rows, {bad:,} bad{came_back})")
        paths.append(path)
        previous = spec
    return paths


@main.command()
@click.option("--batches", default=2, show_default=True, help="Sample batches if none landed.")
@click.option("--rows", default=1000, show_default=True, help="Customers per sample batch.")
@click.option("--bad-rate", default=0.03, show_default=True, help="Share of bad sample rows.")
@click.option("--seed", default=42, show_default=True)
def demo(batches: int, rows: int, bad_rate: float, seed: int) -> None:
    """Run the whole pipeline on every landed batch (sample data if the landing folder is empty)."""
    from pipeline_project.instance import ensure_dagster_home

    home = ensure_dagster_home()
    settings = Settings.from_env()
    click.echo(f"Dagster home: {home}\nwarehouse:   {settings.warehouse.duckdb_path}")

    import dagster as dg

    from pipeline_project.definitions import build_definitions
    from pipeline_project.partitions import batches as batch_partitions
    from pipeline_project.resources import LandingZone
    from pipeline_project.sensors.alerting import alert_finished_run

    paths = settings.landing
    landing = LandingZone.from_settings(paths)
    if not landing.scan().files:
        click.echo(f"landing folder {paths.landing_dir} is empty: generating sample data")
        _generate(paths.landing_dir, paths.catalog_path,
                  batches=batches, rows=rows, bad_rate=bad_rate, seed=seed)  # fmt: skip
    scan = landing.scan()
    defs = build_definitions(settings)
    _alert_rejected_files(defs, scan.rejected)
    batch_job = defs.resolve_job_def("batch_pipeline_job")
    quiet = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    failed = []
    catalog = _CatalogState(paths.catalog_path, found=landing.catalog_fingerprint() is not None)
    outcomes: list[BatchOutcome] = []
    with dg.DagsterInstance.get() as instance, _stage_progress():
        if catalog.found:
            click.echo(f"product catalog: loading and embedding {paths.catalog_path}")
            catalog_run = defs.resolve_job_def("catalog_job").execute_in_process(
                instance=instance, run_config=quiet, raise_on_error=False
            )
            catalog.loaded = catalog_run.success
            alert_finished_run(
                instance, catalog_run.dagster_run, defs.resources["alerts"], _CLI_LOG
            )
            if not catalog_run.success:
                failed.append("product_catalog")
        known = set(instance.get_dynamic_partitions(batch_partitions.name))
        new = sorted(set(scan.files) - known)
        if new:
            instance.add_dynamic_partitions(batch_partitions.name, new)
        for i, batch_id in enumerate(sorted(scan.files), start=1):
            click.echo(
                f"[{i}/{len(scan.files)}] {batch_id}: ingest, validate, embed, segment, recommend"
            )
            result = batch_job.execute_in_process(
                partition_key=batch_id, instance=instance, run_config=quiet, raise_on_error=False
            )
            outcomes.append(_after_batch(batch_id, result, instance, defs.resources["alerts"]))
    failed += [o.batch_id for o in outcomes if o.status == FAILED]
    click.echo("")
    _print_summary(outcomes)
    if notice := catalog.notice(outcomes):
        click.echo(notice)
    click.echo("See it in the UI: pipeline-project ui  (then open http://127.0.0.1:3000)")
    if failed:
        click.echo(f"runs failed for: {', '.join(failed)} (see the Dagster UI for why)", err=True)
        sys.exit(1)


@contextmanager
def _stage_progress() -> Iterator[None]:
    """On a terminal (stderr), a bar per long stage of each batch: lines ingested, lines
    validated of the batch's lines, chunks embedded of the chunks to embed, customers
    recommended. Elsewhere (a file, a pipe, CI) a plain line per stage at most every
    LOG_EVERY_SECONDS seconds, and when a stage ends."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from pipeline_project.progress import listening

    console = Console(stderr=True)
    if not console.is_terminal:
        with listening(_ProgressLines()):
            yield
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[figures]}"),
        TimeElapsedColumn(),
    )
    tasks: dict[tuple[str, str], int] = {}
    with Progress(*columns, console=console, disable=not console.is_terminal) as bars:

        def show(batch_id: str, stage: str, done: int, total: int | None, unit: str) -> None:
            figures = f"{done:,} {unit}" if total is None else f"{done:,} of {total:,} {unit}"
            if (batch_id, stage) not in tasks:
                for (batch, _), task in tasks.items():  # the batch's earlier stages are done
                    if batch == batch_id and not bars.tasks[task].finished:
                        bars.update(task, total=bars.tasks[task].completed)
                description = f"{batch_id} {stage}"
                tasks[(batch_id, stage)] = bars.add_task(description, total=total, figures="")
            bars.update(tasks[(batch_id, stage)], completed=done, total=total, figures=figures)

        with listening(show):
            yield
        for task in bars.tasks:  # a stage that ended without a final report
            if not task.finished:
                bars.update(task.id, total=task.completed)


class _ProgressLines:
    """Progress as plain lines on stderr, a stage at most every LOG_EVERY_SECONDS seconds."""

    def __init__(self) -> None:
        self.last: dict[tuple[str, str], float] = {}

    def __call__(self, batch_id: str, stage: str, done: int, total: int | None, unit: str) -> None:
        from pipeline_project.progress import LOG_EVERY_SECONDS

        now = time.monotonic()
        finished = total is not None and done >= total
        key = (batch_id, stage)
        if key in self.last and now - self.last[key] < LOG_EVERY_SECONDS and not finished:
            return
        self.last[key] = now
        of = "" if total is None else f" of {total:,}"
        click.echo(f"  {batch_id} {stage}: {done:,}{of} {unit}", err=True)


def _alert_rejected_files(defs, rejected_files) -> None:
    """Landing files the demo does not read: printed, and alerted as the landing sensor does."""
    import dagster as dg

    from pipeline_project.sensors.landing import alert_rejected_file

    if not rejected_files:
        return
    with dg.build_resources({"alerts": defs.resources["alerts"]}) as resources:
        for rejected in rejected_files:
            click.echo(f"skipped landing file {rejected.name!r}: {rejected.reason}", err=True)
            alert_rejected_file(resources.alerts, rejected, _CLI_LOG)


# ---- the demo's summary -----------------------------------------------------------------------

OK, FAILED, NOT_RUN = "ok", "FAILED", "not run"
RULES = ("out_of_stock", "low_confidence", "already_purchased", "implausible_value")
# Wider than any summary table: a table is as wide as its content, and no cell is ever wrapped or
# cut to fit a narrow terminal (a terminal narrower than a table wraps its lines, as before).
TABLE_WIDTH = 1_000


@dataclass
class BatchOutcome:
    """One batch's run as the summary shows it."""

    batch_id: str
    status: str  # OK or FAILED: the run
    recommendations: str  # OK, NO_CATALOG, FAILED or NOT_RUN: the recommendation stages
    figures: dict = field(default_factory=dict)


def _after_batch(
    batch_id: str, result: dg.ExecuteInProcessResult, instance: dg.DagsterInstance, alerts
) -> BatchOutcome:
    """What follows each batch's run, whatever its outcome: the alerts a daemon's sensors would
    raise for it (none twice), and its figures for the summary."""
    from pipeline_project.sensors.alerting import alert_finished_run

    alert_finished_run(instance, result.dagster_run, alerts, _CLI_LOG)
    return BatchOutcome(
        batch_id,
        OK if result.success else FAILED,
        _recommendations_status(result),
        _figures(result),
    )


def _figures(result: dg.ExecuteInProcessResult) -> dict:
    customers = _metadata(result, "validated_customers", "customers")
    return {
        **_metadata(result, "customer_embeddings", "customer_embeddings"),
        **customers,
        # both stages report an error_rate: this table shows the schema error rate
        "error_rate": customers.get("error_rate", 0.0),
        "segments": _metadata(result, "customer_segments", "customer_segments").get(
            "segment_shares", {}
        ),
        **{
            f"kept_{k}": v
            for k, v in _metadata(
                result, "validated_recommendations", "validated_recommendations"
            ).items()
        },
        **_metadata(result, "validated_recommendations", "rejected_recommendations"),
        **_check_figures(result, "every_customer_gets_top_n_or_a_reason"),
        "checks": _verdicts(result),
    }


# A check passed, failed, or had too little data to judge (no result at all).
CHECK_VERDICTS = ("passed", "failed", "not judged")


def _verdicts(result: dg.ExecuteInProcessResult) -> dict[str, list[str]]:
    """The run's checks: passed, failed, and not judged (too little data: no result at all)."""
    from pipeline_project.checks.verdicts import NOT_JUDGED

    verdicts: dict[str, list[str]] = {"passed": [], "failed": [], "not judged": []}
    for evaluation in result.get_asset_check_evaluations():
        verdicts["passed" if evaluation.passed else "failed"].append(evaluation.check_name)
    for event in result.get_asset_materialization_events():
        entry = event.event_specific_data.materialization.metadata.get(NOT_JUDGED)
        verdicts["not judged"] += list(entry.value) if entry is not None else []
    return {kind: sorted(set(names)) for kind, names in verdicts.items()}


def _check_figures(result: dg.ExecuteInProcessResult, check_name: str) -> dict:
    for evaluation in result.get_asset_check_evaluations():
        if evaluation.check_name == check_name:
            return {k: v.value for k, v in evaluation.metadata.items()}
    return {}


def _recommendations_status(result: dg.ExecuteInProcessResult) -> str:
    from pipeline_project.assets.recommendations import NO_CATALOG

    stages = ("recommendations", "validated_recommendations")
    if any(result.is_node_failed(stage) for stage in stages):
        return FAILED
    if all(result.asset_materializations_for_node(stage) for stage in stages):
        return OK
    # A stage that ran and materialized nothing found no catalog (and logged so); the stage
    # after it is skipped.
    if any(result.is_node_success(stage) for stage in stages):
        return NO_CATALOG
    return NOT_RUN  # a stage upstream failed


def _print_summary(outcomes: list[BatchOutcome]) -> None:
    """Per batch: validation and inference figures, then the recommendations'."""
    validation = _table(
        "batch", "status", "rows in", "valid", "invalid", "blank lines", "err rate", "returning",
        "profiles", "cache hits", "model calls", "dead-lettered",
    )  # fmt: skip
    recommendation = _table(
        "batch", "segments", "recommendations", "served 5", "fewer", "kept", "rejected", *RULES
    )
    for o in outcomes:
        f = o.figures
        validation.add_row(
            o.batch_id,
            _styled(o.status),
            *(
                f"{f.get(key, 0):,}"
                for key in ("rows_in", "rows_valid", "rows_invalid", "blank_lines")
            ),
            f"{f.get('error_rate', 0.0):.2%}",
            *(
                f"{f.get(key, 0):,}"
                for key in (
                    "returning_customers",
                    "distinct_profiles",
                    "cache_hits",
                    "model_calls",
                    "dead_lettered",
                )
            ),  # fmt: skip
        )
        figures = [
            f.get("served_top_n"),
            f.get("served_fewer"),
            f.get("kept_dagster/partition_row_count"),
            f.get("kept_rejected"),
            *(f.get(f"rejected_{rule}") for rule in RULES),
        ]
        recommendation.add_row(
            o.batch_id,
            f"{len(f.get('segments', {})):,}",
            _styled(o.recommendations),
            # no recommendations is not "0 kept": a stage skipped or not run has no figures
            *("-" if n is None else f"{n:,}" for n in figures),
        )
    checks = _table("batch", "checks passed", "failed", "not judged")
    named = []
    for o in outcomes:
        verdicts = {kind: o.figures.get("checks", {}).get(kind, []) for kind in CHECK_VERDICTS}
        checks.add_row(o.batch_id, *(f"{len(names):,}" for names in verdicts.values()))
        named += [
            f"{o.batch_id}: {kind}{' (too little data to judge)' if kind == 'not judged' else ''}:"
            f" {', '.join(names)}"
            for kind, names in verdicts.items()
            if names and kind != "passed"
        ]
    click.echo(_render(validation) + "\n")
    click.echo(_render(recommendation) + "\n")
    click.echo(_render(checks) + "\n")
    if named:
        click.echo("\n".join(named) + "\n")


def _table(*headers: str):
    from rich import box
    from rich.table import Table

    table = Table(box=box.MARKDOWN, header_style="bold")
    table.add_column(headers[0])
    for header in headers[1:]:
        text = header in ("status", "recommendations")
        table.add_column(header, justify="left" if text else "right")
    return table


def _styled(status: str):
    from rich.text import Text

    return Text(
        status, style={OK: "green", FAILED: "bold red", NOT_RUN: "dim"}.get(status, "yellow")
    )


def _render(table) -> str:
    """The table as text, coloured on a terminal; elsewhere (a pipe, a CI log, click's CliRunner)
    plain, without ANSI escapes."""
    from rich.console import Console

    on_terminal = sys.stdout.isatty()
    console = Console(
        width=TABLE_WIDTH,
        color_system="auto" if on_terminal else None,
        force_terminal=on_terminal,
        highlight=False,
        markup=False,
        emoji=False,
    )
    with console.capture() as captured:
        console.print(table)
    # the Markdown box's top and bottom edges are blank lines
    return "\n".join(line.rstrip() for line in captured.get().splitlines() if line.strip())


@dataclass
class _CatalogState:
    """The product catalog file as the demo found it, for the notice after the summary."""

    path: Path
    found: bool
    loaded: bool | None = None  # None: not loaded (no file)

    def notice(self, outcomes: list[BatchOutcome]) -> str:
        from pipeline_project.assets.recommendations import NO_CATALOG

        where = self.path.resolve()
        if not any(o.recommendations == NO_CATALOG for o in outcomes):
            if self.found or not any(o.recommendations == OK for o in outcomes):
                return ""
            return (
                f"catalog file {where} not found: the recommendations use the one loaded before\n"
            )
        if not self.found:
            problem = f"{where} does not exist"
        elif not self.loaded:
            problem = f"{where} could not be loaded (its catalog_job run failed: see the UI)"
        else:
            problem = f"{where} holds no products"
        return f"""\
No product catalog: {problem}, so no batch has recommendations: the stages
recommendations and validated_recommendations were skipped ({NO_CATALOG}: their partitions
stay unmaterialized, and that fails no run).
The catalog is a CSV file with a header line and one product a line:
    product_id,name,category,price,in_stock
    P00001,Ultra Charger,electronics,84.87,true
  product_id  unique; the IDs that the customers' purchaseHistory productId refers to
  name        text; with the category, the product's text for its embedding
  category    text
  price       a number >= 0
  in_stock    true or false (out-of-stock products are never recommended)
Put your catalog there, or set PIPELINE_CATALOG_PATH to its path, or write a sample one with
  pipeline-project generate --batches 0
then run `pipeline-project demo` again (while `pipeline-project ui` runs, catalog_file_sensor
loads the file and the batches get their recommendations).
"""


def _metadata(result, node: str, asset: str) -> dict:
    for materialization in result.asset_materializations_for_node(node):
        if materialization.asset_key.to_user_string() == asset:
            return {k: v.value for k, v in materialization.metadata.items()}
    return {}


@main.command(context_settings={"ignore_unknown_options": True})
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=3000, show_default=True)
@click.argument("dagster_args", nargs=-1, type=click.UNPROCESSED)
def ui(host: str, port: int, dagster_args: tuple[str, ...]) -> None:
    """Start the UI and the daemon on loopback with the project's Dagster home: `dg dev` in the
    project's folder, `dagster dev -m pipeline_project.definitions` anywhere else."""
    from pipeline_project.instance import ensure_dagster_home

    ensure_dagster_home()
    args, env = ui_command(Path.cwd(), host, port, dagster_args)
    # A process started in the background (`&` in a script, a test runner's worker) inherits
    # SIGINT ignored, and dagster dev handles SIGTERM as SIGINT: it could not be stopped by its
    # PID. Restore the default so that SIGINT and SIGTERM stop it and its children.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.execvpe(args[0], args, env)


def ui_command(
    folder: Path, host: str, port: int, dagster_args: tuple[str, ...] = ()
) -> tuple[list[str], dict[str, str]]:
    """The command `ui` becomes, and its environment. The tools next to this Python (the same
    environment) are used even when they are not on PATH."""
    beside = Path(sys.executable).parent
    project = folder / "pyproject.toml"
    if project.is_file() and "[tool.dg]" in project.read_text(encoding="utf-8"):
        # The project's own folder: `dg dev` loads the code location its pyproject names, in
        # this environment (said to dg, which otherwise warns that none is active).
        env = {**os.environ, "VIRTUAL_ENV": sys.prefix}
        return [str(beside / "dg"), "dev", "--host", host, "--port", str(port), *dagster_args], env
    target = ["-m", "pipeline_project.definitions"]
    return [str(beside / "dagster"), "dev", *target, "-h", host, "-p", str(port),
            *dagster_args], dict(os.environ)  # fmt: skip


@main.group()
def dlq() -> None:
    """The dead-letter queue: customers whose embedding failed, and their replay."""


def _warehouse():
    from pipeline_project.definitions import build_resources

    return build_resources(Settings.from_env())["warehouse"]


@dlq.command("list")
def dlq_list() -> None:
    """Dead letters per batch, stage and reason: pending (not replayed yet) and replayed."""
    from pipeline_project.core import dead_letters

    with _warehouse().read_connection() as conn:  # read-only: beside other readers
        rows = dead_letters.summary(conn)
    if not rows:
        click.echo("the dead-letter queue is empty")
        return
    click.echo(f"{'batch':<24}{'stage':<12}{'reason':<18}{'pending':>9}{'replayed':>10}  last")
    for batch_id, stage, reason, pending, replayed, last in rows:
        click.echo(
            f"{batch_id:<24}{stage:<12}{reason:<18}{pending:>9,}{replayed:>10,}"
            f"  {last:%Y-%m-%d %H:%M}"
        )


@dlq.command("show")
@click.argument("batch_id")
@click.option("--limit", default=20, show_default=True, help="Rows to show.")
@click.option("--all", "show_all", is_flag=True, help="Replayed dead letters too.")
def dlq_show(batch_id: str, limit: int, show_all: bool) -> None:
    """One batch's dead letters: record, reason, error, attempts, payload."""
    from pipeline_project.core import dead_letters

    with _warehouse().read_connection() as conn:
        rows = dead_letters.records(conn, batch_id, limit, pending_only=not show_all)
    if not rows:
        click.echo(f"{batch_id}: no {'' if show_all else 'pending '}dead letters")
        return
    for key, stage, reason, attempts, error, payload, replayed_at in rows:
        state = f"replayed {replayed_at:%Y-%m-%d %H:%M}" if replayed_at else "pending"
        click.echo(f"{key}  {stage}  {reason}  attempts={attempts}  {state}")
        click.echo(f"    error:   {error}")
        click.echo(f"    payload: {payload}")


@dlq.command("replay")
@click.argument("batch_id")
def dlq_replay(batch_id: str) -> None:
    """Re-run BATCH_ID's pending dead letters through inference (dead_letter_replay_job)."""
    from pipeline_project.instance import ensure_dagster_home

    ensure_dagster_home()
    import dagster as dg

    from pipeline_project.definitions import build_definitions
    from pipeline_project.partitions import batches as batch_partitions

    with dg.DagsterInstance.get() as instance:
        if batch_id not in instance.get_dynamic_partitions(batch_partitions.name):
            click.echo(f"{batch_id}: no such batch", err=True)
            sys.exit(2)
        result = (
            build_definitions()
            .resolve_job_def("dead_letter_replay_job")
            .execute_in_process(partition_key=batch_id, instance=instance, raise_on_error=False)
        )
    figures = _metadata(result, "customer_embeddings", "customer_embeddings")
    if not result.success:
        click.echo(f"{batch_id}: replay failed (see the run {result.run_id} in the UI)", err=True)
        sys.exit(1)
    click.echo(
        f"{batch_id}: {figures['replay_candidates']:,} pending, {figures['replayed']:,} replayed,"
        f" {figures['still_dead_lettered']:,} still dead-lettered"
        f" ({figures['model_calls']:,} model calls)"
    )


def _run_lifecycle_job(job_name: str, op_name: str, config: dict) -> dg.ExecuteInProcessResult:
    """Run one of the lifecycle jobs in this process, recorded in the Dagster instance."""
    from pipeline_project.instance import ensure_dagster_home

    ensure_dagster_home()
    import dagster as dg

    from pipeline_project.definitions import build_definitions

    with dg.DagsterInstance.get() as instance:
        return (
            build_definitions()
            .resolve_job_def(job_name)
            .execute_in_process(
                run_config={"ops": {op_name: {"config": config}}},
                instance=instance,
                raise_on_error=False,
            )
        )


def _output_metadata(result, node: str) -> dict:
    """The metadata of the op `node`'s output."""
    for event in result.all_node_events:
        if event.is_successful_output and event.node_handle.name == node:
            return {k: v.value for k, v in event.step_output_data.metadata.items()}
    return {}


def _failure(result) -> str:
    """Why the run failed, as its step said (never data: the lifecycle ops fail with counts)."""
    for event in result.all_events:
        if event.is_step_failure and event.step_failure_data.error is not None:
            return event.step_failure_data.error.message.strip().splitlines()[0]
    return f"see the run {result.run_id} in the UI"


@main.command()
@click.option(
    "--customer-id", "customer_ids", multiple=True, required=True,
    help="A customer to erase (repeat for several).",
)  # fmt: skip
def erase(customer_ids: tuple[str, ...]) -> None:
    """Erase customers everywhere: every table of every batch, raw lines (tombstones), dead
    letters, alerts, cached vectors; then rewrite storage so nothing is recoverable. Only the
    IDs' SHA-256 reach Dagster's run history and the erasure log."""
    from pipeline_project.core.erasure import NotACustomerId, requested_hashes
    from pipeline_project.lifecycle import ERASE_CUSTOMERS_JOB

    try:
        hashes = requested_hashes(customer_ids)
    except NotACustomerId as err:
        click.echo(f"erase: {err}", err=True)
        sys.exit(2)
    result = _run_lifecycle_job(ERASE_CUSTOMERS_JOB, "erase_customer_rows", {"customers": hashes})
    if not result.success:
        click.echo(f"erase failed: {_failure(result)}", err=True)
        sys.exit(1)
    figures = _output_metadata(result, "erase_customer_rows")
    click.echo(
        f"erased {figures['customers_found']} of {figures['customers_requested']} customers:"
        f" {figures['raw_lines']:,} raw lines in {len(figures['batches'])} batches,"
        f" {figures['rows_removed']:,} rows, {figures['alerts_removed']} alerts"
        " (recorded in erasure_log)"
    )
    if figures["landing_files_holding_them"]:
        click.echo(
            "the landing files still hold their lines (the sender's copies): "
            + ", ".join(figures["landing_files_holding_them"])
        )


@main.group()
def batch() -> None:
    """Batches: delete one that should never have been loaded."""


@batch.command("delete")
@click.argument("batch_ids", nargs=-1, required=True)
def batch_delete(batch_ids: tuple[str, ...]) -> None:
    """Delete BATCH_IDS as if they never arrived: rows, raw and landing files, partitions."""
    from pipeline_project.lifecycle import DELETE_BATCHES_JOB

    result = _run_lifecycle_job(
        DELETE_BATCHES_JOB, "delete_batch_rows", {"batch_ids": list(batch_ids)}
    )
    if not result.success:
        click.echo(f"batch delete failed: {_failure(result)}", err=True)
        sys.exit(1)
    done = _output_metadata(result, "delete_batch_rows")["batches"]
    for batch_id, figures in done.items():
        stale = figures["stale"]
        click.echo(
            f"{batch_id}: deleted {sum(figures['rows_removed'].values()):,} rows, landing files:"
            f" {', '.join(figures['landing_files']) or 'none'}"
            + (f"; {len(stale)} later batches will be re-profiled" if stale else "")
        )


if __name__ == "__main__":
    main()
