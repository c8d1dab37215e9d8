"""Checks on model output: every customer is embedded or dead-lettered; few are dead-lettered;
the model still follows the probe texts' meaning; the batch's vectors have not drifted."""

from dataclasses import dataclass

import dagster as dg
import duckdb

from pipeline_project.checks.conservation import count_not_placed_exactly_once
from pipeline_project.checks.verdicts import NotJudged, Verdict
from pipeline_project.core import dead_letters
from pipeline_project.core.embedding_drift import EmbeddingDrift
from pipeline_project.core.probes import PROBE_TEXTS, ProbeVerdict
from pipeline_project.partitions import batches
from pipeline_project.tables import CUSTOMER_EMBEDDINGS

EMBEDDED_OR_DEAD_LETTERED = "every_customer_embedded_or_dead_lettered"
DEAD_LETTER_SHARE_BELOW_THRESHOLD = "embedding_dead_letter_share_below_threshold"
EMBEDDING_DRIFT = "embedding_drift_below_threshold"
MODEL_PASSES_PROBES = "embedding_model_passes_probe_texts"

# partitions_def on a check spec is a preview API; it is the only way to keep each batch's
# result (pass/fail per partition) instead of "latest run wins".
EMBEDDING_CHECK_SPECS = [
    dg.AssetCheckSpec(
        EMBEDDED_OR_DEAD_LETTERED,
        asset=CUSTOMER_EMBEDDINGS,
        blocking=True,
        partitions_def=batches,
        description="Each valid customer has an embedding or a pending dead-letter record (one"
        " not replayed yet), never both.",
    ),
    dg.AssetCheckSpec(
        DEAD_LETTER_SHARE_BELOW_THRESHOLD,
        asset=CUSTOMER_EMBEDDINGS,
        partitions_def=batches,
        description="Share of customers dead-lettered by inference is at most the threshold.",
    ),
    dg.AssetCheckSpec(
        MODEL_PASSES_PROBES,
        asset=CUSTOMER_EMBEDDINGS,
        blocking=True,
        partitions_def=batches,
        description="Fixed probe texts sent to the model before it embeds the batch (never"
        " from the cache): each is nearer to its partner (a customer who buys the same) than"
        " to the others. A model that fails embeds nothing: the batch stops here.",
    ),
    dg.AssetCheckSpec(
        EMBEDDING_DRIFT,
        asset=CUSTOMER_EMBEDDINGS,
        partitions_def=batches,
        description="The batch's vectors are not all alike, their customer-weighted mean has"
        " not moved from the recent batches' much more than those move between themselves,"
        " and most of its customers have a profile the recent batches had.",
    ),
]


@dataclass(frozen=True)
class DriftLimits:
    factor: float  # the mean may move this many times the recent batches' typical move...
    min_distance: float  # ...and at least this cosine distance before it is drift
    max_new_profile_customer_share: float
    min_spread: float  # below: every vector alike, a degenerate model
    min_baselines: int


# New profiles may exceed what recent normal batches brought by this share of customers.
NEW_PROFILE_MARGIN = 0.25


def embedding_drift_result(
    drift: EmbeddingDrift | None, baseline_batches: int, limits: DriftLimits
) -> Verdict:
    """WARN on a degenerate batch at once, on drift once `limits.min_baselines` batches exist;
    no verdict otherwise."""
    if drift is None:
        return NotJudged(EMBEDDING_DRIFT, "no vectors in this batch")
    figures: dict = {"baseline_batches": baseline_batches}
    reasons = []
    if drift.spread is not None:  # a batch of one profile has no spread
        figures["vector_spread"] = round(drift.spread, 6)
    if drift.spread is not None and drift.spread < limits.min_spread:
        reasons.append(f"every vector alike (spread {drift.spread:.2e})")
    if baseline_batches < limits.min_baselines or drift.mean_distance is None:
        if reasons:  # degenerate: judged without a baseline
            return _drift(False, {**figures, **_why(reasons)})
        return NotJudged(
            EMBEDDING_DRIFT,
            f"{baseline_batches} earlier normal batches of this model, fewer than"
            f" {limits.min_baselines}",
        )
    threshold = max(limits.min_distance, limits.factor * drift.typical_distance)
    new_share = drift.new_profile_customer_share
    # as many new profiles as normal batches bring, and a margin, is no drift
    new_limit = min(
        1.0,
        max(limits.max_new_profile_customer_share,
            drift.typical_new_profile_customer_share + NEW_PROFILE_MARGIN),
    )  # fmt: skip
    if drift.mean_distance > threshold:
        reasons.append(f"mean moved {drift.mean_distance:.4f} (limit {threshold:.4f})")
    if new_share > new_limit:
        usual = drift.typical_new_profile_customer_share
        reasons.append(
            f"{new_share:.0%} of customers have a profile never seen recently (limit"
            f" {new_limit:.0%}; normal batches bring {usual:.0%})"
        )
    figures |= {
        "mean_distance": round(drift.mean_distance, 6),
        "typical_distance": round(drift.typical_distance, 6),
        "distance_threshold": round(threshold, 6),
        "new_profile_customer_share": round(new_share, 4),
        "new_profile_share": round(drift.new_profile_share, 4),
        "typical_new_profile_customer_share": round(drift.typical_new_profile_customer_share, 4),
        "max_new_profile_customer_share": round(new_limit, 4),
    }
    return _drift(not reasons, {**figures, **_why(reasons)})


def _why(reasons: list[str]) -> dict:
    return {"reason": "; ".join(reasons)} if reasons else {}


def _drift(passed: bool, metadata: dict) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        asset_key=CUSTOMER_EMBEDDINGS,
        check_name=EMBEDDING_DRIFT,
        passed=passed,
        severity=dg.AssetCheckSeverity.WARN,
        metadata=metadata,
    )


_COUNTS_SQL = """
SELECT
    (SELECT count(*) FROM customers WHERE batch_id = $batch_id) AS customers,
    (SELECT count(*) FROM customer_embeddings WHERE batch_id = $batch_id) AS embedded
"""


def embedding_check_results(
    conn: duckdb.DuckDBPyConnection, batch_id: str, stage: str, dead_letter_threshold: float
) -> list[Verdict]:
    [(customers, embedded)] = conn.execute(_COUNTS_SQL, {"batch_id": batch_id}).fetchall()
    dead = dead_letters.count_pending(conn, batch_id, stage)
    misplaced = count_not_placed_exactly_once(
        conn,
        source="SELECT customer_id FROM customers WHERE batch_id = $batch_id",
        key="customer_id",
        destinations=[
            "SELECT customer_id FROM customer_embeddings WHERE batch_id = $batch_id",
            f"SELECT record_key::UUID AS customer_id FROM ({dead_letters.PENDING_SQL})",
        ],
        params={"batch_id": batch_id, "stage": stage},
    )
    share = dead / customers if customers else 0.0
    figures = {"customers": customers, "embedded": embedded, "dead_lettered": dead}
    share_result = (
        dg.AssetCheckResult(
            asset_key=CUSTOMER_EMBEDDINGS,
            check_name=DEAD_LETTER_SHARE_BELOW_THRESHOLD,
            passed=share <= dead_letter_threshold,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={**figures, "dead_letter_share": share, "threshold": dead_letter_threshold},
        )
        if customers
        else NotJudged(DEAD_LETTER_SHARE_BELOW_THRESHOLD, "the batch has no customer")
    )
    return [
        dg.AssetCheckResult(
            asset_key=CUSTOMER_EMBEDDINGS,
            check_name=EMBEDDED_OR_DEAD_LETTERED,
            passed=customers == embedded + dead and misplaced == 0,
            severity=dg.AssetCheckSeverity.ERROR,
            metadata={**figures, "customers_not_placed_exactly_once": misplaced},
        ),
        share_result,
    ]


def probe_result(verdict: ProbeVerdict, model: str) -> dg.AssetCheckResult:
    """Fails (blocking) when the model's vectors do not follow the probe texts' meaning; says
    which model, and its figures."""
    metadata: dict = {"verdict": verdict.reason, "probe_texts": len(PROBE_TEXTS), "model": model}
    if verdict.margin is not None:
        metadata |= {"margin": round(verdict.margin, 4), "misplaced_texts": verdict.misplaced}
    said = f"the embedding model {model} {'passes' if verdict.passed else 'fails'} its probe"
    said += f" texts: {verdict.reason}"
    return dg.AssetCheckResult(
        asset_key=CUSTOMER_EMBEDDINGS,
        check_name=MODEL_PASSES_PROBES,
        passed=verdict.passed,
        severity=dg.AssetCheckSeverity.ERROR,
        description=said,
        # one request per run, not in the batch's cost figures: its size, to add if wanted
        metadata={
            **metadata,
            "probe_requests": 1,
            "probe_characters": sum(len(text) for text in PROBE_TEXTS),
        },
    )
