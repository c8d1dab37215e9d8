"""Dagster's own processes killed or hung under real runs, on the project's instance file
(dagster_instance.yaml): a run worker killed mid-step, a hung step, two runs of one batch at
once, the daemon killed mid-run.

Real processes throughout: one `pipeline-project ui` (dagster dev) shared by the worker crash,
the hung step and the batch run twice; `dagster-webserver` and `dagster-daemon run` as separate
processes for the daemon's crash (under dagster dev the daemon cannot die alone: dagster dev
shuts everything down when it does). Runs are read back from the instance's own storage, the
tables from the DuckDB file.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from pipeline_project.definitions import build_definitions
from pipeline_project.instance import write_instance_yaml
from pipeline_project.resources import Warehouse
from pipeline_project.sample_data import build_catalog, generate_batch
from pipeline_project.sensors.rescore import RESCORE_TAG
from pipeline_project.settings import EmbeddingSettings, Settings
from pipeline_project_tests.dagster_dev import (
    DagsterDev,
    alive,
    run_worker_pid,
    running_ui,
    running_webserver_and_daemon,
    step_pid,
    step_succeeded,
    storage_read,
    wait_for,
)
from pipeline_project_tests.helpers import run_batch, settings_in, table_rows

# validated_customers of the big batch runs for 5 to 20 s here (2 shared cores): long enough to
# be killed mid-step. The medium one takes a few seconds, the small one about one.
ROWS = {"big": 60_000, "medium": 30_000, "small": 2_000}
INGESTION_JOB = "batch_ingestion_job"
WRITER_POOL = "duckdb_writer"
PARTITION_TAG = "dagster/partition"
# Bounds asserted below, from dagster_instance.yaml's run_monitoring: a dead run gives its slots
# back free_slots_after_run_end_seconds (15) after its end, seen by a daemon pass every
# poll_interval_seconds (5); the rest is slack for a loaded 2-core machine.
SLOT_FREED_WITHIN = 60
# A run tagged dagster/max_runtime is failed at the first monitoring pass after it. Its retry
# inherits the tag, so the limit leaves room for a retry on a loaded machine.
MAX_RUNTIME = 45
FAILED_AFTER_MAX_RUNTIME_WITHIN = 40
VALIDATED = ["customers", "customer_purchases", "schema_errors"]
BATCH_TABLES = ["raw_customers", *VALIDATED]
FINISHED = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}


@dataclass
class Session:
    dev: DagsterDev
    instance: dg.DagsterInstance
    settings: Settings
    sources: dict[str, Path]
    staging: Path


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Batch files of three sizes, written once and landed under any batch ID. No catalog file
    is written: the catalog sensor stays idle and takes no writer slot."""
    folder = tmp_path_factory.mktemp("sources")
    catalog, _ = build_catalog(seed=1)
    files = {}
    for seed, (size, rows) in enumerate(ROWS.items(), start=1):
        files[size] = folder / f"{size}.jsonl"
        generate_batch(files[size], rows, 0.03, seed, catalog)
    return files


def pipeline_env(root: Path) -> dict[str, str]:
    data = root / "data"
    return {
        "DAGSTER_HOME": str(root / "dagster_home"),
        "PIPELINE_LANDING_DIR": str(root / "landing"),
        "PIPELINE_DUCKDB_PATH": str(data / "warehouse.duckdb"),
        "PIPELINE_ALERTS_DUCKDB_PATH": str(data / "alerts.duckdb"),
        "PIPELINE_CATALOG_PATH": str(data / "catalog.csv"),
        "PIPELINE_DUCKDB_MEMORY_LIMIT": "256MB",
        "PIPELINE_EMBEDDING_BACKEND": "hashing",
    }


def land(settings: Settings, staging: Path, source: Path, batch_id: str) -> None:
    """Deliver a batch file the way an upload should: written aside, then renamed into place."""
    staging.mkdir(parents=True, exist_ok=True)
    settings.landing_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(source, staging / f"{batch_id}.jsonl")
    os.replace(staging / f"{batch_id}.jsonl", settings.landing_dir / f"{batch_id}.jsonl")


@pytest.fixture(scope="module")
def session(
    sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Session]:
    """One `pipeline-project ui` on the project's dagster.yaml, shared by the tests below.
    The automation sensor is turned off (as from the UI): only the landing sensor's ingestion
    runs are under test, and the downstream stages would only compete for the two cores."""
    root = tmp_path_factory.mktemp("dagster_dev")
    env = pipeline_env(root)
    write_instance_yaml(Path(env["DAGSTER_HOME"]))
    settings = Settings.from_env(env)
    settings.landing_dir.mkdir(parents=True)
    with running_ui(root, env, settings) as dev:
        dev.switch_sensor("pipeline_automation_sensor", on=False)
        with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
            yield Session(dev, instance, settings, sources, root / "staging")


# ---- reading runs, slots and tables ----


@storage_read
def batch_runs(instance: dg.DagsterInstance, batch_id: str) -> list[dg.RunRecord]:
    """The batch's ingestion runs, oldest first. Not its re-scores (rescore_sensor, tagged): a
    catalog or segment model that the session's daemon loaded meanwhile may re-score a batch
    holding current answers, by design."""
    records = instance.get_run_records(
        dg.RunsFilter(job_name=INGESTION_JOB, tags={PARTITION_TAG: batch_id})
    )
    records = [r for r in records if RESCORE_TAG not in r.dagster_run.tags]
    return sorted(records, key=lambda r: r.create_timestamp)


@storage_read
def record(instance: dg.DagsterInstance, run_id: str) -> dg.RunRecord:
    found = instance.get_run_record_by_id(run_id)
    assert found is not None, run_id
    return found


def finished(instance: dg.DagsterInstance, run_id: str) -> dg.RunRecord | None:
    found = record(instance, run_id)
    return found if found.dagster_run.status in FINISHED else None


@storage_read
def slots_held(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    """The steps of `run_id` holding a duckdb_writer slot."""
    claimed = instance.event_log_storage.get_concurrency_info(WRITER_POOL).claimed_slots
    return [slot.step_key for slot in claimed if slot.run_id == run_id]


def in_step(instance: dg.DagsterInstance, batch_id: str, step_key: str) -> str | None:
    """The batch's run that has started `step_key` and not finished it, if any."""
    for run in batch_runs(instance, batch_id):
        if step_pid(instance, run.dagster_run.run_id, step_key) and not step_succeeded(
            instance, run.dagster_run.run_id, step_key
        ):
            return run.dagster_run.run_id
    return None


def retry_of(instance: dg.DagsterInstance, run_id: str) -> str | None:
    """The run that run retries started for `run_id`, once there is one."""
    return record(instance, run_id).dagster_run.tags.get("dagster/auto_retry_run_id")


def lines(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for _ in f)


def counts(settings: Settings, batch_id: str) -> dict[str, int]:
    """Row counts of the validated tables for one batch (waits out a writer's lock)."""
    warehouse = Warehouse(database=str(settings.duckdb_path))
    with warehouse.get_connection() as conn:
        return {
            table: conn.execute(
                f"SELECT count(*) FROM {table} WHERE batch_id = ?", [batch_id]
            ).fetchone()[0]
            for table in VALIDATED
        }


def assert_complete(settings: Settings, batch_id: str, source: Path) -> dict[str, int]:
    """Every landed line of the batch ended valid or rejected, exactly once."""
    found = counts(settings, batch_id)
    assert found["customers"] + found["schema_errors"] == lines(source), (batch_id, found)
    return found


def rows_of(db: Path, table: str, batch_id: str, timeout: float = 120) -> list[tuple]:
    """table_rows, retried while a run holds the DuckDB file's write lock."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return table_rows(db, table, batch_id)
        except duckdb.IOException:
            assert time.monotonic() < deadline, f"{db} stayed locked"
            time.sleep(1)


def wait_success(instance: dg.DagsterInstance, run_id: str, what: str, timeout: float = 240):
    done = wait_for(what, lambda: finished(instance, run_id), timeout=timeout)
    status = done.dagster_run.status
    assert status == dg.DagsterRunStatus.SUCCESS, f"{what}: {status}"
    return done


# ---- the daemon killed (separate webserver and daemon processes; first, so that the shared
# dagster dev session below starts only after it) ----


@pytest.mark.slow
def test_the_daemon_killed_mid_run_and_started_again_launches_the_queued_run_and_loses_nothing(
    sources: dict[str, Path], tmp_path: Path
):
    env = pipeline_env(tmp_path)
    write_instance_yaml(Path(env["DAGSTER_HOME"]))
    settings = Settings.from_env(env)
    staging = tmp_path / "staging"
    land(settings, staging, sources["small"], "b001")
    with running_webserver_and_daemon(tmp_path, env, settings) as dev:
        dev.switch_sensor("pipeline_automation_sensor", on=False)
        with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
            first = wait_for(
                "b001's run from the landing sensor to start",
                lambda: _in_progress(instance, "b001"),
                timeout=240,
                interval=0.25,
            )
            # The batch launched again from the launchpad meanwhile: it waits in the queue
            # (one run per batch at a time).
            again = dev.launch_run(INGESTION_JOB, {PARTITION_TAG: "b001"})
            wait_for(
                "b001's re-run queued while its first run is in progress",
                lambda: _status(instance, again) == QUEUED and _in_progress(instance, "b001"),
                timeout=30,
                interval=0.1,
            )
            left_behind = dev.kill_daemon()
            killed_at = time.time()
            assert _status(instance, again) == QUEUED
            # While no daemon runs: a new batch lands; nothing discovers or launches anything.
            land(settings, staging, sources["small"], "b002")
            time.sleep(6)  # more than one pass of the run queue (every 5 s)
            assert _status(instance, again) == QUEUED
            assert batch_runs(instance, "b002") == []
            # The run in progress goes on: its worker is a child of the killed daemon's code
            # server, which outlives the daemon until its runs are done.
            status_while_down = _status(instance, first)
            assert status_while_down in (dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.SUCCESS)

            dev.start_daemon()
            restarted_at = time.time()
            relaunched = wait_success(instance, again, "b001's queued re-run")
            discovered = wait_for(
                "b002's run from the landing sensor", lambda: batch_runs(instance, "b002")
            )[0]
            # every run ends SUCCESS, or FAILURE and its retry SUCCESS
            for batch_id in ("b001", "b002"):
                for run in batch_runs(instance, batch_id):
                    _ends_well(instance, run.dagster_run.run_id)
                assert_complete(settings, batch_id, sources["small"])
            # the killed daemon's code server goes once the run it carried is over
            wait_for(
                "the killed daemon's children to exit",
                lambda: not any(alive(pid) for pid in left_behind),
                timeout=120,
            )
            down_for = restarted_at - killed_at
            print(
                f"\ndaemon killed; the run in progress was {status_while_down.value} while it"
                f" was down, then {_status(instance, first).value}; restarted {down_for:.1f} s"
                f" after the kill; the queued re-run started"
                f" {relaunched.start_time - restarted_at:.1f} s after the restart; b002"
                f" discovered {discovered.create_timestamp.timestamp() - restarted_at:.1f} s after"
            )


QUEUED = dg.DagsterRunStatus.QUEUED


def _ends_well(instance: dg.DagsterInstance, run_id: str) -> None:
    done = wait_for(f"run {run_id} to end", lambda: finished(instance, run_id), timeout=240)
    if done.dagster_run.status != dg.DagsterRunStatus.SUCCESS:
        retry = wait_for(f"a retry of {run_id}", lambda: retry_of(instance, run_id), timeout=60)
        wait_success(instance, retry, f"the retry of {run_id}")


def _status(instance: dg.DagsterInstance, run_id: str) -> dg.DagsterRunStatus:
    return record(instance, run_id).dagster_run.status


def _in_progress(instance: dg.DagsterInstance, batch_id: str) -> str | None:
    """The batch's run in progress (its worker started), if any."""
    for run in batch_runs(instance, batch_id):
        if run.dagster_run.status == dg.DagsterRunStatus.STARTED:
            return run.dagster_run.run_id
    return None


# ---- under dagster dev (one session for the three tests) ----


@pytest.mark.slow
def test_a_killed_run_worker_gives_its_writer_slot_back_and_the_retry_and_next_batch_succeed(
    session: Session,
):
    instance, settings = session.instance, session.settings
    land(settings, session.staging, session.sources["big"], "b001")
    run_id = wait_for(
        "b001's run to start validated_customers",
        lambda: in_step(instance, "b001", "validated_customers"),
        timeout=240,
        interval=0.25,
    )
    time.sleep(1)  # well inside the step
    worker = run_worker_pid(instance, run_id)
    step = step_pid(instance, run_id, "validated_customers")
    assert worker and step and alive(worker) and alive(step)
    for pid in (step, worker):
        os.kill(pid, signal.SIGKILL)
    killed_at = time.time()
    land(settings, session.staging, session.sources["small"], "b002")

    dead = wait_for("the dead run to be failed", lambda: finished(instance, run_id), timeout=60)
    assert dead.dagster_run.status == dg.DagsterRunStatus.FAILURE
    assert not step_succeeded(instance, run_id, "validated_customers")  # killed mid-step
    assert slots_held(instance, run_id) == ["validated_customers"]  # the dead run holds it
    wait_for(
        f"the dead run's {WRITER_POOL} slot to be freed (within {SLOT_FREED_WITHIN} s of its end;"
        " run_monitoring.free_slots_after_run_end_seconds frees it)",
        lambda: not slots_held(instance, run_id),
        timeout=SLOT_FREED_WITHIN,
        interval=0.5,
    )
    freed_after = time.time() - dead.end_time

    retry = wait_for("a retry of the dead run", lambda: retry_of(instance, run_id), timeout=60)
    retried = wait_success(instance, retry, "the retry of b001's run")
    [next_batch] = [r.dagster_run.run_id for r in batch_runs(instance, "b002")]
    later = wait_success(instance, next_batch, "b002's run")
    assert_complete(settings, "b001", session.sources["big"])
    assert_complete(settings, "b002", session.sources["small"])
    print(
        f"\nworker killed; failed after {dead.end_time - killed_at:.1f} s; slot freed"
        f" {freed_after:.1f} s after the run's end; retry SUCCESS {retried.end_time - killed_at:.1f}"
        f" s after the kill; b002 SUCCESS {later.end_time - killed_at:.1f} s after the kill"
    )


@pytest.mark.slow
def test_a_hung_step_is_failed_at_the_runs_max_runtime_and_gives_its_slot_back(
    session: Session,
):
    instance, settings, dev = session.instance, session.settings, session.dev
    # From the launchpad: add the batch and launch it with a time limit. The landing sensor is
    # off meanwhile, so that it does not run the batch as well (it skips it once on again: the
    # batch's raw file holds that landing file).
    dev.switch_sensor("landing_batches_sensor", on=False)
    try:
        dev.add_partition("b003")
        land(settings, session.staging, session.sources["medium"], "b003")
        tags = {PARTITION_TAG: "b003", "dagster/max_runtime": str(MAX_RUNTIME)}
        run_id = dev.launch_run(INGESTION_JOB, tags)
        _hang_and_recover(session, run_id)
        runs = batch_runs(instance, "b003")
        assert len(runs) == 2, [r.dagster_run.tags for r in runs]  # the hung run and its retry
    finally:
        dev.switch_sensor("landing_batches_sensor", on=True)
    assert_complete(settings, "b003", session.sources["medium"])


def _hang_and_recover(session: Session, run_id: str) -> None:
    instance = session.instance
    # Its validation step then hangs: SIGSTOP, no signal handler runs, the slot stays claimed.
    step = wait_for(
        "the run's validated_customers step",
        lambda: step_pid(instance, run_id, "validated_customers"),
        timeout=180,
        interval=0.2,
    )
    os.kill(step, signal.SIGSTOP)
    worker = run_worker_pid(instance, run_id)
    try:
        assert not step_succeeded(instance, run_id, "validated_customers")
        assert slots_held(instance, run_id) == ["validated_customers"]
        started = record(instance, run_id).start_time
        assert started is not None
        hung = wait_for(
            f"the hung run to be failed (dagster/max_runtime={MAX_RUNTIME} s; run monitoring"
            " enforces it)",
            lambda: finished(instance, run_id),
            timeout=started + MAX_RUNTIME + FAILED_AFTER_MAX_RUNTIME_WITHIN - time.time(),
        )
        assert hung.dagster_run.status == dg.DagsterRunStatus.FAILURE
        ran_for = hung.end_time - started
        assert MAX_RUNTIME <= ran_for <= MAX_RUNTIME + FAILED_AFTER_MAX_RUNTIME_WITHIN
        wait_for(
            f"the hung run's {WRITER_POOL} slot to be freed (within {SLOT_FREED_WITHIN} s)",
            lambda: not slots_held(instance, run_id),
            timeout=SLOT_FREED_WITHIN,
            interval=0.5,
        )
        freed_after = time.time() - hung.end_time
        # Dagster asked the worker to stop the step, but a stopped process cannot act on it: it
        # stays (with what it holds, the DuckDB file's lock perhaps) until it is killed.
        step_left = alive(step)
    finally:
        for pid in (step, worker):
            if pid and alive(pid):
                os.kill(pid, signal.SIGKILL)
    retry = wait_for("a retry of the hung run", lambda: retry_of(instance, run_id), timeout=60)
    retried = wait_success(instance, retry, "the retry of the hung run")
    print(
        f"\nhung run failed {ran_for:.1f} s after its start (limit {MAX_RUNTIME} s); slot freed"
        f" {freed_after:.1f} s after its end; stopped step still alive then: {step_left};"
        f" retry SUCCESS in {retried.end_time - retried.start_time:.1f} s"
    )


@pytest.mark.slow
def test_two_runs_of_one_batch_at_once_never_overlap_and_leave_the_tables_of_one_run(
    session: Session, tmp_path: Path
):
    instance, settings = session.instance, session.settings
    land(settings, session.staging, session.sources["small"], "b004")
    # The landing sensor's run and, as soon as it exists, a manual launch of the same batch
    # from the UI's launchpad: both go through the run queue.
    sensor_run = wait_for(
        "b004's run from the landing sensor",
        lambda: batch_runs(instance, "b004"),
        timeout=120,
        interval=0.2,
    )[0].dagster_run.run_id
    manual_run = session.dev.launch_run(INGESTION_JOB, {PARTITION_TAG: "b004"})
    done = [wait_success(instance, r, f"run {r}") for r in (sensor_run, manual_run)]
    (first_start, first_end), (second_start, second_end) = sorted(
        (r.start_time, r.end_time) for r in done
    )
    assert first_end <= second_start, (
        f"the two runs of b004 overlapped for {first_end - second_start:.1f} s"
    )

    # A clean single run of the same file, in-process on a warehouse of its own.
    alone = replace(settings_in(tmp_path / "alone"), embedding=EmbeddingSettings("hashing"))
    land(alone, tmp_path / "staging", session.sources["small"], "b004")
    quiet = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    with dg.instance_for_test() as clean:
        assert run_batch(build_definitions(alone), clean, "b004", quiet).success
    for table in BATCH_TABLES:
        assert rows_of(settings.duckdb_path, table, "b004") == rows_of(
            alone.duckdb_path, table, "b004"
        ), table
    assert_complete(settings, "b004", session.sources["small"])
    print(
        f"\nsame batch twice: first run {first_start:.1f}-{first_end:.1f}, second"
        f" {second_start:.1f}-{second_end:.1f} (gap {second_start - first_end:.1f} s)"
    )
