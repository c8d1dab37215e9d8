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

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

from pipeline_project.tables import PRODUCT_NEIGHBOURS

# Customers a model version learns co-purchases from (a seeded sample of its training customers).
NEIGHBOUR_SAMPLE = 200_000
_BLOCK = 256  # products whose similarities are computed at once


def learn_neighbours(
    conn: duckdb.DuckDBPyConnection, version: int, customers_sql: str, params: dict,
    *, neighbours: int, sample: int = NEIGHBOUR_SAMPLE,
) -> int:  # fmt: skip
    """Store each product's `neighbours` most co-purchased products for model `version`, from
    the purchases of `customers_sql` (batch_id, customer_id: each customer once, the batch
    holding their current record); returns how many rows."""
    pairs = conn.sql(
        f"""
        WITH cur AS ({customers_sql}),
        chosen AS (SELECT * FROM cur ORDER BY hash(customer_id), customer_id LIMIT $sample)
        SELECT DISTINCT c.customer_id::VARCHAR AS customer_id, p.product_id FROM (
            SELECT batch_id, customer_id, product_id FROM customer_purchases
            UNION ALL
            SELECT batch_id, customer_id, product_id FROM prior_purchases
        ) AS p JOIN chosen AS c USING (batch_id, customer_id)
        """,
        params={**params, "sample": sample},
    ).to_arrow_table()
    if pairs.num_rows == 0:
        return 0
    customer_codes = pairs["customer_id"].combine_chunks().dictionary_encode()
    product_codes = pairs["product_id"].combine_chunks().dictionary_encode()
    products = product_codes.dictionary
    rows = customer_codes.indices.to_numpy()
    cols = product_codes.indices.to_numpy()
    bought = sp.csr_matrix(
        (np.ones(len(rows), np.float32), (rows, cols)),
        shape=(len(customer_codes.dictionary), len(products)),
    )
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
    conn.register("new_neighbours", rows)
    try:
        conn.execute(f"INSERT INTO {PRODUCT_NEIGHBOURS} BY NAME SELECT * FROM new_neighbours")
    finally:
        conn.unregister("new_neighbours")
    return rows.num_rows


def neighbour_matrix(
    conn: duckdb.DuckDBPyConnection, version: int, index: dict[str, int]
) -> sp.csr_matrix:
    """Model `version`'s neighbours as a sparse products x products matrix over `index` (the
    scored products; neighbours outside it are left out)."""
    table = conn.sql(
        f"SELECT product_id, neighbour_id, similarity FROM {PRODUCT_NEIGHBOURS}"
        " WHERE model_version = $version",
        params={"version": version},
    ).to_arrow_table()
    size = len(index)
    if table.num_rows == 0:
        return sp.csr_matrix((size, size), dtype=np.float32)
    ids = pa.array(list(index), pa.string())
    rows = pc.index_in(table["product_id"], value_set=ids).fill_null(-1).to_numpy()
    cols = pc.index_in(table["neighbour_id"], value_set=ids).fill_null(-1).to_numpy()
    known = (rows >= 0) & (cols >= 0)
    similarity = table["similarity"].to_numpy()[known].astype(np.float32)
    return sp.csr_matrix((similarity, (rows[known], cols[known])), shape=(size, size))
