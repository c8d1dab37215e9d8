"""DuckDB stores: wait out another process's write lock, release it on every exit."""

import shutil
import subprocess
import sys
import time
import uuid

import pytest

from pipeline_project.resources import AlertSink, Warehouse

HOLD_LOCK = """
import duckdb, sys, time
conn = duckdb.connect(sys.argv[1])
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.close()
"""


def hold_lock(path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(path), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "locked"
    proc.stdout.close()
    return proc


def test_warehouse_waits_for_another_process_to_release_the_lock(tmp_path):
    db = tmp_path / "w.duckdb"
    holder = hold_lock(db, 2.0)
    started = time.monotonic()
    with Warehouse(database=str(db)).get_connection() as conn:
        waited = time.monotonic() - started
        assert conn.execute("SELECT count(*) FROM raw_customers").fetchall() == [(0,)]
    holder.wait(timeout=30)
    assert 1.0 < waited < 30


def test_alert_sink_gives_up_quickly_and_says_so_instead_of_raising(tmp_path):
    db = tmp_path / "alerts.duckdb"
    holder = hold_lock(db, 20.0)
    try:
        sink = AlertSink(database=str(db), connect_timeout_seconds=1.0)
        messages = []

        class Log:
            warning = error = staticmethod(messages.append)

        started = time.monotonic()
        outcome = sink.emit(severity="warning", monitor="m", key="k", message="hello", log=Log)
        assert outcome.sent is True and outcome.stored is False
        assert time.monotonic() - started < 10
        assert any("could not be stored" in m for m in messages)
    finally:
        holder.kill()
        holder.wait()


def test_replace_batch_refuses_tables_that_are_not_the_warehouse_s(tmp_path):
    warehouse = Warehouse(database=str(tmp_path / "w.duckdb"))
    with (
        pytest.raises(ValueError, match="not a warehouse table"),
        warehouse.replace_batch(["alerts; DROP"], "b1"),
    ):
        pass


def test_batch_id_is_a_parameter_never_part_of_the_sql(tmp_path):
    warehouse = Warehouse(database=str(tmp_path / "w.duckdb"))
    hostile = "b1' OR '1'='1"
    with warehouse.transaction() as conn:
        conn.execute(f"INSERT INTO customers VALUES ('b2', 1, '{uuid.uuid4()}', 'x', now(), 0, 0)")
    with warehouse.replace_batch(["customers"], hostile):
        pass
    with warehouse.get_connection() as conn:
        assert conn.execute("SELECT batch_id FROM customers").fetchall() == [("b2",)]
    with pytest.raises(ValueError, match="not a valid batch ID"):
        warehouse.raw_file("../../etc/b1")


def test_a_killed_run_s_staging_folder_is_removed_by_the_next_write_of_its_batch(tmp_path):
    warehouse = Warehouse(database=str(tmp_path / "w.duckdb"))
    with warehouse.scratch_folder("b1") as left_behind:
        pass
    left_behind.mkdir()  # as if the process had been killed inside the block
    (left_behind / "part-000000.parquet").write_bytes(b"x")
    other = warehouse.files_dir / "staging" / "b1-x.abc"
    other.mkdir()
    with warehouse.scratch_folder("b1") as folder:
        assert folder.is_dir() and not left_behind.exists()
    assert other.exists()  # another batch's folder ("b1-x") is not touched


def test_a_scratch_folder_in_use_is_never_taken_for_a_killed_runs(tmp_path):
    """Validation holds the raw lines' copy in one scratch folder while its staged parts go to
    another of the same batch: opening the second must not remove the first."""
    warehouse = Warehouse(database=str(tmp_path / "w.duckdb"))
    with warehouse.scratch_folder("b1") as outer:
        (outer / "lines.parquet").write_bytes(b"x")
        with warehouse.scratch_folder("b1") as inner:
            assert inner != outer and (outer / "lines.parquet").exists()


def test_staged_parts_that_vanished_commit_nothing_not_an_empty_batch(tmp_path):
    warehouse = Warehouse(database=str(tmp_path / "w.duckdb"))
    with warehouse.transaction() as conn:
        conn.execute(f"INSERT INTO customers VALUES ('b1', 1, '{uuid.uuid4()}', 'x', now(), 0, 0)")
    with (
        pytest.raises(FileNotFoundError, match="staged parts of customers"),
        warehouse.staged_batch(["customers"], "b1") as (_, staging),
    ):
        shutil.rmtree(staging["customers"])  # e.g. removed by another process's cleanup
    with warehouse.get_connection() as conn:
        assert conn.execute("SELECT count(*) FROM customers").fetchall() == [(1,)]


def test_each_lakehouse_has_its_own_scratch_folder_on_a_worker():
    def lake(catalog: str, data: str) -> Warehouse:
        return Warehouse(database="", backend="ducklake", ducklake_catalog=catalog,
                         ducklake_data_path=data)  # fmt: skip

    folders = {
        lake("dbname=a", "s3://x/lake").files_dir,
        lake("dbname=b", "s3://x/lake").files_dir,
        lake("dbname=a", "s3://y/lake").files_dir,
    }
    assert len(folders) == 3
    assert lake("dbname=a", "s3://x/lake").files_dir in folders  # stable


def test_the_maintenance_job_checkpoints_the_file_and_reports_its_storage(tmp_path):
    """On the file backend the maintenance job checkpoints the DuckDB file (the WAL into it)
    and reports the files and bytes before and after; a policy it cannot follow is refused."""
    from pipeline_project.definitions import build_definitions
    from pipeline_project_tests.helpers import settings_in

    settings = settings_in(tmp_path)
    warehouse = Warehouse(database=str(settings.duckdb_path))
    with warehouse.transaction() as conn:
        conn.execute(
            "INSERT INTO customer_segments SELECT 'b1', range, uuid(), 'h', 0, 0.0, 1"
            " FROM range(50000)"
        )
    job = build_definitions(settings).resolve_job_def("warehouse_maintenance_job")
    result = job.execute_in_process()
    assert result.success
    [output] = [e for e in result.all_events if e.event_type_value == "STEP_OUTPUT"]
    figures = {k: v.value for k, v in output.event_specific_data.metadata.items()}
    assert figures["files_after"] == 1 and figures["bytes_after"] > 0  # no WAL left
    refused = job.execute_in_process(
        run_config={"ops": {"maintain_warehouse": {"config": {"orphan_age_hours": 0}}}},
        raise_on_error=False,
    )
    assert not refused.success
    [failure] = [e for e in refused.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "orphan_age_hours at least 1" in str(failure.event_specific_data.error)
