"""Customer profile texts: what a customer buys, how much, how often, how recently.

A profile is built from everything known of the customer up to and including the batch: the
batch's own record and the purchases that earlier accepted batches (in arrival order) delivered
(prior_purchases), each purchase counted once. Customers who behave alike get the same text, so
the model embeds each profile once:

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

from pipeline_project.core.catalog import PRODUCTS
from pipeline_project.core.staging import write_staged
from pipeline_project.tables import BATCHES, PRIOR_PURCHASES, WAREHOUSE_TABLES

# The batch's latest purchase: recency is measured from it ($as_of of PROFILES_SQL).
AS_OF_SQL = "SELECT max(purchased_at) FROM customer_purchases WHERE batch_id = $batch_id"


def profiles_sql(customers: str, purchases: str) -> str:
    """The profile text of each customer of `customers` (line_no, customer_id) from its rows of
    `purchases` (line_no, product_id, amount, purchased_at, quantity: the purchase counted that
    many times), as of $as_of. Both are queries from the code, never from data."""
    return f"""
WITH c AS ({customers}
), p AS (
    SELECT p.line_no, coalesce(cat.category, 'unknown') AS category, p.amount, p.purchased_at,
           p.quantity
    FROM ({purchases}) AS p
    LEFT JOIN {PRODUCTS} AS cat ON cat.product_id = p.product_id
), as_of AS (
    SELECT $as_of::TIMESTAMPTZ AS as_of
), by_category AS (
    SELECT line_no, category, sum(amount * quantity) AS spend FROM p GROUP BY line_no, category
), top_categories AS (
    SELECT line_no, list(category ORDER BY spend DESC, category)[1:2] AS top
    FROM by_category GROUP BY line_no
), totals AS (
    SELECT line_no, max(purchased_at) AS last_at, sum(quantity) AS purchase_count,
           sum(amount * quantity) AS total_spend
    FROM p GROUP BY line_no
), profiles AS (
    SELECT
        c.line_no,
        c.customer_id,
        CASE WHEN coalesce(l.purchase_count, 0) = 0 THEN 'Customer with no purchases yet.'
        ELSE 'Customer who buys mostly ' || array_to_string(t.top, ' and ') || '. '
            || 'Spend: ' || CASE
                WHEN l.total_spend < 50 THEN 'low'
                WHEN l.total_spend < 200 THEN 'moderate'
                WHEN l.total_spend < 1000 THEN 'high'
                ELSE 'very high' END || '. '
            || 'Purchase frequency: ' || CASE
                WHEN l.purchase_count <= 2 THEN 'occasional'
                WHEN l.purchase_count <= 9 THEN 'regular'
                ELSE 'frequent' END || '. '
            || 'Last purchase: ' || CASE
                WHEN date_diff('day', l.last_at, a.as_of) <= 30 THEN 'this month'
                WHEN date_diff('day', l.last_at, a.as_of) <= 90 THEN 'this quarter'
                WHEN date_diff('day', l.last_at, a.as_of) <= 365 THEN 'this year'
                ELSE 'lapsed' END || '.'
        END AS profile_text
    FROM c
    LEFT JOIN top_categories AS t USING (line_no)
    LEFT JOIN totals AS l USING (line_no)
    CROSS JOIN as_of AS a
)
SELECT line_no, customer_id, profile_text, md5(profile_text) AS text_hash FROM profiles
"""


# A batch's customers' known purchases, lines $first..$last: its own records' and those earlier
# batches delivered (prior_purchases, or the temp table `batch_prior` while it is being staged).
def known_purchases_sql(prior: str = PRIOR_PURCHASES) -> str:
    return f"""
SELECT line_no, product_id, amount, purchased_at, 1 AS quantity FROM customer_purchases
WHERE batch_id = $batch_id AND line_no BETWEEN $first AND $last
UNION ALL
SELECT line_no, product_id, amount, purchased_at, quantity FROM {prior}
WHERE batch_id = $batch_id AND line_no BETWEEN $first AND $last"""


# The profiles of the customers on lines $first..$last of the batch: a batch is profiled in
# line ranges, so memory does not grow with the batch.
PROFILES_SQL = profiles_sql(
    "SELECT line_no, customer_id FROM customers"
    " WHERE batch_id = $batch_id AND line_no BETWEEN $first AND $last",
    known_purchases_sql("batch_prior"),
)

# The purchases of the batch's customers that earlier accepted batches delivered (arrival order
# before $seq) and that its own records do not hold: a purchase is its product, instant and
# amount; the most times any one batch listed it is how often it was bought, less the times the
# batch's own record lists it.
_PRIOR_SQL = f"""
WITH mine AS (
    SELECT line_no, customer_id FROM customers WHERE batch_id = $batch_id
), earlier AS (
    SELECT batch_id, arrival_seq FROM {BATCHES} WHERE accepted AND arrival_seq < $seq
), counted AS (
    SELECT p.batch_id, p.customer_id, p.product_id, p.purchased_at, p.amount, count(*) AS n
    FROM customer_purchases AS p
    SEMI JOIN earlier USING (batch_id)
    SEMI JOIN mine USING (customer_id)
    GROUP BY ALL
), known AS (
    SELECT customer_id, product_id, purchased_at, amount, max(n) AS n,
           arg_min(c.batch_id, e.arrival_seq) AS first_batch_id
    FROM counted AS c JOIN earlier AS e USING (batch_id)
    GROUP BY customer_id, product_id, purchased_at, amount
), own AS (
    SELECT customer_id, product_id, purchased_at, amount, count(*) AS n
    FROM customer_purchases WHERE batch_id = $batch_id GROUP BY ALL
)
SELECT $batch_id AS batch_id, m.line_no, k.customer_id, k.product_id, k.amount, k.purchased_at,
       (k.n - coalesce(o.n, 0))::INTEGER AS quantity, k.first_batch_id
FROM known AS k
JOIN mine AS m USING (customer_id)
LEFT JOIN own AS o USING (customer_id, product_id, purchased_at, amount)
WHERE k.n > coalesce(o.n, 0)
"""

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


# How many of the batch's customers an earlier accepted batch held: customers who came back.
_RETURNING_SQL = f"""
SELECT count(*) FROM customers AS c
WHERE c.batch_id = $batch_id AND c.customer_id IN (
    SELECT e.customer_id FROM customers AS e JOIN {BATCHES} AS b USING (batch_id)
    WHERE b.accepted AND b.arrival_seq < $seq)
"""


def stage_prior_purchases(
    conn: duckdb.DuckDBPyConnection, batch_id: str, path: Path
) -> tuple[int, int]:
    """The batch's prior purchases into the temp table `batch_prior` and, when there are any,
    the Parquet file `path` (prior_purchases rows); returns how many, and how many of the
    batch's customers an earlier batch held (returning customers)."""
    rows = conn.execute(
        f"SELECT arrival_seq, (SELECT count(*) FROM {BATCHES} AS e WHERE e.accepted"
        f" AND e.arrival_seq < b.arrival_seq) FROM {BATCHES} AS b WHERE batch_id = ?",
        [batch_id],
    ).fetchall()
    columns = ", ".join(WAREHOUSE_TABLES[PRIOR_PURCHASES].column_names)
    returning = 0
    if rows and rows[0][1]:
        params = {"batch_id": batch_id, "seq": rows[0][0]}
        conn.execute(f"CREATE OR REPLACE TEMP TABLE batch_prior AS {_PRIOR_SQL}", params)
        [(returning,)] = conn.execute(_RETURNING_SQL, params).fetchall()
    else:  # the first batch, or no batch before it was accepted: nothing to look up
        conn.execute(
            f"CREATE OR REPLACE TEMP TABLE batch_prior AS SELECT {columns} FROM"
            f" {PRIOR_PURCHASES} WHERE false"
        )
    [(count,)] = conn.execute("SELECT count(*) FROM batch_prior").fetchall()
    if count:
        conn.execute(
            f"COPY (SELECT {columns} FROM batch_prior ORDER BY line_no) TO '{_quote(path)}'"
            " (FORMAT parquet)"
        )
    return count, returning


def store_prior_purchases(conn: duckdb.DuckDBPyConnection, path: Path | None) -> None:
    """The staged prior purchases (stage_prior_purchases) into prior_purchases, in the caller's
    transaction (which removed the batch's old ones); None: there are none."""
    if path is not None:
        conn.execute(
            f"INSERT INTO {PRIOR_PURCHASES} BY NAME SELECT * FROM read_parquet(?)", [str(path)]
        )


def _quote(path: Path) -> str:
    return str(path).replace("'", "''")


def stage_profiles(
    conn: duckdb.DuckDBPyConnection, batch_id: str, folder: Path, chunk_rows: int
) -> tuple[int, int]:
    """The batch's customer profiles as Parquet parts in `folder`, one line range at a time,
    from their known purchases (stage_prior_purchases first); returns how many customers and
    how many distinct profiles the batch has."""
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
