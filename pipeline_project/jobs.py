"""Jobs, schedules and the automation sensor: which assets run together, and when."""

from __future__ import annotations

import dagster as dg

from pipeline_project.assets.catalog import product_catalog, product_embeddings
from pipeline_project.assets.health import pipeline_health
from pipeline_project.assets.inference import DEAD_LETTER_REPLAY_TAG, customer_embeddings
from pipeline_project.assets.ingestion import raw_customers
from pipeline_project.assets.recommendations import recommendations, validated_recommendations
from pipeline_project.assets.segmentation import customer_segments, segment_model
from pipeline_project.assets.validation import validated_customers
from pipeline_project.checks.schema_checks import COLUMN_SCHEMA_CHECKS
from pipeline_project.maintenance import warehouse_maintenance_job
from pipeline_project.retention import daily_retention, retention_job

INGESTION_ASSETS = [raw_customers, validated_customers]
BATCH_ASSETS = [
    *INGESTION_ASSETS,
    customer_embeddings,
    customer_segments,
    recommendations,
    validated_recommendations,
]
CATALOG_ASSETS = [product_catalog, product_embeddings]
ASSETS = [*CATALOG_ASSETS, segment_model, *BATCH_ASSETS, pipeline_health]


def _job(
    name: str, assets: list, description: str, *, with_selection=None, **kwargs
) -> dg.UnresolvedAssetJobDefinition:
    """The assets with their checks, except the column-schema-change checks (hourly)."""
    selection = dg.AssetSelection.assets(*assets) - dg.AssetSelection.checks(*COLUMN_SCHEMA_CHECKS)
    if with_selection is not None:
        selection = selection | with_selection
    return dg.define_asset_job(name, selection=selection, description=description, **kwargs)


# What a new landing batch needs first; the automation sensor carries it on downstream.
batch_ingestion_job = _job(
    "batch_ingestion_job",
    INGESTION_ASSETS,
    "Ingest and validate one landing batch (one partition).",
)
# Every stage of one batch in one run: the CLI demo and manual re-runs.
batch_pipeline_job = _job(
    "batch_pipeline_job", BATCH_ASSETS, "Every stage of one batch, ingestion to the last stage."
)
# Launch it for a batch (UI or `pipeline-project dlq replay`) once the cause of its dead
# letters is fixed; automation then refreshes the batch's downstream stages.
dead_letter_replay_job = _job(
    "dead_letter_replay_job",
    [customer_embeddings],
    "Re-run one batch's dead-lettered customers through inference and merge them in.",
    tags={DEAD_LETTER_REPLAY_TAG: "true"},
)
catalog_job = _job(
    "catalog_job",
    CATALOG_ASSETS,
    "Reload the product catalog from its file and embed new product texts.",
)
segment_model_job = _job(
    "segment_model_job",
    [segment_model],
    "Retrain the segment model on every customer's current profile; rescore_sensor then"
    " re-scores the batches that hold current answers.",
)
pipeline_health_job = _job(
    "pipeline_health_job",
    [pipeline_health],
    "Refresh the pipeline health summary; check that no table's columns changed.",
    with_selection=dg.AssetSelection.checks(*COLUMN_SCHEMA_CHECKS),
)
JOBS = [
    batch_ingestion_job,
    batch_pipeline_job,
    dead_letter_replay_job,
    catalog_job,
    segment_model_job,
    pipeline_health_job,
    warehouse_maintenance_job,
    retention_job,
]


def _running_schedule(name: str, job, cron: str, description: str) -> dg.ScheduleDefinition:
    return dg.ScheduleDefinition(
        name=name,
        job=job,
        cron_schedule=cron,
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description=description,
    )


hourly_pipeline_health = _running_schedule(
    "hourly_pipeline_health",
    pipeline_health_job,
    "0 * * * *",
    "Refresh pipeline_health every hour.",
)
weekly_segment_model_retrain = _running_schedule(
    "weekly_segment_model_retrain",
    segment_model_job,
    "0 3 * * 1",
    "Mondays 03:00 UTC: retrain segments on the week's data.",
)
daily_warehouse_maintenance = _running_schedule(
    "daily_warehouse_maintenance",
    warehouse_maintenance_job,
    "30 2 * * *",
    "02:30 UTC: expire old snapshots, merge small files, delete files nothing references.",
)
SCHEDULES = [
    weekly_segment_model_retrain,
    hourly_pipeline_health,
    daily_warehouse_maintenance,
    daily_retention,
]


def build_automation_sensor(
    minimum_interval_seconds: int = 30,
) -> dg.AutomationConditionSensorDefinition:
    return dg.AutomationConditionSensorDefinition(
        "pipeline_automation_sensor",
        target=dg.AssetSelection.all(),
        default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=minimum_interval_seconds,
        description="Runs each batch's downstream stages once its upstream has landed and passed.",
        # One run per batch, launched in the tick; a backfill would wait for the backfill
        # daemon's next pass (up to an interval more per stage of latency).
        emit_backfills=False,
    )
