"""Publications: a batch's validated recommendations become its customers' current answer.

`batch_publications` holds one row per batch whose business-rules step committed: the models
and catalog its recommendations come from. The view current_recommendations gives each customer
the list of their newest published batch (arrival order). A batch withdrawn (new content, a
failed validation) loses its row with its recommendations.
"""

from __future__ import annotations

import duckdb

from pipeline_project.tables import BATCH_PUBLICATIONS, CATALOG_VERSIONS


def publish(conn: duckdb.DuckDBPyConnection, batch_id: str, recommendations: int) -> None:
    """The batch's publication row (caller's transaction, its old row deleted already)."""
    conn.execute(
        f"""INSERT INTO {BATCH_PUBLICATIONS} BY NAME
        SELECT $batch_id AS batch_id, now() AS published_at,
               coalesce((SELECT max(model_version) FROM customer_segments
                         WHERE batch_id = $batch_id), 0) AS segment_model_version,
               (SELECT max(catalog_version) FROM {CATALOG_VERSIONS}) AS catalog_version,
               (SELECT count(*) FROM customer_segments WHERE batch_id = $batch_id) AS customers,
               $recommendations AS recommendations""",
        {"batch_id": batch_id, "recommendations": recommendations},
    )


# The batches that hold some customer's current answer: each segmented customer's newest
# published batch (arrival order), as current_recommendations reads it.
_LIVE_SQL = f"""
SELECT DISTINCT batch_id FROM (
    SELECT s.customer_id, arg_max(s.batch_id, b.arrival_seq) AS batch_id
    FROM customer_segments AS s
    JOIN batches AS b USING (batch_id)
    JOIN {BATCH_PUBLICATIONS} USING (batch_id)
    WHERE b.accepted
    GROUP BY s.customer_id)
"""


def live_batches(
    conn: duckdb.DuckDBPyConnection, where: str = "true", newest: int | None = None
) -> list[str]:
    """The batches holding a current answer whose publication matches `where` (a condition on
    batch_publications' columns, from the code): what a new model or catalog must re-score;
    with `newest`, only among the newest that many batches holding a current answer (arrival
    order), so that the older ones stay as they are however often this is asked."""
    limit = "" if newest is None else f" ORDER BY arrival_seq DESC LIMIT {int(newest)}"
    return sorted(
        b
        for (b,) in conn.execute(
            f"SELECT batch_id FROM (SELECT * FROM ({_LIVE_SQL})"
            f" JOIN (SELECT batch_id, arrival_seq FROM batches) USING (batch_id){limit})"
            f" JOIN {BATCH_PUBLICATIONS} USING (batch_id) WHERE {where}"
        ).fetchall()
    )
