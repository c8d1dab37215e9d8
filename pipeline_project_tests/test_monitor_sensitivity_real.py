"""The seeded-anomaly benchmark's small version on real batches (the extra `real-data`): a
module of its own, so that pytest-xdist runs it beside the generated batches' version (each is
several minutes on one worker)."""

import pytest

from pipeline_project_tests.test_monitor_sensitivity import (
    _each_broken_output_caught_and_normal_batches_quiet,
    _small_run,
)
from pipeline_project_tests.test_real_data import _real_data_installed


@pytest.mark.slow
def test_on_real_batches_each_broken_output_is_caught_and_the_real_batches_stay_quiet():
    _real_data_installed()
    # 100 households a batch: half a gzip holds about 40 lines and its cut one (200: 19, and
    # the cut line alone broke the 5% error rate: a second alert on the truncated file)
    summary = _small_run("--data", "real", "--households", "400")
    _each_broken_output_caught_and_normal_batches_quiet(summary)
    # the four real batches first, as converted; the quality gate says why it did not judge
    assert [b["batch"] for b in summary["batches"][:4]] == [
        f"d0{day}-normal-b{day}" for day in range(1, 5)
    ]
    assert all(
        "fewer than" in b["not_judged"]["recommendation_hit_rate_beats_popularity"]
        for b in summary["batches"]
        if b["hit_rate"] is None and b["published"]
    )
