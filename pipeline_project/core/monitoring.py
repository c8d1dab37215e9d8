"""Monitoring figures: distribution shift (PSI), record-count anomalies, step usage."""

from __future__ import annotations

import resource
import time
from collections.abc import Sequence

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


class StepUsage:
    """Wall time, CPU time and peak RSS of a step, from creation to `figures()`."""

    def __init__(self) -> None:
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def figures(self) -> dict[str, float]:
        # ru_maxrss is in KiB on Linux: the peak of this process, which under the multiprocess
        # executor is the step's own process.
        return {
            "step_seconds": round(time.perf_counter() - self._wall, 3),
            "cpu_seconds": round(time.process_time() - self._cpu, 3),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }
