"""Crash safety and concurrency with real processes: SIGKILL mid-write, two writers at once.

Each child is `python -m pipeline_project_tests.crash_child` running the batch through the
pipeline (catalog, ingestion, validation, inference with the hashing backend) on a real
DuckDB file; see that module for the points where a child waits to be killed.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from pipeline_project.sample_data import Catalog, generate_batch, write_catalog
from pipeline_project_tests.helpers import table_rows

TABLES = [
    "raw_customers",
    "customers",
    "customer_purchases",
    "schema_errors",
    "customer_embeddings",
    "dead_letter",
]

VALIDATED = ["customers", "customer_purchases", "schema_errors"]
STEPS_DONE_BEFORE = {
    "raw_file": [],
    "staged_chunk": ["raw_customers"],
    "validation_swap": ["raw_customers"],
    "embeddings_swap": ["raw_customers", *VALIDATED],
}


def child(root: Path, batch_id: str, pause_at: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "PIPELINE_EMBEDDING_BACKEND": "hashing"}
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline_project_tests.crash_child", str(root), batch_id,
         *([pause_at] if pause_at else [])],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def run_to_end(root: Path, batch_id: str) -> str:
    proc = child(root, batch_id)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out + err[-3000:]
    return out


def state(root: Path, batch_id: str | None = None) -> dict[str, list[tuple]]:
    db = root / "warehouse.duckdb"
    tables = {t: table_rows(db, t, batch_id) for t in TABLES}
    # created_at of a dead letter is a load time, like ingested_at
    tables["dead_letter"] = [row[:7] for row in tables["dead_letter"]]
    return tables


def after_a_failed_run(before: dict, new: dict, point: str) -> dict[str, list[tuple]]:
    """What the batch's tables hold after a run of its new file stopped at `point`: the steps
    done before it hold the new content; once the new raw file is in, nothing the old content
    gave is left in any later table (it was withdrawn in the transaction that recorded the new
    content): no mix of the two files, no old answer live. Before that, everything is as it
    was."""
    done = STEPS_DONE_BEFORE[point]
    if not done:
        return before
    return {t: new[t] if t in done else [] for t in TABLES}


def make_root(path: Path, rows: int, seed: int) -> tuple[Path, Catalog]:
    """A folder with the catalog and batch b001 in its landing folder."""
    catalog = write_catalog(path / "catalog.csv", seed=1)
    generate_batch(path / "landing" / "b001.jsonl", rows, 0.1, seed, catalog)
    return path, catalog


@pytest.fixture(scope="module")
def committed_and_reference(tmp_path_factory) -> tuple[Path, dict, Path]:
    """b001 committed from a first file, then a second file landed for it (copied for each
    test); and a reference folder where the second file ran once, never interrupted."""
    base = tmp_path_factory.mktemp("crash")
    root, catalog = make_root(base / "committed", 300, seed=1)
    run_to_end(root, "b001")
    before = state(root)
    generate_batch(root / "landing" / "b001.jsonl", 400, 0.1, 2, catalog)
    reference = base / "reference"
    (reference / "landing").mkdir(parents=True)
    shutil.copy(root / "catalog.csv", reference / "catalog.csv")
    shutil.copy(root / "landing" / "b001.jsonl", reference / "landing" / "b001.jsonl")
    run_to_end(reference, "b001")
    return root, before, reference


@pytest.fixture
def batch_committed(committed_and_reference, tmp_path) -> tuple[Path, dict, Path]:
    committed, before, reference = committed_and_reference
    root = tmp_path / "crashed"
    shutil.copytree(committed, root)
    return root, before, reference


@pytest.mark.slow
@pytest.mark.parametrize(
    "pause_at", ["raw_file", "staged_chunk", "validation_swap", "embeddings_swap"]
)
def test_sigkill_mid_write_keeps_the_committed_batch_and_the_rerun_matches_a_clean_run(
    batch_committed, pause_at
):
    root, before, reference = batch_committed
    proc = child(root, "b001", pause_at)
    deadline = time.monotonic() + 240
    while not (root / "paused").exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the child never reached the pause point"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    (root / "paused").unlink()

    # The file opens (no lock left by the dead process); the steps that finished before the
    # killed one hold the new file's rows, and nothing of the old file is left after them.
    after_kill, new = state(root), state(reference)
    assert after_kill == after_a_failed_run(before, new, pause_at)
    assert after_kill != new and before["customers"] != new["customers"]
    staging = root / "warehouse.duckdb.files" / "staging"
    raw_folder = root / "warehouse.duckdb.files" / "raw_customers" / "batch_id=b001"
    if pause_at == "raw_file":  # killed mid-file: its temporary file is left
        assert any(p.name.endswith(".tmp") for p in raw_folder.iterdir())
    if pause_at == "staged_chunk":  # killed mid-staging: its folder is left
        assert list(staging.iterdir()) != []

    run_to_end(root, "b001")
    assert state(root) == state(reference)
    assert not staging.exists() or list(staging.iterdir()) == []
    assert [p.name for p in raw_folder.iterdir()] == ["lines.parquet"]


@pytest.mark.slow
def test_two_processes_write_different_batches_to_one_duckdb_file_at_the_same_time(tmp_path):
    root, catalog = make_root(tmp_path / "shared", 1000, seed=1)
    generate_batch(root / "landing" / "b002.jsonl", 1000, 0.1, 2, catalog)
    first, second = child(root, "b001"), child(root, "b002")
    outputs = [p.communicate(timeout=300) for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, [e[-3000:] for _, e in outputs]
    spans = [tuple(float(part.split("=")[1]) for part in out.split()[2:4]) for out, _ in outputs]
    assert max(s for s, _ in spans) < min(e for _, e in spans)  # the runs overlapped

    alone, _ = make_root(tmp_path / "alone", 1000, seed=1)
    shutil.copy(root / "landing" / "b002.jsonl", alone / "landing" / "b002.jsonl")
    run_to_end(alone, "b001")
    run_to_end(alone, "b002")
    for batch_id in ("b001", "b002"):
        together = state(root, batch_id)
        assert together == state(alone, batch_id)
        assert len(together["raw_customers"]) == 1000
        assert len(together["customers"]) + len(together["schema_errors"]) == 1000
    with duckdb.connect(str(root / "warehouse.duckdb")) as conn:  # no lock left behind
        assert conn.execute("SELECT count(DISTINCT batch_id) FROM customers").fetchall() == [(2,)]
