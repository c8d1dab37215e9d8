"""Recommendations: scored recommendations per batch, and the business-rule filter."""

from collections.abc import Iterator
from dataclasses import dataclass

import dagster as dg
import duckdb
from pydantic import Field

from pipeline_project.asset_metadata import one_table_metadata, table_metadata
from pipeline_project.batch_history import failed_flags, recent_batch_metadata
from pipeline_project.checks.drift_checks import (
    CONFIDENCE_DRIFT,
    drift_check_result,
    drift_check_spec,
)
from pipeline_project.checks.output_checks import (
    PERSONALIZED,
    PERSONALIZED_SPEC,
    RECOMMENDATION_CHECK_SPECS,
    RECOMMENDATION_QUALITY,
    RECOMMENDATION_QUALITY_SPEC,
    personalization_result,
    recommendation_check_results,
    recommendation_quality_result,
)
from pipeline_project.checks.verdicts import Verdict, judged, not_judged
from pipeline_project.core.catalog import vocabulary
from pipeline_project.core.monitoring import StepUsage
from pipeline_project.core.publications import publish
from pipeline_project.core.recommendation_quality import (
    HoldoutQuality,
    holdout_quality,
    quality_verdict,
)
from pipeline_project.core.recommendations import (
    BatchScoring,
    ConfidenceSummary,
    RuleOutcome,
    Weights,
    confidence_summary,
    list_spread,
    load_scoring_inputs,
    rule_outcome,
    score_batch,
    stage_business_rules,
)
from pipeline_project.policies import (
    batch_stage,
    fails_at_once_when_deterministic,
    per_batch_automation,
)
from pipeline_project.progress import Progress
from pipeline_project.resources import LandingZone, Warehouse
from pipeline_project.resources.embeddings import Embedder
from pipeline_project.tables import (
    BATCH_PUBLICATIONS,
    BATCHES,
    CUSTOMER_PURCHASES,
    CUSTOMER_SEGMENTS,
    PRODUCT_CATALOG,
    PRODUCT_EMBEDDINGS,
    RECOMMENDATION_SHORTFALLS,
    RECOMMENDATIONS,
    REJECTED_RECOMMENDATIONS,
    VALIDATED_RECOMMENDATIONS,
)

ERROR = dg.AssetCheckSeverity.ERROR
# The quality gate, chosen from measured normal batches (see README, "recommendation quality"):
# below this many evaluated customers a lead cannot be told from chance (no verdict); above
# it, a model must lead popularity by more than this many standard errors to publish. The
# hashing model's lead on generated batches: +1.0 standard errors on average at 2,000
# customers (-0.6 to +2.9 measured), +2.2 at 10,000.
QUALITY_SAMPLE = 10_000
QUALITY_MIN_CUSTOMERS = 5_000
QUALITY_MIN_LEAD_Z = 0.0
_CATALOG = [PRODUCT_CATALOG, PRODUCT_EMBEDDINGS]
SCORED_TABLES = [RECOMMENDATIONS, RECOMMENDATION_SHORTFALLS]

# What a stage reports, logs and the demo prints when there is no catalog to recommend from.
NO_CATALOG = "skipped: no catalog"


def _no_catalog(conn: duckdb.DuckDBPyConnection) -> bool:
    [(products,)] = conn.execute(f"SELECT count(*) FROM {PRODUCT_CATALOG}").fetchall()
    return products == 0


def _profiles_stale(conn: duckdb.DuckDBPyConnection, batch_id: str) -> bool:
    """The batch's profiles read another catalog vocabulary than the catalog's (or none)."""
    rows = conn.execute(
        f"SELECT profile_vocabulary FROM {BATCHES} WHERE batch_id = ?", [batch_id]
    ).fetchall()
    return bool(rows) and rows[0][0] != vocabulary(conn)


def _skip_for_no_catalog(context: dg.AssetExecutionContext, landing: LandingZone) -> None:
    """Say why the stage materializes nothing: its partition stays unmaterialized and the stages
    downstream are skipped."""
    context.log.warning(
        f"{context.partition_key}: {NO_CATALOG}: the product_catalog table is empty; put the"
        f" catalog CSV at {landing.catalog_path} (PIPELINE_CATALOG_PATH) and run catalog_job"
    )


class RecommendationConfig(dg.Config):
    top_n: int = Field(default=5, description="Recommendations per customer.")
    customer_chunk: int = Field(
        default=200_000, description="Customers read per chunk (scored in smaller ones)."
    )
    segment_weight: float = Field(
        default=Weights.segment, description="Weight of the segments' share of the product."
    )
    taste_weight: float = Field(
        default=Weights.taste,
        description="Weight of the share of the product among customers of the customer's"
        " tastes (what they buy).",
    )
    co_purchase_weight: float = Field(
        default=Weights.co_purchase,
        description="Weight of what buyers of the customer's products also buy.",
    )
    similarity_weight: float = Field(
        default=Weights.similarity,
        description="Weight of the profile's similarity to the product's text.",
    )
    segment_temperature: float = Field(
        default=Weights.temperature,
        description="Softness of segment and taste membership: the softmax temperature over"
        " the standardised cosines to each centroid.",
    )
    recency_days: float = Field(
        default=Weights.recency_days,
        description="A customer's purchase this many days before their last weighs 1/e as much"
        " in the co-purchase part.",
    )

    def weights(self) -> Weights:
        parts = (self.segment_weight, self.taste_weight, self.co_purchase_weight,
                 self.similarity_weight)  # fmt: skip
        if min(parts) < 0 or sum(parts) <= 0 or self.segment_temperature <= 0:
            raise dg.Failure(
                description="recommendations config: the weights must be 0 or more and not all"
                f" 0, the temperature above 0 (got weights {parts}, temperature"
                f" {self.segment_temperature})",
                allow_retries=False,
            )
        return Weights(self.segment_weight, self.co_purchase_weight, self.similarity_weight,
                       self.segment_temperature, self.recency_days,
                       self.taste_weight)  # fmt: skip

    psi_threshold: float = Field(
        default=0.25, description="WARN when the confidence distribution shifts more (PSI)."
    )
    drift_baseline_batches: int = Field(default=5, description="Recent batches in the baseline.")
    drift_min_baseline_batches: int = Field(
        default=3, description="No drift verdict before this many earlier normal batches."
    )
    quality_sample: int = Field(
        default=QUALITY_SAMPLE,
        description="Customers (2+ purchases) whose last purchase is held out.",
    )
    quality_top_n: int = Field(default=10, description="Hit rate at this many products.")
    quality_min_customers: int = Field(
        default=QUALITY_MIN_CUSTOMERS,
        description="No quality verdict on fewer evaluated customers.",
    )
    quality_min_lead_z: float = Field(
        default=QUALITY_MIN_LEAD_Z,
        description="Publish only when the model leads popularity by more standard errors"
        " (paired per customer).",
    )
    quality_min_ratio_to_recent: float = Field(
        default=0.5, description="Fail below this share of the recent batches' median hit rate."
    )
    personalization_min_profiles: int = Field(
        default=20, description="No personalization verdict on fewer distinct profiles."
    )
    min_lists_per_segment: float = Field(
        default=1.0,
        description="Publish only when the distinct profiles get more different top-N lists"
        " than this many per segment.",
    )


# A multi_asset with one skippable spec: the only way to yield nothing (no catalog, a gate
# failed) from an asset with checks, as can_subset makes its check outputs optional too: a
# check that cannot judge yields no result. It also lets the UI run the checks alone.
@dg.multi_asset(
    specs=[
        dg.AssetSpec(
            RECOMMENDATIONS,
            deps=[CUSTOMER_SEGMENTS, PRODUCT_EMBEDDINGS, PRODUCT_CATALOG],
            description="Top-N products per segmented customer with confidence in [0, 1],"
            " predicted value and the parts of the score (segment affinity, co-purchase,"
            " similarity).",
            kinds={"duckdb"},
            # A batch that ran before the catalog arrived is re-profiled when it does
            # (rescore_sensor, from customer_embeddings), not scored on its old profiles.
            automation_condition=per_batch_automation(ignore=_CATALOG, wait_for=_CATALOG),
            skippable=True,
        )
    ],
    check_specs=[
        drift_check_spec(CONFIDENCE_DRIFT, RECOMMENDATIONS, "the confidence histogram"),
        RECOMMENDATION_QUALITY_SPEC,
        PERSONALIZED_SPEC,
    ],
    can_subset=True,
    **batch_stage("recommendations"),
)
@fails_at_once_when_deterministic
def recommendations(
    context: dg.AssetExecutionContext,
    config: RecommendationConfig,
    warehouse: Warehouse,
    embedder: Embedder,
    landing: LandingZone,
):
    """Scores the batch's segmented customers against the catalog once the model is judged
    good enough (quality, personalization: nothing is written otherwise); skipped without a
    catalog."""
    batch_id = context.partition_key
    usage = StepUsage()
    model, dimensions = embedder.model_id(), embedder.output_dimensions()
    checked = {key.name for key in context.selected_asset_check_keys}
    if not context.selected_asset_keys:  # the checks alone
        yield from _stored_checks(context, config, warehouse, model, dimensions, checked)
        return
    loaded = _inputs(context, warehouse, landing, model, dimensions)
    if loaded is _SKIPPED:
        return
    if loaded is None:
        yield from _nothing_to_recommend(context, warehouse)
        return
    gates = _gates(context, config, warehouse, loaded, model, dimensions, checked)
    if _refused(context, gates):
        yield from judged(gates.verdicts)
        return
    with warehouse.staged_batch(SCORED_TABLES, batch_id) as (conn, staging):
        scored = score_batch(
            conn, batch_id, model, dimensions, loaded, staging, top_n=config.top_n,
            weights=config.weights(), customer_chunk=config.customer_chunk,
            on_chunk=Progress(context.log, batch_id, "recommend", "customers"),
        )  # fmt: skip
    with warehouse.get_connection() as conn:
        summary = confidence_summary(conn, batch_id)
    context.log.info(
        f"{batch_id}: {scored.customers:,} customers scored in {scored.chunks} chunks against"
        f" {len(loaded.inputs.product_ids):,} products, {scored.shortfalls:,} short of products"
    )
    checks = [*gates.verdicts, *_drift(context, config, checked, summary.histogram)]
    figures = {
        "segment_model_version": loaded.version,
        "customers_short_of_products": scored.shortfalls,
        **usage.figures(),
        **one_table_metadata(warehouse, RECOMMENDATIONS, summary.rows),
        **_verdict_figures(context, gates, checks),
        "commit_retries": warehouse.commit_retries(),
    }
    yield _scored(summary, figures)
    yield from judged(checks)


def _drift(
    context: dg.AssetExecutionContext,
    config: RecommendationConfig,
    checked: set[str],
    histogram: list[int],
) -> list[Verdict]:
    return [_confidence_drift(context, config, histogram)] if CONFIDENCE_DRIFT in checked else []


def _verdict_figures(
    context: dg.AssetExecutionContext, gates: "_Gates", checks: list[Verdict]
) -> dict:
    """The hit rates, the failed flags (a batch that failed a check is nobody's baseline) and
    the checks that did not judge."""
    return {
        **(gates.quality.rates() if gates.quality is not None else {}),
        **failed_flags(judged(checks)),
        **not_judged(checks, context.log),
    }


_SKIPPED = object()  # no catalog, or profiles built with another one: nothing to score yet


def _inputs(
    context: dg.AssetExecutionContext,
    warehouse: Warehouse,
    landing: LandingZone,
    model: str,
    dimensions: int,
) -> BatchScoring | None | object:
    """The batch's scoring inputs (None: nothing to recommend), or _SKIPPED and why."""
    batch_id = context.partition_key
    with warehouse.get_connection() as conn:
        if _no_catalog(conn):
            _skip_for_no_catalog(context, landing)
            return _SKIPPED
        if _profiles_stale(conn, batch_id):
            context.log.warning(
                f"{batch_id}: its profiles were built with another catalog vocabulary (or"
                " none): nothing scored; rescore_sensor rebuilds them first (from"
                " customer_embeddings)"
            )
            return _SKIPPED
        return load_scoring_inputs(conn, batch_id, model, dimensions)


def _refused(context: dg.AssetExecutionContext, gates: "_Gates") -> bool:
    """Whether a gate failed: then nothing is written, and the log says why."""
    failed = [v for v in judged(gates.verdicts) if not v.passed]
    if failed:
        context.log.error(
            f"{context.partition_key}: not published, the model is not good enough ("
            + "; ".join(v.description for v in failed)
            + "): nothing written, the batch's previous recommendations stay as they were"
        )
    return bool(failed)


@dataclass(frozen=True)
class _Gates:
    verdicts: list[Verdict]  # quality, personalization (the selected ones)
    quality: HoldoutQuality | None


def _gates(
    context: dg.AssetExecutionContext,
    config: RecommendationConfig,
    warehouse: Warehouse,
    loaded: BatchScoring,
    model: str,
    dimensions: int,
    checked: set[str],
) -> _Gates:
    """What is judged before anything is written: the held-out quality against popularity,
    and how many different lists the profiles get."""
    batch_id, verdicts, quality, spread = context.partition_key, [], None, None
    weights = config.weights()
    with warehouse.get_connection() as conn:
        if RECOMMENDATION_QUALITY in checked:
            quality = holdout_quality(
                conn, batch_id, model, dimensions, loaded, weights,
                sample=config.quality_sample, top_n=config.quality_top_n,
            )  # fmt: skip
        if PERSONALIZED in checked:
            spread = list_spread(conn, batch_id, model, dimensions, loaded, weights,
                                 top_n=config.top_n)  # fmt: skip
    if quality is not None:
        verdicts.append(_quality_result(context, config, quality))
    if spread is not None:
        verdicts.append(
            personalization_result(
                spread,
                loaded.inputs.segments,
                min_profiles=config.personalization_min_profiles,
                min_lists_per_segment=config.min_lists_per_segment,
            )  # fmt: skip
        )
    return _Gates(verdicts, quality)


def _nothing_to_recommend(
    context: dg.AssetExecutionContext, warehouse: Warehouse
) -> Iterator[dg.MaterializeResult]:
    """A batch with no segmented customers or no product embeddings holds no recommendations
    (and its checks have nothing to judge)."""
    with warehouse.replace_batch(SCORED_TABLES, context.partition_key):
        pass
    context.log.warning(f"{context.partition_key}: no segmented customers or product embeddings")
    yield dg.MaterializeResult(
        asset_key=RECOMMENDATIONS, metadata=one_table_metadata(warehouse, RECOMMENDATIONS, 0)
    )


def _stored_checks(
    context: dg.AssetExecutionContext,
    config: RecommendationConfig,
    warehouse: Warehouse,
    model: str,
    dimensions: int,
    checked: set[str],
) -> Iterator[dg.AssetCheckResult]:
    """The selected checks of the batch as it stands, run without writing it."""
    batch_id = context.partition_key
    with warehouse.get_connection() as conn:
        histogram = confidence_summary(conn, batch_id).histogram
        loaded = load_scoring_inputs(conn, batch_id, model, dimensions)
    if loaded is None:
        return
    verdicts = _gates(context, config, warehouse, loaded, model, dimensions, checked).verdicts
    if CONFIDENCE_DRIFT in checked:
        verdicts.append(_confidence_drift(context, config, histogram))
    yield from judged(verdicts)


def _quality_result(
    context: dg.AssetExecutionContext, config: RecommendationConfig, quality: HoldoutQuality
) -> Verdict:
    """The batch's held-out hit rate against popularity and the recent normal batches'."""
    recent = recent_batch_metadata(
        context.instance,
        RECOMMENDATIONS,
        "hit_rate",
        exclude_partition=context.partition_key,
        batches=config.drift_baseline_batches,
        unless_failed=RECOMMENDATION_QUALITY,
    )
    verdict = quality_verdict(
        quality, [float(r) for r in recent], min_customers=config.quality_min_customers,
        min_baselines=config.drift_min_baseline_batches,
        min_ratio_to_recent=config.quality_min_ratio_to_recent,
        min_lead_z=config.quality_min_lead_z,
    )  # fmt: skip
    return recommendation_quality_result(quality, verdict, len(recent))


def _scored(summary: ConfidenceSummary, figures: dict) -> dg.MaterializeResult:
    return dg.MaterializeResult(
        asset_key=RECOMMENDATIONS,
        metadata={
            "customers": summary.customers,
            "mean_confidence": round(summary.mean, 4),
            **{f"confidence_{k}": round(v, 4) for k, v in summary.quantiles.items()},
            "confidence_histogram": dg.MetadataValue.json(summary.histogram),
            "confidence_distribution": _distribution_table(summary.histogram),
            **figures,
        },
    )


class _Refused(Exception):
    """A blocking check failed on the rows about to be published: the transaction rolls back."""

    def __init__(self, checks: list[dg.AssetCheckResult]) -> None:
        super().__init__("a blocking check failed")
        self.checks = checks


def _apply_rules(
    context: dg.AssetExecutionContext, config: "BusinessRulesConfig", warehouse: Warehouse
) -> tuple[RuleOutcome | None, list[dg.AssetCheckResult]]:
    """The rules split the batch's recommendations and publish them, in ONE transaction that
    commits only if the blocking checks pass on the new rows: else the batch's previous
    publication stays as it was (None: nothing published)."""
    batch_id = context.partition_key
    tables = [VALIDATED_RECOMMENDATIONS, REJECTED_RECOMMENDATIONS, BATCH_PUBLICATIONS]
    ruled: dict = {}

    def publish_if_sound(conn) -> None:
        ruled["outcome"] = outcome = rule_outcome(conn, batch_id)
        ruled["checks"] = checks = _rule_checks(conn, batch_id, config)
        if any(not c.passed and c.severity == ERROR for c in judged(checks)):
            raise _Refused(checks)
        publish(conn, batch_id, outcome.kept)

    try:
        with warehouse.staged_batch(tables, batch_id, before_commit=publish_if_sound) as (
            conn,
            staging,
        ):
            stage_business_rules(
                conn, batch_id, staging, min_confidence=config.min_confidence,
                max_predicted_value=config.max_predicted_value, chunk_lines=config.customer_chunk,
            )  # fmt: skip
    except _Refused as refused:
        context.log.error(
            f"{batch_id}: not published: a blocking check failed on the new rows; the batch's"
            " previous recommendations stay as they were"
        )
        return None, refused.checks
    outcome = ruled["outcome"]
    if outcome.suspicious:
        context.log.warning(
            f"{batch_id}: {outcome.by_rule['implausible_value']} recommendations with an "
            f"implausible predicted value, e.g. {outcome.suspicious}"
        )
    return outcome, ruled["checks"]


def _rule_checks(conn, batch_id: str, config: "BusinessRulesConfig") -> list[dg.AssetCheckResult]:
    return recommendation_check_results(
        conn,
        batch_id,
        min_confidence=config.min_confidence,
        max_predicted_value=config.max_predicted_value,
        rejected_share_ceiling=config.rejected_share_ceiling,
        rejected_total_ceiling=config.rejected_total_ceiling,
        chunk_lines=config.customer_chunk,
    )


def _confidence_drift(
    context: dg.AssetExecutionContext, config: RecommendationConfig, histogram: list[int]
) -> dg.AssetCheckResult:
    """The batch's confidence histogram against the recent batches'."""
    baselines = recent_batch_metadata(
        context.instance,
        RECOMMENDATIONS,
        "confidence_histogram",
        exclude_partition=context.partition_key,
        batches=config.drift_baseline_batches,
        unless_failed=CONFIDENCE_DRIFT,
    )
    return drift_check_result(
        CONFIDENCE_DRIFT, RECOMMENDATIONS, histogram, baselines,
        threshold=config.psi_threshold, min_baselines=config.drift_min_baseline_batches,
    )  # fmt: skip


def _distribution_table(histogram: list[int]) -> dg.TableMetadataValue:
    return dg.MetadataValue.table(
        records=[
            dg.TableRecord({"confidence": f"{i / 10:.1f}-{(i + 1) / 10:.1f}", "count": n})
            for i, n in enumerate(histogram)
        ],
        schema=dg.TableSchema(
            columns=[dg.TableColumn("confidence", "string"), dg.TableColumn("count", "int")]
        ),
    )


class BusinessRulesConfig(dg.Config):
    min_confidence: float = Field(default=0.3, description="Lowest confidence kept.")
    max_predicted_value: float = Field(
        default=10_000.0, description="Predicted value must be in (0, this]."
    )
    rejected_share_ceiling: float = Field(
        default=0.5, description="WARN when one rule rejects more than this share."
    )
    rejected_total_ceiling: float = Field(
        default=0.5, description="WARN when the rules together reject more than this share."
    )
    customer_chunk: int = Field(
        default=200_000, description="Customers' recommendations judged per chunk of lines."
    )


_RULED_SPEC_KWARGS = {
    "deps": [RECOMMENDATIONS, PRODUCT_CATALOG, CUSTOMER_PURCHASES],
    "group_name": "recommendations",
    "kinds": {"duckdb"},
    "automation_condition": per_batch_automation(ignore=_CATALOG),
    "skippable": True,
}


@dg.multi_asset(
    specs=[
        dg.AssetSpec(
            VALIDATED_RECOMMENDATIONS,
            description="Recommendations that pass every business rule.",
            **_RULED_SPEC_KWARGS,
        ),
        dg.AssetSpec(
            REJECTED_RECOMMENDATIONS,
            description="Recommendations a business rule rejected, with the rule(s).",
            **_RULED_SPEC_KWARGS,
        ),
    ],
    check_specs=RECOMMENDATION_CHECK_SPECS,
    can_subset=True,  # so that its checks are optional outputs too (see recommendations)
    **batch_stage("recommendations"),
)
@fails_at_once_when_deterministic
def validated_recommendations(
    context: dg.AssetExecutionContext,
    config: BusinessRulesConfig,
    warehouse: Warehouse,
    landing: LandingZone,
):
    """Applies the business rules: in stock, confidence >= minimum, not already bought,
    predicted value in (0, max]. Don't blindly trust model output. Skipped without a catalog."""
    batch_id = context.partition_key
    usage = StepUsage()
    with warehouse.get_connection() as conn:
        if _no_catalog(conn):
            _skip_for_no_catalog(context, landing)
            return
    selected = {key.to_user_string() for key in context.selected_asset_keys}
    # one pass of the rules writes both tables, whichever of them is selected
    if selected:
        outcome, checks = _apply_rules(context, config, warehouse)
    else:  # the checks alone, on the published rows
        outcome = None
        with warehouse.get_connection() as conn:
            checks = _rule_checks(conn, batch_id, config)
    if outcome is not None:
        yield from _ruled(selected, outcome, warehouse, usage, not_judged(checks, context.log))
    checked = {key.name for key in context.selected_asset_check_keys}
    yield from (check for check in judged(checks) if check.check_name in checked)


def _ruled(
    selected: set[str], outcome: RuleOutcome, warehouse: Warehouse, usage: StepUsage,
    unjudged: dict,
) -> Iterator[dg.MaterializeResult]:  # fmt: skip
    """The materializations of the selected ones of the two tables the rules wrote."""
    rows = {VALIDATED_RECOMMENDATIONS: outcome.kept, REJECTED_RECOMMENDATIONS: outcome.rejected}
    tables = table_metadata(warehouse, {t: n for t, n in rows.items() if t in selected})
    if VALIDATED_RECOMMENDATIONS in selected:
        yield dg.MaterializeResult(
            asset_key=VALIDATED_RECOMMENDATIONS,
            metadata={
                **tables[VALIDATED_RECOMMENDATIONS],
                "rejected": outcome.rejected,
                **usage.figures(),
                "commit_retries": warehouse.commit_retries(),
                **unjudged,
            },
        )
    if REJECTED_RECOMMENDATIONS in selected:
        yield dg.MaterializeResult(
            asset_key=REJECTED_RECOMMENDATIONS,
            metadata={
                **tables[REJECTED_RECOMMENDATIONS],
                **{f"rejected_{rule}": n for rule, n in outcome.by_rule.items()},
            },
        )
