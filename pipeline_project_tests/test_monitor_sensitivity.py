"""The seeded-anomaly benchmark's small version: the monitors for a wrong model catch it, and
no normal batch alerts (benchmarks/monitor_sensitivity.py --small), on generated batches (on
real ones: test_monitor_sensitivity_real.py)."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _small_run(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, "benchmarks/monitor_sensitivity.py", "--small", "--json", *args],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _each_broken_output_caught_and_normal_batches_quiet(summary: dict) -> dict:
    kinds = {a["kind"]: a for a in summary["anomalies"].values()}
    assert set(kinds) == {
        "random_model", "customer_blind_scorer", "constant_model", "truncated_file",
        "empty_file", "bad_catalog", "future_date",
    }  # fmt: skip
    # nothing of a broken output reaches current_recommendations
    assert summary["broken_published"] == {}
    assert summary["missed"] == []
    # each raised its alert (the alerts table, as the sensors store them)
    assert summary["anomalies_not_alerted"] == []
    # the monitor that must catch each
    assert kinds["random_model"]["failed"] == ["embedding_model_passes_probe_texts"]
    assert kinds["constant_model"]["failed"] == ["embedding_model_passes_probe_texts"]
    assert "recommendations_differ_between_customers" in kinds["customer_blind_scorer"]["failed"]
    for broken_file in ("truncated_file", "empty_file"):  # one failure, one alert
        assert kinds[broken_file]["failed"] == ["landing_file_read_to_the_end_with_records"]
        assert kinds[broken_file]["alerted"] == ["landing_file_read_to_the_end_with_records"]
    assert kinds["bad_catalog"]["alerted"] == ["unique_product_ids"]
    assert summary["normal_batches"] == 11 and summary["normal_batches_alerted"] == []
    normal = [b for b in summary["batches"] if b["kind"] == "normal"]
    assert all(b["run_succeeded"] and b["published"] > 0 for b in normal)
    return kinds


def test_each_broken_output_publishes_nothing_and_alerts_and_normal_batches_stay_quiet():
    summary = _small_run()
    _each_broken_output_caught_and_normal_batches_quiet(summary)
    # 3,000 rows evaluate fewer customers than the quality gate needs: not judged, never passed
    assert all(b["hit_rate"] is None for b in summary["batches"])
