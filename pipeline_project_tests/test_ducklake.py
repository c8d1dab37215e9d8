"""The DuckLake backend with its catalog in a real PostgreSQL, and Dagster's state in PostgreSQL
(deploy/dagster.yaml): the same pipeline, the same rows as the file backend, several writers at
once, commit conflicts retried, uniqueness kept by the writes, the password kept out of sight.

These run in the scale-out environment (DuckDB 1.5.5 and the extension wheels; see README,
"Scaling out"): `.venv-lake/bin/pytest -m ducklake`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import duckdb
import psycopg2
import pyarrow as pa
import pytest
import yaml

from pipeline_project.definitions import build_definitions, build_resources
from pipeline_project.resources.embeddings import HashingEmbedder
from pipeline_project.resources.warehouse import RAW_FILE_SCHEMA, MaintenancePolicy
from pipeline_project.sample_data import generate_batch, write_catalog
from pipeline_project.settings import Settings
from pipeline_project.tables import (
    CUSTOMER_SEGMENTS,
    EMBEDDING_CACHE,
    RAW_CUSTOMERS,
    SEGMENT_MODEL,
    WAREHOUSE_DDL,
)
from pipeline_project_tests.dagster_dev import running_ui, wait_for
from pipeline_project_tests.helpers import INFERENCE_STAGES, warehouse_contents
from pipeline_project_tests.postgres_server import PASSWORD, PostgresServer, postgres_server
from pipeline_project_tests.s3_server import KEY_ID, SECRET, moto_server, object_keys, s3_client

pytestmark = pytest.mark.ducklake

REPO = Path(__file__).resolve().parents[1]
# Every table of a batch's run, and the shared ones.
TABLES = [RAW_CUSTOMERS, *WAREHOUSE_DDL]
VALIDATED = ["customers", "customer_purchases", "schema_errors"]
# What the stages up to inference write for a batch.
BATCH_TABLES = [RAW_CUSTOMERS, *VALIDATED, "customer_embeddings", "dead_letter"]


# What the deploy instance's compute log manager reads from the environment.
COMPUTE_LOGS = ("PIPELINE_COMPUTE_LOGS_BUCKET", "PIPELINE_S3_REGION")


@pytest.fixture(scope="module")
def postgres():
    with postgres_server() as server:
        yield server


class Lake:
    """One scale-out deployment in a folder: a lake database and a Dagster database on the
    PostgreSQL server, the environment a run worker gets, and the deploy instance file."""

    def __init__(self, root: Path, server: PostgresServer, name: str, s3: str, on_s3: bool):
        self.root = root
        self.s3 = s3 if on_s3 else None
        self.bucket = name.replace("_", "-").lower()
        s3_client(s3).create_bucket(Bucket=self.bucket)
        self.home = root / "dagster_home"
        self.home.mkdir(parents=True)
        shutil.copy(REPO / "deploy" / "dagster.yaml", self.home / "dagster.yaml")
        self.env = {
            "PIPELINE_WAREHOUSE_BACKEND": "ducklake",
            "PIPELINE_DUCKLAKE_CATALOG": server.dsn(server.create_database(f"{name}_lake")),
            "PIPELINE_DUCKLAKE_PASSWORD": server.password,
            "PIPELINE_DUCKLAKE_DATA_PATH": str(root / "shared" / "lake"),
            "PIPELINE_LANDING_DIR": str(root / "shared" / "landing"),
            "PIPELINE_CATALOG_PATH": str(root / "shared" / "catalog.csv"),
            "PIPELINE_ALERTS_DUCKDB_PATH": str(root / "shared" / "alerts.duckdb"),
            "PIPELINE_DUCKDB_PATH": str(root / "unused" / "warehouse.duckdb"),
            "PIPELINE_DAGSTER_PG_HOST": server.host,
            "PIPELINE_DAGSTER_PG_PORT": str(server.port),
            "PIPELINE_DAGSTER_PG_USER": server.user,
            "PIPELINE_DAGSTER_PG_PASSWORD": server.password,
            "PIPELINE_DAGSTER_PG_DB": server.create_database(f"{name}_dagster"),
            "DAGSTER_HOME": str(self.home),
            "PIPELINE_TEST_ROOT": str(root),
            # the deploy instance's compute logs, on the S3 server
            "PIPELINE_COMPUTE_LOGS_BUCKET": self.bucket,
            "PIPELINE_S3_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": s3,
            "AWS_ACCESS_KEY_ID": KEY_ID,
            "AWS_SECRET_ACCESS_KEY": SECRET,
        }
        if on_s3:  # nothing shared but PostgreSQL and object storage
            self.env |= {
                "PIPELINE_DUCKLAKE_DATA_PATH": f"s3://{self.bucket}/lake",
                "PIPELINE_LANDING_S3_PREFIX": f"s3://{self.bucket}/landing",
                "PIPELINE_CATALOG_PATH": f"s3://{self.bucket}/catalog.csv",
                "PIPELINE_S3_ENDPOINT": s3,
                "PIPELINE_S3_ACCESS_KEY_ID": KEY_ID,
                "PIPELINE_S3_SECRET_ACCESS_KEY": SECRET,
            }
        self.settings = Settings.from_env(self.env)

    def write_batches(self, batch_ids: list[str], rows: int = 300) -> None:
        """The catalog and the batches' landing files, in the folder or on object storage."""
        local = self.root / "local"
        write_batches(local / "landing", local / "catalog.csv", batch_ids, rows)
        if self.s3 is None:
            shutil.copytree(local / "landing", self.settings.landing_dir, dirs_exist_ok=True)
            self.settings.catalog_path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(local / "catalog.csv", self.settings.catalog_path)
            return
        client = s3_client(self.s3)
        client.upload_file(str(local / "catalog.csv"), self.bucket, "catalog.csv")
        for path in (local / "landing").iterdir():
            client.upload_file(str(path), self.bucket, f"landing/{path.name}")

    def instance(self) -> dg.DagsterInstance:
        """The deploy instance file on this deployment's Dagster database (the file reads its
        connection from the environment, as in a container)."""
        os.environ.update({k: v for k, v in self.env.items()
                           if "DAGSTER_PG" in k or k.startswith("AWS_") or k in COMPUTE_LOGS})  # fmt: skip
        return dg.DagsterInstance.from_config(str(self.home))

    def warehouse(self):
        """The resource as a step gets it: Dagster resolves the password's EnvVar at start."""
        resource = build_resources(self.settings, HashingEmbedder(dimensions=32))["warehouse"]
        secrets = {"ducklake_password": self.env["PIPELINE_DUCKLAKE_PASSWORD"]}
        if self.s3 is not None:
            secrets |= {"s3_access_key_id": KEY_ID, "s3_secret_access_key": SECRET}
        return resource.model_copy(update=secrets)


@pytest.fixture(scope="module")
def s3():
    with moto_server() as url:
        yield url


@pytest.fixture
def lake_factory(tmp_path, postgres, s3, monkeypatch):
    # In-process runs resolve the secrets' EnvVars from this process's environment.
    monkeypatch.setenv("PIPELINE_DUCKLAKE_PASSWORD", postgres.password)
    monkeypatch.setenv("PIPELINE_S3_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("PIPELINE_S3_SECRET_ACCESS_KEY", SECRET)
    for key in ("HOST", "PORT", "USER", "PASSWORD", "DB"):
        monkeypatch.setenv(f"PIPELINE_DAGSTER_PG_{key}", "")  # restored afterwards
    for name in (*COMPUTE_LOGS, "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID",
                 "AWS_SECRET_ACCESS_KEY"):  # fmt: skip
        monkeypatch.setenv(name, "")  # Lake.instance() sets them; restored afterwards

    def make(name: str, on_s3: bool = False) -> Lake:
        return Lake(tmp_path / name, postgres, f"{name}_{uuid.uuid4().hex[:8]}", s3, on_s3)

    return make


def write_batches(landing: Path, catalog_path: Path, batch_ids: list[str], rows: int = 300):
    catalog = write_catalog(catalog_path, seed=3)
    for n, batch_id in enumerate(batch_ids):
        generate_batch(landing / f"{batch_id}.jsonl", rows, 0.05, 100 + n, catalog)


def run_in_process(settings: Settings, instance: dg.DagsterInstance, batch_ids: list[str]):
    defs = build_definitions(settings, embedder=HashingEmbedder(dimensions=32))
    assert defs.resolve_job_def("catalog_job").execute_in_process(instance=instance).success
    instance.add_dynamic_partitions("batches", batch_ids)
    results = []
    for batch_id in batch_ids:
        result = defs.resolve_job_def("batch_pipeline_job").execute_in_process(
            partition_key=batch_id, instance=instance, raise_on_error=False
        )
        assert result.success, batch_id
        results.append(result)
    return results


def table_contents(warehouse, tables=TABLES) -> dict[str, list[tuple]]:
    """Every row of each table, sorted, without load timestamps."""
    return warehouse_contents(warehouse, tables)


def start_workers(lake: Lake, jobs: list[tuple[str, str]]) -> list[subprocess.Popen]:
    """Worker processes, each saying it is ready and waiting for the go file: once all are
    ready they start together (a fixed wait was once too short on a loaded machine: one worker
    looked up the missing texts after the other had cached some). Their output goes to files
    (a pipe nobody reads would stop a chatty worker)."""
    procs = []
    for n, (mode, arg) in enumerate(jobs):
        log = lake.root / f"worker-{n}.log"
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "pipeline_project_tests.lake_child", mode, *arg.split()],
                env={**os.environ, **lake.env},
                cwd=REPO,
                stdout=(lake.root / f"worker-{n}.out").open("w"),
                stderr=log.open("w"),
            )
        )
        procs[-1].log = log
    ready, deadline = lake.root / "ready", time.monotonic() + 300
    while len(list(ready.glob("*")) if ready.exists() else []) < len(procs):
        for proc in procs:
            assert proc.poll() is None, proc.log.read_text()[-3000:]
        assert time.monotonic() < deadline, "the workers never said they were ready"
        time.sleep(0.05)
    (lake.root / "go").touch()
    return procs


def finish(procs: list[subprocess.Popen], timeout: float = 600) -> list[dict]:
    outcomes = []
    for proc in procs:
        proc.wait(timeout=timeout)
        assert proc.returncode == 0, proc.log.read_text()[-3000:]
        out = proc.log.with_suffix(".out").read_text()
        outcomes.append(json.loads(out.strip().splitlines()[-1]))
    return outcomes


@pytest.mark.parametrize("storage", ["folder", "s3"])
def test_the_pipeline_on_ducklake_gives_the_same_rows_as_the_file_backend(
    lake_factory, settings, instance, storage
):
    lake = lake_factory("lake", on_s3=storage == "s3")
    lake.write_batches(["b001", "b002"])
    write_batches(settings.landing_dir, settings.catalog_path, ["b001", "b002"])
    with lake.instance() as instance:
        lake_results = run_in_process(lake.settings, instance, ["b001", "b002"])
    run_in_process(settings, instance, ["b001", "b002"])
    file_warehouse = build_resources(settings, HashingEmbedder(dimensions=32))["warehouse"]
    on_lake, on_file = table_contents(lake.warehouse()), table_contents(file_warehouse)
    for table in TABLES:
        assert on_lake[table] == on_file[table], table
    assert len(on_lake["customers"]) > 500 and len(on_lake["validated_recommendations"]) > 0
    # the data are the lake's Parquet files, the raw lines too: in the folder, or on S3 with
    # nothing of the lake on the worker's disk
    if storage == "s3":
        keys = object_keys(lake.s3, lake.bucket)
        assert [k for k in keys if k.startswith("lake/tables/main/raw_customers/")]
        # the lake, the landing files, the catalog and the compute logs: nothing else
        assert {k.split("/")[0] for k in keys} == {"lake", "landing", "catalog.csv", "compute-logs"}
        assert not [p for p in (lake.root / "shared").rglob("*") if p.is_file()]
    else:
        tables = Path(lake.env["PIPELINE_DUCKLAKE_DATA_PATH"]) / "tables"
        assert list((tables / "main" / RAW_CUSTOMERS).rglob("*.parquet"))
    assert not list(lake.warehouse().files_dir.glob("staging/b00*"))  # no scratch left
    assert not Path(lake.env["PIPELINE_DUCKDB_PATH"]).exists()  # no local warehouse file
    # the secrets are in no log line, no metadata value, no stored event
    for result in lake_results:
        with lake.instance() as instance:
            for record in instance.all_logs(result.run_id):
                assert PASSWORD not in str(record)
                assert SECRET not in str(record) and KEY_ID not in str(record)


def _raw_lines(n: int, text: str) -> pa.Table:
    now = datetime.now(UTC)
    return pa.Table.from_pylist(
        [{"line_no": i + 1, "raw": f'{{"v": "{text}"}}', "byte_length": 12, "utf8_ok": True,
          "read_error": None, "ingested_at": now} for i in range(n)],
        schema=RAW_FILE_SCHEMA,
    )  # fmt: skip


def test_a_batchs_raw_lines_on_object_storage_become_visible_at_its_commit(lake_factory):
    warehouse = lake_factory("visible", on_s3=True).warehouse()
    raw = f"SELECT count(*), min(raw) FROM {RAW_CUSTOMERS} WHERE batch_id = 'b1'"
    with warehouse.replacing_raw_file("b1") as writer:
        writer.write_table(_raw_lines(3, "old"))
    seen = {}

    def before_swap(conn):  # inside the swap: the new lines are in, not yet committed
        seen["writer"] = conn.execute(raw).fetchall()
        with warehouse.get_connection() as other:  # another worker's transaction
            seen["reader"] = other.execute(raw).fetchall()

    with warehouse.replacing_raw_file("b1", before_swap=before_swap) as writer:
        writer.write_table(_raw_lines(5, "new"))
    assert seen == {"writer": [(5, '{"v": "new"}')], "reader": [(3, '{"v": "old"}')]}
    with warehouse.get_connection() as conn:
        assert conn.execute(raw).fetchall() == [(5, '{"v": "new"}')]

    def crash(conn):
        raise RuntimeError("killed before the commit")

    with pytest.raises(RuntimeError), warehouse.replacing_raw_file("b1", crash) as writer:
        writer.write_table(_raw_lines(7, "lost"))
    with warehouse.get_connection() as conn:
        assert conn.execute(raw).fetchall() == [(5, '{"v": "new"}')]
    assert not list(warehouse.files_dir.glob("staging/b1.*"))  # the scratch file is gone


def test_a_commit_conflict_is_retried_as_a_whole_and_succeeds(lake_factory):
    lake = lake_factory("conflict")
    warehouse = lake.warehouse()
    rows = "SELECT $batch, range, uuid(), 'h', 0, 0.0, 1 FROM range(5)"
    for batch in ("b1", "b2"):
        with warehouse.replace_batch([CUSTOMER_SEGMENTS], batch) as conn:
            conn.execute(f"INSERT INTO {CUSTOMER_SEGMENTS} {rows}", {"batch": batch})
    tries = []
    for attempt in warehouse.write_attempts():
        with attempt, warehouse.replace_batch([CUSTOMER_SEGMENTS], "b1") as conn:
            conn.execute(f"INSERT INTO {CUSTOMER_SEGMENTS} {rows}", {"batch": "b1"})
            tries.append(attempt.retry_state.attempt_number)
            if len(tries) == 1:  # another worker replaces its own batch and commits first
                with lake.warehouse().replace_batch([CUSTOMER_SEGMENTS], "b2") as other:
                    other.execute(f"INSERT INTO {CUSTOMER_SEGMENTS} {rows}", {"batch": "b2"})
    assert tries == [1, 2] and warehouse.commit_retries() == 1
    with warehouse.get_connection() as conn:
        counts = conn.execute(
            f"SELECT batch_id, count(*) FROM {CUSTOMER_SEGMENTS} GROUP BY ALL ORDER BY ALL"
        ).fetchall()
    assert counts == [("b1", 5), ("b2", 5)]


def test_a_first_time_batch_appends_without_a_delete_and_commits_beside_another(lake_factory):
    """A batch's first write deletes nothing: its commit is an append (no DELETE in the
    lake's snapshot), which commits beside another worker's first write without a retry; a
    re-run deletes the batch's old rows."""
    lake = lake_factory("append")
    warehouse = lake.warehouse()
    rows = "SELECT $batch, range, uuid(), 'h', 0, 0.0, 1 FROM range(5)"
    with warehouse.replace_batch([CUSTOMER_SEGMENTS], "b0") as conn:
        conn.execute(f"INSERT INTO {CUSTOMER_SEGMENTS} {rows}", {"batch": "b0"})
    tries = []
    for attempt in warehouse.write_attempts():
        with attempt, warehouse.replace_batch([CUSTOMER_SEGMENTS], "b1") as conn:
            conn.execute(f"INSERT INTO {CUSTOMER_SEGMENTS} {rows}", {"batch": "b1"})
            tries.append(attempt.retry_state.attempt_number)
            with lake.warehouse().replace_batch([CUSTOMER_SEGMENTS], "b2") as other:
                other.execute(f"INSERT INTO {CUSTOMER_SEGMENTS} {rows}", {"batch": "b2"})
    assert tries == [1] and warehouse.commit_retries() == 0

    def deletes() -> int:
        with warehouse.get_connection() as conn:
            changes = conn.execute("SELECT changes FROM ducklake_snapshots('lake')").fetchall()
        # tables_deleted_from, or inlined_delete for rows kept in the catalog (few rows)
        return sum(any("delete" in kind for kind in change) for (change,) in changes)

    assert deletes() == 0
    with warehouse.replace_batch([CUSTOMER_SEGMENTS], "b1") as conn:  # a re-run
        conn.execute(f"INSERT INTO {CUSTOMER_SEGMENTS} {rows}", {"batch": "b1"})
    assert deletes() == 1
    with warehouse.get_connection() as conn:
        counts = conn.execute(
            f"SELECT batch_id, count(*) FROM {CUSTOMER_SEGMENTS} GROUP BY ALL ORDER BY ALL"
        ).fetchall()
    assert counts == [("b0", 5), ("b1", 5), ("b2", 5)]


def test_the_maintenance_job_brings_storage_back_near_one_runs_and_changes_no_row(
    lake_factory,
):
    """Re-runs of a batch leave files behind (DuckLake never deletes one by itself); the
    maintenance job deletes what no kept snapshot needs, and every table reads the same."""
    lake = lake_factory("maintain")
    write_batches(lake.settings.landing_dir, lake.settings.catalog_path, ["b001"], rows=400)
    warehouse = lake.warehouse()
    with lake.instance() as instance:
        run_in_process(lake.settings, instance, ["b001"])
        one_run = warehouse.storage()
        job = defs_for(lake).resolve_job_def("batch_pipeline_job")
        for _ in range(3):
            assert job.execute_in_process(partition_key="b001", instance=instance).success
        grown = warehouse.storage()
        before = table_contents(warehouse)
        maintained = defs_for(lake).resolve_job_def("warehouse_maintenance_job").execute_in_process(
            instance=instance,
            run_config={"ops": {"maintain_warehouse": {"config": {"keep_snapshots_hours": 0,
                                                                  "grace_hours": 0}}}},
        )  # fmt: skip
    assert maintained.success
    after = warehouse.storage()
    assert grown[1] > 2.5 * one_run[1], (one_run, grown)
    assert after[1] < 1.5 * one_run[1], (one_run, grown, after)
    assert table_contents(warehouse) == before


def test_the_maintenance_waits_for_a_writer_and_no_write_starts_beside_it(lake_factory):
    lake = lake_factory("maintain_lock")
    writer, maintenance = lake.warehouse(), lake.warehouse()
    release, ended = threading.Event(), []

    def write() -> None:
        with writer.transaction() as conn:
            conn.execute(f"INSERT INTO {CUSTOMER_SEGMENTS} SELECT 'b1', range, uuid(), 'h', 0,"
                         " 0.0, 1 FROM range(50)")  # fmt: skip
            release.wait(60)
        ended.append("write")

    def maintain() -> None:
        maintenance.maintain(MaintenancePolicy())
        ended.append("maintenance")

    with ThreadPoolExecutor(2) as pool:
        pending = pool.submit(write)
        time.sleep(1.0)  # the write holds its share of the lock
        maintaining = pool.submit(maintain)
        time.sleep(3.0)
        assert ended == []  # the maintenance waits for the write
        release.set()
        pending.result(timeout=60)
        maintaining.result(timeout=120)
    assert ended == ["write", "maintenance"]


def test_two_workers_embedding_the_same_texts_at_once_leave_one_cache_row_per_text(
    lake_factory,
):
    lake = lake_factory("cache")
    texts = lake.root / "texts.json"
    texts.write_text(json.dumps([f"Customer profile number {i}" for i in range(300)]))
    outcomes = finish(start_workers(lake, [("embed", str(texts)), ("embed", str(texts))]))
    assert all(o["success"] for o in outcomes)
    assert all(o["embedded"] == 300 for o in outcomes)  # both sent every text to the model
    assert max(o["start"] for o in outcomes) < min(o["end"] for o in outcomes)  # at once
    with lake.warehouse().get_connection() as conn:
        [(rows, distinct)] = conn.execute(
            f"SELECT count(*), count(DISTINCT text_hash) FROM {EMBEDDING_CACHE}"
        ).fetchall()
    assert (rows, distinct) == (300, 300)


def test_four_first_batches_at_once_train_segment_model_version_1_once(lake_factory):
    lake = lake_factory("bootstrap")
    batch_ids = ["b1", "b2", "b3", "b4"]
    write_batches(lake.settings.landing_dir, lake.settings.catalog_path, batch_ids, rows=200)
    defs = build_definitions(lake.settings, embedder=HashingEmbedder(dimensions=32))
    with lake.instance() as instance:
        assert defs.resolve_job_def("catalog_job").execute_in_process(instance=instance).success
        instance.add_dynamic_partitions("batches", batch_ids)
        instance.event_log_storage.set_concurrency_slots("duckdb_writer", 4)
        for batch_id in batch_ids:
            assert (
                defs.resolve_job_def("batch_pipeline_job")
                .execute_in_process(
                    partition_key=batch_id,
                    instance=instance,
                    asset_selection=[dg.AssetKey(k) for k in INFERENCE_STAGES],
                )  # fmt: skip
                .success
            )
    outcomes = finish(start_workers(lake, [("segments", b) for b in batch_ids]))
    assert all(o["success"] for o in outcomes)
    with lake.warehouse().get_connection() as conn:
        versions = conn.execute(
            f"SELECT model_version, count(*) FROM {SEGMENT_MODEL} GROUP BY ALL"
        ).fetchall()
        assigned = conn.execute(
            f"SELECT DISTINCT batch_id, model_version FROM {CUSTOMER_SEGMENTS} ORDER BY ALL"
        ).fetchall()
    assert versions == [(1, 8)]  # one model of 8 segments, trained once
    assert assigned == [(b, 1) for b in batch_ids]


def test_four_batches_at_once_as_four_processes_overlap_and_equal_a_sequential_run(
    lake_factory,
):
    batch_ids = ["b1", "b2", "b3", "b4"]
    # four workers that share nothing but PostgreSQL and object storage
    parallel = lake_factory("parallel", on_s3=True)
    sequential = lake_factory("sequential", on_s3=True)
    for lake in (parallel, sequential):
        lake.write_batches(["b0", *batch_ids])
        with lake.instance() as instance:
            # the catalog and a first batch (which trains the segment model) on both
            run_in_process(lake.settings, instance, ["b0"])
            instance.add_dynamic_partitions("batches", batch_ids)
            instance.event_log_storage.set_concurrency_slots("duckdb_writer", 4)
    with sequential.instance() as instance:
        defs = build_definitions(sequential.settings, embedder=HashingEmbedder(dimensions=32))
        for batch_id in batch_ids:
            assert (
                defs.resolve_job_def("batch_pipeline_job")
                .execute_in_process(partition_key=batch_id, instance=instance)
                .success
            )
    outcomes = finish(start_workers(parallel, [("pipeline", b) for b in batch_ids]))
    assert all(o["success"] for o in outcomes)
    overlapping = sum(
        1
        for i, a in enumerate(outcomes)
        for b in outcomes[i + 1 :]
        if a["start"] < b["end"] and b["start"] < a["end"]
    )
    assert overlapping >= 3, outcomes  # the runs ran at the same time, not one after another
    writes = {
        o["run_id"]: step_span(parallel, o["run_id"], "validated_customers") for o in outcomes
    }
    spans = sorted(writes.values())
    assert any(a[1] > b[0] for a, b in zip(spans, spans[1:], strict=False)), (
        spans
    )  # writers at once
    # A batch's recommendations score with purchase affinities of every batch segmented so far,
    # which depends on the order batches finish: compared up to the segments.
    upto_segments = [t for t in TABLES if "recommendations" not in t]
    assert table_contents(parallel.warehouse(), upto_segments) == table_contents(
        sequential.warehouse(), upto_segments
    )
    with parallel.warehouse().get_connection() as conn:
        per_batch = dict(
            conn.execute(
                "SELECT batch_id, count(*) FROM validated_recommendations GROUP BY ALL"
            ).fetchall()
        )
    assert set(per_batch) == {"b0", *batch_ids}


@pytest.mark.parametrize("pause_at", ["validation_swap", "embeddings_swap"])
def test_sigkill_inside_a_ducklake_transaction_keeps_the_committed_batch_and_the_rerun_is_clean(
    lake_factory, pause_at
):
    crashed, reference = lake_factory("crashed"), lake_factory("reference")
    write_batches(crashed.settings.landing_dir, crashed.settings.catalog_path, ["b1"])
    inference = [dg.AssetKey(step) for step in INFERENCE_STAGES]

    def run(lake: Lake, instance, first: bool) -> None:
        defs = defs_for(lake)
        if first:
            assert defs.resolve_job_def("catalog_job").execute_in_process(instance=instance).success
            instance.add_dynamic_partitions("batches", ["b1"])
        result = defs.resolve_job_def("batch_pipeline_job").execute_in_process(
            partition_key="b1", instance=instance, asset_selection=inference
        )
        assert result.success

    with crashed.instance() as instance:
        run(crashed, instance, first=True)
    committed = table_contents(crashed.warehouse(), BATCH_TABLES)
    # a new file lands for b1; its run is killed inside the write transaction
    write_batches(crashed.settings.landing_dir, crashed.settings.catalog_path, ["b1"], rows=400)
    [proc] = start_workers(crashed, [("inference", f"b1 {pause_at}")])
    deadline = time.monotonic() + 240
    while not (crashed.root / "paused").exists():
        assert proc.poll() is None, proc.log.read_text()[-3000:]
        assert time.monotonic() < deadline, "the worker never reached the pause point"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    after = table_contents(crashed.warehouse(), BATCH_TABLES)
    # the step before the killed one committed the new file's rows, and with them withdrew
    # what the old file gave; the killed transaction never committed: no mix, no old answer
    assert after[RAW_CUSTOMERS] != committed[RAW_CUSTOMERS]
    killed = VALIDATED if pause_at == "validation_swap" else ["customer_embeddings", "dead_letter"]
    for table in killed:
        assert after[table] == [], table
    if pause_at == "embeddings_swap":  # validation of the new file committed before it
        assert after["customers"] and after["customers"] != committed["customers"]
    # the rerun equals a lakehouse where the new file ran once, never interrupted
    with crashed.instance() as instance:
        # What run monitoring does under the daemon (deploy/dagster.yaml): the dead run is
        # failed and its duckdb_writer slot freed, else the rerun would wait for it for ever.
        [dead] = instance.get_runs(dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED]))
        instance.report_run_failed(dead)
        instance.event_log_storage.free_concurrency_slots_for_run(dead.run_id)
        run(crashed, instance, first=False)
    shutil.copytree(crashed.settings.landing_dir, reference.settings.landing_dir)
    shutil.copy(crashed.settings.catalog_path, reference.settings.catalog_path)
    with reference.instance() as instance:
        run(reference, instance, first=True)
    assert table_contents(crashed.warehouse(), BATCH_TABLES) == table_contents(
        reference.warehouse(), BATCH_TABLES
    )


@pytest.mark.slow
def test_through_the_ui_the_sensor_and_automation_carry_two_batches_on_ducklake(lake_factory):
    """`pipeline-project ui` on the scale-out configuration: Dagster's state in PostgreSQL
    (deploy/dagster.yaml, with runs launched as local processes instead of containers: there
    is no container runtime here) and the warehouse on DuckLake."""
    lake = lake_factory("ui")
    instance_yaml = yaml.safe_load((REPO / "deploy" / "dagster.yaml").read_text())
    del instance_yaml["run_launcher"]
    (lake.home / "dagster.yaml").write_text(yaml.safe_dump(instance_yaml))
    write_batches(lake.settings.landing_dir, lake.settings.catalog_path, ["b001", "b002"])
    with lake.instance() as instance:  # what the deploy's init job does
        instance.event_log_storage.set_concurrency_slots("duckdb_writer", 2)
        instance.event_log_storage.set_concurrency_slots("model_inference", 1)
    env = {**lake.env, "PIPELINE_EMBEDDING_BACKEND": "hashing",
           "PIPELINE_ALERT_SENSOR_INTERVAL_SECONDS": "5"}  # fmt: skip
    with running_ui(lake.root, env, lake.settings) as dev:
        done = wait_for(
            "validated recommendations of both batches",
            lambda: (
                dev.materialized("validated_recommendations", ["b001", "b002"]) == ["b001", "b002"]
            ),
            timeout=600,
        )
        assert done
        wait_for("every run to end", dev.idle, timeout=120)
        runs = dev.runs()
    assert runs and all(run["status"] == "SUCCESS" for run in runs), runs
    assert {"batch_ingestion_job", "catalog_job"} <= {run["jobName"] for run in runs}
    with lake.warehouse().get_connection() as conn:
        kept = dict(
            conn.execute(
                "SELECT batch_id, count(*) FROM validated_recommendations GROUP BY ALL"
            ).fetchall()
        )
    assert set(kept) == {"b001", "b002"} and min(kept.values()) > 0
    assert PASSWORD not in (lake.root / "dagster_dev.log").read_text()


def defs_for(lake: Lake) -> dg.Definitions:
    return build_definitions(lake.settings, embedder=HashingEmbedder(dimensions=32))


def step_span(lake: Lake, run_id: str, step: str) -> tuple[float, float]:
    """When a step of a run started and succeeded, from the events in PostgreSQL."""
    kinds = {dg.DagsterEventType.STEP_START, dg.DagsterEventType.STEP_SUCCESS}
    with lake.instance() as instance:
        times = {
            e.dagster_event_type: e.timestamp
            for e in instance.all_logs(run_id, of_type=kinds)
            if e.step_key == step
        }
    return times[dg.DagsterEventType.STEP_START], times[dg.DagsterEventType.STEP_SUCCESS]


# One worker raising an alert the moment ROOT/go appears; prints whether it stored it.
_RAISE_ALERT = """
import logging, os, sys, time
from pathlib import Path
from pipeline_project.definitions import build_resources
from pipeline_project.resources.embeddings import HashingEmbedder
from pipeline_project.settings import Settings
from pipeline_project.resources.alerts import AlertSink
checked = AlertSink._suppressed
def slow_check(self, conn, key, run_id):  # a slow look at the history: the others' chance
    reason = checked(self, conn, key, run_id)
    time.sleep(1.0)
    return reason
AlertSink._suppressed = slow_check
sink = build_resources(Settings.from_env(), HashingEmbedder(dimensions=32))["alerts"]
sink = sink.model_copy(update={"postgres_password": os.environ["PIPELINE_DUCKLAKE_PASSWORD"]})
sink.is_firing("warm-up", logging.getLogger())  # attached, the table made
root = Path(os.environ["PIPELINE_TEST_ROOT"])
(root / f"ready-{os.getpid()}").touch()
go = root / "go"
while not go.exists():
    time.sleep(0.01)
print(sink.emit(severity="error", monitor="drift", key="drift:b1", batch_id="b1",
                message="drift in b1 (reported by anna@example.com)",
                log=logging.getLogger()).stored)
"""


def test_alerts_live_in_the_catalogs_postgresql_and_a_key_fires_once_across_workers(
    lake_factory,
):
    """On DuckLake no alerts file is shared: alerts are rows of the catalog's PostgreSQL
    database, written by any worker; four worker processes raising one key at once store it
    once."""
    lake = lake_factory("alerts")
    lake.root.mkdir(parents=True, exist_ok=True)
    workers = [
        subprocess.Popen([sys.executable, "-c", _RAISE_ALERT], env={**os.environ, **lake.env},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]  # fmt: skip
    assert wait_for(
        "every worker attached and waiting",
        lambda: len(list(lake.root.glob("ready-*"))) == 4,
        timeout=120,
        interval=0.2,
    )
    (lake.root / "go").touch()
    outputs = [worker.communicate(timeout=120) for worker in workers]
    stored = [out.strip().splitlines()[-1] if out.strip() else err[-2000:] for out, err in outputs]
    assert sorted(stored) == ["False", "False", "False", "True"], stored
    sink = build_resources(lake.settings, HashingEmbedder(dimensions=32))["alerts"]
    assert sink.postgres == lake.env["PIPELINE_DUCKLAKE_CATALOG"]
    sink = sink.model_copy(update={"postgres_password": PASSWORD})  # as Dagster resolves it
    log = logging.getLogger("alerts-test")
    assert sink.is_firing("drift:b1", log)
    assert sink.resolve(monitor="drift", key="drift:b1", message="back", log=log).stored
    catalog = psycopg2.connect(lake.env["PIPELINE_DUCKLAKE_CATALOG"], password=PASSWORD)
    try:
        with catalog.cursor() as cur:
            cur.execute("SELECT alert_key, status, message FROM alerts ORDER BY created_at")
            rows = cur.fetchall()
    finally:
        catalog.close()
    assert rows == [
        ("drift:b1", "firing", "drift in b1 (reported by <masked>)"),
        ("drift:b1", "resolved", "back"),
    ]
    assert not Path(lake.env["PIPELINE_ALERTS_DUCKDB_PATH"]).exists()
    assert PASSWORD not in repr(sink) and all(PASSWORD not in err for _, err in outputs)


def test_a_wrong_catalog_password_fails_clearly_and_never_shows_a_password(lake_factory):
    lake = lake_factory("wrong")
    warehouse = lake.warehouse().model_copy(update={"ducklake_password": "Wrong-pw-51c2"})
    # the catalog lock (psycopg2) or DuckDB's attach, whichever reaches the server first
    with pytest.raises((psycopg2.Error, duckdb.Error)) as failure, warehouse.get_connection():
        pass
    message = str(failure.value)
    assert "password authentication failed" in message
    assert "Wrong-pw-51c2" not in message and PASSWORD not in message
    with pytest.raises(ValueError, match="must not hold a password"):
        lake.warehouse().model_copy(
            update={"ducklake_catalog": lake.env["PIPELINE_DUCKLAKE_CATALOG"] + " password=x"}
        )._lake()
