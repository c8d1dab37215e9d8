"""Recommendations: score products per customer profile, then apply the business rules.

confidence = segment_weight * segment_affinity + (1 - segment_weight) * similarity_score, where
- segment_affinity: how much the customer's segment buys the product, relative to the
  segment's most bought product (0..1, from every batch's purchases under the same model);
- similarity_score: cosine similarity between the customer's profile embedding and the
  product's embedding, rescaled to 0..1 over the catalog for that profile.
predicted_value = confidence * the segment's average amount for the product (its price if the
segment never bought it). Every part is stored with the recommendation.

The product embeddings (the catalog's texts, embedded by the customers' model), loading the
scoring inputs and scoring a batch are here too.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb
import numpy as np
import pyarrow as pa

from pipeline_project.core.embedding_cache import with_vectors
from pipeline_project.core.vectors import list_column_to_matrix

RULES = ("out_of_stock", "low_confidence", "already_purchased", "implausible_value")


@dataclass(frozen=True)
class ScoringInputs:
    product_ids: list[str]
    product_vectors: np.ndarray  # (products, dims), unit length
    affinity: np.ndarray  # (segments, products) in 0..1
    expected_value: np.ndarray  # (segments, products)


def segment_tables(
    n_segments: int,
    product_ids: list[str],
    prices: np.ndarray,
    purchases: pa.Table,  # segment_id, product_id, purchases, avg_amount
) -> tuple[np.ndarray, np.ndarray]:
    """Affinity (purchases / the segment's top product's purchases) and expected value."""
    index = {p: i for i, p in enumerate(product_ids)}
    counts = np.zeros((n_segments, len(product_ids)))
    value = np.tile(np.asarray(prices, dtype=float), (n_segments, 1))
    for seg, prod, n, avg in zip(
        purchases["segment_id"].to_pylist(),
        purchases["product_id"].to_pylist(),
        purchases["purchases"].to_pylist(),
        purchases["avg_amount"].to_pylist(),
        strict=True,
    ):
        if prod in index and 0 <= seg < n_segments:
            counts[seg, index[prod]] = n
            value[seg, index[prod]] = avg
    top = counts.max(axis=1, keepdims=True)
    affinity = np.divide(counts, top, out=np.zeros_like(counts), where=top > 0)
    return affinity, value


def score_profiles(
    profile_vectors: np.ndarray,
    profile_segments: np.ndarray,
    inputs: ScoringInputs,
    *,
    top_n: int,
    segment_weight: float,
) -> dict[str, np.ndarray]:
    """Top-N products per profile with every part of the score; arrays of length profiles*N."""
    n = min(top_n, len(inputs.product_ids))
    similarity = profile_vectors @ inputs.product_vectors.T  # (profiles, products)
    low = similarity.min(axis=1, keepdims=True)
    span = similarity.max(axis=1, keepdims=True) - low
    similarity_score = np.divide(
        similarity - low, span, out=np.zeros_like(similarity), where=span > 0
    )
    affinity = inputs.affinity[profile_segments]
    confidence = np.clip(
        segment_weight * affinity + (1.0 - segment_weight) * similarity_score, 0.0, 1.0
    )
    top = np.argsort(-confidence, axis=1, kind="stable")[:, :n]
    rows = np.repeat(np.arange(len(profile_vectors)), n)
    cols = top.ravel()
    return {
        "profile": rows,
        "rank": np.tile(np.arange(1, n + 1, dtype=np.int32), len(profile_vectors)),
        "product": cols,
        "confidence": confidence[rows, cols],
        "predicted_value": confidence[rows, cols]
        * inputs.expected_value[profile_segments[rows], cols],
        "segment_affinity": affinity[rows, cols],
        "similarity": similarity[rows, cols],
        "similarity_score": similarity_score[rows, cols],
    }


# ---- product embeddings -------------------------------------------------------------------

# Each catalog product's text; a source of embedding_cache.missing_texts.
PRODUCT_TEXTS_SQL = """
SELECT product_id, 'Product: ' || name || '. Category: ' || category || '.' AS text,
       md5('Product: ' || name || '. Category: ' || category || '.') AS text_hash
FROM product_catalog
"""


def store_product_embeddings(conn: duckdb.DuckDBPyConnection, model: str, dimensions: int) -> int:
    """Replace the model's product_embeddings with the catalog's texts (embedded already);
    returns the number of products."""
    params = {"model": model, "dimensions": dimensions}
    conn.execute(
        "DELETE FROM product_embeddings WHERE model = $model AND dimensions = $dimensions",
        params,
    )
    conn.execute(
        "INSERT INTO product_embeddings SELECT product_id, $model, $dimensions, text_hash,"
        f" text FROM ({PRODUCT_TEXTS_SQL})",
        params,
    )
    [(products,)] = conn.execute("SELECT count(*) FROM product_catalog").fetchall()
    return products


# ---- scoring a batch ------------------------------------------------------------------------

_PRODUCTS_SQL = """
SELECT p.product_id, p.text_hash, cat.price
FROM product_embeddings AS p
JOIN product_catalog AS cat USING (product_id)
WHERE p.model = $model AND p.dimensions = $dimensions
"""

_SEGMENT_PURCHASES_SQL = """
SELECT s.segment_id, p.product_id, count(*) AS purchases, avg(p.amount) AS avg_amount
FROM customer_purchases AS p
JOIN customer_segments AS s ON s.batch_id = p.batch_id AND s.line_no = p.line_no
WHERE s.model_version = $version
GROUP BY ALL
"""

# The batch's distinct profiles and their segment.
_BATCH_PROFILES_SQL = """
SELECT text_hash, any_value(segment_id) AS segment_id
FROM customer_segments
WHERE batch_id = $batch_id
GROUP BY text_hash
"""


def load_scoring_inputs(
    conn: duckdb.DuckDBPyConnection, batch_id: str, model: str, dimensions: int
) -> tuple[int, ScoringInputs] | None:
    """The batch's segment model version and what scoring needs (the product vectors and each
    segment's affinity and expected value); None without segmented customers or products."""
    versions = conn.execute(
        "SELECT DISTINCT model_version FROM customer_segments WHERE batch_id = ?", [batch_id]
    ).fetchall()
    products = with_vectors(
        conn, _PRODUCTS_SQL, model, dimensions, order_by="product_id"
    ).to_arrow_table()
    if not versions or products.num_rows == 0:
        return None
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
    return version, inputs


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


def score_batch(
    conn: duckdb.DuckDBPyConnection,
    batch_id: str,
    model: str,
    dimensions: int,
    inputs: ScoringInputs,
    *,
    top_n: int,
    segment_weight: float,
    profile_chunk: int,
) -> int:
    """Score the batch's distinct profiles `profile_chunk` at a time and write every segmented
    customer's top-N into recommendations; returns the number of chunks scored."""
    reader = with_vectors(
        conn, _BATCH_PROFILES_SQL, model, dimensions, {"batch_id": batch_id}
    ).to_arrow_reader(profile_chunk)
    scored = [
        _score_chunk(chunk, inputs, dimensions, top_n=top_n, segment_weight=segment_weight)
        for chunk in reader
        if chunk.num_rows
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
    return len(scored)


def _score_chunk(
    chunk: pa.RecordBatch,
    inputs: ScoringInputs,
    dimensions: int,
    *,
    top_n: int,
    segment_weight: float,
) -> pa.Table:
    vectors = list_column_to_matrix(chunk, "embedding", dimensions)
    segments = chunk.column("segment_id").to_numpy()
    scored = score_profiles(vectors, segments, inputs, top_n=top_n, segment_weight=segment_weight)
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


@dataclass(frozen=True)
class ConfidenceSummary:
    rows: int
    customers: int
    histogram: list[int]  # recommendations per confidence bin [0, 0.1), ..., [0.9, 1]
    mean: float
    quantiles: dict[str, float]  # p05, p25, p50, p75, p95


def confidence_summary(conn: duckdb.DuckDBPyConnection, batch_id: str) -> ConfidenceSummary:
    """How many recommendations the batch has, for how many customers, and how confident."""
    [(rows, customers)] = conn.execute(
        "SELECT count(*), count(DISTINCT line_no) FROM recommendations WHERE batch_id = ?",
        [batch_id],
    ).fetchall()
    bins = conn.execute(
        "SELECT least(floor(confidence * 10), 9)::INT AS bin, count(*) FROM recommendations"
        " WHERE batch_id = ? GROUP BY bin",
        [batch_id],
    ).fetchall()
    # approx_quantile (a t-digest) in bounded memory: quantile_cont holds every value of the
    # batch at once and runs out of DuckDB's memory limit at 10M customers (50M rows).
    [(quantiles, mean)] = conn.execute(
        "SELECT approx_quantile(confidence, [0.05, 0.25, 0.5, 0.75, 0.95]), avg(confidence)"
        " FROM recommendations WHERE batch_id = ?",
        [batch_id],
    ).fetchall()
    histogram = [0] * 10
    for b, n in bins:
        histogram[b] = n
    names = ("p05", "p25", "p50", "p75", "p95")
    quantiles = dict(zip(names, quantiles or [0.0] * 5, strict=True))
    return ConfidenceSummary(rows, customers, histogram, mean or 0.0, quantiles)


def rules_sql(source: str) -> str:
    """`source` rows with `failed_rules`: every business rule each recommendation breaks.

    Parameters: $batch_id, $min_confidence, $max_predicted_value. `source` is a table name
    from the code, never from data.
    """
    return f"""
    SELECT r.*, list_filter([
        CASE WHEN NOT coalesce(c.in_stock, false) THEN 'out_of_stock' END,
        CASE WHEN isnan(r.confidence) OR r.confidence < $min_confidence OR r.confidence > 1
             THEN 'low_confidence' END,
        CASE WHEN bought.product_id IS NOT NULL THEN 'already_purchased' END,
        CASE WHEN isnan(r.predicted_value) OR NOT (r.predicted_value > 0
                  AND r.predicted_value <= $max_predicted_value)
             THEN 'implausible_value' END
    ], lambda rule: rule IS NOT NULL) AS failed_rules
    FROM {source} AS r
    LEFT JOIN product_catalog AS c USING (product_id)
    LEFT JOIN (
        SELECT DISTINCT line_no, product_id FROM customer_purchases WHERE batch_id = $batch_id
    ) AS bought ON bought.line_no = r.line_no AND bought.product_id = r.product_id
    WHERE r.batch_id = $batch_id
    """


_COLUMNS = (
    "batch_id, line_no, customer_id, rank, product_id, segment_id, confidence,"
    " predicted_value, segment_affinity, similarity, similarity_score, model_version"
)


@dataclass(frozen=True)
class RuleOutcome:
    kept: int
    rejected: int
    by_rule: dict[str, int]
    suspicious: list[tuple]  # a few recommendations with an implausible value


def rejected_by_rule(conn, batch_id: str) -> dict[str, int]:
    """The batch's rejected recommendations per rule broken (one may break several)."""
    return dict(
        conn.execute(
            "SELECT rule, count(*) FROM (SELECT unnest(failed_rules) AS rule"
            " FROM rejected_recommendations WHERE batch_id = ?) GROUP BY rule",
            [batch_id],
        ).fetchall()
    )


def apply_business_rules(
    conn, batch_id: str, *, min_confidence: float, max_predicted_value: float
) -> RuleOutcome:
    """Split the batch's recommendations into rejected_recommendations (with every rule broken)
    and validated_recommendations (the rest), inside the caller's transaction (see
    Warehouse.replace_batch, which has removed the batch's old rows).

    The rules run once, in DuckDB: the rejected rows are inserted from them, the kept ones are
    the batch's recommendations without a rejected (line_no, rank). No row passes through
    Python; DuckDB streams both inserts within its memory limit."""
    params = {
        "batch_id": batch_id,
        "min_confidence": min_confidence,
        "max_predicted_value": max_predicted_value,
    }
    # An INSERT's result is the count of rows it inserted.
    [(rejected,)] = conn.execute(
        f"INSERT INTO rejected_recommendations SELECT {_COLUMNS}, failed_rules[1], failed_rules"
        f" FROM ({rules_sql('recommendations')}) WHERE len(failed_rules) > 0",
        params,
    ).fetchall()
    [(kept,)] = conn.execute(
        f"INSERT INTO validated_recommendations SELECT {_COLUMNS} FROM recommendations AS r"
        " WHERE batch_id = $batch_id AND NOT EXISTS (SELECT 1 FROM rejected_recommendations AS x"
        " WHERE x.batch_id = $batch_id AND x.line_no = r.line_no AND x.rank = r.rank)",
        {"batch_id": batch_id},
    ).fetchall()
    by_rule = rejected_by_rule(conn, batch_id)
    suspicious = [
        (str(customer), product, value)
        for customer, product, value in conn.execute(
            "SELECT customer_id, product_id, predicted_value FROM rejected_recommendations"
            " WHERE batch_id = ? AND list_contains(failed_rules, 'implausible_value')"
            " ORDER BY line_no, rank LIMIT 5",
            [batch_id],
        ).fetchall()
    ]
    return RuleOutcome(kept, rejected, {rule: by_rule.get(rule, 0) for rule in RULES}, suspicious)
