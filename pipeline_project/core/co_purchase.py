"""Products bought together: each product's nearest neighbours by co-purchase, learned with a
segment model version from the customers it was trained on.

cosine(i, j) = customers who bought both / sqrt(customers who bought i x those who bought j),
over a bounded sample of the customers (each once, their whole known history), and only each
product's `neighbours` best kept: a table of products x neighbours rows, never a product x
product matrix. The similarity is computed a block of products at a time (sparse products), so
memory is bounded by the block and the catalog, not by the customers.

At scoring, a customer's co-purchase score of a product is the sum, over the products they
bought, of that product's similarity to it, each weighted by how recently they bought it
(exp(-days / recency_days) before their last purchase): what people who buy what they buy, and
bought lately, also buy.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

from pipeline_project.core.arrow_results import arrow_reader, arrow_table
from pipeline_project.tables import PRODUCT_FACTORS, PRODUCT_NEIGHBOURS, TASTE_SHARES, TASTES

# Customers a model version learns co-purchases from (a seeded sample of its training customers).
NEIGHBOUR_SAMPLE = 50_000
_BLOCK = 256  # products whose similarities are computed at once


def learn_neighbours(
    conn: duckdb.DuckDBPyConnection, version: int, customers_sql: str, params: dict,
    *, neighbours: int, recency_days: float, tastes: int, seed: int = 0,
    sample: int = NEIGHBOUR_SAMPLE,
) -> int:  # fmt: skip
    """Learn from the purchases of `customers_sql` (batch_id, customer_id: each customer once,
    the batch holding their current record; a seeded sample of at most `sample`) what model
    `version` scores with: each product's `neighbours` most co-purchased products
    (product_neighbours), and the customers' tastes (learn_tastes). Returns the neighbour
    rows."""
    # every purchase of the sample streamed as it comes (no aggregate in DuckDB: memory there
    # holds no row per customer), folded into one (customer, product, last instant) each here
    reader = arrow_reader(
        conn,
        f"""
        WITH cur AS ({customers_sql}),
        chosen AS (SELECT * FROM cur ORDER BY hash(customer_id), customer_id LIMIT $sample)
        SELECT c.customer_id::VARCHAR AS customer_id, p.product_id,
               epoch(p.purchased_at)::BIGINT AS at
        FROM (
            SELECT batch_id, customer_id, product_id, purchased_at FROM customer_purchases
            UNION ALL
            SELECT batch_id, customer_id, product_id, purchased_at FROM prior_purchases
        ) AS p JOIN chosen AS c USING (batch_id, customer_id)
        """,
        {**params, "sample": sample},
        1_000_000,
    )
    purchases = pa.Table.from_batches(list(reader))
    if purchases.num_rows == 0:
        return 0
    customer_codes = purchases["customer_id"].combine_chunks().dictionary_encode()
    product_codes = purchases["product_id"].combine_chunks().dictionary_encode()
    products = product_codes.dictionary
    n_products = len(products)
    keys = customer_codes.indices.to_numpy().astype(np.int64) * n_products + (
        product_codes.indices.to_numpy()
    )
    at = purchases["at"].to_numpy()
    order = np.lexsort((at, keys))
    last = np.ones(len(order), dtype=bool)
    last[:-1] = keys[order][1:] != keys[order][:-1]
    keys, last_at = keys[order][last], at[order][last]
    rows, cols = keys // n_products, keys % n_products
    shape = (len(customer_codes.dictionary), n_products)
    bought = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=shape)
    age_days = (last_at.max() - last_at) / 86400.0
    recent = sp.csr_matrix(
        (np.exp(-age_days / recency_days).astype(np.float32), (rows, cols)), shape=shape
    )
    learn_tastes(conn, version, bought, recent, products, tastes=tastes, seed=seed)
    stored = _store_neighbours(conn, version, bought, products, neighbours)
    return stored


def _store_neighbours(
    conn: duckdb.DuckDBPyConnection, version: int, bought: sp.csr_matrix, products: pa.Array,
    neighbours: int,
) -> int:  # fmt: skip
    counts = np.asarray(bought.sum(axis=0)).ravel()
    inverse_root = 1.0 / np.sqrt(np.maximum(counts, 1.0))
    by_product = bought.T.tocsr()
    parts = []
    k = min(neighbours, len(products) - 1)
    if k <= 0:
        return 0
    for first in range(0, len(products), _BLOCK):
        block = np.arange(first, min(first + _BLOCK, len(products)))
        together = (by_product[block] @ bought).toarray()  # block x products
        together *= inverse_root[block, None] * inverse_root[None, :]
        together[np.arange(len(block)), block] = 0.0
        best = np.argpartition(-together, k - 1, axis=1)[:, :k]
        similarity = np.take_along_axis(together, best, axis=1)
        keep = similarity > 0
        parts.append(
            pa.table(
                {
                    "product_index": np.repeat(block, k)[keep.ravel()],
                    "neighbour_index": best.ravel()[keep.ravel()],
                    "similarity": similarity.ravel()[keep.ravel()].astype(np.float64),
                }
            )
        )
    table = pa.concat_tables(parts)
    rows = pa.table(
        {
            "model_version": pa.array(np.full(table.num_rows, version, np.int32)),
            "product_id": products.take(table["product_index"]),
            "neighbour_id": products.take(table["neighbour_index"]),
            "similarity": table["similarity"],
        }
    )
    _insert(conn, PRODUCT_NEIGHBOURS, rows)
    return rows.num_rows


def _insert(conn: duckdb.DuckDBPyConnection, table: str, rows: pa.Table) -> None:
    conn.register("new_rows", rows)
    try:
        conn.execute(f"INSERT INTO {table} BY NAME SELECT * FROM new_rows")
    finally:
        conn.unregister("new_rows")


# ---- tastes: segments of what customers buy ------------------------------------------------

FACTORS = 64  # dimensions of a product's purchase vector


def learn_tastes(
    conn: duckdb.DuckDBPyConnection, version: int, bought: sp.csr_matrix, recent: sp.csr_matrix,
    products: pa.Array, *, tastes: int, seed: int = 0,
) -> None:  # fmt: skip
    """Customers' tastes, learned from what they bought: each product's purchase vector (a
    truncated SVD of the customers x products matrix, tf-idf weighted: products bought by the
    same customers lie close together), a customer's vector the sum of their products'
    (unit length), `tastes` k-means clusters of those, and each taste's share of each product:
    its customers who bought it, each weighted by how recently (`recent`), over its customers.
    Stored as product_factors, tastes and taste_shares of model `version`."""
    from sklearn.cluster import KMeans
    from sklearn.utils.extmath import randomized_svd

    customers, n_products = bought.shape
    idf = np.log(customers / np.maximum(np.asarray(bought.sum(axis=0)).ravel(), 1.0))
    weighted = _unit_rows(bought @ sp.diags(idf.astype(np.float32)))
    k = min(FACTORS, min(bought.shape) - 1)
    if k >= 1:
        _, sigma, vt = randomized_svd(weighted, n_components=k, n_iter=5, random_state=seed)
        factors = _unit_dense(vt.T * sigma)  # products x k
    else:  # one customer or one product: no purchase vectors, one taste (popular lately)
        factors = np.zeros((n_products, 1))
    vectors = _unit_dense(np.asarray(bought @ factors))
    # no more tastes than distinct purchase vectors (customers who bought alike share one)
    n_tastes = min(tastes, len({row.tobytes() for row in vectors.round(6)}))
    if n_tastes > 1:
        kmeans = KMeans(n_clusters=n_tastes, n_init=4, random_state=seed).fit(vectors)
        labels, centres = kmeans.labels_, _unit_dense(kmeans.cluster_centers_)
    else:
        labels, centres = np.zeros(customers, dtype=np.int64), np.zeros((1, factors.shape[1]))
    sizes = np.bincount(labels, minlength=n_tastes).astype(float)
    member = sp.csr_matrix(
        (np.ones(customers, np.float32), (labels, np.arange(customers))),
        shape=(n_tastes, customers),
    )
    shares = (member @ recent).toarray() / np.maximum(sizes, 1.0)[:, None]
    taste, product = np.nonzero(shares)
    _insert(conn, PRODUCT_FACTORS, pa.table({
        "model_version": pa.array(np.full(n_products, version, np.int32)),
        "product_id": products,
        "factor": pa.array(list(factors.astype(np.float32)), pa.list_(pa.float32())),
    }))  # fmt: skip
    _insert(conn, TASTES, pa.table({
        "model_version": pa.array(np.full(n_tastes, version, np.int32)),
        "taste_id": pa.array(np.arange(n_tastes, dtype=np.int32)),
        "centroid": pa.array(list(centres.astype(np.float32)), pa.list_(pa.float32())),
        "customers": pa.array(sizes),
    }))  # fmt: skip
    _insert(conn, TASTE_SHARES, pa.table({
        "model_version": pa.array(np.full(len(taste), version, np.int32)),
        "taste_id": pa.array(taste.astype(np.int32)),
        "product_id": products.take(pa.array(product)),
        "share": pa.array(shares[taste, product].astype(np.float64)),
    }))  # fmt: skip


def _unit_rows(matrix: sp.csr_matrix) -> sp.csr_matrix:
    norms = np.sqrt(np.asarray(matrix.multiply(matrix).sum(axis=1)).ravel())
    return sp.diags(np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)) @ matrix


def _unit_dense(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


@dataclass(frozen=True)
class Tastes:
    """Model version's tastes over the scored products."""

    factors: np.ndarray  # (products, k) unit length (0 for a product nobody bought)
    centroids: np.ndarray  # (tastes, k) unit length
    share: np.ndarray  # (tastes, products)

    def customer_vectors(self, bought: sp.csr_matrix) -> np.ndarray:
        """Each customer's (rows of `bought`, customers x products) purchase vector."""
        return _unit_dense(np.asarray(bought @ self.factors))

    def membership_cosine(self, bought: sp.csr_matrix) -> np.ndarray:
        """Each customer's cosine to each taste."""
        return self.customer_vectors(bought) @ self.centroids.T


def load_tastes(conn: duckdb.DuckDBPyConnection, version: int, product_ids: list[str]) -> Tastes:
    """Model `version`'s tastes over `product_ids` (none learned: one empty taste)."""
    index = pa.array(product_ids, pa.string())
    factors_table = arrow_table(
        conn, f"SELECT product_id, factor FROM {PRODUCT_FACTORS} WHERE model_version = $v",
        {"v": version},
    )  # fmt: skip
    centroids_table = arrow_table(
        conn, f"SELECT centroid FROM {TASTES} WHERE model_version = $v ORDER BY taste_id",
        {"v": version},
    )  # fmt: skip
    if factors_table.num_rows == 0 or centroids_table.num_rows == 0:
        return Tastes(np.zeros((len(product_ids), 1)), np.zeros((1, 1)),
                      np.zeros((1, len(product_ids))))  # fmt: skip
    k = len(factors_table["factor"][0].as_py())
    factors = np.zeros((len(product_ids), k), dtype=np.float32)
    at = pc.index_in(factors_table["product_id"], value_set=index).fill_null(-1).to_numpy()
    values = np.asarray(factors_table["factor"].to_pylist(), dtype=np.float32)
    factors[at[at >= 0]] = values[at >= 0]
    centroids = np.asarray(centroids_table["centroid"].to_pylist(), dtype=np.float32)
    shares = arrow_table(
        conn, f"SELECT taste_id, product_id, share FROM {TASTE_SHARES} WHERE model_version = $v",
        {"v": version},
    )  # fmt: skip
    share = np.zeros((len(centroids), len(product_ids)))
    col = pc.index_in(shares["product_id"], value_set=index).fill_null(-1).to_numpy()
    taste = shares["taste_id"].to_numpy()
    share[taste[col >= 0], col[col >= 0]] = shares["share"].to_numpy()[col >= 0]
    return Tastes(factors, centroids, share)


def neighbour_matrix(
    conn: duckdb.DuckDBPyConnection, version: int, index: dict[str, int]
) -> sp.csr_matrix:
    """Model `version`'s neighbours as a sparse products x products matrix over `index` (the
    scored products; neighbours outside it are left out)."""
    table = arrow_table(
        conn,
        f"SELECT product_id, neighbour_id, similarity FROM {PRODUCT_NEIGHBOURS}"
        " WHERE model_version = $version",
        {"version": version},
    )
    size = len(index)
    if table.num_rows == 0:
        return sp.csr_matrix((size, size), dtype=np.float32)
    ids = pa.array(list(index), pa.string())
    rows = pc.index_in(table["product_id"], value_set=ids).fill_null(-1).to_numpy()
    cols = pc.index_in(table["neighbour_id"], value_set=ids).fill_null(-1).to_numpy()
    known = (rows >= 0) & (cols >= 0)
    similarity = table["similarity"].to_numpy()[known].astype(np.float32)
    return sp.csr_matrix((similarity, (rows[known], cols[known])), shape=(size, size))
