"""Monitoring figures: distribution shift (PSI), record-count anomalies, step usage."""

from __future__ import annotations

import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True)
class BatchVolume:
    """A past batch's line count and the weekday it landed on (0 = Monday)."""

    rows: int
    weekday: int
    landed_at: float


@dataclass(frozen=True)
class VolumeVerdict:
    anomalous: bool
    rule: str
    expected: float | None = None
    deviation: float | None = None
    robust_z: float | None = None

    def figures(self) -> dict[str, float | int | str]:
        figures: dict = {"rule": self.rule}
        for name in ("expected", "deviation", "robust_z"):
            value = getattr(self, name)
            if value is not None:
                figures[name] = round(value, 4)
        return figures


def _mad(values: np.ndarray, centre: float) -> float:
    return float(np.median(np.abs(values - centre)))


def volume_anomaly(
    rows: int,
    weekday: int,
    history: Sequence[BatchVolume],
    *,
    tolerance: float,
    min_batches: int,
    robust_min_batches: int,
    z_threshold: float,
    relative_floor: float,
    seasonal_days: float = 14.0,
) -> VolumeVerdict:
    """Is `rows` an anomalous volume against the `history` of normal batches (newest first)?

    - fewer than `min_batches`: no judgement;
    - fewer than `robust_min_batches`: the cold-start rule, beyond ±`tolerance` of their mean;
    - else a robust z-score, 0.6745 (rows - median) / MAD, beyond `z_threshold` and beyond
      `relative_floor` of the median (a steady history has a tiny MAD: noise is no anomaly);
      once the history spans `seasonal_days` and holds two batches of the same weekday, the
      median is that weekday's and the MAD the spread around each weekday's own median.
    """
    if len(history) < min_batches:
        return VolumeVerdict(False, "no baseline yet")
    values = np.array([b.rows for b in history], dtype=float)
    if len(history) < robust_min_batches:
        mean = float(values.mean())
        deviation = (rows - mean) / mean if mean else (0.0 if rows == 0 else float("inf"))
        return VolumeVerdict(abs(deviation) > tolerance, "cold start: mean ±tolerance",
                             mean, deviation)  # fmt: skip
    weekdays = np.array([b.weekday for b in history])
    span_days = (max(b.landed_at for b in history) - min(b.landed_at for b in history)) / 86400
    same_day = values[weekdays == weekday]
    if span_days >= seasonal_days and len(same_day) >= 2:
        expected = float(np.median(same_day))
        residuals = np.concatenate(
            [values[weekdays == d] - np.median(values[weekdays == d]) for d in set(weekdays)]
        )
        mad, rule = float(np.median(np.abs(residuals))), "robust z-score, same weekday"
    else:
        expected = float(np.median(values))
        mad, rule = _mad(values, expected), "robust z-score"
    deviation = (rows - expected) / expected if expected else float("inf")
    # a MAD of zero (identical batches): any change beyond the floor is an anomaly
    z = 0.6745 * (rows - expected) / mad if mad else (0.0 if rows == expected else float("inf"))
    anomalous = abs(z) > z_threshold and abs(deviation) > relative_floor
    return VolumeVerdict(anomalous, rule, expected, deviation, z)


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


def _status_mib(field: str) -> float | None:
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM), None where
    /proc cannot tell."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _rss_mib() -> float | None:
    """This process's resident set now."""
    return _status_mib("VmRSS")


def _peak_rss_mib() -> float:
    """This process's peak RSS since the last reset (VmHWM), else since it started."""
    peak = _status_mib("VmHWM")
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return peak


class StepUsage:
    """Wall time, CPU time and peak RSS of a step, from creation to `figures()`.

    The peak is reset when the step starts, so it is this step's own also where steps share a
    process (execute_in_process, the CLI's demo); `rss_growth_mib` is how far it rose above
    the RSS the step started with (what earlier steps left allocated is not this step's)."""

    def __init__(self) -> None:
        self._peak_is_own = _reset_peak_rss()
        self._start_rss = _rss_mib()
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def figures(self) -> dict[str, float]:
        figures = {
            "step_seconds": round(time.perf_counter() - self._wall, 3),
            "cpu_seconds": round(time.process_time() - self._cpu, 3),
            "peak_rss_mib": round(peak := _peak_rss_mib(), 1),
        }
        if self._peak_is_own and self._start_rss is not None:
            figures["rss_growth_mib"] = round(max(0.0, peak - self._start_rss), 1)
        if not self._peak_is_own:
            figures["peak_rss_of"] = "the process (its peak could not be reset)"
        return figures
