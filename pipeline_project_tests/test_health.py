"""The pipeline health summary's figures and Markdown, from given runs, steps and dead letters."""

from collections import Counter

import pytest

from pipeline_project.core.health import (
    RecentActivity,
    end_to_end_times,
    health_figures,
    health_markdown,
)


def activity() -> RecentActivity:
    return RecentActivity(
        run_status=Counter({"SUCCESS": 3, "FAILURE": 1}),
        steps_ok=Counter({"customer_embeddings": 2, "validated_customers": 1}),
        steps_failed=Counter({"validated_customers": 1}),
        end_to_end_seconds=[10.0, 30.0, 20.0],
        batches=2,
        schema_error_rates=[0.01, 0.6667],
        model_error_rates=[],
        latency_p95_seconds=[0.12345],
        dead_letters={"inference": 4},
        estimated_costs=[0.0125, 0.25],
        costs_saved_by_cache=[0.5],
    )


def test_a_batch_spans_from_its_first_run_start_to_its_last_run_end():
    runs = [("b1", 100.0, 110.0), ("b2", 105.0, 106.0), ("b1", 120.0, 150.0),
            (None, 1.0, 999.0), ("b3", 200.0, None)]  # fmt: skip
    assert end_to_end_times(runs) == [50.0, 1.0]


def test_figures_count_runs_and_failures_and_take_the_worst_rates():
    figures = health_figures(activity())
    assert figures == {
        "batches": 2,
        "runs": 4,
        "runs_failed": 1,
        "step_failure_rate": 0.25,
        "schema_error_rate_max": 0.6667,
        "model_error_rate_max": 0.0,
        "latency_p95_seconds_max": 0.1235,
        "end_to_end_seconds_p50": 20.0,
        "end_to_end_seconds_max": 30.0,
        "dead_letter_total": 4,
        "estimated_cost": 0.2625,  # the batches' costs add up, re-runs included
        "cost_saved_by_cache": 0.5,
    }


def test_figures_of_a_quiet_window_are_zero():
    assert set(health_figures(RecentActivity()).values()) == {0}


def test_markdown_lists_the_figures_and_a_row_per_failing_step():
    recent = activity()
    markdown = health_markdown(recent, health_figures(recent), window_hours=24.0)
    assert markdown.startswith("### Pipeline health, last 24 h\n\n- **batches**: 2\n")
    assert "- **runs by status**: {'SUCCESS': 3, 'FAILURE': 1}" in markdown
    assert "- **dead letters by stage**: {'inference': 4}" in markdown
    assert markdown.endswith("|---|---|---|\n| validated_customers | 1 | 1 |")
    assert health_markdown(RecentActivity(), {}, 1.5).endswith("| (none) | | |")


def test_dead_letters_not_read_are_not_available_never_zero_and_the_summary_says_why():
    recent = activity()
    recent.dead_letters, recent.dead_letters_not_read = None, "the file was locked"
    figures = health_figures(recent)
    assert figures["dead_letter_total"] is None
    assert {k: v for k, v in figures.items() if k != "dead_letter_total"} == {
        k: v for k, v in health_figures(activity()).items() if k != "dead_letter_total"
    }  # the other figures are read as before
    markdown = health_markdown(recent, figures, window_hours=24.0)
    assert markdown.startswith(
        "### Pipeline health, last 24 h\n\n> **Dead letters not read**: the file was locked.\n\n"
    )
    assert "- **dead letter total**: not available\n" in markdown
    assert "- **dead letters by stage**: not available (the file was locked)\n" in markdown
    assert "dead letter total**: 0" not in markdown


@pytest.mark.parametrize("hours, shown", [(24.0, "24 h"), (0.5, "0.5 h")])
def test_markdown_names_the_window(hours, shown):
    assert f"last {shown}\n" in health_markdown(RecentActivity(), {}, hours)
