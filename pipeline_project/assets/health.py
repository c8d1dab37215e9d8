"""pipeline_health: the last hours of the pipeline in one place, as Markdown and plotted numbers."""

import time
from collections.abc import Mapping
from datetime import UTC, datetime

import dagster as dg
import duckdb
from pydantic import Field

from pipeline_project.core import dead_letters
from pipeline_project.core.health import (
    RecentActivity,
    end_to_end_times,
    health_figures,
    health_markdown,
)
from pipeline_project.policies import warehouse_pool
from pipeline_project.resources import Warehouse
from pipeline_project.resources.warehouse import DUCKDB, is_lock_conflict
from pipeline_project.tables import CUSTOMER_EMBEDDINGS, CUSTOMERS, RAW_CUSTOMERS

_STEP_EVENTS = {dg.DagsterEventType.STEP_SUCCESS, dg.DagsterEventType.STEP_FAILURE}


class PipelineHealthConfig(dg.Config):
    window_hours: float = Field(default=24.0, description="How far back the summary looks.")


def _materializations(instance: dg.DagsterInstance, asset: str, since: float) -> list:
    return instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), after_timestamp=since), limit=10_000
    ).records


def _metadata_values(instance: dg.DagsterInstance, asset: str, key: str, since: float) -> list:
    return [
        r.asset_materialization.metadata[key].value
        for r in _materializations(instance, asset, since)
        if key in r.asset_materialization.metadata
    ]


def _partitions(instance: dg.DagsterInstance, asset: str, since: float) -> set[str]:
    return {r.asset_materialization.partition for r in _materializations(instance, asset, since)}


def _count_steps(instance: dg.DagsterInstance, runs: list, activity: RecentActivity) -> None:
    for record in runs:
        for event in instance.all_logs(record.dagster_run.run_id, of_type=_STEP_EVENTS):
            succeeded = event.dagster_event_type == dg.DagsterEventType.STEP_SUCCESS
            (activity.steps_ok if succeeded else activity.steps_failed)[event.step_key] += 1


def _pending_dead_letters(
    warehouse: Warehouse, log: dg.DagsterLogManager
) -> tuple[Mapping[str, int] | None, str]:
    """The pending dead letters per stage, read on a read-only connection; (None, why) when
    another process held the warehouse file past the lock wait (a CLI, a step outside the
    writer pool): the summary is still worth having, without them."""
    try:
        with warehouse.read_connection() as conn:
            return dead_letters.pending_by_stage(conn), ""
    except duckdb.IOException as err:
        if not is_lock_conflict(err):
            raise
        why = (
            "another process held the warehouse file for longer than the lock wait"
            f" ({warehouse.connect_timeout_seconds:g} s): {str(err).splitlines()[0]}"
        )
        log.warning(f"pipeline_health: dead letters not read, {why}")
        return None, why


def pipeline_health_for(backend: str) -> dg.AssetsDefinition:
    """pipeline_health for the warehouse's backend: in the writer pool on the DuckDB file, in
    no pool on DuckLake, where its reads wait for nobody (see policies.warehouse_pool)."""
    return dg.asset(
        name="pipeline_health",
        group_name="monitoring",
        kinds={"duckdb"},
        description="Last 24 hours: batches, runs, step failures, error rates, dead letters,"
        " latency.",
        pool=warehouse_pool(backend, on_ducklake=None),
    )(_pipeline_health)


def _pipeline_health(
    context: dg.AssetExecutionContext, config: PipelineHealthConfig, warehouse: Warehouse
) -> dg.MaterializeResult:
    """Summary of the pipeline's recent health (runs, steps, batches, errors, dead letters)."""
    instance = context.instance
    since = time.time() - config.window_hours * 3600
    runs = [
        r
        for r in instance.get_run_records(
            dg.RunsFilter(created_after=datetime.fromtimestamp(since, tz=UTC)),
            limit=5000,
        )
        if r.dagster_run.run_id != context.run.run_id
    ]
    activity = RecentActivity(
        end_to_end_seconds=end_to_end_times(
            (r.dagster_run.tags.get("dagster/partition"), r.start_time, r.end_time) for r in runs
        ),
        batches=len(_partitions(instance, RAW_CUSTOMERS, since)),
        schema_error_rates=_metadata_values(instance, CUSTOMERS, "error_rate", since),
        model_error_rates=_metadata_values(instance, CUSTOMER_EMBEDDINGS, "error_rate", since),
        latency_p95_seconds=_metadata_values(
            instance, CUSTOMER_EMBEDDINGS, "latency_p95_seconds", since
        ),
        estimated_costs=_metadata_values(instance, CUSTOMER_EMBEDDINGS, "estimated_cost", since),
        costs_saved_by_cache=_metadata_values(
            instance, CUSTOMER_EMBEDDINGS, "cost_saved_by_cache", since
        ),
    )
    activity.run_status.update(r.dagster_run.status.value for r in runs)
    _count_steps(instance, runs, activity)
    activity.dead_letters, activity.dead_letters_not_read = _pending_dead_letters(
        warehouse, context.log
    )
    figures = health_figures(activity)
    markdown = health_markdown(activity, figures, config.window_hours)
    metadata = {**figures, "summary": dg.MetadataValue.md(markdown)}
    if activity.dead_letters is None:
        metadata["dead_letters_not_read"] = activity.dead_letters_not_read
    return dg.MaterializeResult(metadata=metadata)


# The default backend's; build_definitions builds it for the deployment's (see jobs.ASSETS).
pipeline_health = pipeline_health_for(DUCKDB)
