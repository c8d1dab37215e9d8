"""raw_customers and the validation step as Dagster assets: idempotent, transactional, checked."""

import itertools
import logging
import subprocess
import sys

import dagster as dg
import duckdb
import pytest

from pipeline_project.assets.ingestion import raw_customers
from pipeline_project.assets.validation import validated_customers
from pipeline_project.batch_history import recent_batch_metadata
from pipeline_project.core.landing_files import iter_raw_line_chunks, store_raw_lines
from pipeline_project.core.staging import write_staged
from pipeline_project.resources import Warehouse
from pipeline_project.sample_data import generate_batch
from pipeline_project.sensors.alerting import alert_finished_run
from pipeline_project.tables import CUSTOMERS
from pipeline_project_tests.helpers import (
    customer,
    not_judged,
    rows_conserved_after,
    run_batch,
    table_rows,
    warehouse_of,
    write_lines,
)

OTHER_ID = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"


def four_customers() -> list[str]:
    return [customer(id=f"6f1c2a3b-4d5e-4f60-8a7b-{i:012d}") for i in range(4)]


TABLES = ["raw_customers", "customers", "customer_purchases", "schema_errors"]


def snapshot(settings, batch_id=None) -> dict[str, list[tuple]]:
    return {t: table_rows(settings.duckdb_path, t, batch_id) for t in TABLES}


def test_materializing_a_batch_three_times_leaves_identical_tables(
    defs, instance, settings, catalog
):
    generate_batch(settings.landing_dir / "b001.jsonl", 300, 0.1, 1, catalog)
    generate_batch(settings.landing_dir / "b002.jsonl.gz", 200, 0.1, 2, catalog)
    assert run_batch(defs, instance, "b002").success
    snapshots = []
    for _ in range(3):
        assert run_batch(defs, instance, "b001").success
        snapshots.append(snapshot(settings))
    assert snapshots[0] == snapshots[1] == snapshots[2]
    counts = {t: len(rows) for t, rows in snapshots[0].items()}
    assert counts["raw_customers"] == 500
    assert counts["customers"] + counts["schema_errors"] == 500
    assert len(snapshot(settings, "b002")["raw_customers"]) == 200


def test_redelivered_file_replaces_exactly_its_batch(defs, instance, settings, catalog):
    generate_batch(settings.landing_dir / "b001.jsonl", 100, 0.0, 1, catalog)
    generate_batch(settings.landing_dir / "b002.jsonl", 100, 0.0, 2, catalog)
    run_batch(defs, instance, "b001")
    run_batch(defs, instance, "b002")
    before_b002 = snapshot(settings, "b002")

    # one broken line in five: at the hard ceiling (20%), not above it
    write_lines(settings.landing_dir / "b001.jsonl", [*four_customers(), customer(email="broken")])
    assert run_batch(defs, instance, "b001").success
    after = snapshot(settings, "b001")
    assert [r[1] for r in after["raw_customers"]] == [1, 2, 3, 4, 5]
    assert len(after["customers"]) == 4 and len(after["schema_errors"]) == 1
    assert snapshot(settings, "b002") == before_b002


@pytest.fixture
def ingested_b001(defs, instance, settings, catalog) -> tuple[dict, Warehouse]:
    """Batch b001 (50 valid lines) ingested and validated: its tables, and the warehouse."""
    generate_batch(settings.landing_dir / "b001.jsonl", 50, 0.0, 1, catalog)
    run_batch(defs, instance, "b001")
    return snapshot(settings), Warehouse(database=str(settings.duckdb_path))


def test_crash_inside_the_write_transaction_keeps_the_previous_batch(settings, ingested_b001):
    before, warehouse = ingested_b001
    with (
        pytest.raises(RuntimeError, match="crash"),
        warehouse.replace_batch([CUSTOMERS], "b001") as conn,
    ):
        conn.execute(f"INSERT INTO customers VALUES ('b001', 999, '{OTHER_ID}', 'x', now(), 0, 0)")
        raise RuntimeError("crash after delete and insert")
    assert snapshot(settings) == before


def test_crash_while_writing_the_raw_file_keeps_the_previous_lines(settings, ingested_b001):
    before, warehouse = ingested_b001
    lines = iter_raw_line_chunks(settings.landing_dir / "b001.jsonl", 10, 1000)
    with pytest.raises(RuntimeError, match="crash"), warehouse.replacing_raw_file("b001") as writer:
        store_raw_lines(writer, itertools.islice(lines, 2))
        raise RuntimeError("crash after two chunks")
    assert snapshot(settings) == before
    assert [p.name for p in warehouse.raw_file("b001").parent.iterdir()] == ["lines.parquet"]


def test_metadata_reports_rows_in_valid_invalid_error_rate_and_chunks(defs, instance, settings):
    lines = [customer(id=f"6f1c2a3b-4d5e-4f60-8a7b-{i:012d}") for i in range(9)] + ["{oops"]
    write_lines(settings.landing_dir / "b001.jsonl", lines)
    config = {"ops": {"validated_customers": {"config": {"chunk_rows": 4}}}}
    result = run_batch(defs, instance, "b001", run_config=config)
    assert result.success
    materializations = [
        e.event_specific_data.materialization for e in result.get_asset_materialization_events()
    ]
    meta = {
        m.asset_key.to_user_string(): {k: v.value for k, v in m.metadata.items()}
        for m in materializations
    }
    assert meta["customers"]["rows_in"] == 10
    assert meta["customers"]["rows_valid"] == 9
    assert meta["customers"]["rows_invalid"] == 1
    assert meta["customers"]["error_rate"] == pytest.approx(0.1)
    assert meta["customers"]["chunks"] == 3
    assert meta["raw_customers"]["dagster/partition_row_count"] == 10
    assert meta["schema_errors"]["invalid_lines_by_field"] == {"line": 1}


def check_results(result) -> dict[str, tuple[bool, str]]:
    return {
        e.check_name: (e.passed, e.severity.value) for e in result.get_asset_check_evaluations()
    }


def test_error_rate_above_threshold_warns_but_the_batch_flows_on(defs, instance, settings):
    lines = [customer(id=f"6f1c2a3b-4d5e-4f60-8a7b-{i:012d}") for i in range(9)] + ["{oops"]
    write_lines(settings.landing_dir / "b001.jsonl", lines)
    result = run_batch(defs, instance, "b001")
    assert result.success
    # no baseline yet: the record count is not judged (no result, never "passed")
    assert check_results(result) == {
        "landing_file_read_to_the_end_with_records": (True, "ERROR"),
        "rows_conserved": (True, "ERROR"),
        "schema_error_rate_below_threshold": (False, "WARN"),
        "schema_error_rate_below_hard_ceiling": (True, "ERROR"),
    }
    assert {e.partition for e in result.get_asset_check_evaluations()} == {"b001"}


def test_error_rate_above_hard_ceiling_fails_the_step_so_nothing_flows_downstream(
    defs, instance, settings
):
    write_lines(settings.landing_dir / "b001.jsonl", [customer(), "{", "[]"])
    result = run_batch(defs, instance, "b001")
    assert not result.success
    assert check_results(result)["schema_error_rate_below_hard_ceiling"] == (False, "ERROR")
    failure = result.get_step_failure_events()[0]
    assert "schema_error_rate_below_hard_ceiling" in failure.event_specific_data.error.message


def test_threshold_and_ceiling_are_launchpad_config(defs, instance, settings):
    write_lines(settings.landing_dir / "b001.jsonl", [customer(), "{", "[]"])
    config = {
        "ops": {
            "validated_customers": {
                "config": {"error_rate_threshold": 0.9, "hard_error_rate_ceiling": 0.9}
            }
        }
    }
    result = run_batch(defs, instance, "b001", run_config=config)
    assert result.success
    assert all(passed for passed, _ in check_results(result).values())


def test_missing_landing_file_fails_with_a_clear_error(defs, instance, settings):
    result = run_batch(defs, instance, "b404")
    assert not result.success
    message = result.get_step_failure_events()[0].event_specific_data.error.message
    assert "no landing file for batch 'b404'" in message


def test_validating_a_batch_that_was_never_ingested_fails_at_once_with_the_reason(defs, instance):
    instance.add_dynamic_partitions("batches", ["b405"])
    job = defs.resolve_job_def("batch_ingestion_job")
    result = job.execute_in_process(
        partition_key="b405", instance=instance, op_selection=["validated_customers"],
        raise_on_error=False,
    )  # fmt: skip
    assert not result.success
    [failure] = result.get_step_failure_events()
    message = failure.event_specific_data.error.message
    assert "b405: its raw lines are not stored (no raw_customers file" in message
    assert not [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]


def test_rows_conserved_check_fails_when_a_line_is_lost(settings, defs, instance):
    write_lines(settings.landing_dir / "b001.jsonl", [*four_customers(), "{"])
    assert run_batch(defs, instance, "b001").success
    conserved = rows_conserved_after(
        settings, "b001", "DELETE FROM schema_errors WHERE batch_id = 'b001'"
    )
    assert conserved.passed is False
    assert conserved.metadata["lines_not_placed_exactly_once"].value == 1


def test_connections_are_closed_after_a_run(defs, instance, settings):
    write_lines(settings.landing_dir / "b001.jsonl", [customer()])
    assert run_batch(defs, instance, "b001").success
    # Another process can take the write lock at once: nothing was left open.
    probe = f"import duckdb; duckdb.connect({str(settings.duckdb_path)!r}).close()"
    subprocess.run([sys.executable, "-c", probe], check=True, timeout=60)


def test_steps_share_the_duckdb_writer_pool(defs):
    job = defs.resolve_job_def("batch_ingestion_job")
    pools = {node.name: node.definition.pool for node in job.graph.node_dict.values()}
    assert pools == {"raw_customers": "duckdb_writer", "validated_customers": "duckdb_writer"}


def test_retry_policy_on_every_stage():
    for stage in (raw_customers, validated_customers):
        policy = stage.op.retry_policy
        assert policy is not None and policy.max_retries >= 1
        assert policy.backoff == dg.Backoff.EXPONENTIAL


def test_crash_between_staged_chunks_keeps_the_previous_batch_and_the_rerun_is_clean(
    defs, instance, settings, ingested_b001
):
    before, warehouse = ingested_b001
    with (
        pytest.raises(RuntimeError, match="crash"),
        warehouse.staged_batch([CUSTOMERS], "b001") as (conn, staging),
    ):
        part = conn.sql(
            f"SELECT 'b001', 999, '{OTHER_ID}'::UUID, 'x', now(), 0, 0.0"
        ).to_arrow_table()
        write_staged(staging[CUSTOMERS], 0, part)
        raise RuntimeError("crash after a staged chunk")
    assert snapshot(settings) == before
    assert list((warehouse.files_dir / "staging").iterdir()) == []
    assert run_batch(defs, instance, "b001").success
    assert snapshot(settings) == before


# ---- half a file, an empty one: validation stops them, no baseline counts them -------------


def _file_check(result) -> dg.AssetCheckEvaluation:
    [check] = [
        e for e in result.get_asset_check_evaluations()
        if e.check_name == "landing_file_read_to_the_end_with_records"
    ]  # fmt: skip
    return check


def _half_a_gzip(settings, catalog, batch_id: str, records: int) -> None:
    """The first half of the bytes of a gzipped batch of `records` as batch `batch_id`."""
    whole = settings.landing_dir / "whole.jsonl.gz"
    generate_batch(whole, records, 0.0, 1, catalog)
    data = whole.read_bytes()
    whole.unlink()
    (settings.landing_dir / f"{batch_id}.jsonl.gz").write_bytes(data[: len(data) // 2])


def test_half_a_gzip_file_stops_at_validation_naming_the_file_and_the_line(
    settings, defs, instance, catalog
):
    _half_a_gzip(settings, catalog, "half", 2000)
    result = run_batch(defs, instance, "half")
    assert not result.success  # a blocking check: nothing downstream, no answer published
    check = _file_check(result)
    assert not check.passed and check.severity == dg.AssetCheckSeverity.ERROR
    figures = {k: v.value for k, v in check.metadata.items()}
    assert figures["landing_file"] == "half.jsonl.gz"
    assert 500 < figures["broke_at_line"] < 2000 and "EOFError" in figures["read_error"]
    assert f"half.jsonl.gz could not be read past line {figures['broke_at_line'] - 1}" in (
        check.description
    )
    with warehouse_of(settings).get_connection() as conn:
        assert conn.execute("SELECT accepted FROM batches").fetchall() == [(False,)]
    # its volume is that check's to judge: one failure, one alert
    assert (
        "landing_file_read_to_the_end_with_records"
        in (not_judged(result)["record_count_within_expected_range"])
    )


def test_a_small_cut_file_raises_one_failure_and_one_alert_not_an_error_rate_too(
    settings, defs, instance, catalog
):
    """Half of a small gzip: its cut line is no bad record, so the error rate (one line in
    fifteen) is not judged and the error-rate alert not raised; the file check fails and is
    the one alert."""
    _half_a_gzip(settings, catalog, "cut", 30)
    result = run_batch(defs, instance, "cut")
    assert not result.success and not _file_check(result).passed
    unjudged = not_judged(result)
    for check in ("schema_error_rate_below_threshold", "schema_error_rate_below_hard_ceiling"):
        assert "not read to its end" in unjudged[check]
    [customers] = [
        m for m in result.asset_materializations_for_node("validated_customers")
        if m.asset_key.to_user_string() == "customers"
    ]  # fmt: skip
    assert customers.metadata["error_rate"].value > 0.05  # what would have alerted
    assert "error_rate_threshold" not in customers.metadata  # nothing for the sensor to judge
    alert_finished_run(instance, result.dagster_run, defs.resources["alerts"], logging.getLogger())
    with duckdb.connect(str(settings.alerts_duckdb_path)) as conn:
        monitors = sorted(m for (m,) in conn.execute("SELECT monitor FROM alerts").fetchall())
    assert monitors == ["landing_file_read_to_the_end_with_records"]


@pytest.mark.parametrize("content", [b"", b" \n" * 150], ids=["empty", "blank lines"])
def test_a_file_without_a_record_stops_at_validation_and_is_nobodys_volume_baseline(
    settings, defs, instance, content
):
    (settings.landing_dir / "empty.jsonl").write_bytes(content)
    result = run_batch(defs, instance, "empty")
    assert not result.success
    check = _file_check(result)
    assert not check.passed and "holds no record" in check.description
    [raw] = result.asset_materializations_for_node("raw_customers")
    assert raw.metadata["landing_file_read_to_the_end_with_records_failed"].value is True
    history = recent_batch_metadata(
        instance, "raw_customers", "volume", exclude_partition=None, batches=5,
        unless_failed=("record_count_within_expected_range",
                       "landing_file_read_to_the_end_with_records"),
    )  # fmt: skip
    assert history == []
