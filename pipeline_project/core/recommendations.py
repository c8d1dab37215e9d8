"""Recommendations: score products per customer profile, then apply the business rules.

What the rules know before scoring is applied before ranking: only products in stock, of a
value above 0 and not bought by the customer (in the batch's record or an earlier batch) are
ranked, so a customer gets top_n products whenever that many clear those rules. The confidence
and value rules judge the ranked rows afterwards, and guard what is published.

confidence = segment_weight * segment_affinity + (1 - segment_weight) * similarity_score, where
- segment_affinity: how much the customer's segment buys the product, relative to the
  segment's most bought product (0..1, learned with the segment model version: segment_affinity);
- similarity_score: cosine similarity between the customer's profile embedding and the
  product's embedding, rescaled to 0..1 over the catalog for that profile.
predicted_value = confidence * the segment's average amount for the product (its price if the
segment never bought it). Every part is stored with the recommendation.

The product embeddings (the catalog's texts, embedded by the customers' model), loading the
scoring inputs and scoring a batch are here too.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline_project.core.catalog import PRODUCTS
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
    allowed: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Top-N products per profile with every part of the score; arrays of length profiles*N.
    With `allowed` (a mask over the products), only allowed products are ranked."""
    n = min(top_n, len(inputs.product_ids) if allowed is None else int(allowed.sum()))
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
    ranking = confidence if allowed is None else np.where(allowed, confidence, -np.inf)
    top = np.argsort(-ranking, axis=1, kind="stable")[:, :n]
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
PRODUCT_TEXTS_SQL = f"""
SELECT product_id, 'Product: ' || name || '. Category: ' || category || '.' AS text,
       md5('Product: ' || name || '. Category: ' || category || '.') AS text_hash
FROM {PRODUCTS} AS cat
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
        "INSERT INTO product_embeddings BY NAME SELECT product_id, $model AS model,"
        f" $dimensions AS dimensions, text_hash, text AS product_text FROM ({PRODUCT_TEXTS_SQL})",
        params,
    )
    [(products,)] = conn.execute("SELECT count(*) FROM product_catalog").fetchall()
    return products


# ---- scoring a batch ------------------------------------------------------------------------

# Every catalog product with a vector: its price and whether it can be sold now.
_PRODUCTS_SQL = f"""
SELECT p.product_id, p.text_hash, cat.price, coalesce(cat.in_stock, false) AS in_stock
FROM product_embeddings AS p
JOIN {PRODUCTS} AS cat USING (product_id)
WHERE p.model = $model AND p.dimensions = $dimensions
"""

_AFFINITY_SQL = """
SELECT segment_id, product_id, purchases, avg_amount FROM segment_affinity
WHERE model_version = $version
"""

# The batch's distinct profiles and their segment.
_BATCH_PROFILES_SQL = """
SELECT text_hash, any_value(segment_id) AS segment_id
FROM customer_segments
WHERE batch_id = $batch_id
GROUP BY text_hash
"""


@dataclass(frozen=True)
class BatchScoring:
    """What scoring a batch needs: its segment model version and the scoring inputs, and
    which products the rules known before scoring allow (in stock, of a value above 0)."""

    version: int
    inputs: ScoringInputs
    allowed: np.ndarray  # (products,) bool


def load_scoring_inputs(
    conn: duckdb.DuckDBPyConnection, batch_id: str, model: str, dimensions: int
) -> BatchScoring | None:
    """The batch's segment model version and what scoring needs (the product vectors and each
    segment's affinity and expected value, as the model version learned them); None without
    segmented customers or products."""
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
        conn.sql(_AFFINITY_SQL, params={"version": version}).to_arrow_table(),
    )
    inputs = ScoringInputs(
        product_ids,
        list_column_to_matrix(products, "embedding", dimensions),
        affinity,
        expected_value,
    )
    # a product of no value to any segment (free, or never sold above 0) is never plausible
    allowed = products["in_stock"].to_numpy(zero_copy_only=False) & (expected_value.max(axis=0) > 0)
    return BatchScoring(version, inputs, allowed)


_CANDIDATE_SCHEMA = pa.schema(
    [
        ("text_hash", pa.string()),
        ("candidate_rank", pa.int32()),
        ("product_id", pa.string()),
        ("confidence", pa.float64()),
        ("predicted_value", pa.float64()),
        ("segment_affinity", pa.float64()),
        ("similarity", pa.float64()),
        ("similarity_score", pa.float64()),
    ]
)


def _candidates(
    profiles: pa.Table | pa.RecordBatch,
    scoring: BatchScoring,
    dimensions: int,
    *,
    depth: int,
    segment_weight: float,
) -> pa.Table:
    """Each profile's `depth` best products among the allowed ones, ranked, with every part of
    their score."""
    if profiles.num_rows == 0:
        return _CANDIDATE_SCHEMA.empty_table()
    vectors = list_column_to_matrix(profiles, "embedding", dimensions)
    segments = profiles.column("segment_id").to_numpy()
    scored = score_profiles(
        vectors, segments, scoring.inputs, top_n=depth, segment_weight=segment_weight,
        allowed=scoring.allowed,
    )  # fmt: skip
    product_ids = np.asarray(scoring.inputs.product_ids, dtype=object)
    return pa.table(
        {
            "text_hash": profiles.column("text_hash").take(pa.array(scored["profile"])),
            "candidate_rank": pa.array(scored["rank"]),
            "product_id": pa.array(product_ids[scored["product"]], pa.string()),
            "confidence": pa.array(scored["confidence"]),
            "predicted_value": pa.array(scored["predicted_value"]),
            "segment_affinity": pa.array(scored["segment_affinity"]),
            "similarity": pa.array(scored["similarity"].astype(np.float64)),
            "similarity_score": pa.array(scored["similarity_score"].astype(np.float64)),
        },
        schema=_CANDIDATE_SCHEMA,
    )


# The customers of lines $first..$last with their segment and profile.
_CHUNK_CUSTOMERS_SQL = """
CREATE OR REPLACE TEMP TABLE chunk_customers AS
SELECT batch_id, line_no, customer_id, text_hash, segment_id, model_version
FROM customer_segments WHERE batch_id = $batch_id AND line_no BETWEEN $first AND $last
"""

# What those customers bought, in this batch's records or before (prior_purchases).
_CHUNK_BOUGHT_SQL = """
CREATE OR REPLACE TEMP TABLE chunk_bought AS
SELECT DISTINCT customer_id, product_id FROM (
    SELECT customer_id, product_id FROM customer_purchases
    WHERE batch_id = $batch_id AND line_no BETWEEN $first AND $last
    UNION ALL
    SELECT customer_id, product_id FROM prior_purchases
    WHERE batch_id = $batch_id AND line_no BETWEEN $first AND $last)
"""

# Each customer's `top_n` first candidates of their profile that they have not bought.
# A customer's rank of a candidate is its rank in the profile's list less the candidates before
# it that the customer bought: a streaming join against the (few) bought candidates' ranks per
# customer, with no window over customers x candidates.
_CHUNK_RECOMMENDATIONS_SQL = """
WITH bought AS (
    SELECT c.customer_id, list(r.candidate_rank) AS ranks
    FROM {customers} AS c
    JOIN {candidates} AS r USING (text_hash)
    JOIN chunk_bought AS b ON b.customer_id = c.customer_id AND b.product_id = r.product_id
    GROUP BY c.customer_id
), ranked AS (
    SELECT c.*, r.* EXCLUDE (text_hash), coalesce(b.ranks, []) AS bought_ranks
    FROM {customers} AS c
    JOIN {candidates} AS r USING (text_hash)
    LEFT JOIN bought AS b USING (customer_id)
)
SELECT batch_id, line_no, customer_id,
       (candidate_rank - len(list_filter(bought_ranks, lambda x: x < candidate_rank)))::INTEGER
           AS rank,
       product_id, segment_id, confidence, predicted_value, segment_affinity, similarity,
       similarity_score, model_version
FROM ranked
WHERE NOT list_contains(bought_ranks, candidate_rank)
  AND candidate_rank - len(list_filter(bought_ranks, lambda x: x < candidate_rank)) <= $top_n
"""

# The chunk's customers with fewer than $top_n recommendations, and their profile.
_CHUNK_SHORT_SQL = """
SELECT c.customer_id, any_value(c.text_hash) AS text_hash, count(r.customer_id) AS got
FROM chunk_customers AS c LEFT JOIN chunk_recommendations AS r USING (customer_id)
GROUP BY c.customer_id HAVING count(r.customer_id) < $top_n
"""


@dataclass(frozen=True)
class ScoredBatch:
    chunks: int
    profiles: int
    shortfalls: int  # customers with fewer than top_n products in stock and not bought


def score_candidates(
    conn: duckdb.DuckDBPyConnection,
    batch_id: str,
    model: str,
    dimensions: int,
    scoring: BatchScoring,
    *,
    depth: int,
    segment_weight: float,
    profile_chunk: int,
) -> pa.Table:
    """Each distinct profile of the batch scored once: its best `depth` products among those
    the rules known before scoring allow (in stock, of a value above 0), ranked
    (`candidate_rank`) with every part of their score. A few rows per profile: small."""
    reader = with_vectors(
        conn, _BATCH_PROFILES_SQL, model, dimensions, {"batch_id": batch_id}
    ).to_arrow_reader(profile_chunk)
    parts = [
        _candidates(chunk, scoring, dimensions, depth=depth, segment_weight=segment_weight)
        for chunk in reader
    ]
    return pa.concat_tables([_CANDIDATE_SCHEMA.empty_table(), *parts])


@dataclass(frozen=True)
class ListSpread:
    """How many different top-N lists the batch's distinct profiles get."""

    profiles: int
    lists: int
    most_common_list_profiles: int
    products: int  # distinct products in the lists


def list_spread(candidates: pa.Table, top_n: int) -> ListSpread:
    """The profiles' top-N lists (their first top_n candidates), counted."""
    top = candidates.filter(pc.less_equal(candidates["candidate_rank"], top_n))
    lists = (
        top.sort_by([("text_hash", "ascending"), ("candidate_rank", "ascending")])
        .group_by("text_hash", use_threads=False)
        .aggregate([("product_id", "list")])
    )
    counts = Counter(tuple(products) for products in lists["product_id_list"].to_pylist())
    return ListSpread(
        profiles=lists.num_rows,
        lists=len(counts),
        most_common_list_profiles=max(counts.values(), default=0),
        products=len(pc.unique(top["product_id"])),
    )


def score_batch(
    conn: duckdb.DuckDBPyConnection,
    batch_id: str,
    model: str,
    dimensions: int,
    scoring: BatchScoring,
    candidates: pa.Table,
    staging: dict[str, Path],
    *,
    top_n: int,
    segment_weight: float,
    customer_chunk: int = 200_000,
    depth: int,
) -> ScoredBatch:
    """Every segmented customer's top-N products among their profile's `candidates` (see
    score_candidates, `depth` per profile) that they have not bought (in this batch or before),
    staged as Parquet parts of recommendations (and recommendation_shortfalls for customers
    with fewer than N such products).

    A customer who bought so many of their profile's candidates that fewer than N are left is
    scored again at the full depth of the catalog, so nobody gets fewer than N while N products
    clear the rules known before scoring. Customers are taken `customer_chunk` lines at a time:
    memory does not grow with the batch."""
    profiles = len(pc.unique(candidates["text_hash"]))
    available = int(scoring.allowed.sum())
    conn.register("candidates", candidates)
    [(last_line,)] = conn.execute(
        "SELECT coalesce(max(line_no), 0) FROM customer_segments WHERE batch_id = ?", [batch_id]
    ).fetchall()
    shortfalls = chunks = 0
    try:
        for part, first in enumerate(range(1, last_line + 1, customer_chunk)):
            params = {"batch_id": batch_id, "first": first, "last": first + customer_chunk - 1}
            conn.execute(_CHUNK_CUSTOMERS_SQL, params)
            conn.execute(_CHUNK_BOUGHT_SQL, params)
            conn.execute(
                "CREATE OR REPLACE TEMP TABLE chunk_recommendations AS "
                + _CHUNK_RECOMMENDATIONS_SQL.format(
                    customers="chunk_customers", candidates="candidates"
                ),
                {"top_n": top_n},
            )
            if depth < available:
                _deepen(conn, scoring, model, dimensions, top_n=top_n,
                        segment_weight=segment_weight, depth=available)  # fmt: skip
            shortfalls += _stage_chunk(conn, staging, part, batch_id, top_n)
            chunks += 1
    finally:
        conn.unregister("candidates")
        for table in _CHUNK_TABLES:
            conn.execute(f"DROP TABLE IF EXISTS {table}")
    return ScoredBatch(chunks, profiles, shortfalls)


def _deepen(
    conn: duckdb.DuckDBPyConnection,
    scoring: BatchScoring,
    model: str,
    dimensions: int,
    *,
    top_n: int,
    segment_weight: float,
    depth: int,
) -> None:
    """The chunk's customers who got fewer than top_n from their profile's candidates (they
    bought most of them): their profiles scored again at `depth`, their rows made again."""
    conn.execute(
        f"CREATE OR REPLACE TEMP TABLE chunk_short AS {_CHUNK_SHORT_SQL}", {"top_n": top_n}
    )
    [(short,)] = conn.execute("SELECT count(*) FROM chunk_short").fetchall()
    if short == 0:
        return
    try:
        profiles = with_vectors(
            conn,
            "SELECT DISTINCT s.text_hash, c.segment_id FROM chunk_short AS s"
            " JOIN chunk_customers AS c USING (customer_id)",
            model,
            dimensions,
        ).to_arrow_table()
        conn.register(
            "deep_candidates",
            _candidates(profiles, scoring, dimensions, depth=depth, segment_weight=segment_weight),
        )
        conn.execute(
            "DELETE FROM chunk_recommendations WHERE customer_id IN"
            " (SELECT customer_id FROM chunk_short)"
        )
        conn.execute(
            "INSERT INTO chunk_recommendations BY NAME "
            + _CHUNK_RECOMMENDATIONS_SQL.format(
                customers="(SELECT * FROM chunk_customers SEMI JOIN chunk_short"
                " USING (customer_id))",
                candidates="deep_candidates",
            ),
            {"top_n": top_n},
        )
    finally:
        conn.unregister("deep_candidates")


_CHUNK_TABLES = ("chunk_customers", "chunk_bought", "chunk_recommendations", "chunk_short")
SHORT_OF_PRODUCTS = "fewer products in stock, of value and not bought than top_n"


def _stage_chunk(
    conn: duckdb.DuckDBPyConnection,
    staging: dict[str, Path],
    part: int,
    batch_id: str,
    top_n: int,
) -> int:
    """The chunk's recommendations, and its customers still short of top_n (the catalog holds
    no more products they could be offered), as Parquet parts; returns how many are short."""
    conn.execute(
        f"CREATE OR REPLACE TEMP TABLE chunk_short AS {_CHUNK_SHORT_SQL}", {"top_n": top_n}
    )
    name = f"part-{part:06d}.parquet"
    conn.execute(
        f"COPY chunk_recommendations TO '{_quote(staging['recommendations'] / name)}'"
        " (FORMAT parquet)"
    )
    [(short,)] = conn.execute("SELECT count(*) FROM chunk_short").fetchall()
    if short:
        conn.execute(
            "COPY (SELECT $batch_id AS batch_id, customer_id, got::INTEGER AS candidates,"
            f" $reason AS reason FROM chunk_short) TO"
            f" '{_quote(staging['recommendation_shortfalls'] / name)}' (FORMAT parquet)",
            {"batch_id": batch_id, "reason": SHORT_OF_PRODUCTS},
        )
    return short


def _quote(path: Path) -> str:
    return str(path).replace("'", "''")


@dataclass(frozen=True)
class ConfidenceSummary:
    rows: int
    customers: int
    histogram: list[int]  # recommendations per confidence bin [0, 0.1), ..., [0.9, 1]
    mean: float
    quantiles: dict[str, float]  # p05, p25, p50, p75, p95


def confidence_summary(conn: duckdb.DuckDBPyConnection, batch_id: str) -> ConfidenceSummary:
    """How many recommendations the batch has, for how many customers, and how confident."""
    # every customer with a recommendation has one of rank 1: no distinct count over the batch
    [(rows, customers)] = conn.execute(
        "SELECT count(*), count(*) FILTER (WHERE rank = 1) FROM recommendations WHERE batch_id = ?",
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
    """`source` rows of lines $first..$last with `failed_rules`: every business rule each
    recommendation breaks. A batch is judged in line ranges, so memory does not grow with it.

    Parameters: $batch_id, $first, $last, $min_confidence, $max_predicted_value. `source` is a
    table name from the code, never from data.
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
    LEFT JOIN {PRODUCTS} AS c USING (product_id)
    LEFT JOIN ({BOUGHT_SQL}) AS bought
        ON bought.customer_id = r.customer_id AND bought.product_id = r.product_id
    WHERE r.batch_id = $batch_id AND r.line_no BETWEEN $first AND $last
    """


# What the customers of lines $first..$last bought, in this batch's records or before it
# (prior_purchases).
BOUGHT_SQL = """
SELECT DISTINCT customer_id, product_id FROM (
    SELECT customer_id, product_id FROM customer_purchases
    WHERE batch_id = $batch_id AND line_no BETWEEN $first AND $last
    UNION ALL
    SELECT customer_id, product_id FROM prior_purchases
    WHERE batch_id = $batch_id AND line_no BETWEEN $first AND $last)
"""


def line_ranges(conn, table: str, batch_id: str, lines: int) -> list[tuple[int, int]]:
    """The batch's lines in `table` as ranges of `lines` lines (a table name from the code)."""
    [(last,)] = conn.execute(
        f"SELECT coalesce(max(line_no), 0) FROM {table} WHERE batch_id = ?", [batch_id]
    ).fetchall()
    return [(first, first + lines - 1) for first in range(1, last + 1, lines)]


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


def stage_business_rules(
    conn,
    batch_id: str,
    staging: dict[str, Path],
    *,
    min_confidence: float,
    max_predicted_value: float,
    chunk_lines: int,
) -> None:
    """The batch's recommendations split by the rules into staged Parquet parts of
    rejected_recommendations (with every rule broken) and validated_recommendations (the
    rest), a line range at a time (see Warehouse.staged_batch, which swaps them in). The rules
    run once per range, in DuckDB; no row passes through Python."""
    for part, (first, last) in enumerate(
        line_ranges(conn, "recommendations", batch_id, chunk_lines)
    ):
        params = {
            "batch_id": batch_id, "first": first, "last": last,
            "min_confidence": min_confidence, "max_predicted_value": max_predicted_value,
        }  # fmt: skip
        conn.execute(
            f"CREATE OR REPLACE TEMP TABLE chunk_ruled AS {rules_sql('recommendations')}", params
        )
        name = f"part-{part:06d}.parquet"
        conn.execute(
            f"COPY (SELECT {_COLUMNS} FROM chunk_ruled WHERE len(failed_rules) = 0)"
            f" TO '{_quote(staging['validated_recommendations'] / name)}' (FORMAT parquet)"
        )
        conn.execute(
            f"COPY (SELECT {_COLUMNS}, failed_rules[1] AS rejected_rule, failed_rules"
            " FROM chunk_ruled WHERE len(failed_rules) > 0)"
            f" TO '{_quote(staging['rejected_recommendations'] / name)}' (FORMAT parquet)"
        )
    conn.execute("DROP TABLE IF EXISTS chunk_ruled")


def rule_outcome(conn, batch_id: str) -> RuleOutcome:
    """The batch's split by the rules, as stored."""
    [(kept, rejected)] = conn.execute(
        "SELECT (SELECT count(*) FROM validated_recommendations WHERE batch_id = $b),"
        " (SELECT count(*) FROM rejected_recommendations WHERE batch_id = $b)",
        {"b": batch_id},
    ).fetchall()
    by_rule = rejected_by_rule(conn, batch_id)
    suspicious = [
        (str(customer), product, value)
        for customer, product, value in conn.execute(
            "SELECT customer_id, product_id, predicted_value FROM rejected_recommendations"
            " WHERE batch_id = ? AND list_contains(failed_rules, 'implausible_value')"
            " ORDER BY customer_id, rank LIMIT 5",
            [batch_id],
        ).fetchall()
    ]
    return RuleOutcome(kept, rejected, {rule: by_rule.get(rule, 0) for rule in RULES}, suspicious)
