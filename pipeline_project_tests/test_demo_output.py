"""The demo's summary as a user reads it: aligned tables whatever the batch IDs, plain text when
not on a terminal, and a plain notice when there is no product catalog."""

import os
import re
from pathlib import Path

import dagster as dg
import pytest
from click.testing import CliRunner, Result

from pipeline_project.cli import main
from pipeline_project_tests.helpers import buyer, write_lines

LONG_ID = "store_0042_customers_export_2025_10_01_x"
SHORT_ID = "b1"
FAILING_ID = "h_all_invalid"  # above the hard error-rate ceiling: its run fails
VALIDATION_HEADER = [
    "batch", "status", "rows in", "valid", "invalid", "blank lines", "err rate", "returning",
    "profiles", "cache hits", "model calls", "dead-lettered",
]  # fmt: skip
RECOMMENDATION_HEADER = [
    "batch", "segments", "recommendations", "served 5", "fewer", "kept", "rejected",
    "out_of_stock", "low_confidence", "already_purchased", "implausible_value",
]  # fmt: skip


def summary_tables(output: str) -> list[list[str]]:
    """The output's tables, each as its lines: header, rule, a line per batch."""
    tables: list[list[str]] = []
    previous_was_table = False
    for line in output.splitlines():
        is_table = line.startswith("|")
        if is_table and not previous_was_table:
            tables.append([])
        if is_table:
            tables[-1].append(line)
        previous_was_table = is_table
    return tables


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def table_rows(table: list[str]) -> dict[str, dict[str, str]]:
    """A table's rows by batch ID, each as {column header: cell}."""
    header, _rule, *lines = table
    names = cells(header)
    return {row[0]: dict(zip(names, row, strict=True)) for row in map(cells, lines)}


CHECKS_HEADER = ["batch", "checks passed", "failed", "not judged"]


def summary(output: str) -> tuple[dict, dict]:
    """The demo's first two tables: validation and inference, recommendations."""
    validation, recommendation, _ = summary_tables(output)
    assert cells(validation[0]) == VALIDATION_HEADER
    assert cells(recommendation[0]) == RECOMMENDATION_HEADER
    return table_rows(validation), table_rows(recommendation)


def check_verdicts(output: str) -> dict[str, dict[str, str]]:
    """The demo's third table: per batch, how many checks passed, failed, were not judged."""
    *_, checks = summary_tables(output)
    assert cells(checks[0]) == CHECKS_HEADER
    return table_rows(checks)


def number(cell: str) -> int:
    return int(cell.replace(",", ""))


def assert_aligned(table: list[str]) -> None:
    """Every line of the table has its column separators at the same places, and each cell sits
    in its column: text to the left, figures to the right, one space from the separators."""
    separators = {tuple(m.start() for m in re.finditer(r"\|", line)) for line in table}
    assert len(separators) == 1, "\n".join(table)
    [positions] = separators
    header, rule, *lines = table
    assert set(rule) <= {"|", "-"}
    for line in lines:
        for left, right in zip(positions, positions[1:], strict=False):
            inside = line[left + 1 : right]
            value = inside.strip()
            assert inside.startswith(" ") and inside.endswith(" ") and value, line
            if re.fullmatch(r"[\d,.%-]+", value):  # figures: right-aligned
                assert inside.endswith(f"{value} "), line
            else:
                assert inside.startswith(f" {value}"), line


@pytest.fixture(scope="module")
def no_catalog_demo(tmp_path_factory) -> tuple[Path, Result]:
    """The demo in a fresh folder whose landing folder holds the user's own batches (a long ID,
    a short one, one that fails) and no catalog file: run once, in process."""
    root = tmp_path_factory.mktemp("demo")
    landing = root / "landing"
    write_lines(landing / f"{LONG_ID}.jsonl", [buyer(i, "books") for i in range(4)])
    write_lines(landing / f"{SHORT_ID}.jsonl", [buyer(i, c) for i, c in enumerate(["toys"] * 3)])
    write_lines(landing / f"{FAILING_ID}.jsonl", ["{", "[]"])
    env = {key: None for key in os.environ if key.startswith(("PIPELINE_", "DAGSTER_"))}
    env |= {"PIPELINE_LANDING_DIR": str(landing), "DAGSTER_HOME": None}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        result = CliRunner().invoke(main, ["demo"], env=env)
    return root, result


@pytest.mark.slow
def test_summary_columns_line_up_for_long_and_short_batch_ids(no_catalog_demo):
    root, result = no_catalog_demo
    assert len(LONG_ID) == 40
    assert "\x1b" not in result.output  # not a terminal: no ANSI escapes
    tables = summary_tables(result.stdout)
    assert len(tables) == 3, result.stdout
    for table in tables:
        assert len(table) == 2 + 3  # header, rule, one line per batch: no row is wrapped
        assert_aligned(table)
    validation, recommendation = summary(result.stdout)
    assert set(validation) == set(recommendation) == {LONG_ID, SHORT_ID, FAILING_ID}
    assert [validation[b]["status"] for b in (LONG_ID, SHORT_ID, FAILING_ID)] == [
        "ok", "ok", "FAILED",
    ]  # fmt: skip
    long, short = validation[LONG_ID], validation[SHORT_ID]
    assert (number(long["rows in"]), number(long["valid"]), number(long["invalid"])) == (4, 4, 0)
    assert (number(short["rows in"]), number(short["valid"]), number(short["invalid"])) == (3, 3, 0)
    assert validation[FAILING_ID]["err rate"] == "100.00%"
    # no verdict is not a pass: a first batch has no volume baseline, and the demo says so
    verdicts = check_verdicts(result.stdout)
    assert number(verdicts[LONG_ID]["not judged"]) >= 1
    assert f"{LONG_ID}: not judged (too little data to judge): " in result.stdout
    assert "record_count_within_expected_range" in result.stdout
    assert number(verdicts[FAILING_ID]["failed"]) >= 1
    assert number(short["profiles"]) == 1 and number(short["model calls"]) == 1
    # blank lines: what validation reports on `customers` (0 when it reports none)
    with dg.DagsterInstance.from_config(str(root / ".dagster_home")) as instance:
        for batch_id in (LONG_ID, SHORT_ID):
            [record] = instance.fetch_materializations(
                dg.AssetRecordsFilter(dg.AssetKey("customers"), asset_partitions=[batch_id]),
                limit=1,
            ).records
            metadata = record.asset_materialization.metadata
            blank = metadata["blank_lines"].value if "blank_lines" in metadata else 0
            assert number(validation[batch_id]["blank lines"]) == blank


@pytest.mark.slow
def test_demo_without_a_catalog_names_the_missing_file_and_skips_recommendations(
    no_catalog_demo,
):
    root, result = no_catalog_demo
    assert result.exit_code == 1  # the failing batch; the missing catalog fails no run
    assert f"runs failed for: {FAILING_ID}" in result.stderr
    assert "No product catalog" in result.stdout, result.stdout
    notice = result.stdout.split("No product catalog", 1)[1]
    catalog = root / "data" / "catalog.csv"  # the default PIPELINE_CATALOG_PATH
    assert f"{catalog} does not exist" in notice
    assert "product_id,name,category,price,in_stock" in notice  # the CSV header it must have
    assert "pipeline-project generate --batches 0" in notice
    assert "PIPELINE_CATALOG_PATH" in notice
    _, recommendation = summary(result.stdout)
    for batch_id in (LONG_ID, SHORT_ID):
        row = recommendation[batch_id]
        assert row["recommendations"] == "skipped: no catalog"
        assert number(row["segments"]) >= 1  # the stages before recommendations ran
        assert {row[c] for c in RECOMMENDATION_HEADER[3:]} == {"-"}  # no figures, not 0 kept
    assert recommendation[FAILING_ID]["recommendations"] == "not run"

    with dg.DagsterInstance.from_config(str(root / ".dagster_home")) as instance:
        runs = {r.tags["dagster/partition"]: r.status for r in instance.get_runs()}
        assert runs[LONG_ID] == runs[SHORT_ID] == dg.DagsterRunStatus.SUCCESS
        for asset in ("recommendations", "validated_recommendations", "rejected_recommendations"):
            assert instance.get_materialized_partitions(dg.AssetKey(asset)) == set()
        assert instance.get_materialized_partitions(dg.AssetKey("customer_segments")) == {
            LONG_ID, SHORT_ID,
        }  # fmt: skip
