"""The one Definitions object: assets, checks, sensors, jobs and resources, wired together.

`defs` is the code location's entry point (`dg dev`, `dagster dev`, workspace.yaml), built when
Dagster loads it; tests and scripts call `build_definitions` with their own settings.
"""

from __future__ import annotations

import warnings

import dagster as dg

from pipeline_project import jobs, lifecycle
from pipeline_project.asset_metadata import described
from pipeline_project.assets.health import pipeline_health_for
from pipeline_project.assets.inference import customer_embeddings_for
from pipeline_project.checks.schema_checks import COLUMN_SCHEMA_CHECKS
from pipeline_project.policies import FRESHNESS_MONITORED, freshness_policy
from pipeline_project.resources import AlertSink, LandingZone, Warehouse
from pipeline_project.resources.embeddings import Embedder, build_embedder
from pipeline_project.sensors.alerting import build_alerting_sensors
from pipeline_project.sensors.catalog import build_catalog_file_sensor
from pipeline_project.sensors.landing import build_landing_batches_sensor
from pipeline_project.sensors.rescore import build_rescore_sensor
from pipeline_project.settings import Settings


def build_resources(
    settings: Settings, embedder: Embedder | None = None
) -> dict[str, dg.ConfigurableResource]:
    """The embedded defaults and production differ only here, in resource configuration."""
    return {
        "warehouse": Warehouse.from_settings(settings.warehouse, settings.object_storage),
        "landing": LandingZone.from_settings(settings.landing, settings.object_storage),
        "alerts": AlertSink.from_settings(settings.alerts, settings.freshness, settings.warehouse),
        "embedder": embedder or build_embedder(settings.embedding, settings.warehouse),
    }


# The stages whose pool depends on the warehouse's backend (see policies.warehouse_pool), by
# op name: each built for the deployment's backend in place of its module's default.
BUILT_FOR_BACKEND = {
    "customer_embeddings": customer_embeddings_for,
    "pipeline_health": pipeline_health_for,
}


def assets_for(backend: str) -> list[dg.AssetsDefinition]:
    """Every asset of jobs.ASSETS, those of BUILT_FOR_BACKEND built for `backend`."""
    return [
        BUILT_FOR_BACKEND[a.node_def.name](backend) if a.node_def.name in BUILT_FOR_BACKEND
        else a
        for a in jobs.ASSETS
    ]  # fmt: skip


def build_definitions(
    settings: Settings | None = None, embedder: Embedder | None = None
) -> dg.Definitions:
    """Everything of one deployment; `settings` default to the environment's."""
    settings = settings or Settings.from_env()
    for path in (settings.warehouse.duckdb_path, settings.alerts.alerts_duckdb_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    fresh = freshness_policy(settings.freshness.warn_hours, settings.freshness.fail_hours)
    interval = settings.sensors.interval_seconds
    resources = build_resources(settings, embedder)
    warehouse: Warehouse = resources["warehouse"]

    def spec_of_deployment(spec: dg.AssetSpec) -> dg.AssetSpec:
        spec = described(
            spec,
            qualified_name=warehouse.qualified_name,
            location=warehouse.location_metadata,
            embedder_kind=resources["embedder"].kind,
        )
        if spec.key.to_user_string() in FRESHNESS_MONITORED:
            return spec.replace_attributes(freshness_policy=fresh)
        return spec

    assets = dg.map_asset_specs(spec_of_deployment, assets_for(settings.warehouse.backend))
    with warnings.catch_warnings():
        # Beta, and the only way to the UI's link from each asset to its source; its warning
        # says nothing a user can act on.
        warnings.simplefilter("ignore", dg.BetaWarning)
        assets = dg.with_source_code_references(assets)
    return dg.Definitions(
        assets=assets,
        asset_checks=COLUMN_SCHEMA_CHECKS,
        jobs=[*jobs.JOBS, lifecycle.erase_customers_job, lifecycle.delete_batches_job],
        schedules=jobs.SCHEDULES,
        sensors=[
            build_landing_batches_sensor(jobs.batch_ingestion_job, interval),
            build_catalog_file_sensor(jobs.catalog_job, interval),
            jobs.build_automation_sensor(interval),
            build_rescore_sensor(jobs.batch_pipeline_job, interval),
            *build_alerting_sensors(settings.alerts),
        ],
        resources=resources,
    )


@dg.definitions
def defs() -> dg.Definitions:
    """The code location (workspace.yaml, pyproject.toml): the one place the environment is read."""
    return build_definitions()
