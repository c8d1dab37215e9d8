"""The project's command line: sample data, the end-to-end demo, the UI."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import click

from pipeline_project.settings import Settings


@click.group()
def main() -> None:
    """pipeline_project: a partitioned, validated AI data pipeline on Dagster and DuckDB."""


@main.command()
@click.option("--batches", default=2, show_default=True, help="Number of batch files.")
@click.option("--rows", default=1000, show_default=True, help="Customers per batch.")
@click.option("--bad-rate", default=0.03, show_default=True, help="Share of bad rows.")
@click.option("--seed", default=42, show_default=True, help="Same seed, same files.")
@click.option("--start", default=1, show_default=True, help="Number of the first batch (b001).")
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
    batches: int, rows: int, bad_rate: float, seed: int, start: int, use_gzip: bool,
    landing_dir: Path | None, catalog: Path | None,
) -> None:  # fmt: skip
    """Write deterministic sample batches and the product catalog."""
    settings = Settings.from_env().landing
    _generate(
        landing_dir or settings.landing_dir, catalog or settings.catalog_path,
        batches=batches, rows=rows, bad_rate=bad_rate, seed=seed, start=start, use_gzip=use_gzip,
    )  # fmt: skip


def _generate(
    landing_dir: Path, catalog_path: Path, *, batches: int, rows: int, bad_rate: float,
    seed: int, start: int = 1, use_gzip: bool = False,
) -> list[Path]:  # fmt: skip
    from pipeline_project.sample_data import generate_batch, write_catalog

    catalog = write_catalog(catalog_path, seed=seed)
    click.echo(f"catalog: {catalog_path} ({len(catalog.product_ids)} products)")
    paths = []
    for number in range(start, start + batches):
        path = landing_dir / f"b{number:03d}.jsonl{'.gz' if use_gzip else ''}"
        kinds = generate_batch(path, rows, bad_rate, seed + number, catalog)
        bad = sum(n for kind, n in kinds.items() if kind != "valid" and not kind.startswith("edge"))
        click.echo(f"batch: {path} ({rows:,} rows, {bad:,} bad)")
        paths.append(path)
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

    paths = settings.landing
    landing = LandingZone.from_settings(paths)
    if not landing.scan().files:
        click.echo(f"landing folder {paths.landing_dir} is empty: generating sample data")
        _generate(paths.landing_dir, paths.catalog_path,
                  batches=batches, rows=rows, bad_rate=bad_rate, seed=seed)  # fmt: skip
    scan = landing.scan()
    for rejected in scan.rejected:
        click.echo(f"skipped landing file {rejected.name!r}: {rejected.reason}", err=True)

    defs = build_definitions(settings)
    batch_job = defs.resolve_job_def("batch_pipeline_job")
    quiet = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    failed = []
    with dg.DagsterInstance.get() as instance:
        if landing.catalog_fingerprint() is not None:
            click.echo(f"product catalog: loading and embedding {paths.catalog_path}")
            catalog_run = defs.resolve_job_def("catalog_job").execute_in_process(
                instance=instance, run_config=quiet, raise_on_error=False
            )
            if not catalog_run.success:
                failed.append("product_catalog")
        known = set(instance.get_dynamic_partitions(batch_partitions.name))
        new = sorted(set(scan.files) - known)
        if new:
            instance.add_dynamic_partitions(batch_partitions.name, new)
        rows_out = []
        for i, batch_id in enumerate(sorted(scan.files), start=1):
            click.echo(
                f"[{i}/{len(scan.files)}] {batch_id}: ingest, validate, embed, segment, recommend"
            )
            result = batch_job.execute_in_process(
                partition_key=batch_id, instance=instance, run_config=quiet, raise_on_error=False
            )
            customers = _metadata(result, "validated_customers", "customers")
            figures = {
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
            }
            rows_out.append((batch_id, "ok" if result.success else "FAILED", figures))
            if not result.success:
                failed.append(batch_id)
    click.echo("")
    header = (
        f"{'batch':<10}{'status':<8}{'rows in':>9}{'valid':>8}{'invalid':>8}{'err rate':>9}"
        f"{'profiles':>10}{'cache hits':>11}{'model calls':>12}{'dead-lettered':>14}"
    )
    click.echo(header)
    for batch_id, status, f in rows_out:
        click.echo(
            f"{batch_id:<10}{status:<8}{f.get('rows_in', 0):>9,}{f.get('rows_valid', 0):>8,}"
            f"{f.get('rows_invalid', 0):>8,}{f.get('error_rate', 0.0):>9.2%}"
            f"{f.get('distinct_profiles', 0):>10,}{f.get('cache_hits', 0):>11,}"
            f"{f.get('model_calls', 0):>12,}{f.get('dead_lettered', 0):>14,}"
        )
    click.echo("")
    click.echo(
        f"{'batch':<10}{'segments':>9}{'kept':>8}{'rejected':>9}   rejected by rule"
        " (out_of_stock, low_confidence, already_purchased, implausible_value)"
    )
    for batch_id, _, f in rows_out:
        by_rule = ", ".join(
            str(f.get(f"rejected_{rule}", 0))
            for rule in ("out_of_stock", "low_confidence", "already_purchased", "implausible_value")
        )
        click.echo(
            f"{batch_id:<10}{len(f.get('segments', {})):>9}"
            f"{f.get('kept_dagster/row_count', 0):>8,}{f.get('kept_rejected', 0):>9,}   {by_rule}"
        )
    click.echo("\nSee it in the UI: pipeline-project ui  (then open http://127.0.0.1:3000)")
    if failed:
        click.echo(f"runs failed for: {', '.join(failed)} (see the Dagster UI for why)", err=True)
        sys.exit(1)


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
    """Start `dagster dev` (UI + daemon) on loopback with the project's Dagster home."""
    from pipeline_project.instance import ensure_dagster_home

    ensure_dagster_home()
    target = ["-w", "workspace.yaml"] if Path("workspace.yaml").exists() else [
        "-m", "pipeline_project.definitions"]  # fmt: skip
    # the dagster next to this Python (the same environment), even when it is not on PATH
    beside = Path(sys.executable).parent / "dagster"
    dagster = str(beside) if beside.exists() else "dagster"
    args = [dagster, "dev", *target, "-h", host, "-p", str(port), *dagster_args]
    # A process started in the background (`&` in a script, a test runner's worker) inherits
    # SIGINT ignored, and dagster dev handles SIGTERM as SIGINT: it could not be stopped by its
    # PID. Restore the default so that SIGINT and SIGTERM stop it and its children.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.execvp(args[0], args)


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

    with _warehouse().get_connection() as conn:
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

    with _warehouse().get_connection() as conn:
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


if __name__ == "__main__":
    main()
