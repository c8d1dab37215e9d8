"""The baseline: the whole non-model pipeline as one hand-written DuckDB script.

What a capable engineer writes without Dagster: one DuckDB file, one SQL pass per stage, no
chunking, no staging, no per-field error messages (the first broken rule only), no checks,
no metadata. It does the same work as the pipeline: lines -> validation (valid customers and
purchases, dead letters with a reason) -> profile texts -> vectors (from a cache of profile
vectors, the model's time is taken out) -> k-means segments -> top-N recommendations ->
business rules.

    python benchmarks/duckdb_script.py LANDING CATALOG_CSV VECTORS PRODUCT_VECTORS WORKDIR

VECTORS: Parquet of text_hash, embedding (profile vectors, e.g. the pipeline's embedding_cache
for the same backend); PRODUCT_VECTORS: Parquet of product_id, embedding.
Prints one JSON line of stage seconds, row counts and peak RSS.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
from sklearn.cluster import MiniBatchKMeans

from pipeline_project.contract import EMAIL_PATTERN, UUID_PATTERN
from pipeline_project.core.profiles import AS_OF_SQL, PROFILES_SQL
from pipeline_project.core.recommendations import ScoringInputs, rules_sql, score_profiles
from pipeline_project.tables import PRIOR_PURCHASES, WAREHOUSE_TABLES

SEGMENTS, TOP_N, SEGMENT_WEIGHT = 8, 5, 0.7

VALIDATE_SQL = """
CREATE TEMP TABLE typed AS
WITH lines AS (
    SELECT row_number() OVER () AS line_no, line AS raw, try_cast(line AS JSON) AS doc
    FROM read_csv($path, columns = {'line': 'VARCHAR'}, delim = '\\x01', quote = '',
                  escape = '', header = false, auto_detect = false, max_line_size = 2000000)
), fields AS (
    SELECT line_no, raw, doc,
        json_extract(doc, ['$.id', '$.email', '$.createdAt', '$.purchaseHistory']) AS f
    FROM lines
)
SELECT line_no, raw, f[4] AS purchases,
        CASE WHEN json_type(f[1]) = 'VARCHAR' THEN f[1] ->> '$' END AS id,
        CASE WHEN json_type(f[2]) = 'VARCHAR' THEN f[2] ->> '$' END AS email,
        try_cast(CASE WHEN json_type(f[3]) = 'VARCHAR' THEN f[3] ->> '$' END AS TIMESTAMPTZ)
            AS created_at,
        json_type(doc) AS doc_type, json_type(f[4]) AS purchases_type
FROM fields
"""

# Each purchase parsed once; checked and kept from the same table.
ELEMENTS_SQL = """
CREATE TEMP TABLE elements AS
WITH items AS (
    SELECT line_no, json_extract(purchases, '$[*]') AS items FROM typed
    WHERE purchases_type = 'ARRAY'
), elements AS (
    SELECT line_no, generate_subscripts(items, 1) - 1 AS purchase_idx, unnest(items) AS e
    FROM items
), fields AS (
    SELECT line_no, purchase_idx, json_type(e) AS e_type,
           json_extract(e, ['$.productId', '$.amount', '$.date']) AS f
    FROM elements
)
SELECT line_no, purchase_idx, e_type,
    CASE WHEN json_type(f[1]) = 'VARCHAR' THEN f[1] ->> '$' END AS product_id,
    CASE WHEN json_type(f[2]) IN ('BIGINT', 'UBIGINT', 'DOUBLE')
         THEN (f[2] ->> '$')::DOUBLE END AS amount,
    try_cast(CASE WHEN json_type(f[3]) = 'VARCHAR' THEN f[3] ->> '$' END AS TIMESTAMPTZ)
        AS purchased_at
FROM fields
"""

CHECK_SQL = f"""
CREATE TABLE checked AS
WITH purchase_checks AS (
    SELECT line_no, bool_and(e_type = 'OBJECT' AND length(trim(product_id)) > 0
                             AND amount > 0 AND isfinite(amount)
                             AND purchased_at IS NOT NULL) AS purchases_ok
    FROM elements GROUP BY line_no
), first_lines AS (
    SELECT lower(id) AS key, min(line_no) AS first_line FROM typed WHERE id IS NOT NULL
    GROUP BY key HAVING count(*) > 1
)
SELECT line_no, raw, id, email, created_at,
    CASE WHEN doc_type IS DISTINCT FROM 'OBJECT' THEN 'not a JSON object'
         WHEN id IS NULL OR NOT regexp_full_match(id, '{UUID_PATTERN}') THEN 'bad id'
         WHEN first_line < line_no THEN 'duplicate id'
         WHEN email IS NULL OR NOT regexp_full_match(email, '{EMAIL_PATTERN}') THEN 'bad email'
         WHEN created_at IS NULL THEN 'bad createdAt'
         WHEN purchases_type IS DISTINCT FROM 'ARRAY' THEN 'bad purchaseHistory'
         WHEN NOT coalesce(purchases_ok, true) THEN 'bad purchase'
    END AS reason
FROM typed LEFT JOIN purchase_checks USING (line_no)
LEFT JOIN first_lines ON first_lines.key = lower(typed.id);
DROP TABLE typed;
"""

SPLIT_SQL = """
CREATE TABLE dead_letter AS SELECT line_no, raw, reason FROM checked WHERE reason IS NOT NULL;
CREATE TABLE customer_purchases AS
SELECT 'b' AS batch_id, c.id::UUID AS customer_id, e.line_no, e.purchase_idx, e.product_id,
       e.amount, e.purchased_at
FROM elements AS e JOIN checked AS c USING (line_no) WHERE c.reason IS NULL;
CREATE TABLE customers AS
SELECT 'b' AS batch_id, c.line_no, c.id::UUID AS customer_id, c.email, c.created_at,
       coalesce(p.n, 0) AS purchase_count, coalesce(p.spend, 0) AS total_spend
FROM checked AS c
LEFT JOIN (SELECT line_no, count(*) AS n, sum(amount) AS spend FROM customer_purchases
           GROUP BY line_no) AS p USING (line_no)
WHERE c.reason IS NULL;
DROP TABLE checked;
DROP TABLE elements;
"""


def main() -> None:
    landing, catalog, vectors_file, product_vectors, workdir = (Path(a) for a in sys.argv[1:6])
    workdir.mkdir(parents=True, exist_ok=True)
    db = workdir / "script.duckdb"
    db.unlink(missing_ok=True)
    conn = duckdb.connect(str(db))
    seconds: dict[str, float] = {}

    def stage(name: str, started: float) -> float:
        seconds[name] = round(time.perf_counter() - started, 2)
        return time.perf_counter()

    t = time.perf_counter()
    conn.execute("SET preserve_insertion_order = true")
    conn.execute(VALIDATE_SQL, {"path": str(landing)})
    conn.execute(ELEMENTS_SQL)
    conn.execute(CHECK_SQL)
    conn.execute(SPLIT_SQL)
    t = stage("ingest_validate", t)

    conn.execute(
        "CREATE TABLE product_catalog AS SELECT * FROM read_csv(?, header = true)", [str(catalog)]
    )
    # one batch: no customer has purchases from an earlier one (the pipeline's profiles and
    # rules read them from prior_purchases)
    conn.execute(WAREHOUSE_TABLES[PRIOR_PURCHASES].ddl())
    conn.execute(f"CREATE TEMP TABLE batch_prior AS SELECT * FROM {PRIOR_PURCHASES}")
    [(as_of,)] = conn.execute(AS_OF_SQL, {"batch_id": "b"}).fetchall()
    conn.execute(
        f"CREATE TABLE profiles AS {PROFILES_SQL}",
        {"batch_id": "b", "as_of": as_of, "first": 0, "last": 2**62},
    )
    conn.execute(
        "CREATE TABLE vectors AS SELECT text_hash, embedding FROM read_parquet(?)",
        [str(vectors_file)],
    )
    distinct = conn.sql(
        "SELECT p.text_hash, count(*) AS customers, any_value(v.embedding) AS embedding"
        " FROM profiles AS p JOIN vectors AS v USING (text_hash) GROUP BY p.text_hash"
        " ORDER BY p.text_hash"
    ).to_arrow_table()
    matrix = np.asarray(distinct["embedding"].to_pylist(), dtype=np.float32)
    weights = distinct["customers"].to_numpy().astype(np.float64)
    t = stage("profiles_vectors", t)

    kmeans = MiniBatchKMeans(SEGMENTS, random_state=0, n_init=3, batch_size=4096)
    kmeans.fit(matrix, sample_weight=weights)
    segments = kmeans.predict(matrix)
    conn.register(
        "profile_segments",
        pa.table({"text_hash": distinct["text_hash"], "segment_id": segments}),
    )
    conn.execute(
        "CREATE TABLE customer_segments AS SELECT p.line_no, p.customer_id, s.segment_id"
        " FROM profiles AS p JOIN profile_segments AS s USING (text_hash)"
    )
    t = stage("segments", t)

    products = conn.sql(
        "SELECT c.product_id, c.price, v.embedding FROM product_catalog AS c"
        " JOIN read_parquet($path) AS v USING (product_id) ORDER BY c.product_id",
        params={"path": str(product_vectors)},
    ).to_arrow_table()
    product_ids = products["product_id"].to_pylist()
    bought = conn.sql(
        "SELECT s.segment_id, p.product_id, count(*) AS n, avg(p.amount) AS avg_amount"
        " FROM customer_purchases AS p JOIN customer_segments AS s USING (line_no)"
        " GROUP BY ALL"
    ).fetchall()
    counts = np.zeros((SEGMENTS, len(product_ids)))
    value = np.tile(products["price"].to_numpy(), (SEGMENTS, 1))
    index = {p: i for i, p in enumerate(product_ids)}
    for seg, prod, n, avg in bought:
        if prod in index:
            counts[seg, index[prod]], value[seg, index[prod]] = n, avg
    top = counts.max(axis=1, keepdims=True)
    inputs = ScoringInputs(
        product_ids,
        np.asarray(products["embedding"].to_pylist(), dtype=np.float32),
        np.divide(counts, top, out=np.zeros_like(counts), where=top > 0),
        value,
    )
    scored = score_profiles(matrix, segments, inputs, top_n=TOP_N, segment_weight=SEGMENT_WEIGHT)
    conn.register(
        "scored",
        pa.table(
            {
                "text_hash": distinct["text_hash"].take(scored["profile"]),
                "rank": scored["rank"],
                "product_id": pa.array(product_ids).take(scored["product"]),
                "confidence": scored["confidence"],
                "predicted_value": scored["predicted_value"],
            }
        ),
    )
    conn.execute(
        "CREATE TABLE recommendations AS SELECT 'b' AS batch_id, p.line_no, p.customer_id,"
        " s.rank, s.product_id, s.confidence, s.predicted_value"
        " FROM profiles AS p JOIN scored AS s USING (text_hash)"
    )
    t = stage("recommendations", t)

    conn.execute(
        f"CREATE TABLE ruled AS {rules_sql('recommendations')}",
        {
            "batch_id": "b",
            "min_confidence": 0.3,
            "max_predicted_value": 10_000.0,
            "first": 0,
            "last": 2**62,
        },
    )
    conn.execute(
        "CREATE TABLE validated_recommendations AS SELECT * FROM ruled WHERE len(failed_rules) = 0"
    )
    t = stage("business_rules", t)

    counts_out = {
        table: conn.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0]
        for table in ("customers", "customer_purchases", "dead_letter", "validated_recommendations")
    }
    conn.close()
    print(
        json.dumps(
            {
                "seconds": seconds,
                "total_seconds": round(sum(seconds.values()), 2),
                "rows": counts_out,
                "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            }
        )
    )


if __name__ == "__main__":
    main()
