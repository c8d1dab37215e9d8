"""Are the recommendations any good? Leave the last purchase out and see if it comes back.

For a bounded sample of the batch's customers with two or more purchases, the last purchase is
held out and the customer is profiled from the rest of the history (the same profile text as
customer_embeddings makes), assigned to the nearest segment of the batch's segment model and
scored with the same code as recommendations (score_profiles). A hit is the held-out product
among the top N products the customer has not bought (in the rest of the history) and that are
in stock: what the business rules would let through. The popularity baseline ranks the most
bought products of the same segment model's customers, with the same exclusions, for the same
customers. The held-out purchases are left out of the segments' affinity and of popularity
alike: neither may know the answer.

Held-out profiles are looked up in the embedding cache, never sent to the model: a profile
differs from the customers' only by one purchase, so it is almost always a text already
embedded. Customers whose held-out profile is not in the cache are counted, not judged.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import duckdb
import numpy as np

from pipeline_project.core.catalog import PRODUCTS
from pipeline_project.core.embedding_cache import with_vectors
from pipeline_project.core.profiles import AS_OF_SQL, profiles_sql
from pipeline_project.core.recommendations import ScoringInputs, score_profiles, segment_tables
from pipeline_project.core.segmentation import assign_segments
from pipeline_project.core.vectors import list_column_to_matrix

# The sampled customers: $sample of the batch's customers with 2+ purchases, in an order that
# depends on the line only (the same customers on every run of the batch).
_SAMPLE_SQL = """
SELECT line_no, customer_id FROM customers
WHERE batch_id = $batch_id AND purchase_count >= 2
ORDER BY hash(line_no), line_no LIMIT $sample
"""
# The queries below read the sample from a temporary table (computed once per evaluation).
_SAMPLED = "SELECT line_no, customer_id FROM quality_sample"

# Each sampled customer's purchases, the last one (latest, then highest purchase_idx) flagged.
_HISTORY_SQL = f"""
SELECT p.line_no, p.customer_id, p.purchase_idx, p.product_id, p.amount, p.purchased_at,
       row_number() OVER (PARTITION BY p.customer_id
                          ORDER BY p.purchased_at DESC, p.purchase_idx DESC) = 1 AS held_out
FROM customer_purchases AS p SEMI JOIN ({_SAMPLED}) AS s USING (customer_id)
WHERE p.batch_id = $batch_id
"""

_HELD_OUT_PROFILES_SQL = profiles_sql(
    _SAMPLED,
    f"SELECT line_no, product_id, amount, purchased_at, 1 AS quantity FROM ({_HISTORY_SQL})"
    " WHERE NOT held_out",
)

# Per sampled customer: the held-out product, the rest of the history and the held-out profile.
_EVALUATION_SQL = f"""
SELECT h.line_no, any_value(h.product_id) FILTER (WHERE h.held_out) AS held_out_product,
       list(DISTINCT h.product_id) FILTER (WHERE NOT h.held_out) AS bought,
       any_value(pr.text_hash) AS text_hash
FROM ({_HISTORY_SQL}) AS h JOIN ({_HELD_OUT_PROFILES_SQL}) AS pr USING (line_no)
GROUP BY h.line_no
"""

# Purchases per segment and product as model $version learned them, the sampled customers'
# held-out purchases taken out: neither the segments' affinity nor popularity may know them.
_SEGMENT_PURCHASES_SQL = f"""
SELECT a.segment_id, a.product_id, greatest(a.purchases - coalesce(h.n, 0), 0) AS purchases,
       a.avg_amount
FROM segment_affinity AS a
LEFT JOIN (
    SELECT s.segment_id, h.product_id, count(*) AS n
    FROM ({_HISTORY_SQL}) AS h
    JOIN customer_segments AS s ON s.batch_id = $batch_id AND s.customer_id = h.customer_id
    WHERE h.held_out GROUP BY ALL
) AS h USING (segment_id, product_id)
WHERE a.model_version = $version
"""

_CENTROIDS_SQL = """
SELECT centroid FROM segment_model WHERE model_version = $version AND embedding_model = $model
ORDER BY segment_id
"""

_IN_STOCK_SQL = f"SELECT product_id FROM {PRODUCTS} AS cat WHERE coalesce(in_stock, false)"

_CHUNK = 256  # customers scored at once against every product


@dataclass(frozen=True)
class HoldoutQuality:
    sampled: int  # customers with 2+ purchases in the sample
    evaluated: int  # of them, with their held-out profile in the cache
    top_n: int
    model_hits: int
    popularity_hits: int
    model_only: int = 0  # customers the model hit and popularity missed
    popularity_only: int = 0  # and the other way round

    def rates(self) -> dict[str, float]:
        """hit_rate and popularity_hit_rate, rounded; none without evaluated customers."""
        rates = {"hit_rate": self.model_hit_rate, "popularity_hit_rate": self.popularity_hit_rate}
        return {name: round(rate, 4) for name, rate in rates.items() if rate is not None}

    @property
    def lead_z(self) -> float:
        """The model's lead over popularity in standard errors, paired per customer (McNemar):
        (model only - popularity only) / sqrt(their sum); 0 when they never disagree."""
        disagree = self.model_only + self.popularity_only
        return (self.model_only - self.popularity_only) / math.sqrt(disagree) if disagree else 0.0

    @property
    def model_hit_rate(self) -> float | None:
        return self.model_hits / self.evaluated if self.evaluated else None

    @property
    def popularity_hit_rate(self) -> float | None:
        return self.popularity_hits / self.evaluated if self.evaluated else None


@contextmanager
def _dropped_after(conn: duckdb.DuckDBPyConnection, *tables: str) -> Iterator[None]:
    """The temporary tables (named in the code) are dropped when the block ends."""
    try:
        yield
    finally:
        for table in tables:
            conn.execute(f"DROP TABLE IF EXISTS {table}")


def holdout_quality(
    conn: duckdb.DuckDBPyConnection,
    batch_id: str,
    model: str,
    dimensions: int,
    version: int,
    inputs: ScoringInputs,
    *,
    sample: int,
    top_n: int,
    segment_weight: float,
) -> HoldoutQuality:
    """Hit rate at `top_n` of the model and of popularity on the batch's held-out purchases."""
    [(as_of,)] = conn.execute(AS_OF_SQL, {"batch_id": batch_id}).fetchall()
    with _dropped_after(conn, "quality_sample", "quality_evaluation"):
        conn.execute(
            f"CREATE OR REPLACE TEMP TABLE quality_sample AS {_SAMPLE_SQL}",
            {"batch_id": batch_id, "sample": sample},
        )
        [(sampled,)] = conn.execute("SELECT count(*) FROM quality_sample").fetchall()
        params = {"batch_id": batch_id, "as_of": as_of}
        centroids = list_column_to_matrix(
            conn.sql(_CENTROIDS_SQL, params={"version": version, "model": model}).to_arrow_table(),
            "centroid",
            dimensions,
        )
        index = {p: i for i, p in enumerate(inputs.product_ids)}
        purchases = conn.sql(
            _SEGMENT_PURCHASES_SQL, params={"batch_id": batch_id, "version": version}
        ).to_arrow_table()
        n_segments = len(inputs.affinity)
        affinity, _ = segment_tables(
            n_segments, inputs.product_ids, np.zeros(len(index)), purchases
        )
        inputs = replace(inputs, affinity=affinity)
        counts = np.zeros(len(index))
        for product, n in zip(
            purchases["product_id"].to_pylist(), purchases["purchases"].to_pylist(), strict=True
        ):
            if product in index:
                counts[index[product]] += n
        popular = np.lexsort((np.arange(len(index)), -counts))  # most bought, then catalog order
        in_stock = {p for (p,) in conn.execute(_IN_STOCK_SQL).fetchall()}
        out_of_stock = np.array([p not in in_stock for p in index])
        model_hits = popularity_hits = model_only = popularity_only = evaluated = 0
        # a chunk at a time, streamed (the last query on the connection): every product's score
        # for each customer of the chunk; the sample's vectors are never held whole
        # the evaluation rows first (small: no vectors), then their vectors streamed, unordered
        # (the figures are sums): no sort of wide rows, memory bounded by the chunk
        conn.execute(
            f"CREATE OR REPLACE TEMP TABLE quality_evaluation AS {_EVALUATION_SQL}", params
        )
        rows = with_vectors(
            conn, "SELECT * FROM quality_evaluation", model, dimensions, order_by=None
        )
        for chunk in rows.to_arrow_reader(_CHUNK):
            if chunk.num_rows == 0:
                continue
            evaluated += chunk.num_rows
            vectors = list_column_to_matrix(chunk, "embedding", dimensions)
            segments, _ = assign_segments(vectors, centroids)
            held = np.array([index.get(p, -1) for p in chunk["held_out_product"].to_pylist()])
            excluded = np.tile(out_of_stock, (chunk.num_rows, 1))
            for row, bought in enumerate(chunk["bought"].to_pylist()):
                excluded[row, [index[p] for p in bought or () if p in index]] = True
            scored = score_profiles(
                vectors, segments, inputs, top_n=len(index), segment_weight=segment_weight
            )
            model_order = scored["product"].reshape(chunk.num_rows, len(index))
            model_hit = _hits(model_order, excluded, held, top_n)
            popularity_hit = _hits(np.tile(popular, (chunk.num_rows, 1)), excluded, held, top_n)
            model_hits += int(model_hit.sum())
            popularity_hits += int(popularity_hit.sum())
            model_only += int((model_hit & ~popularity_hit).sum())
            popularity_only += int((popularity_hit & ~model_hit).sum())
        return HoldoutQuality(
            sampled, evaluated, top_n, model_hits, popularity_hits, model_only, popularity_only
        )


def _hits(order: np.ndarray, excluded: np.ndarray, held: np.ndarray, top_n: int) -> np.ndarray:
    """Per customer: is the held-out product among the first `top_n` products of its `order`
    that are not excluded?"""
    rows = np.arange(len(order))[:, None]
    allowed = ~excluded[rows, order]
    shown = allowed & (np.cumsum(allowed, axis=1) <= top_n)
    return ((order == held[:, None]) & shown).any(axis=1)


@dataclass(frozen=True)
class QualityVerdict:
    passed: bool | None  # None: not enough customers to judge
    reason: str


def quality_verdict(
    quality: HoldoutQuality,
    recent_model_rates: list[float],
    *,
    min_customers: int,
    min_baselines: int,
    min_ratio_to_recent: float,
    min_lead_z: float,
) -> QualityVerdict:
    """Fail when the model is no better than popularity: its lead (paired per customer, in
    standard errors) not above `min_lead_z`, or exactly popularity's hits (it recommends the
    most popular products); or when its hit rate is below `min_ratio_to_recent` of the median
    of its recent normal batches. No verdict on fewer than `min_customers` evaluated."""
    rate, popular = quality.model_hit_rate, quality.popularity_hit_rate
    if rate is None or quality.evaluated < min_customers:
        return QualityVerdict(
            None, f"{quality.evaluated} customers evaluated, fewer than {min_customers}"
        )
    n, z = quality.top_n, quality.lead_z
    said = (
        f"hit rate@{n} {rate:.3f} (popularity {popular:.3f}, {quality.evaluated} customers,"
        f" lead {z:+.1f} standard errors)"
    )
    if quality.model_hits and not quality.model_only + quality.popularity_only:
        return QualityVerdict(False, f"{said}: the model hits exactly popularity's customers")
    if z <= min_lead_z:
        return QualityVerdict(
            False, f"{said}: the model is no better than popularity (a lead above"
            f" {min_lead_z:+.1f} is required)",
        )  # fmt: skip
    if len(recent_model_rates) >= min_baselines:
        typical = float(np.median(recent_model_rates))
        if rate < min_ratio_to_recent * typical:
            return QualityVerdict(
                False, f"{said}: below {min_ratio_to_recent:g}x its recent median {typical:.3f}"
            )
        return QualityVerdict(True, f"{said}, recent median {typical:.3f}")
    return QualityVerdict(True, f"{said}; {len(recent_model_rates)} recent batches, no trend yet")
