"""Alerting sensors, each driven by a real test instance and crafted runs or events."""

from dataclasses import replace

import dagster as dg
import duckdb
import pytest

from pipeline_project.definitions import build_definitions
from pipeline_project.partitions import batches
from pipeline_project.resources import AlertSink
from pipeline_project.sensors.alerting import (
    alert_delivery_sensor,
    alert_finished_run,
    build_alerting_sensors,
    check_results_alert_sensor,
    dead_letter_growth_sensor,
    error_rate_alert_sensor,
    freshness_alert_sensor,
    run_failure_alert_sensor,
)
from pipeline_project.settings import AlertSettings
from pipeline_project_tests.helpers import customer, run_batch, write_lines
from pipeline_project_tests.test_alerts import Hook


def alerts(settings) -> list[tuple]:
    if not settings.alerts_duckdb_path.exists():
        return []
    with duckdb.connect(str(settings.alerts_duckdb_path), read_only=True) as conn:
        return conn.execute(
            "SELECT alert_key, status, severity, batch_id, link FROM alerts ORDER BY created_at"
        ).fetchall()


def good_lines(n: int) -> list[str]:
    return [customer(id=f"6f1c2a3b-4d5e-4f60-8a7b-{i:012d}") for i in range(n)]


def status_context(instance, result, resources, failure=False):
    context = dg.build_run_status_sensor_context(
        sensor_name="s",
        dagster_instance=instance,
        dagster_run=result.dagster_run,
        dagster_event=result.get_run_failure_event() if failure else result.get_run_success_event(),
        resources={"alerts": resources["alerts"]},
    )
    return context.for_run_failure() if failure else context


def tick(sensor, instance, resources, cursor=None):
    with dg.build_sensor_context(
        instance=instance, resources={"alerts": resources["alerts"]}, cursor=cursor
    ) as context:
        return sensor(context)


def test_a_failed_run_alerts_the_check_that_stopped_it_else_the_run_failure_with_a_link(
    defs, instance, resources, settings
):
    # stopped by a blocking check: that check alerts, with why; no second alert for the run
    write_lines(settings.landing_dir / "bad.jsonl", ["{", "[]", customer()])
    result = run_batch(defs, instance, "bad")
    assert not result.success
    run_failure_alert_sensor(status_context(instance, result, resources, failure=True))
    stopped = [a for a in alerts(settings) if a[3] == "bad" and a[2] == "error"]
    assert stopped == [
        ("check:customers:schema_error_rate_below_hard_ceiling:bad", "firing", "error", "bad",
         f"/runs/{result.run_id}"),
    ]  # fmt: skip
    assert not [a for a in alerts(settings) if "run_fail" in a[0]]

    # failed without a check that says why (its landing file is gone): the run failure alerts
    instance.add_dynamic_partitions("batches", ["gone"])
    gone = run_batch(defs, instance, "gone")
    assert not gone.success
    run_failure_alert_sensor(status_context(instance, gone, resources, failure=True))
    [(key, status, severity, batch, link)] = [a for a in alerts(settings) if "run_fail" in a[0]]
    assert (key, status, severity, batch) == (
        "run_failure:batch_ingestion_job:gone",
        "firing",
        "error",
        "gone",
    )
    assert link == f"/runs/{gone.run_id}"


def test_failed_warn_check_in_a_successful_run_alerts_and_a_pass_resolves_it(
    defs, instance, resources, settings
):
    path = write_lines(settings.landing_dir / "b1.jsonl", [*good_lines(9), "{oops"])  # 10% > 5%
    first = run_batch(defs, instance, "b1")
    assert first.success
    check_results_alert_sensor(status_context(instance, first, resources))
    # the WARN check guards the error rate its stage alerted itself: that alert, not a second
    key = "error_rate:customers:b1"
    assert alerts(settings) == [(key, "firing", "warning", "b1", f"/runs/{first.run_id}")]

    write_lines(path, good_lines(10))
    second = run_batch(defs, instance, "b1")
    check_results_alert_sensor(status_context(instance, second, resources))
    assert [(k, s) for k, s, *_ in alerts(settings) if k == key] == [
        (key, "firing"),
        (key, "resolved"),
    ]


def embeddings_materialized(
    instance, batch_id: str, dead_letter_total: int, error_rate: float = 0.0,
    threshold: float | None = 0.05,
):  # fmt: skip
    recorded = {} if threshold is None else {"error_rate_threshold": threshold}
    instance.report_runless_asset_event(
        dg.AssetMaterialization(
            "customer_embeddings", partition=batch_id,
            metadata={"dead_letter_total": dead_letter_total, "error_rate": error_rate,
                      **recorded},
        )
    )  # fmt: skip


def sensor_with(name: str, **settings) -> dg.SensorDefinition:
    """The alerting sensor `name`, built from alert settings other than the defaults."""
    [sensor] = [s for s in build_alerting_sensors(AlertSettings(**settings)) if s.name == name]
    return sensor


def test_dead_letter_queue_growing_for_k_batches_alerts_then_resolves(
    instance, resources, settings
):
    growth = sensor_with("dead_letter_growth_sensor", dlq_growth_batches=3)
    for i, total in enumerate([5, 5, 6, 8]):
        embeddings_materialized(instance, f"b{i}", total)
        tick(growth, instance, resources)
    assert alerts(settings) == []  # 5 -> 5 did not grow: only 2 growing batches so far
    embeddings_materialized(instance, "b4", 9)
    tick(growth, instance, resources)
    assert [(k, s) for k, s, *_ in alerts(settings)] == [("dead_letter_growth", "firing")]
    embeddings_materialized(instance, "b5", 9)
    tick(growth, instance, resources)
    assert [(k, s) for k, s, *_ in alerts(settings)][-1] == ("dead_letter_growth", "resolved")


def test_error_rate_sensor_alerts_per_batch_above_the_threshold_once(instance, resources, settings):
    embeddings_materialized(instance, "ok", 0, error_rate=0.01)
    embeddings_materialized(instance, "bad", 0, error_rate=0.09)
    result = tick(error_rate_alert_sensor, instance, resources)
    assert alerts(settings) == [
        ("error_rate:customer_embeddings:bad", "firing", "warning", "bad", None)
    ]
    again = tick(error_rate_alert_sensor, instance, resources, cursor=result.cursor)
    assert "0 new materializations" in again.skip_reason.skip_message
    assert len(alerts(settings)) == 1


def test_the_error_rate_threshold_is_the_stage_s_and_the_growth_window_the_settings(
    instance, resources, settings
):
    # one threshold per monitor: the one the stage's check used, recorded with the batch
    embeddings_materialized(instance, "b0", 1, error_rate=0.09, threshold=0.10)
    embeddings_materialized(instance, "old", 1, error_rate=0.09, threshold=None)
    tick(error_rate_alert_sensor, instance, resources)
    assert alerts(settings) == []  # 9% is below its 10%; no recorded threshold, no judgement
    embeddings_materialized(instance, "b1", 2)
    tick(sensor_with("dead_letter_growth_sensor", dlq_growth_batches=1), instance, resources)
    assert [(k, s) for k, s, *_ in alerts(settings)] == [("dead_letter_growth", "firing")]


@pytest.mark.parametrize(
    "sensor",
    [run_failure_alert_sensor, check_results_alert_sensor, freshness_alert_sensor,
     dead_letter_growth_sensor, error_rate_alert_sensor, alert_delivery_sensor],
)  # fmt: skip
def test_every_alerting_sensor_runs_by_default(sensor):
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING


# ---- one alert whatever path a batch takes: the run itself, then the daemon's sensor ----


def stage_alerting_its_error_rate(asset: str, rate: float) -> dg.AssetsDefinition:
    """A stand-in for a stage that reports its error rate and alerts on it inside its run."""

    @dg.asset(name=asset, partitions_def=batches)
    def stage(context: dg.AssetExecutionContext, alerts: AlertSink) -> dg.MaterializeResult:
        alerts.alert_error_rate(
            asset=asset, batch_id=context.partition_key, rate=rate, threshold=0.05,
            log=context.log, run_id=context.run.run_id,
        )  # fmt: skip
        return dg.MaterializeResult(metadata={"error_rate": rate, "error_rate_threshold": 0.05})

    return stage


@pytest.mark.parametrize("cooldown_seconds", [3600.0, 0.0])
@pytest.mark.parametrize("asset", ["customers", "customer_embeddings"])
def test_an_error_rate_the_asset_alerted_is_not_alerted_again_by_the_sensor(
    instance, settings, asset, cooldown_seconds
):
    """Exactly one stored alert and one POST, also once the cooldown is over (0 s): the
    sensor recognises the run it already alerted for."""
    hook = Hook()
    with hook.running() as url:
        sink = AlertSink(database=str(settings.alerts_duckdb_path), webhook_url=url,
                         cooldown_seconds=cooldown_seconds)  # fmt: skip
        instance.add_dynamic_partitions("batches", ["b1"])
        result = dg.materialize(
            [stage_alerting_its_error_rate(asset, 1.0)], partition_key="b1", instance=instance,
            resources={"alerts": sink},
        )  # fmt: skip
        assert result.success
        assert len(alerts(settings)) == 1 and len(hook.bodies) == 1  # the run alerted
        cursor = tick(error_rate_alert_sensor, instance, {"alerts": sink}).cursor
        tick(error_rate_alert_sensor, instance, {"alerts": sink}, cursor=cursor)
    assert alerts(settings) == [(f"error_rate:{asset}:b1", "firing", "warning", "b1",
                                 f"/runs/{result.run_id}")]  # fmt: skip
    assert len(hook.bodies) == 1


def webhook_defs(settings, url: str, monkeypatch, **alert_settings) -> dg.Definitions:
    """The project's definitions with the webhook configured the deployed way (an env var)."""
    monkeypatch.setenv("PIPELINE_ALERT_WEBHOOK_URL", url)
    settings = replace(
        settings, alerts=replace(settings.alerts, webhook_configured=True, **alert_settings)
    )
    settings.landing.landing_dir.mkdir(parents=True, exist_ok=True)
    return build_definitions(settings)


def test_a_failed_in_process_run_alerts_once_and_the_daemon_s_sensor_adds_nothing(
    instance, settings, monkeypatch
):
    hook = Hook()
    with hook.running() as url:
        defs = webhook_defs(settings, url, monkeypatch, cooldown_seconds=0.0)
        write_lines(settings.landing_dir / "bad.jsonl", ["{", "[]", "{oops"])  # every line bad
        result = run_batch(defs, instance, "bad")
        assert not result.success
        sink = defs.resources["alerts"]  # as the CLI has it: the webhook URL still an EnvVar
        alert_finished_run(instance, result.dagster_run, sink)
        # each failed check once: the error rate (raised by the validation itself) and the
        # hard ceiling that stopped the run (which says why: no separate run-failure alert)
        expected = [
            ("check:customers:schema_error_rate_below_hard_ceiling:bad", "firing", "error"),
            ("error_rate:customers:bad", "firing", "warning"),
        ]
        assert sorted((k, s, sev) for k, s, sev, *_ in alerts(settings)) == expected
        assert len(hook.bodies) == 2
        run_failure_alert_sensor(status_context(instance, result, {"alerts": sink}, failure=True))
        tick(error_rate_alert_sensor, instance, {"alerts": sink})
        alert_finished_run(instance, result.dagster_run, sink)  # the CLI asked twice
    assert len(alerts(settings)) == 2 and len(hook.bodies) == 2
    assert {b["link"] for b in hook.bodies} == {f"/runs/{result.run_id}"}
    assert any(
        "schema_error_rate_below_hard_ceiling failed on customers for batch bad" in b["message"]
        for b in hook.bodies
    )


def test_a_failed_warn_check_of_an_in_process_run_alerts_once_and_the_sensor_adds_nothing(
    instance, settings, monkeypatch
):
    hook = Hook()
    with hook.running() as url:
        defs = webhook_defs(settings, url, monkeypatch, cooldown_seconds=0.0)
        write_lines(settings.landing_dir / "b1.jsonl", [*good_lines(9), "{oops"])  # 10% > 5%
        result = run_batch(defs, instance, "b1")
        assert result.success
        sink = defs.resources["alerts"]
        alert_finished_run(instance, result.dagster_run, sink)
        check_results_alert_sensor(status_context(instance, result, {"alerts": sink}))
        tick(error_rate_alert_sensor, instance, {"alerts": sink})
    # The failed WARN check is the error-rate alert its stage raised: one alert, not two.
    key = "error_rate:customers:b1"
    assert [(k, s) for k, s, *_ in alerts(settings)] == [(key, "firing")]
    assert [b["key"] for b in hook.bodies] == [key]


def test_a_failed_check_its_stage_did_not_alert_is_alerted_by_the_sensor_once(instance, settings):
    """The sensor skips a check's alert only when its stage really stored it: a dead-letter
    share above the check's threshold that the stage did not alert still alerts, once."""
    spec = dg.AssetCheckSpec(
        "embedding_dead_letter_share_below_threshold",
        asset="customer_embeddings",
        partitions_def=batches,  # preview, as the project's checks
    )

    @dg.asset(name="customer_embeddings", partitions_def=batches, check_specs=[spec])
    def stage(context: dg.AssetExecutionContext):
        yield dg.MaterializeResult(metadata={"error_rate": 0.038})
        yield dg.AssetCheckResult(
            check_name=spec.name, passed=False, severity=dg.AssetCheckSeverity.WARN,
            description="3.8% of customers dead-lettered, above 1%",
        )  # fmt: skip

    sink = AlertSink(database=str(settings.alerts_duckdb_path))
    instance.add_dynamic_partitions("batches", ["b1"])
    result = dg.materialize([stage], partition_key="b1", instance=instance)
    assert result.success
    alert_finished_run(instance, result.dagster_run, sink)
    check_results_alert_sensor(status_context(instance, result, {"alerts": sink}))
    key = "check:customer_embeddings:embedding_dead_letter_share_below_threshold:b1"
    assert [(k, s) for k, s, *_ in alerts(settings)] == [(key, "firing")]
