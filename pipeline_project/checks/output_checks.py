"""Checks on recommendations: no kept recommendation breaks a rule; nobody is forgotten;
rejections per rule stay below a ceiling; the model beats popularity on held-out purchases;
customers who differ get different recommendations."""

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
    " top N no less often than in the most popular products' (beyond chance), not exactly as"
    " often for the same customers, and not much less often than in the recent batches.",
)


def recommendation_quality_result(
    quality: HoldoutQuality, verdict: QualityVerdict, baseline_batches: int
) -> dg.AssetCheckResult:
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
            "lead_standard_errors": round(quality.lead_z, 2),
            **quality.rates(),
            "baseline_batches": baseline_batches,
        },
    )


PERSONALIZED = "recommendations_differ_between_customers"

PERSONALIZED_SPEC = dg.AssetCheckSpec(
    PERSONALIZED,
    asset="recommendations",
    partitions_def=batches,  # preview, as above
    description="Customers with different profiles get different top-N lists: no single list"
    " goes to most of the batch's distinct profiles (a scorer that ignores the customer).",
)

# Per distinct profile of the batch, its top-N list; the lists' spread over the profiles.
_LISTS_SQL = """
WITH lists AS (
    SELECT r.line_no, any_value(s.text_hash) AS text_hash,
           list(r.product_id ORDER BY r.rank) AS products
    FROM recommendations AS r
    JOIN customer_segments AS s ON s.batch_id = r.batch_id AND s.line_no = r.line_no
    WHERE r.batch_id = $batch_id
    GROUP BY r.line_no
), per_profile AS (
    SELECT text_hash, any_value(products ORDER BY line_no) AS products FROM lists GROUP BY text_hash
), per_list AS (
    SELECT products, count(*) AS profiles FROM per_profile GROUP BY products
)
SELECT coalesce(sum(profiles), 0), count(*), coalesce(max(profiles), 0),
       (SELECT count(DISTINCT product_id) FROM recommendations WHERE batch_id = $batch_id)
FROM per_list
"""


def personalization_result(
    conn: duckdb.DuckDBPyConnection, batch_id: str, *, min_profiles: int, max_same_list_share: float
) -> dg.AssetCheckResult:
    """WARN when one top-N list goes to more than `max_same_list_share` of the batch's distinct
    profiles; no verdict on fewer than `min_profiles` (customers alike get the same list)."""
    [(profiles, lists, modal, products)] = conn.execute(
        _LISTS_SQL, {"batch_id": batch_id}
    ).fetchall()
    share = modal / profiles if profiles else 0.0
    judged = profiles >= min_profiles
    passed = not judged or share <= max_same_list_share
    verdict = (
        f"{profiles} distinct profiles, fewer than {min_profiles}: no verdict"
        if not judged
        else f"the most common list goes to {share:.1%} of {profiles} distinct profiles"
        + ("" if passed else f", above {max_same_list_share:.0%}: the scorer ignores the customer")
    )
    return dg.AssetCheckResult(
        asset_key="recommendations",
        check_name=PERSONALIZED,
        passed=passed,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "verdict": verdict,
            "distinct_profiles": profiles,
            "distinct_lists": lists,
            "most_common_list_share": round(share, 4),
            "products_recommended": products,
        },
    )
