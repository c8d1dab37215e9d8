"""Customer profile texts: what a customer buys, how much, how often, how recently.

A profile is built from everything known of the customer up to and including the batch: the
batch's own record and the purchases that earlier accepted batches (in arrival order) delivered
(prior_purchases), each purchase counted once. Customers who behave alike get the same text, so
the model embeds each profile once:

    "Customer who buys mostly electronics and books. Spend: high. Shopping trips: regular.
     Last purchase: fairly recent."

- categories: the (at most) two categories the customer bought most (purchases), from the
  product catalog ("unknown" for products missing from it);
- the bands are relative to the population, not fixed amounts: quartiles of the batch's
  customers (a seeded sample of at most PROFILE_SAMPLE of them, their whole known history):
  spend (total) low / moderate / high / very high; shopping trips (distinct purchase instants:
  a record has no basket id) occasional / regular / frequent / very frequent; days between the
  last purchase and the batch's latest purchase recent / fairly recent / a while ago / long
  ago. A value on a cut point takes the lower band. Grocery households and the generator's
  customers spread over the four bands alike (fixed bands put 98% of real households in one).
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline_project.core.arrow_results import arrow_table
from pipeline_project.core.catalog import PRODUCTS
from pipeline_project.core.staging import write_staged
from pipeline_project.tables import BATCHES, PRIOR_PURCHASES, WAREHOUSE_TABLES

# The batch's latest purchase: recency is measured from it ($as_of of PROFILES_SQL).
AS_OF_SQL = "SELECT max(purchased_at) FROM customer_purchases WHERE batch_id = $batch_id"


# Shoppers are cut into quartiles on a sample of at most this many of the batch's customers.
PROFILE_SAMPLE = 50_000
SPEND_BANDS = ("low", "moderate", "high", "very high")
TRIP_BANDS = ("occasional", "regular", "frequent", "very frequent")
RECENCY_BANDS = ("recent", "fairly recent", "a while ago", "long ago")


def _totals_sql(customers: str, purchases: str) -> str:
    """Each customer's figures (line_no, customer_id, last_at, trips, total_spend, days) and
    their purchases' categories (`p`), as CTEs."""
    return f"""
WITH c AS ({customers}
), p AS (
    SELECT p.line_no, coalesce(cat.category, 'unknown') AS category, p.amount, p.purchased_at,
           p.quantity
    FROM ({purchases}) AS p
    LEFT JOIN {PRODUCTS} AS cat ON cat.product_id = p.product_id
), totals AS (
    SELECT line_no, max(purchased_at) AS last_at, count(DISTINCT purchased_at) AS trips,
           sum(amount * quantity) AS total_spend,
           date_diff('day', max(purchased_at), $as_of::TIMESTAMPTZ) AS days
    FROM p GROUP BY line_no
)"""


def _band(value: str, cuts: str, names: tuple[str, ...]) -> str:
    """The band of `value` among the cut points `cuts` (a list parameter, ascending): the
    number of cut points below it names it."""
    cases = " ".join(
        f"WHEN len(list_filter({cuts}, lambda q: q < {value})) = {i} THEN '{name}'"
        for i, name in enumerate(names)
    )
    return f"CASE {cases} END"


def profiles_sql(customers: str, purchases: str) -> str:
    """The profile text of each customer of `customers` (line_no, customer_id) from its rows of
    `purchases` (line_no, product_id, amount, purchased_at, quantity: the purchase counted that
    many times), as of $as_of, banded by $spend_cuts, $trip_cuts, $day_cuts (profile_cuts).
    Both are queries from the code, never from data."""
    return f"""{_totals_sql(customers, purchases)}, by_category AS (
    SELECT line_no, category, sum(quantity) AS bought FROM p GROUP BY line_no, category
), top_categories AS (
    SELECT line_no, list(category ORDER BY bought DESC, category)[1:2] AS top
    FROM by_category GROUP BY line_no
), profiles AS (
    SELECT
        c.line_no,
        c.customer_id,
        CASE WHEN l.line_no IS NULL THEN 'Customer with no purchases yet.'
        ELSE 'Customer who buys mostly ' || array_to_string(t.top, ' and ') || '. '
            || 'Spend: ' || {_band("l.total_spend", "$spend_cuts", SPEND_BANDS)} || '. '
            || 'Shopping trips: ' || {_band("l.trips", "$trip_cuts", TRIP_BANDS)} || '. '
            || 'Last purchase: ' || {_band("l.days", "$day_cuts", RECENCY_BANDS)} || '.'
        END AS profile_text
    FROM c
    LEFT JOIN top_categories AS t USING (line_no)
    LEFT JOIN totals AS l USING (line_no)
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


# The quartiles of a seeded sample of the batch's customers with purchases (every customer of a
# batch of at most PROFILE_SAMPLE lines: one line in `step`); `prior`: where their earlier
# purchases are. `step` is written into the SQL: as a parameter it made the query 5x slower on
# DuckDB 1.5.5 (0.70 s against 0.14 s at 250k lines) and 2.6x on 2.0.1.
def _cuts_sql(prior: str, step: int) -> str:
    sampled = f"hash(line_no, 'profile sample') % {int(step)} = 0"
    return f"""{
        _totals_sql(
            f"SELECT line_no, customer_id FROM customers WHERE batch_id = $batch_id AND {sampled}",
            known_purchases_sql(prior).replace("line_no BETWEEN $first AND $last", sampled),
        )
    }
SELECT quantile_disc(total_spend, [0.25, 0.5, 0.75]), quantile_disc(trips, [0.25, 0.5, 0.75]),
       quantile_disc(days, [0.25, 0.5, 0.75])
FROM totals SEMI JOIN c USING (line_no)
"""


def profile_cuts(
    conn: duckdb.DuckDBPyConnection, batch_id: str, as_of, prior: str = "batch_prior"
) -> dict[str, list]:
    """The batch's quartile cut points of spend, trips and days since the last purchase (the
    parameters of PROFILES_SQL), from a sample of at most PROFILE_SAMPLE customers; their
    earlier purchases from `prior` (the temp table batch_prior while profiles are staged)."""
    [(lines,)] = conn.execute(
        "SELECT count(*) FROM customers WHERE batch_id = ?", [batch_id]
    ).fetchall()
    step = max(1, -(-lines // PROFILE_SAMPLE))
    [(spend, trips, days)] = conn.execute(
        _cuts_sql(prior, step), {"batch_id": batch_id, "as_of": as_of}
    ).fetchall()
    return {"spend_cuts": [float(x) for x in spend or []],
            "trip_cuts": [int(x) for x in trips or []],
            "day_cuts": [int(x) for x in days or []]}  # fmt: skip


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
    cuts = profile_cuts(conn, batch_id, as_of)
    [(last_line,)] = conn.execute(
        "SELECT coalesce(max(line_no), 0) FROM customers WHERE batch_id = ?", [batch_id]
    ).fetchall()
    pq.write_table(PROFILE_SCHEMA.empty_table(), folder / "part-empty.parquet")
    for part, first in enumerate(range(1, last_line + 1, chunk_rows)):
        params = {"batch_id": batch_id, "as_of": as_of, "first": first,
                  "last": first + chunk_rows - 1, **cuts}  # fmt: skip
        write_staged(folder, part, arrow_table(conn, PROFILES_SQL, params))
    [(customers, distinct_profiles)] = conn.execute(
        "SELECT count(*), count(DISTINCT text_hash) FROM read_parquet(?)",
        [str(folder / "*.parquet")],
    ).fetchall()
    return customers, distinct_profiles
