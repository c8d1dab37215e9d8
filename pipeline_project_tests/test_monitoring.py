"""Monitors: each one trips on a crafted batch and stays quiet on a normal one."""

from contextlib import contextmanager

import dagster as dg
import numpy as np
import pytest

from pipeline_project.checks.drift_checks import drift_check_result
from pipeline_project.checks.model_checks import DriftLimits, embedding_drift_result
from pipeline_project.checks.verdicts import NotJudged
from pipeline_project.core.embedding_client import EmbeddingResponse
from pipeline_project.core.embedding_drift import EmbeddingDrift
from pipeline_project.core.monitoring import BatchVolume, StepUsage, psi, volume_anomaly
from pipeline_project.resources.embeddings import HashingEmbedder
from pipeline_project_tests.helpers import (
    buyer,
    customer,
    materialize,
    not_judged,
    run_batch,
    write_lines,
)
from pipeline_project_tests.helpers import rows as query_rows


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
    assert isinstance(quiet, NotJudged) and "fewer than 1" in quiet.reason  # never "passed"
    assert isinstance(drift_check_result("d", "a", [0, 0], [[1, 1]], threshold=0.25), NotJudged)
    same = drift_check_result("d", "a", [50, 50], [[10, 10], [12, 8]], threshold=0.25)
    assert same.passed
    shifted = drift_check_result("d", "a", [95, 5], [[10, 10], [12, 8]], threshold=0.25)
    assert not shifted.passed and shifted.severity == dg.AssetCheckSeverity.WARN
    assert shifted.metadata["psi"].value > 0.25


DAY = 86_400.0
JUDGE = dict(tolerance=0.3, min_batches=3, robust_min_batches=7, z_threshold=3.5,
             relative_floor=0.25, seasonal_days=14.0)  # fmt: skip


def daily(values: list[int], start_weekday: int = 0) -> list[BatchVolume]:
    """One batch a day, oldest first in `values`; returned newest first, as baselines are."""
    batches = [
        BatchVolume(rows=v, weekday=(start_weekday + i) % 7, landed_at=i * DAY)
        for i, v in enumerate(values)
    ]
    return batches[::-1]


def test_volume_needs_a_baseline_then_judges_by_the_cold_start_rule():
    assert volume_anomaly(1000, 0, daily([100, 100]), **JUDGE).rule == "no baseline yet"
    assert not volume_anomaly(1000, 0, daily([100, 100]), **JUDGE).anomalous
    spike = volume_anomaly(140, 0, daily([100, 100, 100]), **JUDGE)
    assert spike.anomalous and spike.expected == 100 and spike.deviation == pytest.approx(0.4)
    assert spike.rule.startswith("cold start")
    assert not volume_anomaly(125, 0, daily([100, 100, 100]), **JUDGE).anomalous
    assert volume_anomaly(60, 0, daily([100, 100, 100]), **JUDGE).anomalous


def test_volume_learns_the_noise_of_a_history_by_a_robust_z_score():
    rng = np.random.default_rng(3)
    noisy = [int(1000 * (1 + rng.uniform(-0.15, 0.15))) for _ in range(10)]
    for rows in (870, 1000, 1140):  # normal noise: no alert
        verdict = volume_anomaly(rows, 3, daily(noisy), **JUDGE)
        assert verdict.rule == "robust z-score" and not verdict.anomalous, (rows, verdict)
    for rows in (2000, 400):  # a spike and a drop
        assert volume_anomaly(rows, 3, daily(noisy), **JUDGE).anomalous, rows
    # a steady history has a MAD of almost nothing: the relative floor keeps noise quiet
    steady = daily([1000, 1001, 999, 1000, 1000, 1002, 998, 1000])
    assert volume_anomaly(1100, 3, steady, **JUDGE).robust_z > 3.5
    assert not volume_anomaly(1100, 3, steady, **JUDGE).anomalous
    assert volume_anomaly(1400, 3, steady, **JUDGE).anomalous
    # one outlier in the window does not move the median: the next spike is still caught
    assert volume_anomaly(2000, 3, daily([*noisy, 5000]), **JUDGE).anomalous


def test_volume_is_judged_by_weekday_once_the_history_spans_two_weeks():
    week = [1000, 1050, 980, 1020, 1000, 400, 380]  # Monday..Sunday: quiet weekends
    three_weeks = daily(week * 3)
    saturday, monday = 5, 0
    quiet = volume_anomaly(410, saturday, three_weeks, **JUDGE)
    assert quiet.rule == "robust z-score, same weekday" and not quiet.anomalous
    assert quiet.expected == 400
    assert volume_anomaly(1000, saturday, three_weeks, **JUDGE).anomalous  # busy for a Saturday
    assert volume_anomaly(400, monday, three_weeks, **JUDGE).anomalous  # quiet for a Monday
    # under two weeks no seasonality: a quiet Saturday is judged against every day
    ten_days = daily((week * 2)[:10])
    assert volume_anomaly(410, saturday, ten_days, **JUDGE).rule == "robust z-score"


def test_record_count_check_trips_on_a_batch_far_from_the_recent_mean(defs, instance, settings):
    for i in range(3):
        write_lines(settings.landing_dir / f"b{i}.jsonl", lines(10, 100 * i))
        result = run_batch(defs, instance, f"b{i}")
        # until three earlier batches: no verdict (no evaluation), and the reason says so
        assert not [
            e for e in result.get_asset_check_evaluations() if "record_count" in e.check_name
        ]
        assert f"{i} earlier" in not_judged(result)["record_count_within_expected_range"]
    write_lines(settings.landing_dir / "normal.jsonl", lines(12, 500))
    assert check(run_batch(defs, instance, "normal"), "record_count_within_expected_range").passed
    write_lines(settings.landing_dir / "spike.jsonl", lines(20, 700))
    spike = check(run_batch(defs, instance, "spike"), "record_count_within_expected_range")
    assert not spike.passed and spike.severity == dg.AssetCheckSeverity.WARN
    assert spike.metadata["deviation"].value > 0.3
    # the spike is nobody's baseline: the next batch is judged against the four before it
    write_lines(settings.landing_dir / "next.jsonl", lines(10, 900))
    after = check(run_batch(defs, instance, "next"), "record_count_within_expected_range")
    assert after.passed and after.metadata["baseline_batches"].value == 4
    assert after.metadata["expected"].value == pytest.approx(10.5)


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
        assert 0 <= m.metadata["rss_growth_mib"].value < m.metadata["peak_rss_mib"].value


def test_step_usage_counts_what_the_step_allocates_not_what_came_before():
    held = bytearray(200 * 2**20)  # allocated before the step: in its start RSS, not its growth
    held[::4096] = b"x" * len(held[::4096])
    usage = StepUsage()
    grown = bytearray(100 * 2**20)
    grown[::4096] = b"x" * len(grown[::4096])  # touched, so resident
    figures = usage.figures()
    assert 95 <= figures["rss_growth_mib"] <= 140, figures
    assert figures["peak_rss_mib"] >= figures["rss_growth_mib"] + 190, figures
    del held, grown


def test_freshness_policies_on_the_ingestion_and_final_assets(defs):
    graph = defs.resolve_asset_graph()
    for key in ("raw_customers", "validated_recommendations"):
        policy = graph.get(dg.AssetKey(key)).freshness_policy
        assert policy is not None and policy.fail_window.to_timedelta().total_seconds() == 72 * 3600


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


# ---- embedding drift: the batch's vectors against the recent batches' --------------------

MIX = ["books", "garden", "toys", "grocery", "electronics", "beauty"]


def mixed_batch(start: int, n: int = 36) -> list[str]:
    return [buyer(start + i, MIX[i % 6], purchases=1 + i % 3) for i in range(n)]


class SameVectorEmbedder(HashingEmbedder):
    """A degenerate model: the same (well-formed, finite, unit) vector for every text."""

    def model_id(self) -> str:
        return "degenerate"

    @contextmanager
    def open(self):
        class Client:
            def embed(_, texts):
                return EmbeddingResponse(np.ones((len(texts), self.dimensions), np.float32))

        yield Client()


def drift_run(settings, instance, embedder, batch_id: str, lines: list[str], succeeds=True):
    write_lines(settings.landing_dir / f"{batch_id}.jsonl", lines)
    result = materialize(settings, instance, embedder, batch_id)
    assert result.success is succeeds
    return result


def drift_of(settings, instance, embedder, batch_id: str, lines: list[str]):
    return check(drift_run(settings, instance, embedder, batch_id, lines), EMBEDDING_DRIFT)


EMBEDDING_DRIFT = "embedding_drift_below_threshold"


def test_embedding_drift_warns_on_a_moved_batch_and_keeps_it_out_of_the_baseline(
    settings, instance, catalog
):
    embedder = HashingEmbedder(dimensions=64)
    for i in range(3):  # no baseline yet: no verdict (no evaluation), never "passed"
        first = drift_run(settings, instance, embedder, f"base{i}", mixed_batch(100 * i))
        assert f"{i} earlier normal batches" in not_judged(first)[EMBEDDING_DRIFT]
    normal = drift_of(settings, instance, embedder, "normal", mixed_batch(500))
    assert normal.passed, normal.metadata
    assert normal.metadata["mean_distance"].value <= normal.metadata["distance_threshold"].value
    assert normal.metadata["new_profile_customer_share"].value == 0  # the same profiles again
    garden = [buyer(700 + i, "garden", purchases=12, amount=90.0) for i in range(36)]
    moved = drift_of(settings, instance, embedder, "moved", garden)
    assert not moved.passed and moved.severity == dg.AssetCheckSeverity.WARN
    assert moved.metadata["mean_distance"].value > moved.metadata["distance_threshold"].value
    assert moved.metadata["new_profile_customer_share"].value == 1.0
    assert "mean moved" in moved.metadata["reason"].value
    after = drift_of(settings, instance, embedder, "after", mixed_batch(900))
    assert after.passed and after.metadata["baseline_batches"].value == 4  # "moved" left out


def test_a_model_that_gives_every_text_the_same_vector_stops_at_its_probes_and_embeds_nothing(
    settings, instance, catalog
):
    degenerate = drift_run(settings, instance, SameVectorEmbedder(dimensions=16), "b1",
                           mixed_batch(0), succeeds=False)  # fmt: skip
    embeddings = dg.AssetKey("customer_embeddings")
    [probe] = [  # judged first, alone
        e for e in degenerate.get_asset_check_evaluations() if e.asset_key == embeddings
    ]
    assert probe.check_name == "embedding_model_passes_probe_texts" and not probe.passed
    assert probe.severity == dg.AssetCheckSeverity.ERROR and "degenerate" in probe.description
    assert embeddings not in {e.asset_key for e in degenerate.get_asset_materialization_events()}
    assert query_rows(settings, "SELECT count(*) FROM customer_embeddings") == [(0,)]
    healthy = drift_run(settings, instance, HashingEmbedder(dimensions=16), "b2", mixed_batch(0))
    assert check(healthy, "embedding_model_passes_probe_texts").passed
    assert EMBEDDING_DRIFT in not_judged(healthy)  # the first batch of its model


def test_a_batch_of_vectors_all_alike_fails_drift_at_once_and_one_profile_is_not_judged():
    limits = DriftLimits(factor=2.0, min_distance=0.05, max_new_profile_customer_share=0.5,
                         min_spread=1e-3, min_baselines=3)  # fmt: skip
    failed = embedding_drift_result(EmbeddingDrift(spread=1e-6), 0, limits)
    assert not failed.passed and "every vector alike" in failed.metadata["reason"].value
    one_profile = EmbeddingDrift(spread=None)
    assert isinstance(embedding_drift_result(one_profile, 0, limits), NotJudged)
