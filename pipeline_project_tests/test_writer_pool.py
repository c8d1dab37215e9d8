"""Every process that writes the warehouse file takes the writer pool; readers open it read-only;
the hourly health summary never fails because another process holds the file."""

import dataclasses
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import duckdb
import pyarrow as pa
import pytest

from pipeline_project.core import dead_letters
from pipeline_project.definitions import build_definitions
from pipeline_project.policies import DUCKDB_WRITER_POOL, MODEL_INFERENCE_POOL
from pipeline_project.resources import Warehouse
from pipeline_project.resources.warehouse import RAW_FILE_SCHEMA
from pipeline_project.settings import Settings

CLI = Path(sys.executable).parent / "pipeline-project"
# The steps that need the warehouse but not the writer pool, and why. On the DuckDB file none:
# one process at a time may open it, a reader too while a writer has it open.
OUTSIDE_THE_WRITER_POOL_ON_THE_FILE: dict[str, str] = {}
# On DuckLake (no file lock, several writer slots): its own pool, or none.
OUTSIDE_THE_WRITER_POOL_ON_DUCKLAKE = {
    "customer_embeddings": MODEL_INFERENCE_POOL,  # an API's rate limit, shared by all workers
    "pipeline_health": None,  # reads a snapshot: waits for nobody, blocks nobody
}
DEAD_LETTERS = (
    "SELECT * FROM (VALUES ('k1', 'inference_failed', 'timeout', 3, 'p1'),"
    " ('k2', 'inference_failed', 'timeout', 3, 'p2'), ('k3', 'invalid_output', 'NaN', 1, 'p3'))"
    " AS t(record_key, reason, error, attempts, payload)"
)
HOLD = """
import duckdb, sys
conn = duckdb.connect(sys.argv[1], read_only=sys.argv[2] == "read_only")
print("holding", flush=True)
sys.stdin.read()  # until the test closes stdin
conn.close()
"""


@contextmanager
def held(db: Path, mode: str = "read_write") -> Iterator[subprocess.Popen]:
    """Another process holds the DuckDB file open (`read_write` or `read_only`) until the
    block ends, or until the test closes the process's stdin."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(db), mode],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "holding"
        yield proc
    finally:
        if not proc.stdin.closed:
            proc.stdin.close()
        proc.wait(timeout=30)
        proc.stdout.close()


def warehouse_steps(defs: dg.Definitions) -> dict[str, str | None]:
    """Every op, asset or check that requires the warehouse resource, and its pool."""
    steps = {}
    for job in defs.resolve_all_job_defs():
        for op in job.graph.iterate_op_defs():
            if "warehouse" in op.required_resource_keys:
                steps[op.name] = op.pool
    for assets_def in defs.resolve_asset_graph().assets_defs:
        for op in assets_def.node_def.iterate_op_defs() if assets_def.is_executable else ():
            if "warehouse" in op.required_resource_keys:
                steps[op.name] = op.pool
    return steps


def lake_settings(settings: Settings, root: Path) -> Settings:
    """DuckLake settings (nothing connects to the catalog while definitions are built)."""
    lake = dataclasses.replace(
        settings.warehouse, backend="ducklake", ducklake_catalog="host=db dbname=lake",
        ducklake_data_path=root / "lake",
    )  # fmt: skip
    return dataclasses.replace(settings, warehouse=lake)


def test_every_step_that_opens_the_warehouse_file_takes_the_writer_pool(defs):
    steps = warehouse_steps(defs)
    assert {"customer_embeddings", "pipeline_health", "validated_customers",
            "maintain_warehouse", "purge_expired_data", "erase_customer_rows"} <= set(steps)  # fmt: skip
    outside = {
        name: pool
        for name, pool in steps.items()
        if pool != DUCKDB_WRITER_POOL and name not in OUTSIDE_THE_WRITER_POOL_ON_THE_FILE
    }
    assert not outside, f"steps that open the warehouse outside the writer pool: {outside}"
    # a sensor takes no pool: none may open the warehouse
    for sensor in defs.sensors:
        assert "warehouse" not in sensor.required_resource_keys, sensor.name


def test_on_ducklake_inference_keeps_its_pool_and_the_health_summary_needs_none(settings, tmp_path):
    steps = warehouse_steps(build_definitions(lake_settings(settings, tmp_path)))
    assert {n: steps[n] for n in OUTSIDE_THE_WRITER_POOL_ON_DUCKLAKE} == (
        OUTSIDE_THE_WRITER_POOL_ON_DUCKLAKE
    )
    others = {n: p for n, p in steps.items() if n not in OUTSIDE_THE_WRITER_POOL_ON_DUCKLAKE}
    assert len(others) >= 10 and set(others.values()) == {DUCKDB_WRITER_POOL}, others


def warehouse_with_dead_letters(settings: Settings, timeout: float = 120.0) -> Warehouse:
    warehouse = Warehouse(database=str(settings.duckdb_path), connect_timeout_seconds=timeout)
    with warehouse.transaction() as conn:
        dead_letters.add(conn, "b1", "inference", DEAD_LETTERS)
    return warehouse


def test_a_read_connection_is_read_only_and_shares_the_file_with_other_readers(settings):
    warehouse = warehouse_with_dead_letters(settings)
    with held(settings.duckdb_path, "read_only"), warehouse.read_connection() as conn:
        assert dead_letters.pending_by_stage(conn) == {"inference": 3}
        with pytest.raises(duckdb.Error, match="read-only"):
            conn.execute("DELETE FROM dead_letter")


def test_a_read_connection_inside_a_write_of_the_same_process_shares_its_connection(settings):
    warehouse = warehouse_with_dead_letters(settings)
    with warehouse.get_connection(), warehouse.read_connection() as conn:
        assert dead_letters.pending_by_stage(conn) == {"inference": 3}


def test_a_read_connection_waits_out_a_writer_like_a_write_does(settings):
    warehouse = warehouse_with_dead_letters(settings, timeout=30.0)
    with held(settings.duckdb_path) as holder:
        threading.Timer(1.5, holder.stdin.close).start()
        started = time.monotonic()
        with warehouse.read_connection() as conn:
            waited = time.monotonic() - started
            assert dead_letters.pending_by_stage(conn) == {"inference": 3}
    assert 1.0 < waited < 20


def test_a_read_connection_sees_the_raw_files_written_since_the_raw_view_was(settings):
    warehouse = Warehouse(database=str(settings.duckdb_path))
    with warehouse.get_connection():
        pass  # the warehouse, its raw_customers view over no file
    lines = [{"line_no": n, "raw": "{}", "byte_length": 2, "utf8_ok": True} for n in (1, 2)]
    with warehouse.replacing_raw_file("b1") as writer:  # no write to the warehouse itself
        writer.write_table(pa.Table.from_pylist(lines, schema=RAW_FILE_SCHEMA))
    with warehouse.read_connection() as conn:
        assert conn.execute("SELECT batch_id, count(*) FROM raw_customers GROUP BY ALL").fetchall(
        ) == [("b1", 2)]  # fmt: skip


def test_a_read_connection_creates_a_missing_warehouse_as_a_write_would(tmp_path):
    with Warehouse(database=str(tmp_path / "new.duckdb")).read_connection() as conn:
        assert dead_letters.pending_by_stage(conn) == {}
        assert conn.execute("SELECT count(*) FROM raw_customers").fetchall() == [(0,)]


def with_lock_wait(defs: dg.Definitions, seconds: float) -> dg.Definitions:
    """The deployment's definitions, its warehouse waiting `seconds` for a lock, not 120."""
    configured = defs.resources["warehouse"]
    fields = {name: getattr(configured, name) for name in Warehouse.model_fields}
    warehouse = Warehouse(**{**fields, "connect_timeout_seconds": seconds})
    return dg.Definitions(
        assets=defs.assets, asset_checks=defs.asset_checks, jobs=defs.jobs,
        resources={**defs.resources, "warehouse": warehouse},
    )  # fmt: skip


def health_run(defs: dg.Definitions, instance):
    result = defs.resolve_job_def("pipeline_health_job").execute_in_process(
        instance=instance, raise_on_error=False
    )
    assert result.success
    [materialization] = result.asset_materializations_for_node("pipeline_health")
    return result, {k: v.value for k, v in materialization.metadata.items()}


def test_health_succeeds_while_another_process_holds_the_file_past_the_lock_wait(
    settings, defs, instance
):
    defs = with_lock_wait(defs, 2.0)
    warehouse_with_dead_letters(settings)
    with held(settings.duckdb_path):  # outside Dagster's pools, as a CLI would
        started = time.monotonic()
        result, figures = health_run(defs, instance)
        waited = time.monotonic() - started
    assert waited >= 2.0  # it waited for the lock before going on without it
    assert figures["dead_letter_total"] is None  # not available: never 0
    assert "lock wait (2 s)" in figures["dead_letters_not_read"]
    summary = figures["summary"]
    assert "**Dead letters not read**: another process held the warehouse file" in summary
    assert "- **dead letter total**: not available\n" in summary
    assert "- **dead letters by stage**: not available (" in summary
    warnings = [
        e.user_message
        for e in instance.all_logs(result.run_id)
        if e.level == 30 and "dead letters not read" in e.user_message  # logging.WARNING
    ]
    assert len(warnings) == 1, warnings

    _, figures = health_run(defs, instance)  # the holder is gone: read again
    assert figures["dead_letter_total"] == 3 and "dead_letters_not_read" not in figures
    assert "- **dead letters by stage**: {'inference': 3}" in figures["summary"]


def cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PIPELINE_", "DAGSTER_"))}
    return subprocess.run(
        [str(CLI), *args], env={**base, **env}, capture_output=True, text=True, timeout=60
    )


def test_dlq_list_and_show_read_beside_another_reader_and_change_nothing(settings):
    warehouse_with_dead_letters(settings)
    db = settings.duckdb_path
    before = db.read_bytes()
    env = {"PIPELINE_DUCKDB_PATH": str(db)}
    # a read-write open would wait for this reader for 120 s and fail
    with held(db, "read_only"):
        listed = cli("dlq", "list", env=env)
        shown = cli("dlq", "show", "b1", env=env)
    assert listed.returncode == 0, listed.stderr
    [row] = [ln.split() for ln in listed.stdout.splitlines() if ln.startswith("b1 ")][:1]
    assert row[:5] == ["b1", "inference", "inference_failed", "2", "0"]
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.count("attempts=3  pending") == 2 and "invalid_output" in shown.stdout
    assert db.read_bytes() == before and not Path(f"{db}.wal").exists()
