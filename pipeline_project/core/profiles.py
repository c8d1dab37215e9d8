"""Customer profile texts: what a customer buys, how much, how often, how recently.

Customers who behave alike get the same text, so the model embeds each profile once:

    "Customer who buys mostly electronics and books. Spend: high. Purchase frequency: regular.
     Last purchase: this quarter."

- categories: the (at most) two categories with the highest spend, from the product catalog
  ("unknown" for products missing from it);
- spend band of total spend: none, low (< 50), moderate (< 200), high (< 1,000), very high;
- frequency band of the purchase count: none, occasional (1-2), regular (3-9), frequent (10+);
- recency band of the days between the last purchase and the batch's latest purchase:
  this month (<= 30), this quarter (<= 90), this year (<= 365), lapsed.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline_project.core.staging import write_staged

# The batch's latest purchase: recency is measured from it ($as_of of PROFILES_SQL).
AS_OF_SQL = "SELECT max(purchased_at) FROM customer_purchases WHERE batch_id = $batch_id"


def profiles_sql(customers: str, purchases: str) -> str:
    """The profile text of each customer of `customers` (line_no, customer_id, purchase_count,
    total_spend) from its rows of `purchases` (line_no, product_id, amount, purchased_at), as of
    $as_of. Both are queries from the code, never from data."""
    return f"""
WITH c AS ({customers}
), p AS (
    SELECT p.line_no, coalesce(cat.category, 'unknown') AS category, p.amount, p.purchased_at
    FROM ({purchases}) AS p
    LEFT JOIN product_catalog AS cat ON cat.product_id = p.product_id
), as_of AS (
    SELECT $as_of::TIMESTAMPTZ AS as_of
), by_category AS (
    SELECT line_no, category, sum(amount) AS spend FROM p GROUP BY line_no, category
), top_categories AS (
    SELECT line_no, list(category ORDER BY spend DESC, category)[1:2] AS top
    FROM by_category GROUP BY line_no
), last_purchase AS (
    SELECT line_no, max(purchased_at) AS last_at FROM p GROUP BY line_no
), profiles AS (
    SELECT
        c.line_no,
        c.customer_id,
        CASE WHEN c.purchase_count = 0 THEN 'Customer with no purchases yet.'
        ELSE 'Customer who buys mostly ' || array_to_string(t.top, ' and ') || '. '
            || 'Spend: ' || CASE
                WHEN c.total_spend < 50 THEN 'low'
                WHEN c.total_spend < 200 THEN 'moderate'
                WHEN c.total_spend < 1000 THEN 'high'
                ELSE 'very high' END || '. '
            || 'Purchase frequency: ' || CASE
                WHEN c.purchase_count <= 2 THEN 'occasional'
                WHEN c.purchase_count <= 9 THEN 'regular'
                ELSE 'frequent' END || '. '
            || 'Last purchase: ' || CASE
                WHEN date_diff('day', l.last_at, a.as_of) <= 30 THEN 'this month'
                WHEN date_diff('day', l.last_at, a.as_of) <= 90 THEN 'this quarter'
                WHEN date_diff('day', l.last_at, a.as_of) <= 365 THEN 'this year'
                ELSE 'lapsed' END || '.'
        END AS profile_text
    FROM c
    LEFT JOIN top_categories AS t USING (line_no)
    LEFT JOIN last_purchase AS l USING (line_no)
    CROSS JOIN as_of AS a
)
SELECT line_no, customer_id, profile_text, md5(profile_text) AS text_hash FROM profiles
"""


# The profiles of the customers on lines $first..$last of the batch: a batch is profiled in
# line ranges, so memory does not grow with the batch.
PROFILES_SQL = profiles_sql(
    "SELECT line_no, customer_id, purchase_count, total_spend FROM customers"
    " WHERE batch_id = $batch_id AND line_no BETWEEN $first AND $last",
    "SELECT line_no, product_id, amount, purchased_at FROM customer_purchases"
    " WHERE batch_id = $batch_id AND line_no BETWEEN $first AND $last",
)

PROFILE_SCHEMA = pa.schema(
    [
        ("line_no", pa.int64()),
        ("customer_id", pa.uuid()),
        ("profile_text", pa.string()),
        ("text_hash", pa.string()),
    ]
)

# The texts of the staged profiles ($profiles: the glob of their parts), as a source of
# embedding_cache.missing_texts.
STAGED_TEXTS_SQL = "SELECT text_hash, profile_text AS text FROM read_parquet($profiles)"


def stage_profiles(
    conn: duckdb.DuckDBPyConnection, batch_id: str, folder: Path, chunk_rows: int
) -> tuple[int, int]:
    """The batch's customer profiles as Parquet parts in `folder`, one line range at a time;
    returns how many customers and how many distinct profiles the batch has."""
    [(as_of,)] = conn.execute(AS_OF_SQL, {"batch_id": batch_id}).fetchall()
    [(last_line,)] = conn.execute(
        "SELECT coalesce(max(line_no), 0) FROM customers WHERE batch_id = ?", [batch_id]
    ).fetchall()
    pq.write_table(PROFILE_SCHEMA.empty_table(), folder / "part-empty.parquet")
    for part, first in enumerate(range(1, last_line + 1, chunk_rows)):
        params = {"batch_id": batch_id, "as_of": as_of, "first": first,
                  "last": first + chunk_rows - 1}  # fmt: skip
        write_staged(folder, part, conn.sql(PROFILES_SQL, params=params).to_arrow_table())
    [(customers, distinct_profiles)] = conn.execute(
        "SELECT count(*), count(DISTINCT text_hash) FROM read_parquet(?)",
        [str(folder / "*.parquet")],
    ).fetchall()
    return customers, distinct_profiles
