"""Checks on recommendations: no kept recommendation breaks a rule; nobody is forgotten;
rejections per rule stay below a ceiling; the model beats popularity on held-out purchases."""

import dagster as dg
import duckdb

from pipeline_project.core.recommendation_quality import HoldoutQuality, QualityVerdict
from pipeline_project.core.recommendations import RULES, rejected_by_rule, rules_sql
from pipeline_project.partitions import batches

NO_RULE_BROKEN = "no_validated_recommendation_breaks_a_rule"
EVERY_CUSTOMER_SERVED = "every_segmented_customer_has_a_recommendation_or_reason"
REJECTED_SHARE_BELOW_CEILING = "rejected_share_per_rule_below_ceiling"

# partitions_def on a check spec is a preview API; it is the only way to keep each batch's
# result (pass/fail per partition) instead of "latest run wins".
RECOMMENDATION_CHECK_SPECS = [
    dg.AssetCheckSpec(
        NO_RULE_BROKEN,
        asset="validated_recommendations",
        blocking=True,
        partitions_def=batches,
        description="Every kept recommendation is in stock, confident enough, not already "
        "bought and of a plausible value.",
    ),
    dg.AssetCheckSpec(
        EVERY_CUSTOMER_SERVED,
        asset="validated_recommendations",
        partitions_def=batches,
        description="Each customer with a segment has a kept recommendation or rejected ones "
        "that say why not.",
    ),
    dg.AssetCheckSpec(
        REJECTED_SHARE_BELOW_CEILING,
        asset="validated_recommendations",
        partitions_def=batches,
        description="For each rule, the share of recommendations it rejects stays below the "
        "ceiling.",
    ),
]

_UNSERVED_SQL = """
SELECT count(*) FROM customer_segments AS s
WHERE s.batch_id = $batch_id
  AND NOT EXISTS (SELECT 1 FROM validated_recommendations AS v
                  WHERE v.batch_id = $batch_id AND v.line_no = s.line_no)
  AND NOT EXISTS (SELECT 1 FROM rejected_recommendations AS r
                  WHERE r.batch_id = $batch_id AND r.line_no = s.line_no)
"""


def recommendation_check_results(
    conn: duckdb.DuckDBPyConnection,
    batch_id: str,
    *,
    min_confidence: float,
    max_predicted_value: float,
    rejected_share_ceiling: float,
) -> list[dg.AssetCheckResult]:
    """Evaluate the checks on one batch's committed tables (never another partition)."""
    rule_params = {
        "batch_id": batch_id,
        "min_confidence": min_confidence,
        "max_predicted_value": max_predicted_value,
    }
    [(breaking,)] = conn.execute(
        f"SELECT count(*) FROM ({rules_sql('validated_recommendations')})"
        " WHERE len(failed_rules) > 0",
        rule_params,
    ).fetchall()
    [(unserved,)] = conn.execute(_UNSERVED_SQL, {"batch_id": batch_id}).fetchall()
    [(total,)] = conn.execute(
        "SELECT count(*) FROM recommendations WHERE batch_id = ?", [batch_id]
    ).fetchall()
    rejected = rejected_by_rule(conn, batch_id)
    shares = {rule: (rejected.get(rule, 0) / total if total else 0.0) for rule in RULES}
    over = {rule: share for rule, share in shares.items() if share > rejected_share_ceiling}
    return [
        dg.AssetCheckResult(
            asset_key="validated_recommendations",
            check_name=NO_RULE_BROKEN,
            passed=breaking == 0,
            severity=dg.AssetCheckSeverity.ERROR,
            metadata={"recommendations_breaking_a_rule": breaking},
        ),
        dg.AssetCheckResult(
            asset_key="validated_recommendations",
            check_name=EVERY_CUSTOMER_SERVED,
            passed=unserved == 0,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={"customers_without_recommendation_or_reason": unserved},
        ),
        dg.AssetCheckResult(
            asset_key="validated_recommendations",
            check_name=REJECTED_SHARE_BELOW_CEILING,
            passed=not over,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={
                **{f"rejected_share_{rule}": round(share, 4) for rule, share in shares.items()},
                "ceiling": rejected_share_ceiling,
                "rules_over_ceiling": ", ".join(sorted(over)) or "none",
            },
        ),
    ]


RECOMMENDATION_QUALITY = "recommendation_hit_rate_beats_popularity"

RECOMMENDATION_QUALITY_SPEC = dg.AssetCheckSpec(
    RECOMMENDATION_QUALITY,
    asset="recommendations",
    partitions_def=batches,  # preview, as above
    description="Held-out last purchases of a sample of customers come back in the model's"
    " top N more often than in the most popular products', and not much less often than in"
    " the recent batches.",
)


def recommendation_quality_result(
    quality: HoldoutQuality, verdict: QualityVerdict, baseline_batches: int
) -> dg.AssetCheckResult:
    rates = {"hit_rate": quality.model_hit_rate, "popularity_hit_rate": quality.popularity_hit_rate}
    return dg.AssetCheckResult(
        asset_key="recommendations",
        check_name=RECOMMENDATION_QUALITY,
        passed=verdict.passed,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "verdict": verdict.reason,
            "top_n": quality.top_n,
            "sampled_customers": quality.sampled,
            "evaluated_customers": quality.evaluated,
            **{k: round(v, 4) for k, v in rates.items() if v is not None},
            "baseline_batches": baseline_batches,
        },
    )
