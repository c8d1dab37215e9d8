"""Alerting sensors: run failures, failed WARN checks, freshness, dead-letter growth, error rates.

Every alert goes through the `alerts` resource (table, log, optional webhook) with a cooldown
per key; a condition that clears records a "resolved" alert. `build_alerting_sensors` makes
them from the alert settings (interval, error-rate threshold, K batches of dead-letter growth).
"""

import json

import dagster as dg

from pipeline_project.policies import FRESHNESS_MONITORED
from pipeline_project.resources import AlertSink
from pipeline_project.settings import AlertSettings
from pipeline_project.tables import CUSTOMER_EMBEDDINGS, CUSTOMERS

ERROR_RATE_MONITORED = (CUSTOMERS, CUSTOMER_EMBEDDINGS)


def _run_key(run: dg.DagsterRun) -> str:
    return f"run_failure:{run.job_name}:{run.tags.get('dagster/partition', '-')}"


def _alert_run_failure(context: dg.RunFailureSensorContext, alerts: AlertSink) -> None:
    run = context.dagster_run
    partition = run.tags.get("dagster/partition")
    alerts.emit(
        severity="error",
        monitor="run_failure",
        key=_run_key(run),
        message=f"run of {run.job_name} failed"
        + (f" for batch {partition}" if partition else "")
        + f": {context.failure_event.message}",
        log=context.log,
        batch_id=partition,
        figures={"job": run.job_name},
        run_id=run.run_id,
    )


def _alert_check_results(context: dg.RunStatusSensorContext, alerts: AlertSink) -> None:
    run = context.dagster_run
    alerts.resolve(
        monitor="run_failure", key=_run_key(run), message="a later run succeeded",
        log=context.log, run_id=run.run_id,
    )  # fmt: skip
    records = context.instance.all_logs(
        run.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION
    )
    for record in records:
        evaluation = record.dagster_event.asset_check_evaluation_data
        asset = evaluation.asset_key.to_user_string()
        partition = evaluation.partition
        key = f"check:{asset}:{evaluation.check_name}:{partition or '-'}"
        figures = {k: v.value for k, v in evaluation.metadata.items()}
        where = f"{asset}" + (f" for batch {partition}" if partition else "")
        if evaluation.passed:
            alerts.resolve(
                monitor=evaluation.check_name, key=key, message=f"passes again on {where}",
                log=context.log, batch_id=partition, run_id=run.run_id,
            )  # fmt: skip
            continue
        alerts.emit(
            severity="error" if evaluation.severity == dg.AssetCheckSeverity.ERROR else "warning",
            monitor=evaluation.check_name,
            key=key,
            message=f"check {evaluation.check_name} failed on {where}",
            log=context.log,
            batch_id=partition,
            figures=figures,
            run_id=run.run_id,
        )


def _alert_freshness(context: dg.SensorEvaluationContext, alerts: AlertSink) -> dg.SkipReason:
    keys = [dg.AssetKey(name) for name in FRESHNESS_MONITORED]
    records = context.instance.get_freshness_state_records(keys)
    states = {}
    for key in keys:
        record = records.get(key)
        state = record.freshness_state.value if record else "UNKNOWN"
        asset = key.to_user_string()
        states[asset] = state
        # One key per level, so WARN turning into FAIL is an alert of its own.
        if state in ("WARN", "FAIL"):
            alerts.emit(
                severity="error" if state == "FAIL" else "warning",
                monitor="freshness",
                key=f"freshness:{asset}:{state.lower()}",
                message=f"{asset} is stale: freshness {state}",
                log=context.log,
                figures={"state": state, "since": record.updated_at},
            )
        if state in ("PASS", "WARN"):
            levels = ("warn", "fail") if state == "PASS" else ("fail",)
            for level in levels:
                alerts.resolve(
                    monitor="freshness", key=f"freshness:{asset}:{level}",
                    message=f"{asset} freshness is {state} again", log=context.log,
                )  # fmt: skip
    return dg.SkipReason(f"freshness states: {json.dumps(states)}")


def _alert_dead_letter_growth(
    context: dg.SensorEvaluationContext, alerts: AlertSink, k: int
) -> dg.SkipReason:
    records = context.instance.fetch_materializations(
        dg.AssetKey(CUSTOMER_EMBEDDINGS), limit=k + 1
    ).records
    totals = [
        r.asset_materialization.metadata["dead_letter_total"].value
        for r in reversed(records)  # oldest first
        if "dead_letter_total" in r.asset_materialization.metadata
    ]
    growing = len(totals) == k + 1 and all(b > a for a, b in zip(totals, totals[1:], strict=False))
    if growing:
        alerts.emit(
            severity="warning",
            monitor="dead_letter_growth",
            key="dead_letter_growth",
            message=f"the dead-letter queue grew with each of the last {k} batches: {totals}",
            log=context.log,
            figures={"dead_letter_totals": totals},
        )
    elif totals:
        alerts.resolve(
            monitor="dead_letter_growth", key="dead_letter_growth",
            message=f"dead-letter queue stopped growing: {totals}", log=context.log,
        )  # fmt: skip
    return dg.SkipReason(f"dead-letter totals (oldest first): {totals}")


def _alert_error_rates(
    context: dg.SensorEvaluationContext, alerts: AlertSink, threshold: float
) -> dg.SensorResult:
    cursor = json.loads(context.cursor) if context.cursor else {}
    seen = 0
    for asset in ERROR_RATE_MONITORED:
        result = context.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), after_storage_id=cursor.get(asset)),
            limit=200,
            ascending=True,
        )
        for record in result.records:
            seen += 1
            cursor[asset] = record.storage_id
            materialization = record.asset_materialization
            entry = materialization.metadata.get("error_rate")
            if entry is None:
                continue
            batch_id = materialization.partition
            key = f"error_rate:{asset}:{batch_id}"
            if entry.value > threshold:
                alerts.emit(
                    severity="warning",
                    monitor="error_rate",
                    key=key,
                    message=f"{asset} error rate {entry.value:.2%} for batch {batch_id} is above "
                    f"{threshold:.0%}",
                    log=context.log,
                    batch_id=batch_id,
                    figures={"error_rate": entry.value, "threshold": threshold},
                    run_id=record.run_id,
                )
            else:
                alerts.resolve(
                    monitor="error_rate", key=key, message="error rate back below threshold",
                    log=context.log, batch_id=batch_id, run_id=record.run_id,
                )  # fmt: skip
    return dg.SensorResult(
        skip_reason=dg.SkipReason(f"{seen} new materializations checked"),
        cursor=json.dumps(cursor),
    )


def build_alerting_sensors(settings: AlertSettings) -> list[dg.SensorDefinition]:
    """The five alerting sensors, ticking every `settings.sensor_interval_seconds`."""
    common = {
        "minimum_interval_seconds": settings.sensor_interval_seconds,
        "default_status": dg.DefaultSensorStatus.RUNNING,
    }

    @dg.run_failure_sensor(
        name="run_failure_alert_sensor",
        description="Alerts (error) when a run fails, e.g. a blocking check or a circuit breaker.",
        **common,
    )
    def run_failure_alert_sensor(context: dg.RunFailureSensorContext, alerts: AlertSink) -> None:
        _alert_run_failure(context, alerts)

    @dg.run_status_sensor(
        name="check_results_alert_sensor",
        run_status=dg.DagsterRunStatus.SUCCESS,
        description="Alerts on failed non-blocking (WARN) checks of successful runs, which a "
        "run-failure sensor never sees; resolves alerts whose check passes again.",
        **common,
    )
    def check_results_alert_sensor(context: dg.RunStatusSensorContext, alerts: AlertSink) -> None:
        _alert_check_results(context, alerts)

    @dg.sensor(
        name="freshness_alert_sensor",
        description="Alerts when the stored freshness state of the ingestion or final asset "
        "turns WARN or FAIL (the freshness daemon evaluates the policies).",
        **common,
    )
    def freshness_alert_sensor(context: dg.SensorEvaluationContext, alerts: AlertSink):
        return _alert_freshness(context, alerts)

    k = settings.dlq_growth_batches

    @dg.sensor(
        name="dead_letter_growth_sensor",
        description=f"Alerts when the dead-letter queue grew with each of the last {k} batches "
        "(PIPELINE_DLQ_GROWTH_BATCHES).",
        **common,
    )
    def dead_letter_growth_sensor(context: dg.SensorEvaluationContext, alerts: AlertSink):
        return _alert_dead_letter_growth(context, alerts, k)

    threshold = settings.error_rate_threshold

    @dg.sensor(
        name="error_rate_alert_sensor",
        description="Alerts when a batch's schema error rate or model error rate is above "
        f"{threshold:.0%} (PIPELINE_ALERT_ERROR_RATE).",
        **common,
    )
    def error_rate_alert_sensor(context: dg.SensorEvaluationContext, alerts: AlertSink):
        return _alert_error_rates(context, alerts, threshold)

    return [
        run_failure_alert_sensor,
        check_results_alert_sensor,
        freshness_alert_sensor,
        dead_letter_growth_sensor,
        error_rate_alert_sensor,
    ]


# With the default settings, for callers that tick one sensor directly (tests); the deployed
# sensors are built by build_definitions from the deployment's settings.
(
    run_failure_alert_sensor,
    check_results_alert_sensor,
    freshness_alert_sensor,
    dead_letter_growth_sensor,
    error_rate_alert_sensor,
) = build_alerting_sensors(AlertSettings())
