"""Checks on validated input: no row vanishes, and the schema error rate stays low.

A blank line (landing_files.BLANK_LINE_SQL) is no record: its place is the blank line count,
in neither table, and it is out of the error rate.
"""

from __future__ import annotations

import dagster as dg
import duckdb

from pipeline_project.checks.conservation import count_not_placed_exactly_once
from pipeline_project.checks.verdicts import NotJudged, Verdict
from pipeline_project.core.landing_files import BLANK_LINE_SQL
from pipeline_project.partitions import batches

ROWS_CONSERVED = "rows_conserved"
# Lines judged at once by rows_conserved (inside the swap transaction): memory per range.
CONSERVATION_RANGE = 1_000_000
FILE_COMPLETE = "landing_file_read_to_the_end_with_records"
ERROR_RATE_BELOW_THRESHOLD = "schema_error_rate_below_threshold"
ERROR_RATE_BELOW_HARD_CEILING = "schema_error_rate_below_hard_ceiling"

# partitions_def on a check spec is a preview API; it is the only way to keep each batch's
# result (pass/fail per partition in the UI) instead of "latest run wins".
INPUT_CHECK_SPECS = [
    dg.AssetCheckSpec(
        FILE_COMPLETE,
        asset="customers",
        blocking=True,
        partitions_def=batches,
        description="The landing file was read to its end (no truncated gzip, no read error)"
        " and holds at least one record: half a file or an empty one stops here.",
    ),
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


# The first line where the file could not be read further, and the landing file's name.
_READ_ERROR_SQL = """
SELECT (SELECT landing_file FROM batches WHERE batch_id = $b),
       min(line_no), arg_min(read_error, line_no)
FROM raw_customers WHERE batch_id = $b AND read_error IS NOT NULL
"""


def file_complete_result(
    conn: duckdb.DuckDBPyConnection, batch_id: str, records: int
) -> dg.AssetCheckResult:
    """Fails when the landing file could not be read to its end, or holds no record."""
    [(landing_file, line, read_error)] = conn.execute(_READ_ERROR_SQL, {"b": batch_id}).fetchall()
    name = landing_file or f"the landing file of {batch_id}"
    if read_error is not None:
        why = f"{name} could not be read past line {line - 1}: {read_error}"
    elif records == 0:
        why = f"{name} holds no record (it is empty or holds only blank lines)"
    else:
        why = f"{name} was read to its end: {records} records"
    figures = {"records": records, "landing_file": landing_file or ""}
    if read_error is not None:
        figures |= {"broke_at_line": line, "read_error": read_error}
    return dg.AssetCheckResult(
        asset_key="customers",
        check_name=FILE_COMPLETE,
        passed=read_error is None and records > 0,
        severity=dg.AssetCheckSeverity.ERROR,
        description=why,
        metadata=figures,
    )


def input_check_results(
    conn: duckdb.DuckDBPyConnection, batch_id: str, threshold: float, ceiling: float
) -> list[Verdict]:
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
        range_size=CONSERVATION_RANGE,
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
    complete = file_complete_result(conn, batch_id, records)
    cut = "read_error" in complete.metadata  # what stops it is the file check
    return [
        complete,
        dg.AssetCheckResult(
            asset_key="customers",
            check_name=ROWS_CONSERVED,
            passed=raw == valid + invalid + blank and misplaced == 0,
            severity=dg.AssetCheckSeverity.ERROR,
            metadata={**figures, "lines_not_placed_exactly_once": misplaced},
        ),
        *_error_rate(records, rate, figures, ERROR_RATE_BELOW_THRESHOLD, threshold, "threshold",
                     cut),
        *_error_rate(records, rate, figures, ERROR_RATE_BELOW_HARD_CEILING, ceiling, "ceiling",
                     cut),
    ]  # fmt: skip


def is_cut(verdicts: list[Verdict]) -> bool:
    """The batch's landing file could not be read to its end (its file check says so)."""
    return any(
        isinstance(v, dg.AssetCheckResult) and v.check_name == FILE_COMPLETE
        and "read_error" in v.metadata
        for v in verdicts
    )  # fmt: skip


def _error_rate(
    records: int, rate: float, figures: dict, check_name: str, limit: float, name: str,
    cut: bool = False,
) -> list[Verdict]:  # fmt: skip
    """The error rate against `limit`; no verdict on a batch without a record, or on a file
    that could not be read to its end (its cut line is no bad record: what stops such a batch
    is landing_file_read_to_the_end_with_records, one failure and one alert)."""
    if records == 0:
        return [NotJudged(check_name, "the batch holds no record: no error rate")]
    if cut:
        return [NotJudged(check_name, "the landing file was not read to its end: no error rate")]
    ceiling = check_name == ERROR_RATE_BELOW_HARD_CEILING
    return [
        dg.AssetCheckResult(
            asset_key="customers",
            check_name=check_name,
            passed=rate <= limit,
            severity=dg.AssetCheckSeverity.ERROR if ceiling else dg.AssetCheckSeverity.WARN,
            metadata={**figures, name: limit},
        )
    ]
