"""The embedding_cache table: one vector per text and model, shared by every stage. All its SQL.

A text is keyed by its md5 (`text_hash`). Statements that combine the cache with another
table take that part as `source`: a SELECT from the code, never from data, whose $-parameters
come in `params` ($model and $dimensions are always set).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import duckdb
import numpy as np
import pyarrow as pa

from pipeline_project.core.arrow_results import arrow_table
from pipeline_project.core.deletes import delete_where
from pipeline_project.core.vectors import matrix_to_list_array

# Whether the row `s` of a source has a vector for $model and $dimensions.
_CACHED = """EXISTS (
    SELECT 1 FROM embedding_cache AS c
    WHERE c.model = $model AND c.dimensions = $dimensions AND c.text_hash = s.text_hash)"""


def _params(model: str, dimensions: int, params: Mapping[str, object] | None) -> dict:
    return {**(params or {}), "model": model, "dimensions": dimensions}


def text_characters(
    conn: duckdb.DuckDBPyConnection, source: str, params: Mapping[str, object]
) -> int:
    """Characters of the distinct texts of `source` (columns text_hash, text)."""
    [(chars,)] = conn.execute(
        f"SELECT coalesce(sum(length(text)), 0) FROM (SELECT any_value(text) AS text"
        f" FROM ({source}) AS s GROUP BY text_hash)",
        dict(params),
    ).fetchall()
    return int(chars)


def missing_texts(
    conn: duckdb.DuckDBPyConnection,
    source: str,
    model: str,
    dimensions: int,
    params: Mapping[str, object] | None = None,
) -> list[tuple[str, str]]:
    """The distinct (text_hash, text) pairs of `source` (columns text_hash, text) that have no
    vector for the model yet, by hash."""
    return conn.execute(
        f"SELECT text_hash, any_value(text) AS text FROM ({source}) AS s WHERE NOT {_CACHED}"
        " GROUP BY text_hash ORDER BY text_hash",
        _params(model, dimensions, params),
    ).fetchall()


def add_vectors(
    conn: duckdb.DuckDBPyConnection,
    model: str,
    dimensions: int,
    texts: Mapping[str, str],
    vectors: Sequence[tuple[str, np.ndarray]],
) -> None:
    """Add (text_hash, vector) pairs, with their text from `texts`, that are not cached yet.

    The statement itself keeps one row per text (the DuckLake backend has no key to do it); two
    workers that could add the same text at once hold `Warehouse.lock(EMBEDDING_CACHE)`."""
    hashes = [h for h, _ in vectors]
    rows = pa.table(
        {
            "text_hash": pa.array(hashes, pa.string()),
            "text": pa.array([texts[h] for h in hashes], pa.string()),
            "embedding": matrix_to_list_array(np.stack([v for _, v in vectors])),
        }
    )
    conn.register("new_vectors", rows)
    try:
        conn.execute(
            "INSERT INTO embedding_cache BY NAME SELECT $model AS model, $dimensions AS dimensions,"
            " text_hash, text, embedding, now() AS created_at"
            f" FROM new_vectors AS s WHERE NOT {_CACHED}",
            {"model": model, "dimensions": dimensions},
        )
    finally:
        conn.unregister("new_vectors")


def insert_cached(
    conn: duckdb.DuckDBPyConnection,
    table: str,
    source: str,
    model: str,
    dimensions: int,
    params: Mapping[str, object] | None = None,
) -> None:
    """Insert into `table` the rows of `source` (columns named as the table's, text_hash among
    them) whose text has a vector for the model: a row whose text failed is never written."""
    conn.execute(
        f"INSERT INTO {table} BY NAME SELECT s.* FROM ({source}) AS s WHERE {_CACHED}",
        _params(model, dimensions, params),
    )


def with_vectors(
    conn: duckdb.DuckDBPyConnection,
    source: str,
    model: str,
    dimensions: int,
    params: Mapping[str, object] | None = None,
    order_by: str | None = "text_hash",
) -> pa.Table:
    """The rows of `source` (with a text_hash column) that have a vector for the model, with it
    as `embedding`, ordered by `order_by` (a column of `source`, named in the code; None:
    unordered, without a sort of the wide rows)."""
    return arrow_table(conn, vectors_sql(source, order_by), _params(model, dimensions, params))


def vectors_sql(source: str, order_by: str | None = "text_hash") -> str:
    """The query of with_vectors (parameters $model, $dimensions and those of `source`)."""
    return (
        f"SELECT s.*, c.embedding FROM ({source}) AS s JOIN embedding_cache AS c"
        " ON c.model = $model AND c.dimensions = $dimensions AND c.text_hash = s.text_hash"
        + (f" ORDER BY s.{order_by}" if order_by else "")
    )


_UNUSED = """(model, dimensions, text_hash) IN (
          SELECT unnest($models), unnest($dimensions), unnest($hashes))
  AND NOT EXISTS (SELECT 1 FROM customer_embeddings AS e
                  WHERE e.model = c.model AND e.dimensions = c.dimensions
                    AND e.text_hash = c.text_hash)
  AND NOT EXISTS (SELECT 1 FROM product_embeddings AS p
                  WHERE p.model = c.model AND p.dimensions = c.dimensions
                    AND p.text_hash = c.text_hash)"""


def delete_unused(conn: duckdb.DuckDBPyConnection, texts: list[tuple[str, int, str]]) -> int:
    """Delete the cached vectors of `texts` (model, dimensions, text_hash) that no customer's
    profile and no product uses any more (an erased customer's own texts); how many."""
    if not texts:
        return 0
    params = {"models": [m for m, _, _ in texts], "dimensions": [d for _, d, _ in texts],
              "hashes": [h for _, _, h in texts]}  # fmt: skip
    return delete_where(conn, "embedding_cache AS c", _UNUSED, params)
