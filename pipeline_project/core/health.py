"""The pipeline's recent health in figures and Markdown, from what the runs left behind."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np


@dataclass
class RecentActivity:
    """What happened in the window: runs, their steps, batches, error rates, dead letters."""

    run_status: Counter[str] = field(default_factory=Counter)  # runs per status
    steps_ok: Counter[str] = field(default_factory=Counter)  # successes per step key
    steps_failed: Counter[str] = field(default_factory=Counter)  # failures per step key
    end_to_end_seconds: list[float] = field(default_factory=list)  # per batch
    batches: int = 0
    schema_error_rates: list[float] = field(default_factory=list)
    model_error_rates: list[float] = field(default_factory=list)
    latency_p95_seconds: list[float] = field(default_factory=list)
    estimated_costs: list[float] = field(default_factory=list)
    costs_saved_by_cache: list[float] = field(default_factory=list)
    # Pending, per stage; None when they could not be read (why: dead_letters_not_read). Not
    # read is never "none pending": its figures are None, shown as not available.
    dead_letters: Mapping[str, int] | None = field(default_factory=dict)
    dead_letters_not_read: str = ""


def end_to_end_times(runs: Iterable[tuple[str | None, float | None, float | None]]) -> list[float]:
    """Per batch, from its first run's start to its last run's end; `runs` are (partition,
    start, end) and runs without a partition or not finished are left out."""
    spans: dict[str, list[float]] = {}
    for partition, start, end in runs:
        if partition and start and end:
            spans.setdefault(partition, []).extend((start, end))
    return [max(s) - min(s) for s in spans.values()]


def health_figures(activity: RecentActivity) -> dict[str, int | float | None]:
    """The headline figures: batches, runs, failures, worst error rates and latency; None for
    a figure that could not be read."""
    failed_steps = sum(activity.steps_failed.values())
    total_steps = sum(activity.steps_ok.values()) + failed_steps
    end_to_end = activity.end_to_end_seconds
    return {
        "batches": activity.batches,
        "runs": sum(activity.run_status.values()),
        "runs_failed": activity.run_status.get("FAILURE", 0),
        "step_failure_rate": round(failed_steps / total_steps, 4) if total_steps else 0.0,
        "schema_error_rate_max": round(max(activity.schema_error_rates, default=0.0), 4),
        "model_error_rate_max": round(max(activity.model_error_rates, default=0.0), 4),
        "latency_p95_seconds_max": round(max(activity.latency_p95_seconds, default=0.0), 4),
        "end_to_end_seconds_p50": round(float(np.median(end_to_end)), 2) if end_to_end else 0.0,
        "end_to_end_seconds_max": round(max(end_to_end, default=0.0), 2),
        "dead_letter_total": (
            None if activity.dead_letters is None else sum(activity.dead_letters.values())
        ),
        "estimated_cost": round(sum(activity.estimated_costs), 6),
        "cost_saved_by_cache": round(sum(activity.costs_saved_by_cache), 6),
    }


NOT_AVAILABLE = "not available"


def health_markdown(
    activity: RecentActivity, figures: Mapping[str, int | float | None], window_hours: float
) -> str:
    """The figures, runs by status, dead letters by stage and a table of the failing steps; a
    figure that could not be read says so, and why, first."""
    if activity.dead_letters is None:
        unread = f"> **Dead letters not read**: {activity.dead_letters_not_read}.\n\n"
        by_stage = f"{NOT_AVAILABLE} ({activity.dead_letters_not_read})"
    else:
        unread, by_stage = "", str(dict(activity.dead_letters))
    failing = (
        "\n".join(
            f"| {step} | {activity.steps_ok[step]} | {n} |"
            for step, n in activity.steps_failed.most_common()
        )
        or "| (none) | | |"
    )
    return (
        f"### Pipeline health, last {window_hours:g} h\n\n"
        + unread
        + "\n".join(
            f"- **{k.replace('_', ' ')}**: {NOT_AVAILABLE if v is None else v}"
            for k, v in figures.items()
        )
        + f"\n- **runs by status**: {dict(activity.run_status)}\n"
        + f"- **dead letters by stage**: {by_stage}\n\n"
        + "| step | succeeded | failed |\n|---|---|---|\n"
        + failing
    )
