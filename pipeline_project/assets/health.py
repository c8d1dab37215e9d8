"""pipeline_health: the last hours of the pipeline in one place, as Markdown and plotted numbers."""

import time
from collections import Counter, defaultdict
from datetime import UTC, datetime

import dagster as dg
import numpy as np
from pydantic import Field

from pipeline_project.resources import Warehouse

_STEP_EVENTS = {dg.DagsterEventType.STEP_SUCCESS, dg.DagsterEventType.STEP_FAILURE}


class PipelineHealthConfig(dg.Config):
    window_hours: float = Field(default=24.0, description="How far back the summary looks.")


def _metadata_values(instance, asset: str, key: str, since: float) -> list[float]:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), after_timestamp=since), limit=10_000
    ).records
    return [
        r.asset_materialization.metadata[key].value
        for r in records
        if key in r.asset_materialization.metadata
    ]


@dg.asset(
    group_name="monitoring",
    kinds={"duckdb"},
    description="Last 24 hours: batches, runs, step failures, error rates, dead letters, latency.",
)
def pipeline_health(
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
    run_status = Counter(r.dagster_run.status.value for r in runs)
    steps_ok: Counter = Counter()
    steps_failed: Counter = Counter()
    for record in runs:
        for event in instance.all_logs(record.dagster_run.run_id, of_type=_STEP_EVENTS):
            target = (
                steps_ok
                if event.dagster_event_type == dg.DagsterEventType.STEP_SUCCESS
                else steps_failed
            )
            target[event.step_key] += 1
    spans: dict[str, list[float]] = defaultdict(list)
    for record in runs:
        partition = record.dagster_run.tags.get("dagster/partition")
        if partition and record.start_time and record.end_time:
            spans[partition] += [record.start_time, record.end_time]
    end_to_end = [max(s) - min(s) for s in spans.values()]
    batches = {
        r.asset_materialization.partition
        for r in instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("raw_customers"), after_timestamp=since),
            limit=10_000,
        ).records
    }
    schema_error_rates = _metadata_values(instance, "customers", "error_rate", since)
    model_error_rates = _metadata_values(instance, "customer_embeddings", "error_rate", since)
    latency_p95 = _metadata_values(instance, "customer_embeddings", "latency_p95_seconds", since)
    with warehouse.get_connection() as conn:
        dead_letters = dict(
            conn.execute(
                "SELECT stage, count(*) FROM dead_letter WHERE replayed_at IS NULL GROUP BY stage"
            ).fetchall()
        )

    total_steps = sum(steps_ok.values()) + sum(steps_failed.values())
    figures = {
        "batches": len(batches),
        "runs": len(runs),
        "runs_failed": run_status.get("FAILURE", 0),
        "step_failure_rate": round(sum(steps_failed.values()) / total_steps, 4)
        if total_steps
        else 0.0,
        "schema_error_rate_max": round(max(schema_error_rates, default=0.0), 4),
        "model_error_rate_max": round(max(model_error_rates, default=0.0), 4),
        "latency_p95_seconds_max": round(max(latency_p95, default=0.0), 4),
        "end_to_end_seconds_p50": round(float(np.median(end_to_end)), 2) if end_to_end else 0.0,
        "end_to_end_seconds_max": round(max(end_to_end, default=0.0), 2),
        "dead_letter_total": sum(dead_letters.values()),
    }
    failing = (
        "\n".join(f"| {step} | {steps_ok[step]} | {n} |" for step, n in steps_failed.most_common())
        or "| (none) | | |"
    )
    markdown = (
        f"### Pipeline health, last {config.window_hours:g} h\n\n"
        + "\n".join(f"- **{k.replace('_', ' ')}**: {v}" for k, v in figures.items())
        + f"\n- **runs by status**: {dict(run_status)}\n"
        + f"- **dead letters by stage**: {dead_letters or {}}\n\n"
        + "| step | succeeded | failed |\n|---|---|---|\n"
        + failing
    )
    return dg.MaterializeResult(metadata={**figures, "summary": dg.MetadataValue.md(markdown)})
