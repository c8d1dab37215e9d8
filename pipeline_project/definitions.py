"""The one Definitions object: assets, checks, sensors, jobs and resources, wired together."""

from __future__ import annotations

import dagster as dg

from pipeline_project.assets.ingestion import raw_customers
from pipeline_project.assets.validation import validated_customers
from pipeline_project.resources import AlertSink, LandingZone, Warehouse
from pipeline_project.sensors.landing import build_landing_batches_sensor
from pipeline_project.settings import Settings

BATCH_ASSETS = [raw_customers, validated_customers]

# Everything a landing batch needs to become validated tables; the landing sensor targets it.
batch_ingestion_job = dg.define_asset_job(
    "batch_ingestion_job",
    selection=dg.AssetSelection.assets(*BATCH_ASSETS),
    description="Ingest and validate one landing batch (one partition).",
)


def build_resources(settings: Settings) -> dict[str, dg.ConfigurableResource]:
    """The embedded defaults and production differ only here, in resource configuration."""
    connection_config = {"memory_limit": settings.duckdb_memory_limit}
    return {
        "warehouse": Warehouse(
            database=str(settings.duckdb_path), connection_config=connection_config
        ),
        "landing": LandingZone(path=str(settings.landing_dir)),
        "alerts": AlertSink(database=str(settings.alerts_duckdb_path)),
    }


def build_definitions(settings: Settings | None = None) -> dg.Definitions:
    settings = settings or Settings.from_env()
    for path in (settings.duckdb_path, settings.alerts_duckdb_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    return dg.Definitions(
        assets=BATCH_ASSETS,
        jobs=[batch_ingestion_job],
        sensors=[build_landing_batches_sensor(batch_ingestion_job)],
        resources=build_resources(settings),
    )


defs = build_definitions()
