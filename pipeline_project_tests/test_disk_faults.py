"""A full disk, a file-size limit and unwritable or wrong warehouse files, with real processes.

The writes that run out of room happen in `python -m pipeline_project_tests.disk_child` (see
that module): RLIMIT_FSIZE lowered in the child everywhere, and, where this machine lets the
tests mount one (root with CAP_SYS_ADMIN), a real 64 MB tmpfs filled up. The "rerun equals a
clean run" comparison is test_crash_safety's, on its committed batch and reference folder.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import duckdb
import pytest

from pipeline_project.resources import AlertSink, Warehouse
from pipeline_project_tests import test_crash_safety
from pipeline_project_tests.disk_child import (
    FILE_SIZE_LIMIT,
    FULL_DISK,
    failures,
    fill_filesystem,
)
from pipeline_project_tests.helpers import customer, run_batch, write_lines
from pipeline_project_tests.test_crash_safety import (
    after_a_failed_run,
    make_root,
    run_to_end,
    state,
)

# test_crash_safety's module fixture `committed_and_reference`, run for this module too: b001
# committed from a first file, a second file landed for it, and a reference folder where the
# second file ran once, never interrupted.
crash_safety_batches = test_crash_safety.committed_and_reference

FAULT_POINTS = ["raw_file", "staged_chunk", "validation_swap"]
REASONS = {FILE_SIZE_LIMIT: "the file reached the file-size limit", FULL_DISK: "the disk is full"}
ADVICE = "Free space on that disk"


def disk_child(root: Path, *args: str, prefix: Sequence[str] = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "PIPELINE_EMBEDDING_BACKEND": "hashing"}
    return subprocess.run(
        [*prefix, sys.executable, "-m", "pipeline_project_tests.disk_child", str(root), "b001",
         *args],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def written_where(root: Path, point: str) -> str:
    """The path the failed step's message names."""
    files = root / "warehouse.duckdb.files"
    return {
        "raw_file": str(files / "raw_customers" / "batch_id=b001" / ".lines.parquet."),
        "staged_chunk": str(files / "staging" / "b001."),
        "validation_swap": str(root / "warehouse.duckdb.wal"),
    }[point]


def no_files_left_over(root: Path) -> None:
    """No staging folder, no temporary raw file: the batch's one raw file only."""
    files = root / "warehouse.duckdb.files"
    assert list((files / "staging").glob("*")) == []
    assert [p.name for p in (files / "raw_customers" / "batch_id=b001").iterdir()] == [
        "lines.parquet"
    ]


def fails_for_lack_of_room(
    root: Path, before: dict, reference: Path, point: str, mechanism: str
) -> None:
    """Run the new b001 until its write runs out of room at `point`; check what is left."""
    child = disk_child(root, point, mechanism)
    assert child.returncode == 1, child.stdout + child.stderr[-3000:]
    # the step says which file, why, and what to do
    assert written_where(root, point) in child.stdout, child.stdout
    assert REASONS[mechanism] in child.stdout and ADVICE in child.stdout, child.stdout
    # read again in this (a fresh) process: the steps that finished before the failed one hold
    # the new file's rows, and nothing of the old file is left after them
    assert state(root) == after_a_failed_run(before, state(reference), point)
    no_files_left_over(root)


def rerun_equals_a_clean_run(root: Path, reference: Path) -> None:
    run_to_end(root, "b001")
    assert state(root) == state(reference)
    no_files_left_over(root)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 64 MB filesystem of this test's own (tmpfs), unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command here: the file-size-limit tests prove the same writes")
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m,mode=0755", "tmpfs", str(disk)],
        capture_output=True, text=True,
    )  # fmt: skip
    if mount.returncode != 0:
        pytest.skip(
            f"no small filesystem can be mounted here ({mount.stderr.strip()}): root with"
            " CAP_SYS_ADMIN is needed; the file-size-limit tests prove the same writes"
        )
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


@pytest.mark.slow
@pytest.mark.parametrize("point", FAULT_POINTS)
def test_a_file_size_limit_mid_write_keeps_the_committed_batch_and_the_rerun_matches_a_clean_run(
    crash_safety_batches, tmp_path, point
):
    committed, before, reference = crash_safety_batches
    root = tmp_path / "limited"
    shutil.copytree(committed, root)
    fails_for_lack_of_room(root, before, reference, point, FILE_SIZE_LIMIT)
    rerun_equals_a_clean_run(root, reference)  # a process without the limit


# A real full disk at the swap (DuckDB's own file and WAL); the Parquet writes before it meet
# ENOSPC through the same OSError path that the file-size limit above proves at every point.
@pytest.mark.slow
@pytest.mark.parametrize("point", ["validation_swap"])
def test_a_full_disk_mid_write_keeps_the_committed_batch_and_the_rerun_matches_a_clean_run(
    crash_safety_batches, small_disk, point
):
    committed, before, reference = crash_safety_batches
    root = small_disk / "root"
    shutil.copytree(committed, root)
    fails_for_lack_of_room(root, before, reference, point, FULL_DISK)
    (root / "ballast").unlink()  # space freed
    rerun_equals_a_clean_run(root, reference)


@pytest.mark.slow
@pytest.mark.parametrize("mechanism", [FILE_SIZE_LIMIT, FULL_DISK])
def test_a_warehouse_file_that_cannot_grow_fails_mid_insert_and_keeps_the_committed_batch(
    crash_safety_batches, tmp_path, request, mechanism
):
    committed, before, _ = crash_safety_batches
    where = request.getfixturevalue("small_disk") if mechanism == FULL_DISK else tmp_path
    root = where / "root"
    shutil.copytree(committed, root)
    size = (root / "warehouse.duckdb").stat().st_size
    child = disk_child(root, "grow", mechanism)
    assert child.returncode == 1, child.stdout + child.stderr[-3000:]
    db = str(root / "warehouse.duckdb")
    assert f'No room to write "{db}"' in child.stdout, child.stdout
    assert REASONS[mechanism] in child.stdout and ADVICE in child.stdout, child.stdout
    assert "Failed to commit" not in child.stdout  # the INSERT failed, not its commit
    assert (root / "warehouse.duckdb").stat().st_size > size, child.stdout  # it began to grow
    (root / "ballast").unlink(missing_ok=True)
    assert state(root) == before  # opened again in this process: the previous batch, intact
    with duckdb.connect(db) as conn:  # and writable: a checkpoint rewrites its blocks
        conn.execute("CHECKPOINT")
    assert state(root) == before


def test_duckdb_spilling_onto_a_full_disk_fails_naming_its_temp_folder(small_disk):
    warehouse = Warehouse(
        database=str(small_disk / "warehouse.duckdb"),
        connection_config={"memory_limit": "64MB", "threads": 1},
    )
    with warehouse.get_connection() as conn:  # the tables are made while there is room
        conn.execute("SELECT 1")
    fill_filesystem(small_disk / "ballast", room=1 << 20)  # DuckDB may spill 90% of 1 MB
    with pytest.raises(OSError) as raised, warehouse.get_connection() as conn:
        conn.execute(
            "SELECT count(*) FROM (SELECT md5(i::VARCHAR) || repeat('x', 100) AS s"
            " FROM range(3000000) AS t(i) ORDER BY s)"
        ).fetchall()
    message = str(raised.value)
    assert f"{warehouse.database}.tmp" in message and ADVICE in message, message
    assert "PIPELINE_DUCKDB_MEMORY_LIMIT" in message, message
    (small_disk / "ballast").unlink()
    with warehouse.get_connection() as conn:  # usable again once there is room
        assert conn.execute("SELECT count(*) FROM customers").fetchall() == [(0,)]


# ---- a file at the warehouse's or the alerts' path that is not a DuckDB database ----


def not_a_database(path: Path, kind: str) -> bytes:
    """Write a file of `kind` at `path`: what a user may point the setting at by mistake."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "sqlite":
        with sqlite3.connect(path) as conn:
            conn.execute("CREATE TABLE customers (id TEXT, email TEXT)")
            conn.execute("INSERT INTO customers VALUES ('1', 'a@example.com')")
        conn.close()
    else:
        text = {"csv": "id,email\n1,a@example.com\n", "text": "warehouse notes\n" * 400}[kind]
        path.write_text(text)
    return path.read_bytes()


@pytest.mark.parametrize("kind", ["csv", "text", "sqlite"])
def test_a_warehouse_path_that_is_not_a_duckdb_database_fails_clearly_and_is_left_as_it_was(
    settings, defs, instance, kind
):
    db = settings.duckdb_path
    content = not_a_database(db, kind)
    write_lines(settings.landing_dir / "b1.jsonl", [customer()])
    result = run_batch(defs, instance, "b1")
    assert not result.success
    [message, *_] = failures(result)
    assert "raw_customers" in message  # the run's first step that needs the warehouse
    assert f'"{db}" is not a DuckDB database' in message, message
    assert "PIPELINE_DUCKDB_PATH" in message, message
    assert db.read_bytes() == content
    assert [p.name for p in db.parent.glob(f"{db.name}*")] == [db.name]  # no .wal, no .files


@pytest.mark.parametrize("kind", ["csv", "sqlite"])
def test_an_alerts_path_that_is_not_a_duckdb_database_is_reported_and_left_as_it_was(
    tmp_path, caplog, kind
):
    path = tmp_path / "alerts.duckdb"
    content = not_a_database(path, kind)
    sink = AlertSink(database=str(path))
    log = logging.getLogger("test_disk_faults")
    with caplog.at_level(logging.WARNING):
        outcome = sink.emit(severity="error", monitor="m", key="k", message="boom", log=log)
    assert outcome.sent and not outcome.stored
    assert f'"{path}" is not a DuckDB database' in caplog.text, caplog.text
    assert path.read_bytes() == content
    assert [p.name for p in tmp_path.glob(f"{path.name}*")] == [path.name]


# ---- a warehouse path the pipeline's user may not write ----


@pytest.fixture
def file_modes_obeyed() -> list[str]:
    """The command prefix under which the child obeys file modes: none, or, when the tests run
    as root (who may write anything, whatever the modes say), root without the capabilities
    that override them (a real process's own capability set, not a mock)."""
    if os.getuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip(
            "running as root and setpriv (util-linux) is missing: chmod denies root nothing"
        )
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "case", ["read_only_file", "read_only_folder", "read_only_folder_with_database"]
)
def test_an_unwritable_warehouse_path_fails_clearly_naming_it(tmp_path, file_modes_obeyed, case):
    root, _ = make_root(tmp_path / "root", 20, seed=1)
    db = root / "warehouse.duckdb"
    if case != "read_only_folder":
        with Warehouse(database=str(db)).get_connection():
            pass
    content = db.read_bytes() if db.exists() else None
    target, mode = (db, 0o444) if case == "read_only_file" else (root, 0o555)
    target.chmod(mode)
    try:
        child = disk_child(root, prefix=file_modes_obeyed)
    finally:
        target.chmod(0o644 if target == db else 0o755)
    assert child.returncode == 1, child.stdout + child.stderr[-3000:]
    named = f"{db}.wal" if case == "read_only_folder_with_database" else str(db)
    assert f'"{named}" cannot be written' in child.stdout, child.stdout
    assert "write access" in child.stdout, child.stdout
    assert (db.read_bytes() if db.exists() else None) == content
