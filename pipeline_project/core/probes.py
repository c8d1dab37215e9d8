"""Probe texts: is the model behind the vectors still a language model?

A fixed set of profile texts in pairs: the two texts of a pair describe customers who buy the
same things and spend alike, the other pairs customers who buy other things. Any model fit to
embed profiles puts each text nearer to its partner than to every text of another pair; a
model that returns random vectors breaks that (not one of 200,000 draws of random vectors
placed all ten texts), one that returns the same vector for every text ties them (no text is
nearer), and one of the wrong width or with broken vectors cannot be judged at all. The probes
go to the model itself, never through the embedding cache: they judge the model as it is now.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline_project.core.inference import validate_vectors

# (what they buy, spend, shopping trips); a pair's two texts differ only in the last purchase
_PAIRS = [
    ("books", "low", "occasional"),
    ("electronics", "very high", "very frequent"),
    ("grocery and home", "moderate", "regular"),
    ("beauty and fashion", "high", "occasional"),
    ("automotive", "moderate", "frequent"),
]
PROBE_PAIRS = [
    tuple(
        f"Customer who buys mostly {buys}. Spend: {spend}. Shopping trips: {trips}."
        f" Last purchase: {last}."
        for last in ("recent", "fairly recent")
    )
    for buys, spend, trips in _PAIRS
]
PROBE_TEXTS = [text for pair in PROBE_PAIRS for text in pair]


@dataclass(frozen=True)
class ProbeVerdict:
    passed: bool
    reason: str
    margin: float | None = None  # smallest (partner similarity - nearest other), > 0 passes
    misplaced: int = 0  # texts nearer to another pair's text than to their partner


def probe_verdict(vectors: np.ndarray, dimensions: int) -> ProbeVerdict:
    """Each probe text must be nearer (cosine) to its partner than to any other probe text."""
    invalid = [why for why in validate_vectors(vectors, len(PROBE_TEXTS), dimensions) if why]
    if invalid:
        return ProbeVerdict(False, f"the model's probe vectors are invalid: {invalid[0]}")
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    similarity = unit @ unit.T
    margins = []
    for i in range(len(PROBE_TEXTS)):
        partner = i ^ 1  # pairs are consecutive: 0-1, 2-3, ...
        others = [j for j in range(len(PROBE_TEXTS)) if j // 2 != i // 2]
        margins.append(float(similarity[i, partner] - similarity[i, others].max()))
    margin = min(margins)
    misplaced = sum(m <= 1e-6 for m in margins)
    if misplaced:
        return ProbeVerdict(
            False,
            f"{misplaced} of {len(PROBE_TEXTS)} probe texts are not nearer to their partner"
            " than to other customers' texts: the model's vectors do not follow meaning"
            " (random, constant or another model)",
            margin,
            misplaced,
        )
    return ProbeVerdict(True, f"every probe text nearest to its partner (margin {margin:.4f})",
                        margin)  # fmt: skip
