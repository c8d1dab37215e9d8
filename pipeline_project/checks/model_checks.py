"""Checks on model output: every customer is embedded or dead-lettered; few are dead-lettered."""

import dagster as dg
import duckdb

from pipeline_project.checks.conservation import count_not_placed_exactly_once
from pipeline_project.core import dead_letters
from pipeline_project.partitions import batches
from pipeline_project.tables import CUSTOMER_EMBEDDINGS

EMBEDDED_OR_DEAD_LETTERED = "every_customer_embedded_or_dead_lettered"
DEAD_LETTER_SHARE_BELOW_THRESHOLD = "embedding_dead_letter_share_below_threshold"

# partitions_def on a check spec is a preview API; it is the only way to keep each batch's
# result (pass/fail per partition) instead of "latest run wins".
EMBEDDING_CHECK_SPECS = [
    dg.AssetCheckSpec(
        EMBEDDED_OR_DEAD_LETTERED,
        asset=CUSTOMER_EMBEDDINGS,
        blocking=True,
        partitions_def=batches,
        description="Each valid customer has an embedding or a pending dead-letter record (one"
        " not replayed yet), never both.",
    ),
    dg.AssetCheckSpec(
        DEAD_LETTER_SHARE_BELOW_THRESHOLD,
        asset=CUSTOMER_EMBEDDINGS,
        partitions_def=batches,
        description="Share of customers dead-lettered by inference is at most the threshold.",
    ),
]

_COUNTS_SQL = """
SELECT
    (SELECT count(*) FROM customers WHERE batch_id = $batch_id) AS customers,
    (SELECT count(*) FROM customer_embeddings WHERE batch_id = $batch_id) AS embedded
"""


def embedding_check_results(
    conn: duckdb.DuckDBPyConnection, batch_id: str, stage: str, dead_letter_threshold: float
) -> list[dg.AssetCheckResult]:
    [(customers, embedded)] = conn.execute(_COUNTS_SQL, {"batch_id": batch_id}).fetchall()
    dead = dead_letters.count_pending(conn, batch_id, stage)
    misplaced = count_not_placed_exactly_once(
        conn,
        source="SELECT customer_id FROM customers WHERE batch_id = $batch_id",
        key="customer_id",
        destinations=[
            "SELECT customer_id FROM customer_embeddings WHERE batch_id = $batch_id",
            f"SELECT record_key::UUID AS customer_id FROM ({dead_letters.PENDING_SQL})",
        ],
        params={"batch_id": batch_id, "stage": stage},
    )
    share = dead / customers if customers else 0.0
    figures = {"customers": customers, "embedded": embedded, "dead_lettered": dead}
    return [
        dg.AssetCheckResult(
            asset_key=CUSTOMER_EMBEDDINGS,
            check_name=EMBEDDED_OR_DEAD_LETTERED,
            passed=customers == embedded + dead and misplaced == 0,
            severity=dg.AssetCheckSeverity.ERROR,
            metadata={**figures, "customers_not_placed_exactly_once": misplaced},
        ),
        dg.AssetCheckResult(
            asset_key=CUSTOMER_EMBEDDINGS,
            check_name=DEAD_LETTER_SHARE_BELOW_THRESHOLD,
            passed=share <= dead_letter_threshold,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={**figures, "dead_letter_share": share, "threshold": dead_letter_threshold},
        ),
    ]
