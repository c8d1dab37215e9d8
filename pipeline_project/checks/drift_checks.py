"""Output distribution shift: PSI of a batch's histogram against recent batches."""

import dagster as dg
import numpy as np

from pipeline_project.checks.verdicts import NotJudged, Verdict
from pipeline_project.core.monitoring import psi
from pipeline_project.partitions import batches

SEGMENT_SHARE_DRIFT = "segment_share_drift_below_threshold"
CONFIDENCE_DRIFT = "confidence_drift_below_threshold"


def drift_check_spec(name: str, asset: str, what: str) -> dg.AssetCheckSpec:
    # partitions_def on a check spec is a preview API; the only way to keep one result per
    # batch rather than "latest run wins".
    return dg.AssetCheckSpec(
        name,
        asset=asset,
        partitions_def=batches,
        description=f"PSI of {what} against the recent batches stays below the threshold.",
    )


def drift_check_result(
    name: str,
    asset: str,
    current: list[float],
    baselines: list[list[float]],
    *,
    threshold: float,
    min_baselines: int = 1,
) -> Verdict:
    """WARN when the PSI of `current` against the pooled `baselines` exceeds `threshold`; no
    verdict until `min_baselines` comparable batches exist, or without anything to compare."""
    comparable = [b for b in baselines if len(b) == len(current)]
    if not sum(current):
        return NotJudged(name, "nothing in this batch to compare")
    if len(comparable) < min_baselines:
        return NotJudged(
            name, f"{len(comparable)} earlier comparable batches, fewer than {min_baselines}"
        )
    value = psi(current, np.sum(np.asarray(comparable, dtype=float), axis=0))
    return dg.AssetCheckResult(
        asset_key=asset,
        check_name=name,
        passed=value <= threshold,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "psi": round(value, 4),
            "threshold": threshold,
            "baseline_batches": len(comparable),
        },
    )
