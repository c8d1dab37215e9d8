"""Checks on validated input: no row vanishes, and the schema error rate stays low.

A blank line (landing_files.BLANK_LINE_SQL) is no record: its place is the blank line count,
in neither table, and it is out of the error rate.
"""

from __future__ import annotations

import dagster as dg
import duckdb

from pipeline_project.checks.conservation import count_not_placed_exactly_once
from pipeline_project.core.landing_files import BLANK_LINE_SQL
from pipeline_project.partitions import batches

ROWS_CONSERVED = "rows_conserved"
ERROR_RATE_BELOW_THRESHOLD = "schema_error_rate_below_threshold"
ERROR_RATE_BELOW_HARD_CEILING = "schema_error_rate_below_hard_ceiling"

# partitions_def on a check spec is a preview API; it is the only way to keep each batch's
# result (pass/fail per partition in the UI) instead of "latest run wins".
INPUT_CHECK_SPECS = [
    dg.AssetCheckSpec(
        ROWS_CONSERVED,
        asset="customers",
        blocking=True,
        partitions_def=batches,
        description="Every raw line is in exactly one of customers or schema_errors, or blank.",
    ),
    dg.AssetCheckSpec(
        ERROR_RATE_BELOW_THRESHOLD,
        asset="customers",
        partitions_def=batches,
        description="Share of records (blank lines aside) rejected into schema_errors is at"
        " most the alert threshold.",
    ),
    dg.AssetCheckSpec(
        ERROR_RATE_BELOW_HARD_CEILING,
        asset="customers",
        blocking=True,
        partitions_def=batches,
        description="Above this share of rejected lines the batch does not flow downstream.",
    ),
]

_BLANK_RAW_LINES = f"SELECT line_no FROM raw_customers WHERE batch_id = $b AND {BLANK_LINE_SQL}"
_CONSERVATION_SQL = f"""
SELECT
    (SELECT count(*) FROM raw_customers WHERE batch_id = $b) AS raw_rows,
    (SELECT count(*) FROM ({_BLANK_RAW_LINES})) AS blank_lines,
    (SELECT count(*) FROM customers WHERE batch_id = $b) AS valid_rows,
    (SELECT count(*) FROM schema_errors WHERE batch_id = $b) AS invalid_rows
"""


def input_check_results(
    conn: duckdb.DuckDBPyConnection, batch_id: str, threshold: float, ceiling: float
) -> list[dg.AssetCheckResult]:
    """Evaluate the input checks on the committed tables of one batch."""
    [(raw, blank, valid, invalid)] = conn.execute(_CONSERVATION_SQL, {"b": batch_id}).fetchall()
    misplaced = count_not_placed_exactly_once(
        conn,
        source="SELECT line_no FROM raw_customers WHERE batch_id = $b",
        key="line_no",
        destinations=[
            "SELECT line_no FROM customers WHERE batch_id = $b",
            "SELECT line_no FROM schema_errors WHERE batch_id = $b",
            _BLANK_RAW_LINES,
        ],
        params={"b": batch_id},
    )
    records = raw - blank
    rate = invalid / records if records else 0.0
    figures = {
        "raw_rows": raw,
        "blank_lines": blank,
        "valid_rows": valid,
        "invalid_rows": invalid,
        "error_rate": rate,
    }
    return [
        dg.AssetCheckResult(
            asset_key="customers",
            check_name=ROWS_CONSERVED,
            passed=raw == valid + invalid + blank and misplaced == 0,
            severity=dg.AssetCheckSeverity.ERROR,
            metadata={**figures, "lines_not_placed_exactly_once": misplaced},
        ),
        dg.AssetCheckResult(
            asset_key="customers",
            check_name=ERROR_RATE_BELOW_THRESHOLD,
            passed=rate <= threshold,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={**figures, "threshold": threshold},
        ),
        dg.AssetCheckResult(
            asset_key="customers",
            check_name=ERROR_RATE_BELOW_HARD_CEILING,
            passed=rate <= ceiling,
            severity=dg.AssetCheckSeverity.ERROR,
            metadata={**figures, "ceiling": ceiling},
        ),
    ]
