"""Monitors: each one trips on a crafted batch and stays quiet on a normal one."""

import dagster as dg
import pytest

from pipeline_project.checks.drift_checks import drift_check_result
from pipeline_project.core.monitoring import count_anomaly, psi
from pipeline_project_tests.helpers import customer, run_batch, write_lines


def lines(n: int, start: int = 0) -> list[str]:
    return [customer(id=f"6f1c2a3b-4d5e-4f60-8a7b-{start + i:012d}") for i in range(n)]


def check(result, name):
    [evaluation] = [e for e in result.get_asset_check_evaluations() if e.check_name == name]
    return evaluation


def test_psi_is_zero_for_the_same_distribution_and_large_for_a_shift():
    assert psi([10, 20, 30], [1, 2, 3]) == pytest.approx(0.0)
    assert psi([30, 20, 10], [10, 20, 30]) > 0.25
    assert 0 < psi([11, 20, 29], [10, 20, 30]) < 0.01


def test_drift_check_waits_for_a_baseline_then_warns_on_a_shift():
    quiet = drift_check_result("d", "a", [5, 5], [], threshold=0.25)
    assert quiet.passed and quiet.metadata["note"].value == "no baseline yet"
    same = drift_check_result("d", "a", [50, 50], [[10, 10], [12, 8]], threshold=0.25)
    assert same.passed
    shifted = drift_check_result("d", "a", [95, 5], [[10, 10], [12, 8]], threshold=0.25)
    assert not shifted.passed and shifted.severity == dg.AssetCheckSeverity.WARN
    assert shifted.metadata["psi"].value > 0.25


def test_count_anomaly_needs_a_baseline_and_a_tolerance():
    assert count_anomaly(1000, [100, 100], 0.3, 3) == (False, None, None)
    anomalous, mean, deviation = count_anomaly(140, [100, 100, 100], 0.3, 3)
    assert anomalous and mean == 100 and deviation == pytest.approx(0.4)
    assert not count_anomaly(125, [100, 100, 100], 0.3, 3)[0]
    assert count_anomaly(60, [100, 100, 100], 0.3, 3)[0]


def test_record_count_check_trips_on_a_batch_far_from_the_recent_mean(defs, instance, settings):
    for i in range(3):
        write_lines(settings.landing_dir / f"b{i}.jsonl", lines(10, 100 * i))
        result = run_batch(defs, instance, f"b{i}")
        quiet = check(result, "record_count_within_expected_range")
        assert quiet.passed and quiet.metadata["baseline_batches"].value == i
    write_lines(settings.landing_dir / "normal.jsonl", lines(12, 500))
    assert check(run_batch(defs, instance, "normal"), "record_count_within_expected_range").passed
    write_lines(settings.landing_dir / "spike.jsonl", lines(20, 700))
    spike = check(run_batch(defs, instance, "spike"), "record_count_within_expected_range")
    assert not spike.passed and spike.severity == dg.AssetCheckSeverity.WARN
    assert spike.metadata["deviation"].value > 0.3


def test_schema_error_rate_above_five_percent_is_a_failed_warn_check(defs, instance, settings):
    write_lines(settings.landing_dir / "ok.jsonl", [*lines(99), "{"])
    write_lines(settings.landing_dir / "bad.jsonl", [*lines(90, 200), *["{"] * 10])
    assert check(run_batch(defs, instance, "ok"), "schema_error_rate_below_threshold").passed
    assert not check(run_batch(defs, instance, "bad"), "schema_error_rate_below_threshold").passed


def test_every_stage_reports_time_cpu_and_peak_memory(defs, instance, settings):
    write_lines(settings.landing_dir / "b1.jsonl", lines(5))
    result = run_batch(defs, instance, "b1")
    for node, asset in (("raw_customers", "raw_customers"), ("validated_customers", "customers")):
        [m] = [
            m
            for m in result.asset_materializations_for_node(node)
            if m.asset_key == dg.AssetKey(asset)
        ]
        assert m.metadata["step_seconds"].value > 0
        assert m.metadata["cpu_seconds"].value >= 0
        assert m.metadata["peak_rss_mib"].value > 50


def test_freshness_policies_on_the_ingestion_and_final_assets(defs):
    graph = defs.resolve_asset_graph()
    for key in ("raw_customers", "validated_recommendations"):
        policy = graph.get(dg.AssetKey(key)).freshness_policy
        assert policy is not None and policy.fail_window.to_timedelta().total_seconds() == 24 * 3600


def test_pipeline_health_summarizes_runs_failures_batches_and_dead_letters(
    defs, instance, settings
):
    write_lines(settings.landing_dir / "good.jsonl", lines(5))
    write_lines(settings.landing_dir / "bad.jsonl", ["{", "[]", customer()])
    assert run_batch(defs, instance, "good").success
    assert not run_batch(defs, instance, "bad").success
    result = defs.resolve_job_def("pipeline_health_job").execute_in_process(instance=instance)
    assert result.success
    [m] = result.asset_materializations_for_node("pipeline_health")
    meta = {k: v.value for k, v in m.metadata.items()}
    assert meta["batches"] == 2 and meta["runs"] == 2 and meta["runs_failed"] == 1
    assert meta["step_failure_rate"] == pytest.approx(1 / 4)
    assert meta["schema_error_rate_max"] == pytest.approx(2 / 3, abs=1e-3)
    assert meta["dead_letter_total"] == 0
    assert "| validated_customers | 1 | 1 |" in meta["summary"]


def test_pipeline_health_is_refreshed_hourly(defs):
    schedule = defs.resolve_schedule_def("hourly_pipeline_health")
    assert schedule.cron_schedule == "0 * * * *" and schedule.job_name == "pipeline_health_job"
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
