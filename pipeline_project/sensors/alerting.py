"""Alerting sensors: run failures, failed WARN checks, freshness, dead-letter growth, error rates.

Every alert goes through the `alerts` resource (table, log, optional webhook) with a cooldown
per key; a condition that clears records a "resolved" alert. `build_alerting_sensors` makes
them from the alert settings (interval, error-rate threshold, K batches of dead-letter growth);
a sixth sensor delivers the alerts whose webhook delivery a tick or step deferred.

The same alerts are raised outside the daemon too: a stage calls `AlertSink.alert_error_rate`
inside its run, the CLI calls `alert_finished_run` after an in-process run. A sensor that sees
the same run later finds the alert stored for it and raises nothing new.
"""

import json
import logging
import statistics
import time
from datetime import UTC, datetime
from typing import Any

import dagster as dg

from pipeline_project.checks.input_checks import ERROR_RATE_BELOW_THRESHOLD
from pipeline_project.checks.model_checks import DEAD_LETTER_SHARE_BELOW_THRESHOLD
from pipeline_project.policies import FRESHNESS_MONITORED
from pipeline_project.resources import AlertSink
from pipeline_project.resources.alerts import error_rate_key
from pipeline_project.settings import AlertSettings
from pipeline_project.tables import CUSTOMER_EMBEDDINGS, CUSTOMERS

ERROR_RATE_MONITORED = (CUSTOMERS, CUSTOMER_EMBEDDINGS)
# Materializations read per monitored asset and tick (the freshness and error-rate sensors).
PAGE = 200

_log = logging.getLogger(__name__)


def _run_key(run: dg.DagsterRun) -> str:
    return f"run_failure:{run.job_name}:{run.tags.get('dagster/partition', '-')}"


def alert_finished_run(
    instance: dg.DagsterInstance,
    run: dg.DagsterRun,
    alerts: AlertSink,
    log: logging.Logger | Any = None,
) -> None:
    """What run_failure_alert_sensor (a failed run) or check_results_alert_sensor (a
    successful one) would raise for `run`: for runs executed in process (the CLI), which no
    daemon may ever see. A sensor that sees the run later adds nothing.
    `alerts` may be the resource as configured (its webhook URL an EnvVar): it is set up here."""
    log = log or _log
    run = instance.get_run_by_id(run.run_id) or run  # the final status
    with dg.build_resources({"alerts": alerts}) as resources:
        sink: AlertSink = resources.alerts
        if run.status == dg.DagsterRunStatus.FAILURE:
            _alert_failed_run(instance, run, sink, log)
        elif run.status == dg.DagsterRunStatus.SUCCESS:
            _alert_check_results(instance, run, sink, log)


def _alert_failed_run(
    instance: dg.DagsterInstance, run: dg.DagsterRun, alerts: AlertSink, log
) -> None:
    """A failed run: each check that failed in it alerts (a blocking check, a gate that
    stopped the batch: the alert names it and its figures); the run failure alerts only when
    no failed blocking check says why, so that one failure is one alert."""
    if _alert_check_results(instance, run, alerts, log, resolve_run_failure=False):
        return
    failures = instance.all_logs(run.run_id, of_type=dg.DagsterEventType.RUN_FAILURE)
    message = failures[-1].dagster_event.message if failures else "the run failed"
    _alert_run_failure(run, message or "", alerts, log)


def _alert_run_failure(run: dg.DagsterRun, failure: str, alerts: AlertSink, log) -> None:
    partition = run.tags.get("dagster/partition")
    alerts.emit(
        severity="error",
        monitor="run_failure",
        key=_run_key(run),
        message=f"run of {run.job_name} failed"
        + (f" for batch {partition}" if partition else "")
        + f": {failure}",
        log=log,
        batch_id=partition,
        figures={"job": run.job_name},
        run_id=run.run_id,
    )


# Checks of a figure whose stage alerts it itself under the error_rate key (alert_error_rate,
# at the check's threshold): their failure is that alert, not a second one, when (and only
# when) the stage really stored it.
ALERTED_BY_THEIR_STAGE = {
    ERROR_RATE_BELOW_THRESHOLD: CUSTOMERS,
    DEAD_LETTER_SHARE_BELOW_THRESHOLD: CUSTOMER_EMBEDDINGS,
}


def _alert_check_results(
    instance: dg.DagsterInstance,
    run: dg.DagsterRun,
    alerts: AlertSink,
    log,
    resolve_run_failure: bool = True,
) -> int:
    """Alerts each failed check of the run once (resolves those that pass again); returns how
    many blocking (ERROR) checks failed: what stops a run."""
    if resolve_run_failure:
        alerts.resolve(
            monitor="run_failure", key=_run_key(run), message="a later run succeeded",
            log=log, run_id=run.run_id,
        )  # fmt: skip
    records = instance.all_logs(run.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)
    failed = 0
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
                log=log, batch_id=partition, run_id=run.run_id,
            )  # fmt: skip
            continue
        failed += evaluation.severity == dg.AssetCheckSeverity.ERROR
        stage = ALERTED_BY_THEIR_STAGE.get(evaluation.check_name)
        if stage is not None and alerts.is_firing(error_rate_key(stage, partition), log):
            continue  # its stage stored this very alert
        said = f": {evaluation.description}" if evaluation.description else ""
        alerts.emit(
            severity="error" if evaluation.severity == dg.AssetCheckSeverity.ERROR else "warning",
            monitor=evaluation.check_name,
            key=key,
            message=f"check {evaluation.check_name} failed on {where}{said}",
            log=log,
            batch_id=partition,
            figures=figures,
            run_id=run.run_id,
        )
    return failed


# Freshness follows the batches' observed cadence: once CADENCE_MIN_GAPS gaps between new
# batches are known, a batch is late after CADENCE_WARN x the median gap of the last
# CADENCE_ARRIVALS arrivals (FAIL after CADENCE_FAIL x); until then the configured hours.
CADENCE_ARRIVALS = 8
CADENCE_MIN_GAPS = 3
CADENCE_WARN, CADENCE_FAIL = 1.5, 3.0


def freshness_limits(
    arrivals: list[float], warn_hours: float, fail_hours: float
) -> tuple[float, float, str]:
    """WARN and FAIL hours for the next batch, and how they were chosen: from the median gap
    between the recent `arrivals` (timestamps, oldest first) once enough are known (a daily
    feed is late after 36 h, an hourly one after 1.5 h), else the configured hours."""
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False) if b > a]
    if len(gaps) < CADENCE_MIN_GAPS:
        return warn_hours, fail_hours, "configured hours (cadence not learned yet)"
    median_hours = statistics.median(gaps) / 3600
    return (
        CADENCE_WARN * median_hours,
        CADENCE_FAIL * median_hours,
        f"cadence: a new batch every {median_hours:.3g} h (median of {len(gaps)} gaps)",
    )


def _newest_new_batch(instance: dg.DagsterInstance, asset: str, seen: dict) -> tuple[dict, bool]:
    """Advance the asset's {storage_id, newest_new_batch_at, arrivals} over its next
    materializations: a materialization is a new batch when it is its partition's first
    (arrivals: the last CADENCE_ARRIVALS of their times). Also whether more materializations
    are left to read."""
    key = dg.AssetKey(asset)
    storage_id, newest = seen.get("storage_id"), seen.get("newest_new_batch_at")
    arrivals = list(seen.get("arrivals", []))
    result = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=key, after_storage_id=storage_id),
        limit=PAGE,
        ascending=True,
    )
    for record in result.records:
        storage_id = record.storage_id
        partition = record.partition_key
        if partition is not None:
            earlier = instance.fetch_materializations(
                dg.AssetRecordsFilter(
                    asset_key=key, asset_partitions=[partition], before_storage_id=storage_id
                ),
                limit=1,
            ).records
            if earlier:
                continue  # a batch it had before: re-materialized, no new data
        newest = max(newest or 0.0, record.timestamp)
        arrivals = [*arrivals, round(record.timestamp, 3)][-CADENCE_ARRIVALS:]
    seen = {"storage_id": storage_id, "newest_new_batch_at": newest, "arrivals": arrivals}
    return seen, result.has_more


def freshness_state(age_hours: float, warn_hours: float, fail_hours: float) -> str:
    """PASS, WARN or FAIL for the hours since the newest new batch."""
    if age_hours > fail_hours:
        return "FAIL"
    return "WARN" if age_hours > min(warn_hours, fail_hours) else "PASS"


def _alert_freshness(context: dg.SensorEvaluationContext, alerts: AlertSink) -> dg.SensorResult:
    """Stale means no new batch for X hours. Dagster's own freshness state is not trusted: it
    judges the latest materialization of any partition, so a re-materialized old batch (a
    retrain cascade, a replay, a backfill) would make the asset look fresh."""
    cursor = json.loads(context.cursor) if context.cursor else {}
    states = {}
    for asset in FRESHNESS_MONITORED:
        cursor[asset], more = _newest_new_batch(context.instance, asset, cursor.get(asset, {}))
        newest = cursor[asset]["newest_new_batch_at"]
        if more:  # judged once caught up, never on a partial history
            states[asset] = "CATCHING_UP"
            continue
        if newest is None:
            states[asset] = "UNKNOWN"  # no batch arrived yet
            continue
        age_hours = (time.time() - newest) / 3600
        warn_hours, fail_hours, chosen = freshness_limits(
            cursor[asset]["arrivals"], alerts.freshness_warn_hours, alerts.freshness_fail_hours
        )
        state = freshness_state(age_hours, warn_hours, fail_hours)
        states[asset] = state
        since = datetime.fromtimestamp(newest, UTC).isoformat(timespec="seconds")
        # One key per level, so WARN turning into FAIL is an alert of its own.
        if state in ("WARN", "FAIL"):
            limit = fail_hours if state == "FAIL" else warn_hours
            alerts.emit(
                severity="error" if state == "FAIL" else "warning",
                monitor="freshness",
                key=f"freshness:{asset}:{state.lower()}",
                message=f"{asset} is stale: no new batch for {age_hours:.2f} h (since {since};"
                f" {state} after {limit:.3g} h, {chosen})",
                log=context.log,
                figures={"state": state, "newest_new_batch_at": since,
                         "age_hours": round(age_hours, 4)},
            )  # fmt: skip
        levels = {"PASS": ("warn", "fail"), "WARN": ("fail",), "FAIL": ()}[state]
        for level in levels:
            alerts.resolve(
                monitor="freshness", key=f"freshness:{asset}:{level}",
                message=f"{asset} got a new batch (at {since})", log=context.log,
            )  # fmt: skip
    return dg.SensorResult(
        skip_reason=dg.SkipReason(f"freshness by newest new batch: {json.dumps(states)}"),
        cursor=json.dumps(cursor),
    )


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


def _alert_error_rates(context: dg.SensorEvaluationContext, alerts: AlertSink) -> dg.SensorResult:
    cursor = json.loads(context.cursor) if context.cursor else {}
    seen = 0
    for asset in ERROR_RATE_MONITORED:
        result = context.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), after_storage_id=cursor.get(asset)),
            limit=PAGE,
            ascending=True,
        )
        for record in result.records:
            seen += 1
            cursor[asset] = record.storage_id
            materialization = record.asset_materialization
            entry = materialization.metadata.get("error_rate")
            limit = materialization.metadata.get("error_rate_threshold")
            if entry is None or limit is None:  # the stage recorded no threshold: no judgement
                continue
            alerts.alert_error_rate(
                asset=asset, batch_id=materialization.partition, rate=entry.value,
                threshold=limit.value, log=context.log, run_id=record.run_id,
            )  # fmt: skip
    return dg.SensorResult(
        skip_reason=dg.SkipReason(f"{seen} new materializations checked"),
        cursor=json.dumps(cursor),
    )


def build_alerting_sensors(settings: AlertSettings) -> list[dg.SensorDefinition]:
    """The five alerting sensors and the delivery one, ticking every
    `settings.sensor_interval_seconds`."""
    common = {
        "minimum_interval_seconds": settings.sensor_interval_seconds,
        "default_status": dg.DefaultSensorStatus.RUNNING,
    }

    @dg.run_failure_sensor(
        name="run_failure_alert_sensor",
        description="Alerts when a run fails: each check that failed in it (a blocking check, a"
        " gate that stopped the batch), or the run's failure when no check says why.",
        **common,
    )
    def run_failure_alert_sensor(context: dg.RunFailureSensorContext, alerts: AlertSink) -> None:
        _alert_failed_run(context.instance, context.dagster_run, alerts, context.log)

    @dg.run_status_sensor(
        name="check_results_alert_sensor",
        run_status=dg.DagsterRunStatus.SUCCESS,
        description="Alerts on failed non-blocking (WARN) checks of successful runs, which a "
        "run-failure sensor never sees; resolves alerts whose check passes again.",
        **common,
    )
    def check_results_alert_sensor(context: dg.RunStatusSensorContext, alerts: AlertSink) -> None:
        _alert_check_results(context.instance, context.dagster_run, alerts, context.log)

    @dg.sensor(
        name="freshness_alert_sensor",
        description="Alerts when no new batch reached the ingestion or final asset for "
        "PIPELINE_FRESHNESS_WARN_HOURS / _FAIL_HOURS. A re-materialized old batch (a retrain, "
        "a backfill) does not count: Dagster's freshness state, judged per asset, would.",
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

    @dg.sensor(
        name="error_rate_alert_sensor",
        description="Alerts when a batch's schema error rate or model error rate is above the"
        " threshold its stage's check used (recorded with the batch: one threshold per"
        " monitor), for runs whose stage could not raise it itself.",
        **common,
    )
    def error_rate_alert_sensor(context: dg.SensorEvaluationContext, alerts: AlertSink):
        return _alert_error_rates(context, alerts)

    @dg.sensor(
        name="alert_delivery_sensor",
        description="Posts the alerts whose webhook delivery was deferred (pending): a tick or "
        "step stops posting after a failed delivery or once its delivery budget is spent.",
        **common,
    )
    def alert_delivery_sensor(context: dg.SensorEvaluationContext, alerts: AlertSink):
        # The only sensor that delivers pending alerts: Dagster never runs two ticks of one
        # sensor at once, so no pending alert is posted by two deliverers.
        delivered, left = alerts.deliver_pending(context.log)
        return dg.SkipReason(f"{delivered} delivered, {left} still pending")

    return [
        run_failure_alert_sensor,
        check_results_alert_sensor,
        freshness_alert_sensor,
        dead_letter_growth_sensor,
        error_rate_alert_sensor,
        alert_delivery_sensor,
    ]


# With the default settings, for callers that tick one sensor directly (tests); the deployed
# sensors are built by build_definitions from the deployment's settings.
(
    run_failure_alert_sensor,
    check_results_alert_sensor,
    freshness_alert_sensor,
    dead_letter_growth_sensor,
    error_rate_alert_sensor,
    alert_delivery_sensor,
) = build_alerting_sensors(AlertSettings())
