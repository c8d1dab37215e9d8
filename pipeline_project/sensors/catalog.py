"""Reload the product catalog whenever its file changes."""

import dagster as dg

from pipeline_project.resources import LandingZone


def build_catalog_file_sensor(target, minimum_interval_seconds: int = 30) -> dg.SensorDefinition:
    @dg.sensor(
        name="catalog_file_sensor",
        job=target,
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Materializes product_catalog when the catalog file appears or changes.",
    )
    def catalog_file_sensor(context: dg.SensorEvaluationContext, landing: LandingZone):
        fingerprint = landing.catalog_fingerprint()
        if fingerprint is None:
            return dg.SkipReason(f"no catalog file at {landing.catalog_path}")
        if fingerprint == context.cursor:
            return dg.SkipReason("catalog file unchanged")
        return dg.SensorResult(
            run_requests=[dg.RunRequest(run_key=f"catalog:{fingerprint}")], cursor=fingerprint
        )

    return catalog_file_sensor
