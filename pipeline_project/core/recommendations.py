"""Recommendations: score every product for each customer, then apply the business rules.

A customer's score of a product blends three parts, each rescaled to 0..1 by the customer's
best product among those they may be offered (its maximum over them is 1):

- segment_affinity: how much the customer's segments buy it. Membership is soft: the softmax,
  at `temperature`, of the cosine between the customer's profile vector and each segment's
  centroid; a segment's share of a product is its customers who bought it, each weighted by
  how recently (segment_affinity.share, learned with the segment model version);
- co_purchase: what people who buy what the customer bought also buy (core/co_purchase): the
  sum over their purchases of the product's co-purchase similarity, weighted by how recently
  they bought each;
- similarity_score: the cosine between the customer's profile vector and the product's text
  vector (not below 0).

confidence = (w_segment * segment_affinity + w_co_purchase * co_purchase + w_similarity *
similarity_score) / (the sum of the weights); predicted_value = confidence * the customer's
segment's average amount for the product (its price if the segment never bought it). Every part
is stored with the recommendation. Measured on real grocery purchases (benchmarks/
recommendation_quality.py) and chosen there: the segment part carries most, co-purchase and
similarity a quarter each.

What the rules know before scoring is applied before ranking: only products in stock, of a value
above 0 and not bought by the customer (in the batch's record or an earlier batch) are ranked,
so a customer gets top_n products whenever that many clear those rules. The confidence and
value rules judge the ranked rows afterwards, and guard what is published.

Customers are scored a chunk at a time against every product (chunk x products arrays): memory
is bounded by the chunk and the catalog, never by the batch.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

from pipeline_project.core.arrow_results import arrow_table
from pipeline_project.core.catalog import PRODUCTS
from pipeline_project.core.co_purchase import Tastes, load_tastes, neighbour_matrix
from pipeline_project.core.embedding_cache import with_vectors
from pipeline_project.core.staging import write_staged
from pipeline_project.core.vectors import list_column_to_matrix

RULES = ("out_of_stock", "low_confidence", "already_purchased", "implausible_value")
# Cells (customers x products) scored at once: about 5 arrays of this many floats.
SCORE_CELLS = 4_000_000


@dataclass(frozen=True)
class Weights:
    """How the parts of a score are blended, and how soft membership is. The defaults were
    measured (benchmarks/recommendation_quality.py, README "Segments and recommendations"):
    on real grocery purchases and on generated batches alike, what customers buy (taste,
    co-purchase) carries the score; the profile text's segments and similarity lowered the hit
    rate on both, and stay as parts a team can weigh in."""

    segment: float = 0.0
    co_purchase: float = 0.25
    similarity: float = 0.0
    temperature: float = 0.1  # of segment and taste membership (cosines standardised)
    recency_days: float = 30.0  # a purchase this many days before the last weighs 1/e
    taste: float = 1.0


@dataclass(frozen=True)
class ScoringInputs:
    """What a segment model version and the catalog give every customer's score."""

    product_ids: list[str]
    product_vectors: np.ndarray  # (products, dims), unit length
    centroids: np.ndarray  # (segments, dims), unit length
    share: np.ndarray  # (segments, products): recency-weighted share of customers who bought
    expected_value: np.ndarray  # (segments, products)
    neighbours: sp.csr_matrix  # (products, products): co-purchase similarity, sparse
    tastes: Tastes  # what customers buy: purchase vectors, taste clusters and their shares
    popularity: np.ndarray  # (products,): purchases by the model's customers
    segment_customers: np.ndarray  # (segments,): customers the shares are over

    @property
    def segments(self) -> int:
        return len(self.centroids)


@dataclass(frozen=True)
class Customers:
    """A chunk of customers as the scorer sees them."""

    profile_vectors: np.ndarray  # (profiles, dims) unit length
    profile_of: np.ndarray  # (customers,) row of profile_vectors
    segment_of: np.ndarray  # (customers,) their (nearest) segment
    recency: sp.csr_matrix  # (customers, products): how recently bought (0: never)

    def __len__(self) -> int:
        return len(self.profile_of)


def segment_tables(
    n_segments: int,
    product_ids: list[str],
    prices: np.ndarray,
    purchases: pa.Table,  # segment_id, product_id, purchases, avg_amount, share, customers
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each segment's share of each product, expected value and purchases; its customers."""
    index = pa.array(product_ids, pa.string())
    at = pc.index_in(purchases["product_id"], value_set=index).fill_null(-1).to_numpy()
    seg = purchases["segment_id"].to_numpy(zero_copy_only=False)
    known = (at >= 0) & (seg >= 0) & (seg < n_segments)
    share = np.zeros((n_segments, len(product_ids)))
    counts = np.zeros((n_segments, len(product_ids)))
    value = np.tile(np.asarray(prices, dtype=float), (n_segments, 1))
    share[seg[known], at[known]] = purchases["share"].to_numpy(zero_copy_only=False)[known]
    counts[seg[known], at[known]] = purchases["purchases"].to_numpy(zero_copy_only=False)[known]
    value[seg[known], at[known]] = purchases["avg_amount"].to_numpy(zero_copy_only=False)[known]
    sizes = np.zeros(n_segments)
    in_range = (seg >= 0) & (seg < n_segments)
    sizes[seg[in_range]] = purchases["customers"].to_numpy(zero_copy_only=False)[in_range]
    return share, value, counts, sizes


def _unit(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def _rescaled(part: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Each row rescaled to 0..1 over the allowed products (min-max): every product but the
    least similar scores above 0, so a product nothing else speaks for still ranks."""
    low = np.where(allowed, part, np.inf).min(axis=1, keepdims=True)
    high = np.where(allowed, part, -np.inf).max(axis=1, keepdims=True)
    span = high - low
    ok = np.isfinite(span) & (span > 0)
    return np.clip(
        np.divide(part - low, span, out=np.zeros_like(part), where=ok), 0.0, None
    ).astype(part.dtype)


def _scaled(part: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Each row divided by its maximum over the allowed products (0 where none is above 0)."""
    top = np.where(allowed, part, 0.0).max(axis=1, keepdims=True)
    return np.divide(part, top, out=np.zeros_like(part), where=top > 0)


def soft_membership(cosine: np.ndarray, temperature: float) -> np.ndarray:
    """Each profile's membership of each segment: the softmax of its cosines to the centroids,
    standardised per profile (a text model's vectors all lie close together, another's far
    apart: the same temperature means the same softness for both), at `temperature`."""
    spread = cosine.std(axis=1, keepdims=True)
    z = np.divide(
        cosine - cosine.mean(axis=1, keepdims=True), spread,
        out=np.zeros_like(cosine), where=spread > 0,
    )  # fmt: skip
    logits = z / temperature
    membership = np.exp(logits - logits.max(axis=1, keepdims=True))
    return membership / membership.sum(axis=1, keepdims=True)


# Within the taste part, the purchase vectors' cosine counts this much beside the tastes' shares.
TASTE_COSINE = 0.25


def _taste(customers: Customers, tastes: Tastes, may: np.ndarray, weights: Weights) -> np.ndarray:
    """What the customer's tastes buy (their soft membership over the tastes' shares) and how
    close the product's purchase vector is to the customer's, each rescaled by the customer's
    best product, blended 1 : TASTE_COSINE (0..1)."""
    bought_once = customers.recency.copy()
    bought_once.data[:] = 1.0
    vectors = tastes.customer_vectors(bought_once)
    membership = soft_membership(vectors @ tastes.centroids.T, weights.temperature)
    share = _scaled((membership @ tastes.share).astype(np.float32), may)
    cosine = _scaled(np.maximum(vectors @ tastes.factors.T, 0.0).astype(np.float32), may)
    return (share + TASTE_COSINE * cosine) / (1.0 + TASTE_COSINE)


def score_customers(
    customers: Customers,
    inputs: ScoringInputs,
    allowed: np.ndarray,
    weights: Weights,
    *,
    top_n: int,
    exclude_bought: bool = True,
) -> dict[str, np.ndarray]:
    """Each customer's top_n products among the `allowed` ones (a mask over the products; and
    not bought, with `exclude_bought`), with every part of their score; arrays of one row per
    recommendation (`customer`: the customer's row), and `available`: per customer, how many
    products they could be offered."""
    n = len(customers)
    may = np.broadcast_to(allowed, (n, len(allowed))).copy()
    if exclude_bought:
        bought = customers.recency.tocoo()
        may[bought.row, bought.col] = False
    profiles = customers.profile_vectors
    membership = soft_membership(profiles @ inputs.centroids.T, weights.temperature)
    segment = _scaled((membership @ inputs.share)[customers.profile_of].astype(np.float32), may)
    cosine = (profiles @ inputs.product_vectors.T)[customers.profile_of].astype(np.float32)
    similarity = _rescaled(cosine, may)
    co_purchase = _scaled(
        np.asarray((customers.recency @ inputs.neighbours).todense(), dtype=np.float32), may
    )
    taste = _taste(customers, inputs.tastes, may, weights)
    total = weights.segment + weights.taste + weights.co_purchase + weights.similarity
    confidence = (
        weights.segment * segment + weights.taste * taste + weights.co_purchase * co_purchase
        + weights.similarity * similarity
    ) / total  # fmt: skip
    available = may.sum(axis=1)
    k = int(min(top_n, len(allowed)))
    ranking = np.where(may, confidence, -np.inf)
    if k == 0 or n == 0:
        top = np.zeros((n, 0), dtype=np.int64)
    else:
        part = np.argpartition(-ranking, k - 1, axis=1)[:, :k]
        # best first; equal scores in catalog order: the same rows whatever the chunking
        order = np.lexsort((part, -np.take_along_axis(ranking, part, axis=1)), axis=1)
        top = np.take_along_axis(part, order, axis=1)
    rank = np.tile(np.arange(1, k + 1, dtype=np.int32), (n, 1))
    keep = rank <= available[:, None]
    rows = np.repeat(np.arange(n), k).reshape(n, k)[keep]
    cols = top[keep]
    return {
        "customer": rows,
        "rank": rank[keep],
        "product": cols,
        "confidence": confidence[rows, cols].astype(np.float64),
        "predicted_value": (
            confidence[rows, cols] * inputs.expected_value[customers.segment_of[rows], cols]
        ).astype(np.float64),
        "segment_affinity": segment[rows, cols].astype(np.float64),
        "taste": taste[rows, cols].astype(np.float64),
        "co_purchase": co_purchase[rows, cols].astype(np.float64),
        "similarity": cosine[rows, cols].astype(np.float64),
        "similarity_score": similarity[rows, cols].astype(np.float64),
        "available": available,
    }


def chunk_size(products: int) -> int:
    """Customers scored at once against `products` products."""
    return max(16, min(50_000, SCORE_CELLS // max(products, 1)))


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
SELECT segment_id, product_id, purchases, avg_amount, share, customers FROM segment_affinity
WHERE model_version = $version
"""

_CENTROIDS_SQL = """
SELECT centroid FROM segment_model WHERE model_version = $version AND embedding_model = $model
ORDER BY segment_id
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
    """The batch's segment model version and what scoring needs (the product vectors, each
    segment's centroid, share and expected value, the co-purchases, as the model version
    learned them); None without segmented customers or products."""
    versions = conn.execute(
        "SELECT DISTINCT model_version FROM customer_segments WHERE batch_id = ?", [batch_id]
    ).fetchall()
    products = with_vectors(conn, _PRODUCTS_SQL, model, dimensions, order_by="product_id")
    if not versions or products.num_rows == 0:
        return None
    [(version,)] = versions
    return _batch_scoring(conn, version, model, dimensions, products)


def _batch_scoring(
    conn: duckdb.DuckDBPyConnection, version: int, model: str, dimensions: int, products: pa.Table
) -> BatchScoring:
    centroids = list_column_to_matrix(
        arrow_table(conn, _CENTROIDS_SQL, {"version": version, "model": model}),
        "centroid",
        dimensions,
    )
    product_ids = products["product_id"].to_pylist()
    share, expected_value, counts, sizes = segment_tables(
        len(centroids), product_ids, products["price"].to_numpy(),
        arrow_table(conn, _AFFINITY_SQL, {"version": version}),
    )  # fmt: skip
    inputs = ScoringInputs(
        product_ids,
        _unit(list_column_to_matrix(products, "embedding", dimensions)),
        _unit(centroids),
        share,
        expected_value,
        neighbour_matrix(conn, version, {p: i for i, p in enumerate(product_ids)}),
        load_tastes(conn, version, product_ids),
        counts.sum(axis=0),
        sizes,
    )
    # a product of no value to any segment (free, or never sold above 0) is never plausible
    allowed = products["in_stock"].to_numpy(zero_copy_only=False) & (expected_value.max(axis=0) > 0)
    return BatchScoring(version, inputs, allowed)


# The customers of lines $first..$last with their segment and profile.
_CHUNK_CUSTOMERS_SQL = """
SELECT line_no, customer_id::VARCHAR AS customer_id, text_hash, segment_id FROM customer_segments
WHERE batch_id = $batch_id AND line_no BETWEEN $first AND $last
ORDER BY line_no
"""

# What those customers bought (in this batch's records or before: prior_purchases): each
# product once, with the days between its last purchase and the customer's last purchase.
_CHUNK_BOUGHT_SQL = """
WITH bought AS (
    SELECT line_no, product_id, purchased_at FROM customer_purchases
    WHERE batch_id = $batch_id AND line_no BETWEEN $first AND $last
    UNION ALL
    SELECT line_no, product_id, purchased_at FROM prior_purchases
    WHERE batch_id = $batch_id AND line_no BETWEEN $first AND $last
), last AS (
    SELECT line_no, product_id, max(purchased_at) AS last_at FROM bought GROUP BY ALL
)
SELECT line_no, product_id,
       date_diff('second', last_at, max(last_at) OVER (PARTITION BY line_no)) / 86400.0 AS days
FROM last
"""


@dataclass(frozen=True)
class ProfileVectors:
    """The unit vectors of some profiles, by text_hash."""

    hashes: pa.Array
    vectors: np.ndarray

    @classmethod
    def read(
        cls, conn: duckdb.DuckDBPyConnection, hashes: pa.Array, model: str, dimensions: int
    ) -> ProfileVectors:
        """The vectors of `hashes` from the embedding cache."""
        conn.register("wanted_profiles", pa.table({"text_hash": pc.unique(hashes)}))
        try:
            table = with_vectors(conn, "SELECT text_hash FROM wanted_profiles", model, dimensions)
        finally:
            conn.unregister("wanted_profiles")
        return cls(
            table["text_hash"].combine_chunks(),
            _unit(list_column_to_matrix(table, "embedding", dimensions)),
        )


def load_customers(
    conn: duckdb.DuckDBPyConnection,
    customers: pa.Table,  # line_no, text_hash, segment_id (the chunk's, by line)
    bought: pa.Table,  # line_no, product_id, days
    inputs: ScoringInputs,
    weights: Weights,
    model: str,
    dimensions: int,
    profiles: ProfileVectors | None = None,
) -> Customers:
    """The chunk as the scorer sees it: the vectors of its distinct profiles (from `profiles`,
    read for many chunks at once, or from the embedding cache) and how recently each customer
    bought each product."""
    profiles = profiles or ProfileVectors.read(conn, customers["text_hash"], model, dimensions)
    at = pc.index_in(customers["text_hash"], value_set=profiles.hashes)
    if at.null_count:
        raise ValueError("a segmented customer's profile has no vector in the embedding cache")
    used, profile_of = np.unique(at.to_numpy(), return_inverse=True)
    row = pc.index_in(bought["line_no"], value_set=customers["line_no"]).fill_null(-1).to_numpy()
    index = pa.array(inputs.product_ids, pa.string())
    col = pc.index_in(bought["product_id"], value_set=index).fill_null(-1).to_numpy()
    known = (row >= 0) & (col >= 0)
    days = bought["days"].to_numpy(zero_copy_only=False)[known]
    recency = sp.csr_matrix(
        (np.exp(-days / weights.recency_days).astype(np.float32), (row[known], col[known])),
        shape=(customers.num_rows, len(inputs.product_ids)),
    )
    return Customers(
        profiles.vectors[used],
        profile_of,
        customers["segment_id"].to_numpy(zero_copy_only=False),
        recency,
    )


@dataclass(frozen=True)
class ScoredBatch:
    chunks: int
    customers: int
    shortfalls: int  # customers with fewer than top_n products in stock and not bought


SHORT_OF_PRODUCTS = "fewer products in stock, of value and not bought than top_n"

_RECOMMENDATION_SCHEMA = pa.schema(
    [
        ("batch_id", pa.string()),
        ("line_no", pa.int64()),
        ("customer_id", pa.string()),  # the warehouse casts it to UUID on load
        ("rank", pa.int32()),
        ("product_id", pa.string()),
        ("segment_id", pa.int32()),
        ("confidence", pa.float64()),
        ("predicted_value", pa.float64()),
        ("segment_affinity", pa.float64()),
        ("similarity", pa.float64()),
        ("similarity_score", pa.float64()),
        ("model_version", pa.int32()),
        ("co_purchase", pa.float64()),
        ("taste", pa.float64()),
    ]
)


def score_batch(
    conn: duckdb.DuckDBPyConnection,
    batch_id: str,
    model: str,
    dimensions: int,
    scoring: BatchScoring,
    staging: dict[str, Path],
    *,
    top_n: int,
    weights: Weights,
    customer_chunk: int = 200_000,
    on_chunk=None,
) -> ScoredBatch:
    """Every segmented customer's top_n products among those in stock, of value and not bought
    (in this batch or before), staged as Parquet parts of recommendations (and
    recommendation_shortfalls for customers with fewer than top_n such products). Customers are
    read `customer_chunk` lines at a time and scored chunk_size() at a time."""
    [(last_line,)] = conn.execute(
        "SELECT coalesce(max(line_no), 0) FROM customer_segments WHERE batch_id = ?", [batch_id]
    ).fetchall()
    inputs, batch = scoring.inputs, pa.scalar(batch_id)
    step = chunk_size(len(inputs.product_ids))
    shortfalls = chunks = scored = 0
    for first in range(1, last_line + 1, customer_chunk):
        params = {"batch_id": batch_id, "first": first, "last": first + customer_chunk - 1}
        lines = arrow_table(conn, _CHUNK_CUSTOMERS_SQL, params)
        bought_all = arrow_table(conn, _CHUNK_BOUGHT_SQL, params)
        profiles = ProfileVectors.read(conn, lines["text_hash"], model, dimensions)
        for start in range(0, lines.num_rows, step):
            part = lines.slice(start, step)
            mine = pc.is_in(bought_all["line_no"], value_set=part["line_no"])
            customers = load_customers(conn, part, bought_all.filter(mine), inputs, weights,
                                       model, dimensions, profiles)  # fmt: skip
            result = score_customers(customers, inputs, scoring.allowed, weights, top_n=top_n)
            rows = result["customer"]
            table = pa.table(
                {
                    "batch_id": pa.repeat(batch, len(rows)),
                    "line_no": part["line_no"].take(rows),
                    "customer_id": part["customer_id"].take(rows),
                    "rank": result["rank"],
                    "product_id": pa.array(inputs.product_ids, pa.string()).take(
                        pa.array(result["product"])
                    ),
                    "segment_id": pa.array(customers.segment_of[rows], pa.int32()),
                    "confidence": result["confidence"],
                    "predicted_value": result["predicted_value"],
                    "segment_affinity": result["segment_affinity"],
                    "similarity": result["similarity"],
                    "similarity_score": result["similarity_score"],
                    "model_version": pa.repeat(pa.scalar(scoring.version, pa.int32()), len(rows)),
                    "co_purchase": result["co_purchase"],
                    "taste": result["taste"],
                }
            )
            write_staged(staging["recommendations"], chunks, table.cast(_RECOMMENDATION_SCHEMA))
            short = np.flatnonzero(result["available"] < top_n)
            if len(short):
                write_staged(
                    staging["recommendation_shortfalls"], chunks,
                    pa.table({
                        "batch_id": pa.repeat(batch, len(short)),
                        "customer_id": part["customer_id"].take(short),
                        "candidates": pa.array(result["available"][short], pa.int32()),
                        "reason": pa.repeat(pa.scalar(SHORT_OF_PRODUCTS), len(short)),
                    }),
                )  # fmt: skip
            shortfalls += len(short)
            chunks += 1
            scored += part.num_rows
            if on_chunk is not None:
                on_chunk(scored, last_line)
    return ScoredBatch(chunks, scored, shortfalls)


@dataclass(frozen=True)
class ListSpread:
    """How many different top-N lists a sample of the batch's customers get from the model
    (ranked over the products in stock, before their own purchases are taken out: a scorer
    that ignores the customer gives everybody the same list)."""

    customers: int
    lists: int
    most_common_list_customers: int
    products: int  # distinct products in the lists


_SPREAD_SAMPLE_SQL = """
SELECT line_no, customer_id, text_hash, segment_id FROM customer_segments
WHERE batch_id = $batch_id ORDER BY hash(line_no), line_no LIMIT $sample
"""


def list_spread(
    conn: duckdb.DuckDBPyConnection,
    batch_id: str,
    model: str,
    dimensions: int,
    scoring: BatchScoring,
    weights: Weights,
    *,
    top_n: int,
    sample: int = 2_000,
) -> ListSpread:
    """The top-N lists of a seeded sample of the batch's customers, counted."""
    lines = arrow_table(conn, _SPREAD_SAMPLE_SQL, {"batch_id": batch_id, "sample": sample}).sort_by(
        "line_no"
    )
    counts: Counter = Counter()
    products: set[int] = set()
    step = chunk_size(len(scoring.inputs.product_ids))
    for start in range(0, lines.num_rows, step):
        part = lines.slice(start, step)
        conn.register("spread_lines", part.select(["line_no"]))
        try:
            bought = arrow_table(
                conn,
                _CHUNK_BOUGHT_SQL.replace(
                    "line_no BETWEEN $first AND $last",
                    "line_no IN (SELECT line_no FROM spread_lines)",
                ),
                {"batch_id": batch_id},
            )
        finally:
            conn.unregister("spread_lines")
        customers = load_customers(conn, part, bought, scoring.inputs, weights, model, dimensions)
        result = score_customers(customers, scoring.inputs, scoring.allowed, weights,
                                 top_n=top_n, exclude_bought=False)  # fmt: skip
        lists: dict[int, list[int]] = {}
        for row, product in zip(result["customer"], result["product"], strict=True):
            lists.setdefault(int(row), []).append(int(product))
        counts.update(tuple(v) for v in lists.values())
        products.update(result["product"].tolist())
    return ListSpread(
        customers=sum(counts.values()),
        lists=len(counts),
        most_common_list_customers=max(counts.values(), default=0),
        products=len(products),
    )


def with_share(inputs: ScoringInputs, share: np.ndarray, popularity: np.ndarray) -> ScoringInputs:
    return replace(inputs, share=share, popularity=popularity)


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
    " predicted_value, segment_affinity, similarity, similarity_score, model_version,"
    " co_purchase, taste"
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
