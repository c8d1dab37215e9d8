"""Monitoring figures: distribution shift (PSI), record-count anomalies, step usage."""

from __future__ import annotations

import resource
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def psi(current: Sequence[float], baseline: Sequence[float], eps: float = 1e-4) -> float:
    """Population stability index of two histograms over the same bins (counts or shares).

    0 means the same distribution; > 0.1 is a moderate shift and > 0.25 a large one.
    """
    cur = np.asarray(current, dtype=float)
    base = np.asarray(baseline, dtype=float)
    if cur.shape != base.shape:
        raise ValueError("histograms must have the same bins")
    if cur.sum() == 0 or base.sum() == 0:
        return 0.0
    p = np.clip(cur / cur.sum(), eps, None)
    q = np.clip(base / base.sum(), eps, None)
    return float(np.sum((p - q) * np.log(p / q)))


def count_anomaly(
    rows: int, baseline: Sequence[int], tolerance: float, min_batches: int
) -> tuple[bool, float | None, float | None]:
    """(anomalous, baseline mean, relative deviation); never anomalous without enough history."""
    if len(baseline) < min_batches:
        return False, None, None
    mean = float(np.mean(baseline))
    deviation = (rows - mean) / mean if mean else (0.0 if rows == 0 else float("inf"))
    return abs(deviation) > tolerance, mean, deviation


_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux: "5" into /proc/self/clear_refs); False where the
    kernel does not allow it."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float:
    """This process's peak RSS since the last reset (VmHWM), else since it started."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class StepUsage:
    """Wall time, CPU time and peak RSS of a step, from creation to `figures()`.

    The peak is reset when the step starts, so it is this step's own also where steps share a
    process (execute_in_process, the CLI's demo)."""

    def __init__(self) -> None:
        self._peak_is_own = _reset_peak_rss()
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def figures(self) -> dict[str, float]:
        figures = {
            "step_seconds": round(time.perf_counter() - self._wall, 3),
            "cpu_seconds": round(time.process_time() - self._cpu, 3),
            "peak_rss_mib": round(_peak_rss_mib(), 1),
        }
        if not self._peak_is_own:
            figures["peak_rss_of"] = "the process (its peak could not be reset)"
        return figures
