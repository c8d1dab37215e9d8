"""The seeded-anomaly benchmark's small version: the monitors for a wrong model catch it, and
no normal batch alerts (benchmarks/monitor_sensitivity.py --small)."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_a_wrong_model_or_scorer_is_caught_and_normal_batches_stay_quiet():
    out = subprocess.run(
        [sys.executable, "benchmarks/monitor_sensitivity.py", "--small", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    kinds = {a["kind"]: a for a in summary["anomalies"].values()}
    assert set(kinds) == {"random_model", "customer_blind_scorer", "constant_model"}
    assert summary["missed"] == []
    # each also raised its alert (the alerts table, as the sensors store them)
    assert summary["anomalies_not_alerted"] == []
    # the monitor that must catch each, whatever the hit rate's noise on 2,000 customers
    assert "embedding_model_passes_probe_texts" in kinds["random_model"]["caught_by_named"]
    blind = kinds["customer_blind_scorer"]["caught_by_named"]
    assert "recommendations_differ_between_customers" in blind
    assert {
        "embedding_model_passes_probe_texts",
        "embedding_drift_below_threshold",  # every vector alike
        "recommendation_hit_rate_beats_popularity",  # exactly popularity's hits
    } <= set(kinds["constant_model"]["failed"])
    assert summary["normal_batches"] == 7 and summary["normal_batches_alerted"] == []
    normal = [b for b in summary["batches"] if b["kind"] == "normal"]
    assert all(b["run_succeeded"] for b in summary["batches"])
    # every normal batch's model beats popularity on its held-out purchases, the random
    # model trails it
    assert all(b["hit_rate"] > b["popularity_hit_rate"] and b["lead_z"] > 0 for b in normal)
    [random_model] = [b for b in summary["batches"] if b["kind"] == "random_model"]
    assert random_model["lead_z"] < 0
