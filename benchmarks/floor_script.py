"""The floor for ingest + validate: the fastest DuckDB code for the same split, not a correct one.

DuckDB's parallel JSON reader with typed columns reads every line, the contract's rules run as
SQL, the good lines become customers and their unnested purchases, the rest a reject table with
the first broken rule. The reader drops the lines it cannot parse (`ignore_errors`), so this is
no dead-letter split (those lines end nowhere); it is what a correct design can approach.

    python benchmarks/floor_script.py LANDING_FILE WORKDIR

Prints one JSON line: seconds, rows, peak RSS.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import duckdb

from pipeline_project.contract import EMAIL_PATTERN, UUID_PATTERN

FLOOR_SQL = f"""
CREATE TABLE typed AS
SELECT row_number() OVER () AS line_no, *
FROM read_ndjson('{{path}}', columns = {{
        'id': 'VARCHAR', 'email': 'VARCHAR', 'createdAt': 'VARCHAR',
        'purchaseHistory': 'STRUCT(productId VARCHAR, amount DOUBLE, date VARCHAR)[]'}},
    ignore_errors = true, maximum_object_size = 2000000);
CREATE TABLE checked AS
WITH duplicates AS (
    SELECT lower(id) AS key, min(line_no) AS first_line FROM typed WHERE id IS NOT NULL
    GROUP BY key HAVING count(*) > 1
)
SELECT t.*, CASE
    WHEN id IS NULL OR NOT regexp_full_match(id, '{UUID_PATTERN}') THEN 'bad id'
    WHEN first_line < line_no THEN 'duplicate id'
    WHEN email IS NULL OR NOT regexp_full_match(email, '{EMAIL_PATTERN}') THEN 'bad email'
    WHEN try_cast("createdAt" AS TIMESTAMPTZ) IS NULL THEN 'bad createdAt'
    WHEN "purchaseHistory" IS NULL THEN 'bad purchaseHistory'
    WHEN NOT list_bool_and(list_transform("purchaseHistory", lambda p:
            coalesce(length(trim(p.productId)) > 0 AND p.amount > 0 AND isfinite(p.amount)
                     AND try_cast(p.date AS TIMESTAMPTZ) IS NOT NULL, false)))
        THEN 'bad purchase'
    END AS reason
FROM typed AS t LEFT JOIN duplicates ON duplicates.key = lower(t.id);
DROP TABLE typed;
CREATE TABLE rejected AS SELECT line_no, reason FROM checked WHERE reason IS NOT NULL;
CREATE TABLE customer_purchases AS
SELECT line_no, id::UUID AS customer_id, p.productId AS product_id, p.amount,
       p.date::TIMESTAMPTZ AS purchased_at
FROM (SELECT line_no, id, unnest("purchaseHistory") AS p FROM checked WHERE reason IS NULL);
CREATE TABLE customers AS
SELECT line_no, id::UUID AS customer_id, email, "createdAt"::TIMESTAMPTZ AS created_at,
       len("purchaseHistory") AS purchase_count
FROM checked WHERE reason IS NULL;
DROP TABLE checked;
"""


def main() -> None:
    landing, workdir = Path(sys.argv[1]), Path(sys.argv[2])
    workdir.mkdir(parents=True, exist_ok=True)
    db = workdir / "floor.duckdb"
    db.unlink(missing_ok=True)
    conn = duckdb.connect(str(db))
    started = time.perf_counter()
    path = str(landing).replace("'", "''")
    conn.execute(FLOOR_SQL.replace("{path}", path))
    seconds = round(time.perf_counter() - started, 2)
    counts = {
        table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        for table in ("customers", "customer_purchases", "rejected")
    }
    conn.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    print(json.dumps({"ingest_validate": seconds, **counts, "peak_rss_mib": peak}))


if __name__ == "__main__":
    main()
