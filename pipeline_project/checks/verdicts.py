"""No verdict is not a pass: a check that cannot judge (no baseline yet, too few customers, no
rows) yields no result at all, so the UI shows it as not evaluated for the batch (never as
passed) and no alert or baseline counts it; why it did not judge goes into the batch's
materialization (`not_judged`) and the run's log, and the demo's summary says "not judged".

A step with such checks is a multi_asset with `can_subset=True`: Dagster then takes a check
left without a result as skipped rather than as a failure of the step.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import dagster as dg

NOT_JUDGED = "not_judged"


@dataclass(frozen=True)
class NotJudged:
    """A check that had not enough data to judge, and why."""

    check_name: str
    reason: str


Verdict = dg.AssetCheckResult | NotJudged


def judged(verdicts: Iterable[Verdict]) -> list[dg.AssetCheckResult]:
    """The results to yield: the checks that judged."""
    return [v for v in verdicts if isinstance(v, dg.AssetCheckResult)]


def not_judged(verdicts: Iterable[Verdict], log: Any = None) -> dict:
    """For the batch's materialization: the checks that did not judge and why (none: {})."""
    reasons = {v.check_name: v.reason for v in verdicts if isinstance(v, NotJudged)}
    if log is not None:
        for name, reason in reasons.items():
            log.info(f"check {name} not judged: {reason}")
    return {NOT_JUDGED: dg.MetadataValue.json(reasons)} if reasons else {}
