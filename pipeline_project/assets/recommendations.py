"""Recommendations: product embeddings, scored recommendations, and the business-rule filter."""

import dagster as dg
import numpy as np
import pyarrow as pa
from pydantic import Field

from pipeline_project.assets.inference import InferenceConfig, embed_into_cache
from pipeline_project.batch_history import recent_batch_metadata
from pipeline_project.checks.drift_checks import (
    CONFIDENCE_DRIFT,
    drift_check_result,
    drift_check_spec,
)
from pipeline_project.checks.output_checks import (
    RECOMMENDATION_CHECK_SPECS,
    recommendation_check_results,
)
from pipeline_project.core.monitoring import StepUsage
from pipeline_project.core.recommendations import (
    ScoringInputs,
    apply_business_rules,
    score_profiles,
    segment_tables,
)
from pipeline_project.core.vectors import list_column_to_matrix
from pipeline_project.partitions import batches
from pipeline_project.policies import DUCKDB_WRITER_POOL, STAGE_RETRY_POLICY
from pipeline_project.resources import Warehouse
from pipeline_project.resources.embeddings import Embedder
from pipeline_project.tables import (
    PRODUCT_EMBEDDINGS,
    RECOMMENDATIONS,
    REJECTED_RECOMMENDATIONS,
    VALIDATED_RECOMMENDATIONS,
)

_CATALOG = dg.AssetSelection.assets("product_catalog", "product_embeddings")

# Per batch: run once upstream landed and passed; catalog reloads do not re-run old batches.
_PER_BATCH_AUTOMATION = (
    dg.AutomationCondition.eager() & dg.AutomationCondition.all_deps_blocking_checks_passed()
).ignore(_CATALOG)

_PRODUCT_TEXTS_SQL = """
SELECT product_id, 'Product: ' || name || '. Category: ' || category || '.' AS product_text,
       md5('Product: ' || name || '. Category: ' || category || '.') AS text_hash
FROM product_catalog
"""

_PRODUCTS_SQL = """
SELECT p.product_id, c.embedding, cat.price
FROM product_embeddings AS p
JOIN embedding_cache AS c USING (model, dimensions, text_hash)
JOIN product_catalog AS cat USING (product_id)
WHERE p.model = $model AND p.dimensions = $dimensions
ORDER BY p.product_id
"""

_SEGMENT_PURCHASES_SQL = """
SELECT s.segment_id, p.product_id, count(*) AS purchases, avg(p.amount) AS avg_amount
FROM customer_purchases AS p
JOIN customer_segments AS s ON s.batch_id = p.batch_id AND s.line_no = p.line_no
WHERE s.model_version = $version
GROUP BY ALL
"""

_BATCH_PROFILES_SQL = """
SELECT s.text_hash, any_value(s.segment_id) AS segment_id, any_value(c.embedding) AS embedding
FROM customer_segments AS s
JOIN embedding_cache AS c
    ON c.model = $model AND c.dimensions = $dimensions AND c.text_hash = s.text_hash
WHERE s.batch_id = $batch_id
GROUP BY s.text_hash
ORDER BY s.text_hash
"""


@dg.asset(
    deps=["product_catalog"],
    pool=DUCKDB_WRITER_POOL,
    retry_policy=STAGE_RETRY_POLICY,
    group_name="recommendations",
    kinds={"duckdb"},
    metadata={"dagster/table_name": PRODUCT_EMBEDDINGS},
    automation_condition=dg.AutomationCondition.eager(),
)
def product_embeddings(
    context: dg.AssetExecutionContext,
    config: InferenceConfig,
    warehouse: Warehouse,
    embedder: Embedder,
) -> dg.MaterializeResult:
    """Each catalog product's text ("Product: <name>. Category: <category>.") and the key of
    its embedding in embedding_cache, from the same model as the customers."""
    model, dimensions = embedder.model_id(), embedder.output_dimensions()
    params = {"model": model, "dimensions": dimensions}
    with warehouse.get_connection() as conn:
        missing = conn.execute(
            f"SELECT DISTINCT text_hash, product_text FROM ({_PRODUCT_TEXTS_SQL}) AS p"
            " WHERE NOT EXISTS (SELECT 1 FROM embedding_cache AS c WHERE c.model = $model"
            " AND c.dimensions = $dimensions AND c.text_hash = p.text_hash) ORDER BY text_hash",
            params,
        ).fetchall()
    outcome = embed_into_cache(context, warehouse, embedder, missing, config, label="products")
    if outcome.failures:
        example = next(iter(outcome.failures.values()))
        raise dg.Failure(
            description=f"{len(outcome.failures)} product texts could not be embedded "
            f"(e.g. {example.reason}: {example.error})"
        )
    with warehouse.transaction() as conn:
        conn.execute(
            "DELETE FROM product_embeddings WHERE model = $model AND dimensions = $dimensions",
            params,
        )
        conn.execute(
            "INSERT INTO product_embeddings SELECT product_id, $model, $dimensions, text_hash,"
            f" product_text FROM ({_PRODUCT_TEXTS_SQL})",
            params,
        )
        [(products,)] = conn.execute("SELECT count(*) FROM product_catalog").fetchall()
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": products,
            "texts_embedded": len(outcome.vectors),
            "model_calls": outcome.model_calls,
            "model": model,
        }
    )


class RecommendationConfig(dg.Config):
    top_n: int = Field(default=5, description="Recommendations per customer.")
    segment_weight: float = Field(
        default=0.7, description="Weight of segment affinity; similarity gets the rest."
    )
    profile_chunk: int = Field(default=2048, description="Profiles scored per chunk.")
    psi_threshold: float = Field(
        default=0.25, description="WARN when the confidence distribution shifts more (PSI)."
    )
    drift_baseline_batches: int = Field(default=5, description="Recent batches in the baseline.")


@dg.asset(
    partitions_def=batches,
    deps=["customer_segments", "product_embeddings", "product_catalog"],
    pool=DUCKDB_WRITER_POOL,
    retry_policy=STAGE_RETRY_POLICY,
    group_name="recommendations",
    kinds={"duckdb"},
    metadata={"dagster/table_name": RECOMMENDATIONS},
    automation_condition=_PER_BATCH_AUTOMATION,
    check_specs=[drift_check_spec(CONFIDENCE_DRIFT, RECOMMENDATIONS, "the confidence histogram")],
)
def recommendations(
    context: dg.AssetExecutionContext,
    config: RecommendationConfig,
    warehouse: Warehouse,
    embedder: Embedder,
):
    """Top-N products per segmented customer with confidence in [0, 1], predicted value and
    the parts of the score (segment affinity, similarity)."""
    batch_id = context.partition_key
    usage = StepUsage()
    model, dimensions = embedder.model_id(), embedder.output_dimensions()
    params = {"model": model, "dimensions": dimensions}
    with warehouse.replace_batch([RECOMMENDATIONS], batch_id) as conn:
        versions = conn.execute(
            "SELECT DISTINCT model_version FROM customer_segments WHERE batch_id = ?", [batch_id]
        ).fetchall()
        products = conn.sql(_PRODUCTS_SQL, params=params).to_arrow_table()
        if not versions or products.num_rows == 0:
            context.log.warning(f"{batch_id}: no segmented customers or no product embeddings")
            yield dg.MaterializeResult(metadata={"dagster/row_count": 0})
            yield drift_check_result(CONFIDENCE_DRIFT, RECOMMENDATIONS, [], [], threshold=1.0)
            return
        [(version,)] = versions
        [(n_segments,)] = conn.execute(
            "SELECT count(*) FROM segment_model WHERE model_version = ? AND embedding_model = ?",
            [version, model],
        ).fetchall()
        product_ids = products["product_id"].to_pylist()
        affinity, expected_value = segment_tables(
            n_segments,
            product_ids,
            products["price"].to_numpy(),
            conn.sql(_SEGMENT_PURCHASES_SQL, params={"version": version}).to_arrow_table(),
        )
        inputs = ScoringInputs(
            product_ids,
            list_column_to_matrix(products, "embedding", dimensions),
            affinity,
            expected_value,
        )
        reader = conn.sql(
            _BATCH_PROFILES_SQL, params={**params, "batch_id": batch_id}
        ).to_arrow_reader(config.profile_chunk)
        scored = [
            _score_chunk(chunk, inputs, config, dimensions) for chunk in reader if chunk.num_rows
        ]
        # A few rows per distinct profile: small. ONE insert joins them to the batch's
        # customers, so DuckDB writes the rows as it makes them (many inserts in a transaction
        # would hold them all in memory until the commit).
        conn.register("scored_profiles", pa.concat_tables(scored) if scored else _NO_SCORES)
        conn.execute(
            "INSERT INTO recommendations SELECT s.batch_id, s.line_no, s.customer_id, r.rank,"
            " r.product_id, s.segment_id, r.confidence, r.predicted_value,"
            " r.segment_affinity, r.similarity, r.similarity_score, s.model_version"
            " FROM customer_segments AS s JOIN scored_profiles AS r USING (text_hash)"
            " WHERE s.batch_id = $batch_id",
            {"batch_id": batch_id},
        )
        conn.unregister("scored_profiles")
        context.log.info(f"{batch_id}: scored {len(scored)} chunks of profiles")
        [(rows, customers)] = conn.execute(
            "SELECT count(*), count(DISTINCT line_no) FROM recommendations WHERE batch_id = ?",
            [batch_id],
        ).fetchall()
        bins = conn.execute(
            "SELECT least(floor(confidence * 10), 9)::INT AS bin, count(*) FROM recommendations"
            " WHERE batch_id = ? GROUP BY bin",
            [batch_id],
        ).fetchall()
        [quantiles] = conn.execute(
            "SELECT quantile_cont(confidence, [0.05, 0.25, 0.5, 0.75, 0.95]), avg(confidence)"
            " FROM recommendations WHERE batch_id = ?",
            [batch_id],
        ).fetchall()
    histogram = [0] * 10
    for b, n in bins:
        histogram[b] = n
    (p05, p25, p50, p75, p95), mean_confidence = (quantiles[0] or [0.0] * 5), quantiles[1] or 0.0
    yield dg.MaterializeResult(
        metadata={
            "dagster/row_count": rows,
            "customers": customers,
            "segment_model_version": version,
            "mean_confidence": round(mean_confidence, 4),
            **{f"confidence_{k}": round(v, 4) for k, v in
               (("p05", p05), ("p25", p25), ("p50", p50), ("p75", p75), ("p95", p95))},
            "confidence_histogram": dg.MetadataValue.json(histogram),
            "confidence_distribution": dg.MetadataValue.table(
                records=[
                    dg.TableRecord({"confidence": f"{i / 10:.1f}-{(i + 1) / 10:.1f}", "count": n})
                    for i, n in enumerate(histogram)
                ],
                schema=dg.TableSchema(
                    columns=[dg.TableColumn("confidence", "string"), dg.TableColumn("count", "int")]
                ),
            ),
            **usage.figures(),
        }
    )  # fmt: skip
    baselines = recent_batch_metadata(
        context.instance,
        RECOMMENDATIONS,
        "confidence_histogram",
        exclude_partition=batch_id,
        batches=config.drift_baseline_batches,
    )
    yield drift_check_result(
        CONFIDENCE_DRIFT, RECOMMENDATIONS, histogram, baselines, threshold=config.psi_threshold
    )


_NO_SCORES = pa.table(
    {
        "text_hash": pa.array([], pa.string()),
        "rank": pa.array([], pa.int32()),
        "product_id": pa.array([], pa.string()),
        **{
            name: pa.array([], pa.float64())
            for name in ("confidence", "predicted_value", "segment_affinity", "similarity",
                         "similarity_score")
        },
    }
)  # fmt: skip


def _score_chunk(
    chunk: pa.RecordBatch, inputs: ScoringInputs, config: RecommendationConfig, dimensions: int
) -> pa.Table:
    vectors = list_column_to_matrix(chunk, "embedding", dimensions)
    segments = chunk.column("segment_id").to_numpy()
    scored = score_profiles(
        vectors, segments, inputs, top_n=config.top_n, segment_weight=config.segment_weight
    )
    return pa.table(
        {
            "text_hash": chunk.column("text_hash").take(pa.array(scored["profile"])),
            "rank": pa.array(scored["rank"]),
            "product_id": pa.array(np.asarray(inputs.product_ids, dtype=object)[scored["product"]]),
            "confidence": pa.array(scored["confidence"]),
            "predicted_value": pa.array(scored["predicted_value"]),
            "segment_affinity": pa.array(scored["segment_affinity"]),
            "similarity": pa.array(scored["similarity"].astype(np.float64)),
            "similarity_score": pa.array(scored["similarity_score"].astype(np.float64)),
        }
    )


class BusinessRulesConfig(dg.Config):
    min_confidence: float = Field(default=0.3, description="Lowest confidence kept.")
    max_predicted_value: float = Field(
        default=10_000.0, description="Predicted value must be in (0, this]."
    )
    rejected_share_ceiling: float = Field(
        default=0.5, description="WARN when one rule rejects more than this share."
    )


_RULED_SPEC_KWARGS = {
    "deps": ["recommendations", "product_catalog", "customer_purchases"],
    "group_name": "recommendations",
    "kinds": {"duckdb"},
    "automation_condition": _PER_BATCH_AUTOMATION,
}


@dg.multi_asset(
    specs=[
        dg.AssetSpec(
            VALIDATED_RECOMMENDATIONS,
            description="Recommendations that pass every business rule.",
            metadata={"dagster/table_name": VALIDATED_RECOMMENDATIONS},
            **_RULED_SPEC_KWARGS,
        ),
        dg.AssetSpec(
            REJECTED_RECOMMENDATIONS,
            description="Recommendations a business rule rejected, with the rule(s).",
            metadata={"dagster/table_name": REJECTED_RECOMMENDATIONS},
            **_RULED_SPEC_KWARGS,
        ),
    ],
    check_specs=RECOMMENDATION_CHECK_SPECS,
    partitions_def=batches,
    pool=DUCKDB_WRITER_POOL,
    retry_policy=STAGE_RETRY_POLICY,
)
def validated_recommendations(
    context: dg.AssetExecutionContext, config: BusinessRulesConfig, warehouse: Warehouse
):
    """Applies the business rules: in stock, confidence >= minimum, not already bought,
    predicted value in (0, max]. Don't blindly trust model output."""
    batch_id = context.partition_key
    usage = StepUsage()
    with warehouse.staged_batch(
        [VALIDATED_RECOMMENDATIONS, REJECTED_RECOMMENDATIONS], batch_id
    ) as (conn, staging):
        outcome = apply_business_rules(
            conn,
            batch_id,
            staging,
            min_confidence=config.min_confidence,
            max_predicted_value=config.max_predicted_value,
        )
    if outcome.suspicious:
        context.log.warning(
            f"{batch_id}: {outcome.by_rule['implausible_value']} recommendations with an "
            f"implausible predicted value, e.g. {outcome.suspicious}"
        )
    with warehouse.get_connection() as conn:
        checks = recommendation_check_results(
            conn,
            batch_id,
            min_confidence=config.min_confidence,
            max_predicted_value=config.max_predicted_value,
            rejected_share_ceiling=config.rejected_share_ceiling,
        )
    yield dg.MaterializeResult(
        asset_key=VALIDATED_RECOMMENDATIONS,
        metadata={
            "dagster/row_count": outcome.kept,
            "rejected": outcome.rejected,
            **usage.figures(),
        },
    )
    yield dg.MaterializeResult(
        asset_key=REJECTED_RECOMMENDATIONS,
        metadata={
            "dagster/row_count": outcome.rejected,
            **{f"rejected_{rule}": n for rule, n in outcome.by_rule.items()},
        },
    )
    yield from checks
