"""Checks on recommendations: no kept recommendation breaks a rule; nobody is forgotten;
rejections per rule stay below a ceiling; the model beats popularity on held-out purchases;
customers who differ get different recommendations."""

from collections import Counter

import dagster as dg
import duckdb

from pipeline_project.checks.verdicts import NotJudged, Verdict
from pipeline_project.core.recommendation_quality import HoldoutQuality, QualityVerdict
from pipeline_project.core.recommendations import (
    RULES,
    ListSpread,
    line_ranges,
    rejected_by_rule,
    rules_sql,
)
from pipeline_project.partitions import batches

NO_RULE_BROKEN = "no_validated_recommendation_breaks_a_rule"
EVERY_CUSTOMER_SERVED = "every_customer_gets_top_n_or_a_reason"
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
        description="Each customer with a segment gets top_n validated recommendations, or"
        " fewer with the reason: the rules rejected some (rejected_recommendations), or fewer"
        " products were in stock and not bought (recommendation_shortfalls). Counts per reason.",
    ),
    dg.AssetCheckSpec(
        REJECTED_SHARE_BELOW_CEILING,
        asset="validated_recommendations",
        partitions_def=batches,
        description="For each rule, the share of recommendations it rejects stays below the "
        "ceiling.",
    ),
]

# Per segmented customer of lines $first..$last: validated recommendations against the promised
# $top_n (the deepest rank scored), and why fewer: rules, the catalog, or nothing said (a fault).
_SERVED_SQL = """
WITH kept AS (
    SELECT customer_id, count(*) AS kept FROM validated_recommendations
    WHERE batch_id = $batch_id AND line_no BETWEEN $first AND $last GROUP BY customer_id
), rejected AS (
    SELECT customer_id, count(*) AS rejected FROM rejected_recommendations
    WHERE batch_id = $batch_id AND line_no BETWEEN $first AND $last GROUP BY customer_id
), served AS (
    SELECT coalesce(k.kept, 0) AS kept, coalesce(r.rejected, 0) AS rejected,
           sh.customer_id IS NOT NULL AS catalog_short
    FROM customer_segments AS s
    LEFT JOIN kept AS k USING (customer_id)
    LEFT JOIN rejected AS r USING (customer_id)
    LEFT JOIN recommendation_shortfalls AS sh
        ON sh.batch_id = $batch_id AND sh.customer_id = s.customer_id
    WHERE s.batch_id = $batch_id AND s.line_no BETWEEN $first AND $last
)
SELECT count(*) AS customers,
       count(*) FILTER (WHERE kept >= $top_n) AS served_top_n,
       count(*) FILTER (WHERE kept < $top_n) AS served_fewer,
       count(*) FILTER (WHERE kept = 0) AS served_none,
       count(*) FILTER (WHERE kept < $top_n AND rejected > 0) AS fewer_rules_rejected,
       count(*) FILTER (WHERE kept < $top_n AND catalog_short) AS fewer_catalog_short,
       count(*) FILTER (WHERE kept < $top_n AND rejected = 0 AND NOT catalog_short)
           AS fewer_without_reason
FROM served
"""

# Customers of lines $first..$last with a rejected recommendation, per rule that rejected one.
_SHORT_BY_RULE_SQL = """
SELECT rejected_rule, count(DISTINCT customer_id) FROM rejected_recommendations
WHERE batch_id = $batch_id AND line_no BETWEEN $first AND $last GROUP BY 1
"""


def recommendation_check_results(
    conn: duckdb.DuckDBPyConnection,
    batch_id: str,
    *,
    min_confidence: float,
    max_predicted_value: float,
    rejected_share_ceiling: float,
    rejected_total_ceiling: float = 0.5,
    chunk_lines: int = 200_000,
) -> list[Verdict]:
    """Evaluate the checks on one batch's committed tables (never another partition), a range
    of `chunk_lines` lines at a time: memory does not grow with the batch."""
    [(top_n,)] = conn.execute(
        "SELECT coalesce(max(rank), 0) FROM recommendations WHERE batch_id = ?", [batch_id]
    ).fetchall()
    breaking, served, by_rule = 0, dict.fromkeys(_SERVED_COLUMNS, 0), Counter()
    for first, last in line_ranges(conn, "customer_segments", batch_id, chunk_lines):
        ranged = {"batch_id": batch_id, "first": first, "last": last}
        [(broken,)] = conn.execute(
            f"SELECT count(*) FROM ({rules_sql('validated_recommendations')})"
            " WHERE len(failed_rules) > 0",
            {**ranged, "min_confidence": min_confidence,
             "max_predicted_value": max_predicted_value},
        ).fetchall()  # fmt: skip
        breaking += broken
        [row] = conn.execute(_SERVED_SQL, {**ranged, "top_n": top_n}).fetchall()
        served = {k: served[k] + (v or 0) for k, v in zip(_SERVED_COLUMNS, row, strict=True)}
        by_rule.update(dict(conn.execute(_SHORT_BY_RULE_SQL, ranged).fetchall()))
    served["top_n"] = top_n
    [(total,)] = conn.execute(
        "SELECT count(*) FROM recommendations WHERE batch_id = ?", [batch_id]
    ).fetchall()
    rejected = rejected_by_rule(conn, batch_id)
    shares = {rule: (rejected.get(rule, 0) / total if total else 0.0) for rule in RULES}
    over = {rule: share for rule, share in shares.items() if share > rejected_share_ceiling}
    # the rules together (each rejected row once, whatever rules it broke): 45% out of stock
    # plus 45% already bought is 90% rejected
    [(rejected_rows,)] = conn.execute(
        "SELECT count(*) FROM rejected_recommendations WHERE batch_id = ?", [batch_id]
    ).fetchall()
    total_share = rejected_rows / total if total else 0.0
    if total_share > rejected_total_ceiling:
        over["all rules together"] = total_share
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
            passed=served["fewer_without_reason"] == 0,
            severity=dg.AssetCheckSeverity.WARN,
            description=_served_verdict(served),
            metadata={**served, "by_rule": dg.MetadataValue.json(dict(sorted(by_rule.items())))},
        )
        if served["customers"]
        else NotJudged(EVERY_CUSTOMER_SERVED, "the batch has no segmented customer"),
        dg.AssetCheckResult(
            asset_key="validated_recommendations",
            check_name=REJECTED_SHARE_BELOW_CEILING,
            passed=not over,
            severity=dg.AssetCheckSeverity.WARN,
            description=f"{total_share:.1%} of the batch's recommendations rejected"
            + (f"; over the ceiling: {', '.join(sorted(over))}" if over else ""),
            metadata={
                **{f"rejected_share_{rule}": round(share, 4) for rule, share in shares.items()},
                "rejected_share_total": round(total_share, 4),
                "ceiling": rejected_share_ceiling,
                "total_ceiling": rejected_total_ceiling,
                "rules_over_ceiling": ", ".join(sorted(over)) or "none",
            },
        )
        if total
        else NotJudged(REJECTED_SHARE_BELOW_CEILING, "the batch has no recommendation"),
    ]


_SERVED_COLUMNS = (
    "customers", "served_top_n", "served_fewer", "served_none", "fewer_rules_rejected",
    "fewer_catalog_short", "fewer_without_reason",
)  # fmt: skip


def _served_verdict(served: dict) -> str:
    said = (
        f"{served['served_top_n']:,} of {served['customers']:,} customers got"
        f" {served['top_n']} recommendations"
    )
    if not served["served_fewer"]:
        return said
    return (
        f"{said}; {served['served_fewer']:,} got fewer: {served['fewer_rules_rejected']:,} had"
        f" some rejected by a rule, {served['fewer_catalog_short']:,} had fewer products in"
        f" stock and not bought, {served['fewer_without_reason']:,} without a reason"
    )


RECOMMENDATION_QUALITY = "recommendation_hit_rate_beats_popularity"

RECOMMENDATION_QUALITY_SPEC = dg.AssetCheckSpec(
    RECOMMENDATION_QUALITY,
    asset="recommendations",
    blocking=True,
    partitions_def=batches,  # preview, as above
    description="Judged before the batch's recommendations are written: held-out last"
    " purchases of a sample of customers come back in the model's top N more often than in the"
    " most popular products' (by the configured lead, paired per customer), and not much less"
    " often than in the recent batches. A model no better than popularity publishes nothing.",
)


def recommendation_quality_result(
    quality: HoldoutQuality, verdict: QualityVerdict, baseline_batches: int
) -> Verdict:
    if verdict.passed is None:
        return NotJudged(RECOMMENDATION_QUALITY, verdict.reason)
    return dg.AssetCheckResult(
        asset_key="recommendations",
        check_name=RECOMMENDATION_QUALITY,
        passed=verdict.passed,
        severity=dg.AssetCheckSeverity.ERROR,
        description=verdict.reason,
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
    blocking=True,
    partitions_def=batches,  # preview, as above
    description="Judged before the batch's recommendations are written: a sample of its"
    " customers get different top-N lists (ranked before their own purchases are taken out),"
    " more lists than there are segments (a scorer that gives each segment one list ignores"
    " the customer).",
)


def personalization_result(
    spread: ListSpread, segments: int, *, min_profiles: int, min_lists_per_segment: float
) -> Verdict:
    """Fails when the sampled customers get no more than `min_lists_per_segment` x the
    segments' number of different top-N lists; no verdict on fewer than `min_profiles`
    customers, or fewer than twice the lists it would need."""
    needed = min_lists_per_segment * segments
    if spread.customers < max(min_profiles, 2 * needed):
        return NotJudged(
            PERSONALIZED,
            f"{spread.customers} customers, fewer than max({min_profiles}, 2 x {needed:g}"
            " lists): too few to tell",
        )
    share = spread.most_common_list_customers / spread.customers
    passed = spread.lists > needed
    said = (
        f"{spread.customers} sampled customers get {spread.lists} different top-N lists"
        f" ({segments} segments; the most common list goes to {share:.1%} of them)"
    )
    if not passed:
        said += ": no more lists than segments, the scorer ignores the customer"
    return dg.AssetCheckResult(
        asset_key="recommendations",
        check_name=PERSONALIZED,
        passed=passed,
        severity=dg.AssetCheckSeverity.ERROR,
        description=said,
        metadata={
            "verdict": said,
            "customers_sampled": spread.customers,
            "distinct_lists": spread.lists,
            "segments": segments,
            "min_lists": needed,
            "most_common_list_share": round(share, 4),
            "products_recommended": spread.products,
        },
    )
