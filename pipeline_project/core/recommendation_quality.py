"""Are the recommendations any good? Leave the last basket out and see if it comes back.

For a bounded sample of the batch's customers who shopped at two instants or more, the
purchases of their last instant (their last basket: one purchase on a record that dates each
apart) are held out and the customer is profiled from the rest of what is known of them (the
same profile text, with the batch's bands, as customer_embeddings makes), given the segment of
their held-out profile and scored with the same code as recommendations (score_customers, the
same weights, the same products allowed). A hit is a held-out product the customer had not
bought before among the top N products they are offered. The popularity baseline offers the
products popular lately among the same segment model's customers (the tastes' recency-weighted
shares, every taste alike: what a scorer blind to the customer offers from the same model),
with the same exclusions, to the same customers. The held-out purchases are taken out of the
segments' shares: the model may not know the answer. (The co-purchase and taste tables are
learned with the model from up to 50,000 customers; a sampled customer's own basket may be one
of them: too little to matter among the 5,000 customers a verdict needs.)

Held-out profiles are looked up in the embedding cache, never sent to the model: a profile
differs from the customer's only by one basket, so it is almost always a text already embedded.
Customers whose held-out profile is not in the cache, or whose last basket holds nothing new,
are counted, not judged.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

from pipeline_project.core.embedding_cache import with_vectors
from pipeline_project.core.profiles import AS_OF_SQL, profile_cuts, profiles_sql
from pipeline_project.core.recommendations import (
    BatchScoring,
    Customers,
    Weights,
    chunk_size,
    score_customers,
    with_share,
)
from pipeline_project.core.vectors import list_column_to_matrix
from pipeline_project.tables import PRIOR_PURCHASES

# The sampled customers: $sample of the batch's customers with a purchase, in an order that
# depends on the line only (the same customers on every run of the batch).
_SAMPLE_SQL = """
SELECT line_no, customer_id FROM customers
WHERE batch_id = $batch_id AND purchase_count >= 1
ORDER BY hash(line_no), line_no LIMIT $sample
"""
# The queries below read the sample from a temporary table (computed once per evaluation).
_SAMPLED = "SELECT line_no, customer_id FROM quality_sample"

# Each sampled customer's known purchases (the batch's and prior ones), those of their last
# instant flagged: held out. Customers with a single instant have nothing left: not sampled.
_HISTORY_SQL = """
WITH known AS (
    SELECT line_no, product_id, amount, purchased_at, 1 AS quantity FROM customer_purchases
    WHERE batch_id = $batch_id AND line_no IN (SELECT line_no FROM quality_sample)
    UNION ALL
    SELECT line_no, product_id, amount, purchased_at, quantity FROM prior_purchases
    WHERE batch_id = $batch_id AND line_no IN (SELECT line_no FROM quality_sample)
), marked AS (
    SELECT *, purchased_at = max(purchased_at) OVER (PARTITION BY line_no) AS held_out
    FROM known
)
SELECT * FROM marked
WHERE line_no IN (SELECT line_no FROM marked GROUP BY line_no HAVING bool_or(NOT held_out))
"""

_HELD_OUT_PROFILES_SQL = profiles_sql(
    _SAMPLED,
    "SELECT line_no, product_id, amount, purchased_at, quantity FROM quality_history"
    " WHERE NOT held_out",
)

# Per sampled customer: the held-out products they had not bought before, and the held-out
# profile; only customers with such a product.
_EVALUATION_SQL = f"""
SELECT h.line_no,
       list(DISTINCT h.product_id) FILTER (WHERE h.held_out AND h.product_id NOT IN (
           SELECT product_id FROM quality_history AS e
           WHERE e.line_no = h.line_no AND NOT e.held_out)) AS new_products,
       any_value(pr.text_hash) AS text_hash
FROM quality_history AS h JOIN ({_HELD_OUT_PROFILES_SQL}) AS pr USING (line_no)
GROUP BY h.line_no
HAVING len(new_products) > 0
"""

# What the evaluated customers bought before their last basket: days before its last purchase.
_BEFORE_SQL = """
SELECT line_no, product_id,
       date_diff('second', max(purchased_at), max(max(purchased_at)) OVER (PARTITION BY line_no))
           / 86400.0 AS days
FROM quality_history WHERE NOT held_out AND line_no IN (SELECT line_no FROM quality_chunk)
GROUP BY line_no, product_id
"""


@dataclass(frozen=True)
class HoldoutQuality:
    sampled: int  # customers sampled (with a purchase)
    evaluated: int  # of them, with a new held-out product and their held-out profile cached
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
    scoring: BatchScoring,
    weights: Weights,
    *,
    sample: int,
    top_n: int,
) -> HoldoutQuality:
    """Hit rate at `top_n` of the model and of popularity on the batch's held-out baskets."""
    [(as_of,)] = conn.execute(AS_OF_SQL, {"batch_id": batch_id}).fetchall()
    cuts = profile_cuts(conn, batch_id, as_of, prior=PRIOR_PURCHASES)
    params = {"as_of": as_of, **cuts}
    tables = ("quality_sample", "quality_history", "quality_evaluation", "quality_chunk")
    with _dropped_after(conn, *tables):
        conn.execute(
            f"CREATE OR REPLACE TEMP TABLE quality_sample AS {_SAMPLE_SQL}",
            {"batch_id": batch_id, "sample": sample},
        )
        [(sampled,)] = conn.execute("SELECT count(*) FROM quality_sample").fetchall()
        conn.execute(
            f"CREATE OR REPLACE TEMP TABLE quality_history AS {_HISTORY_SQL}",
            {"batch_id": batch_id},
        )
        conn.execute(
            f"CREATE OR REPLACE TEMP TABLE quality_evaluation AS {_EVALUATION_SQL}", params
        )
        evaluation = with_vectors(
            conn, "SELECT * FROM quality_evaluation", model, dimensions, order_by="line_no"
        )
        inputs = scoring.inputs
        index = {p: i for i, p in enumerate(inputs.product_ids)}
        vectors = list_column_to_matrix(evaluation, "embedding", dimensions)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        unit = np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)
        segments = np.argmax(unit @ inputs.centroids.T, axis=1) if len(unit) else np.zeros(0, int)
        held = [
            [index[p] for p in products if p in index]
            for products in evaluation["new_products"].to_pylist()
        ]
        blind = _without_held_out(inputs, segments, held)
        # popular lately: the tastes' recency-weighted shares, the tastes alike (what a scorer
        # blind to the customer would offer from the same model)
        trend = inputs.tastes.share.mean(axis=0)
        popular = np.lexsort((np.arange(len(index)), -trend))
        hits = np.zeros((2, len(held)), dtype=bool)
        step = chunk_size(len(index))
        for start in range(0, evaluation.num_rows, step):
            stop = min(start + step, evaluation.num_rows)
            lines = evaluation["line_no"].slice(start, stop - start)
            conn.register("quality_chunk_lines", pa.table({"line_no": lines}))
            conn.execute(
                "CREATE OR REPLACE TEMP TABLE quality_chunk AS SELECT * FROM quality_chunk_lines"
            )
            conn.unregister("quality_chunk_lines")
            before = conn.sql(_BEFORE_SQL).to_arrow_table()
            row = pc.index_in(before["line_no"], value_set=lines).to_numpy()
            at = pc.index_in(before["product_id"], value_set=pa.array(inputs.product_ids))
            col = at.fill_null(-1).to_numpy()
            known = col >= 0
            days = before["days"].to_numpy(zero_copy_only=False)[known]
            recency = sp.csr_matrix(
                (np.exp(-days / weights.recency_days), (row[known], col[known])),
                shape=(stop - start, len(index)),
            )
            customers = Customers(
                unit[start:stop], np.arange(stop - start), segments[start:stop], recency
            )
            result = score_customers(customers, blind, scoring.allowed, weights, top_n=top_n)
            offered: dict[int, set[int]] = {}
            for r, product in zip(result["customer"], result["product"], strict=True):
                offered.setdefault(int(r), set()).add(int(product))
            bought = recency.tolil().rows
            for r in range(stop - start):
                wanted = set(held[start + r])
                hits[0, start + r] = bool(wanted & offered.get(r, set()))
                mine = set(bought[r])
                shown = [int(p) for p in popular if scoring.allowed[p] and p not in mine][:top_n]
                hits[1, start + r] = bool(wanted & set(shown))
        model_hit, popularity_hit = hits
        return HoldoutQuality(
            sampled, len(held), top_n, int(model_hit.sum()), int(popularity_hit.sum()),
            int((model_hit & ~popularity_hit).sum()), int((popularity_hit & ~model_hit).sum()),
        )  # fmt: skip


def _without_held_out(inputs, segments: np.ndarray, held: list[list[int]]):
    """The scoring inputs with the held-out purchases taken out of the shares (each as much as
    a customer can weigh: 1 / the segment's customers) and of popularity."""
    share = inputs.share.copy()
    popularity = inputs.popularity.astype(float).copy()
    sizes = np.maximum(inputs.segment_customers, 1.0)
    for segment, products in zip(segments, held, strict=True):
        share[segment, products] = np.maximum(share[segment, products] - 1.0 / sizes[segment], 0)
        popularity[products] = np.maximum(popularity[products] - 1.0, 0.0)
    return with_share(inputs, share, popularity)


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
