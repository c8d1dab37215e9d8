"""Alerting sensors, each driven by a real test instance and crafted runs or events."""

import dagster as dg
import duckdb
import pytest
from dagster._core.definitions.freshness import FreshnessState, FreshnessStateChange

from pipeline_project.sensors.alerting import (
    build_alerting_sensors,
    check_results_alert_sensor,
    dead_letter_growth_sensor,
    error_rate_alert_sensor,
    freshness_alert_sensor,
    run_failure_alert_sensor,
)
from pipeline_project.settings import AlertSettings
from pipeline_project_tests.helpers import customer, run_batch, write_lines


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


def test_run_failure_raises_an_error_alert_with_a_link_to_the_run(
    defs, instance, resources, settings
):
    write_lines(settings.landing_dir / "bad.jsonl", ["{", "[]", customer()])
    result = run_batch(defs, instance, "bad")
    assert not result.success
    run_failure_alert_sensor(status_context(instance, result, resources, failure=True))
    [(key, status, severity, batch, link)] = alerts(settings)
    assert (key, status, severity, batch) == (
        "run_failure:batch_ingestion_job:bad",
        "firing",
        "error",
        "bad",
    )
    assert link == f"/runs/{result.run_id}"


def test_failed_warn_check_in_a_successful_run_alerts_and_a_pass_resolves_it(
    defs, instance, resources, settings
):
    path = write_lines(settings.landing_dir / "b1.jsonl", [*good_lines(9), "{oops"])  # 10% > 5%
    first = run_batch(defs, instance, "b1")
    assert first.success
    check_results_alert_sensor(status_context(instance, first, resources))
    key = "check:customers:schema_error_rate_below_threshold:b1"
    assert (key, "firing", "warning", "b1", f"/runs/{first.run_id}") in alerts(settings)

    write_lines(path, good_lines(10))
    second = run_batch(defs, instance, "b1")
    check_results_alert_sensor(status_context(instance, second, resources))
    assert [(k, s) for k, s, *_ in alerts(settings) if k == key] == [
        (key, "firing"),
        (key, "resolved"),
    ]


def test_freshness_fail_alerts_and_pass_resolves(instance, resources, settings):
    def change(state):
        instance._report_runless_asset_event(  # what the freshness daemon does
            asset_event=FreshnessStateChange(
                key=dg.AssetKey("validated_recommendations"), new_state=state,
                previous_state=FreshnessState.UNKNOWN, state_change_timestamp=0.0,
            )
        )  # fmt: skip

    assert "UNKNOWN" in tick(freshness_alert_sensor, instance, resources).skip_message
    change(FreshnessState.WARN)
    tick(freshness_alert_sensor, instance, resources)
    tick(freshness_alert_sensor, instance, resources)  # still WARN: no second alert
    change(FreshnessState.FAIL)  # escalation: an alert of its own despite the cooldown
    tick(freshness_alert_sensor, instance, resources)
    assert alerts(settings) == [
        ("freshness:validated_recommendations:warn", "firing", "warning", None, None),
        ("freshness:validated_recommendations:fail", "firing", "error", None, None),
    ]
    change(FreshnessState.PASS)
    tick(freshness_alert_sensor, instance, resources)
    assert sorted((k, s) for k, s, *_ in alerts(settings)[2:]) == [
        ("freshness:validated_recommendations:fail", "resolved"),
        ("freshness:validated_recommendations:warn", "resolved"),
    ]


def embeddings_materialized(
    instance, batch_id: str, dead_letter_total: int, error_rate: float = 0.0
):
    instance.report_runless_asset_event(
        dg.AssetMaterialization(
            "customer_embeddings", partition=batch_id,
            metadata={"dead_letter_total": dead_letter_total, "error_rate": error_rate},
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


def test_the_error_rate_threshold_and_growth_window_come_from_the_alert_settings(
    instance, resources, settings
):
    embeddings_materialized(instance, "b0", 1, error_rate=0.09)
    tick(sensor_with("error_rate_alert_sensor", error_rate_threshold=0.10), instance, resources)
    assert alerts(settings) == []  # 9% is below a 10% threshold
    embeddings_materialized(instance, "b1", 2)
    tick(sensor_with("dead_letter_growth_sensor", dlq_growth_batches=1), instance, resources)
    assert [(k, s) for k, s, *_ in alerts(settings)] == [("dead_letter_growth", "firing")]


@pytest.mark.parametrize(
    "sensor",
    [run_failure_alert_sensor, check_results_alert_sensor, freshness_alert_sensor,
     dead_letter_growth_sensor, error_rate_alert_sensor],
)  # fmt: skip
def test_every_alerting_sensor_runs_by_default(sensor):
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
