"""Discovery: new or re-delivered landing files become partitions and runs in one tick."""

import json

import dagster as dg

from pipeline_project.partitions import batches
from pipeline_project.resources import AlertSink, LandingZone
from pipeline_project.resources.alerts import AlertOutcome
from pipeline_project.resources.landing import LandingFile, RejectedFile
from pipeline_project.tables import RAW_CUSTOMERS

LANDING_SENSOR_INTERVAL_SECONDS = 30


def _already_ingested(instance: dg.DagsterInstance, landing_file: LandingFile) -> bool:
    """Whether raw_customers already holds this exact file (same fingerprint), e.g. from a run
    started outside the sensor; only asked for batches the sensor's cursor does not know."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(
            asset_key=dg.AssetKey(RAW_CUSTOMERS), asset_partitions=[landing_file.batch_id]
        ),
        limit=1,
    ).records
    if not records:
        return False
    metadata = records[0].asset_materialization.metadata
    stored = metadata.get("landing_fingerprint")
    return stored is not None and stored.value == landing_file.fingerprint


def build_landing_batches_sensor(
    target: dg.JobDefinition,
    minimum_interval_seconds: int = LANDING_SENSOR_INTERVAL_SECONDS,
) -> dg.SensorDefinition:
    @dg.sensor(
        name="landing_batches_sensor",
        job=target,
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Registers each new landing batch as a partition and launches its run; "
        "a re-delivered file (new size or mtime) runs its batch again.",
    )
    def landing_batches_sensor(
        context: dg.SensorEvaluationContext, landing: LandingZone, alerts: AlertSink
    ) -> dg.SensorResult:
        cursor = json.loads(context.cursor) if context.cursor else {}
        seen: dict[str, str] = cursor.get("files", {})
        reported: dict[str, str] = cursor.get("rejected", {})
        scan = landing.scan()

        known = set(context.instance.get_dynamic_partitions(batches.name))
        new_partitions = sorted(b for b in scan.files if b not in known)
        run_requests = []
        for batch_id, landing_file in sorted(scan.files.items()):
            fingerprint = landing_file.fingerprint
            if seen.get(batch_id) == fingerprint:
                continue
            if (
                batch_id not in seen
                and batch_id in known
                and _already_ingested(context.instance, landing_file)
            ):
                seen[batch_id] = fingerprint
                continue
            run_requests.append(
                dg.RunRequest(
                    partition_key=batch_id,
                    run_key=f"{batch_id}:{fingerprint}",
                    tags={"pipeline/landing_file": landing_file.name},
                )
            )
            seen[batch_id] = fingerprint

        still_rejected = {}
        for rejected in scan.rejected:
            still_rejected[rejected.name] = rejected.fingerprint
            if reported.get(rejected.name) == rejected.fingerprint:
                continue
            outcome = alert_rejected_file(alerts, rejected, context.log)
            if outcome.sent and not outcome.stored:  # report again on the next tick
                del still_rejected[rejected.name]

        # Only files still in the landing folder stay in the cursor, so it cannot grow forever.
        seen = {b: seen[b] for b in scan.files if b in seen}
        new_cursor = json.dumps({"files": seen, "rejected": still_rejected}, sort_keys=True)
        if not run_requests and not new_partitions:
            return dg.SensorResult(
                skip_reason=dg.SkipReason(f"no new batch files ({len(scan.files)} known)"),
                cursor=new_cursor,
            )
        return dg.SensorResult(
            run_requests=run_requests,
            dynamic_partitions_requests=(
                [batches.build_add_request(new_partitions)] if new_partitions else []
            ),
            cursor=new_cursor,
        )

    return landing_batches_sensor


def alert_rejected_file(alerts: AlertSink, rejected: RejectedFile, log) -> AlertOutcome:
    """A landing file that is never read (its name is no batch ID, a link, ...): one warning per
    file, the same from this sensor and from the demo."""
    return alerts.emit(
        severity="warning",
        monitor="landing_file_name",
        key=f"landing_file_name:{rejected.name}",
        message=f"skipped landing file {rejected.name!r}: {rejected.reason}",
        log=log,
        figures={"file": rejected.name, "reason": rejected.reason},
    )
