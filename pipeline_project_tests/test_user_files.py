"""A user's own export: a byte-order mark and blank lines are no records and no errors."""

import gzip
from pathlib import Path

import pytest

from pipeline_project.checks.input_checks import input_check_results
from pipeline_project.resources import Warehouse
from pipeline_project_tests.helpers import (
    buyer,
    customer,
    rows_conserved_after,
    run_batch,
    store_and_validate,
)

BOM = b"\xef\xbb\xbf"


def export_file(path: Path, lines: list[str], bom: bool = True) -> Path:
    """A file as spreadsheet and Windows exports write it: a BOM, then CRLF lines."""
    data = (BOM if bom else b"") + b"".join(line.encode() + b"\r\n" for line in lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def metadata(result, asset: str) -> dict:
    [mat] = [
        e.event_specific_data.materialization
        for e in result.get_asset_materialization_events()
        if e.asset_key.to_user_string() == asset
    ]
    return {k: v.value for k, v in mat.metadata.items()}


def test_fifty_good_customers_with_a_bom_and_two_blank_lines_have_no_errors(
    defs, instance, settings
):
    lines = [buyer(i, "books") for i in range(50)]
    lines[25:25] = ["   "]  # a line of spaces in the middle, an empty line at the end
    export_file(settings.landing_dir / "b001.jsonl", [*lines, ""])
    result = run_batch(defs, instance, "b001")
    assert result.success
    customers = metadata(result, "customers")
    assert customers["rows_in"] == 52
    assert (customers["rows_valid"], customers["rows_invalid"]) == (50, 0)
    assert customers["blank_lines"] == 2
    assert customers["error_rate"] == 0.0
    assert metadata(result, "schema_errors")["dagster/partition_row_count"] == 0
    raw = metadata(result, "raw_customers")
    assert (raw["dagster/partition_row_count"], raw["blank_lines"]) == (52, 2)
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert all(check.passed for check in checks.values()), checks
    assert checks["rows_conserved"].metadata["blank_lines"].value == 2


@pytest.mark.parametrize("name", ["b1.jsonl", "b1.jsonl.gz"])
def test_the_bom_of_the_first_line_is_stripped_and_the_record_is_valid(tmp_path, name):
    path = export_file(tmp_path / "landing" / name, [customer()])
    warehouse = Warehouse(database=str(tmp_path / "w.duckdb"))
    _, summary = store_and_validate(warehouse, path, "b1", 1000, 1 << 20)
    assert (summary.valid, summary.invalid) == (1, 0)
    with warehouse.get_connection() as conn:
        [(raw, byte_length)] = conn.execute("SELECT raw, byte_length FROM raw_customers").fetchall()
    assert raw == customer() and byte_length == len(customer())


def test_blank_lines_are_counted_apart_from_records_and_errors(tmp_path):
    lines = ["", customer(), "   ", "\t \t", "{oops", "\r"]  # "\r": a CR CR LF line end
    path = export_file(tmp_path / "landing" / "b1.jsonl", lines, bom=False)
    warehouse = Warehouse(database=str(tmp_path / "w.duckdb"))
    stored, summary = store_and_validate(warehouse, path, "b1", 2, 1 << 20)
    assert (stored.lines, stored.blank_lines) == (6, 4)
    assert (summary.rows_in, summary.blank_lines, summary.valid, summary.invalid) == (6, 4, 1, 1)
    assert summary.error_rate == 0.5  # one of two records
    with warehouse.get_connection() as conn:
        assert conn.execute("SELECT line_no FROM schema_errors").fetchall() == [(5,)]
        _, conserved, warned, _ = input_check_results(conn, "b1", 0.05, 0.6)
    assert conserved.passed and conserved.metadata["blank_lines"].value == 4
    assert conserved.metadata["error_rate"].value == 0.5
    assert not warned.passed  # 50% of the records, not 1 of 6 lines


def test_a_whitespace_line_cut_at_the_length_limit_is_rejected_not_blank(tmp_path):
    path = export_file(tmp_path / "landing" / "b1.jsonl", [" " * 500, customer()], bom=False)
    warehouse = Warehouse(database=str(tmp_path / "w.duckdb"))
    stored, summary = store_and_validate(warehouse, path, "b1", 1000, 400)
    assert (stored.blank_lines, summary.blank_lines, summary.invalid) == (0, 0, 1)


def test_rows_conserved_fails_when_a_blank_line_is_also_placed_in_schema_errors(
    defs, instance, settings
):
    export_file(settings.landing_dir / "b001.jsonl", [customer(), ""])
    assert run_batch(defs, instance, "b001").success
    conserved = rows_conserved_after(
        settings,
        "b001",
        "INSERT INTO schema_errors SELECT 'b001', 2, '', ['line: empty'], 1, now()",
    )
    assert conserved.passed is False
    assert conserved.metadata["lines_not_placed_exactly_once"].value == 1
