"""A real process whose writes run out of room, for test_disk_faults.

    python -m pipeline_project_tests.disk_child ROOT BATCH_ID [FAULT_AT MECHANISM]

ROOT holds landing/, catalog.csv and warehouse.duckdb (see test_crash_safety). The process runs
the catalog, then the batch through ingestion, validation and inference, as crash_child does,
but on an in-memory Dagster instance: the only files it writes are the pipeline's. With
FAULT_AT, the room runs out at that point of the write (the names of crash_child's points):

- raw_file: two chunks of the new raw_customers file written;
- staged_chunk: validation staged its first chunk (the next part gets half written);
- validation_swap: inside the swap transaction, the batch deleted and re-inserted, not committed.

MECHANISM says how:

- file_size_limit: RLIMIT_FSIZE lowered below what the write needs (SIGXFSZ ignored, so that
  write() fails with EFBIG instead of the signal killing the process);
- full_disk: the filesystem that holds ROOT filled up by ROOT/ballast (the test mounts a small
  tmpfs there); the test frees the space by deleting it.

    python -m pipeline_project_tests.disk_child ROOT BATCH_ID grow MECHANISM

instead replaces the batch's customer_purchases with a million rows in one Warehouse transaction,
with room for 1 MB more once the batch is deleted: DuckDB writes the full row groups of a big
INSERT into the database file itself, so the file's own growth fails mid-INSERT.

It prints each failed step's message (`FAILED <step>: <message> <- <cause>`) and exits 1 if a
step failed.
"""

from __future__ import annotations

import errno
import resource
import signal
import sys
from dataclasses import replace
from pathlib import Path

import dagster as dg

from pipeline_project.definitions import build_definitions
from pipeline_project.resources import Warehouse
from pipeline_project.settings import Settings
from pipeline_project.tables import CUSTOMER_PURCHASES
from pipeline_project_tests.crash_child import install_at
from pipeline_project_tests.helpers import INFERENCE_STAGES, settings_in

FILE_SIZE_LIMIT, FULL_DISK = "file_size_limit", "full_disk"
# file_size_limit at validation_swap: below what the commit writes into the WAL file.
COMMIT_LIMIT_BYTES = 8192
# grow: how much the database file may still grow (a few of its 256 KB blocks).
GROWTH_BYTES = 1 << 20


def run_out_of_room(root: Path, mechanism: str, limit_bytes: int, room: int = 0) -> None:
    """From now on, a write that needs more room fails: no file grows past `limit_bytes`, or
    the disk has `room` bytes left."""
    if mechanism == FILE_SIZE_LIMIT:
        _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, hard))
    elif mechanism == FULL_DISK:
        fill_filesystem(root / "ballast", room)
    else:
        raise SystemExit(f"unknown mechanism {mechanism!r}")


def fill_filesystem(ballast: Path, room: int = 0) -> None:
    """Write `ballast` until the filesystem has not one byte left, then give `room` back."""
    with open(ballast, "wb", buffering=0) as f:
        for size in (1 << 20, 1 << 12, 1):
            block = b"\0" * size
            try:
                while f.write(block):
                    pass
            except OSError as err:
                if err.errno != errno.ENOSPC:
                    raise
        f.truncate(max(0, f.tell() - room))


def install_fault(root: Path, point: str, mechanism: str) -> None:
    def raw_file() -> None:  # the file being written cannot grow any more
        [tmp] = Warehouse(database=str(root / "warehouse.duckdb")).raw_dir.glob(
            "*/.lines.parquet.*.tmp"
        )
        run_out_of_room(root, mechanism, tmp.stat().st_size)

    def staged_chunk(staging, part) -> None:
        if part == 0:  # the next chunk's biggest part gets about half written
            parts = [p for folder in staging.values() for p in folder.glob("*.parquet")]
            run_out_of_room(root, mechanism, max(p.stat().st_size for p in parts) // 2)

    def validation_swap() -> None:  # the new rows are in; the commit writes them
        run_out_of_room(root, mechanism, COMMIT_LIMIT_BYTES)

    faults = {"raw_file": raw_file, "staged_chunk": staged_chunk,
              "validation_swap": validation_swap}  # fmt: skip
    if point not in faults:
        raise SystemExit(f"unknown fault point {point!r}")
    install_at(point, faults[point])


def failures(result: dg.ExecuteInProcessResult) -> list[str]:
    """Each failed step's error and its causes, as the run's event log shows them."""
    lines = []
    for event in result.all_events:
        if event.is_step_failure:
            error, messages = event.step_failure_data.error, []
            while error is not None:
                messages.append(error.message.strip())
                error = error.cause
            lines.append(f"FAILED {event.step_key}: " + " <- ".join(messages))
    return lines


def run_pipeline(root: Path, batch_id: str) -> bool:
    # test_disk_faults picks the embedding backend through PIPELINE_EMBEDDING_BACKEND
    settings = replace(
        settings_in(root, duckdb_memory_limit="256MB"), embedding=Settings.from_env().embedding
    )
    defs = build_definitions(settings)
    # In memory: no event log or compute log file of Dagster's own shares the limit or the disk.
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("batches", [batch_id])
    catalog = defs.resolve_job_def("catalog_job").execute_in_process(
        instance=instance, raise_on_error=False
    )
    print("\n".join(failures(catalog)))
    if not catalog.success:
        return False
    result = defs.resolve_job_def("batch_pipeline_job").execute_in_process(
        partition_key=batch_id,
        instance=instance,
        asset_selection=[dg.AssetKey(step) for step in INFERENCE_STAGES],
        raise_on_error=False,
        run_config={
            "ops": {
                "raw_customers": {"config": {"chunk_rows": 50}},
                "validated_customers": {"config": {"chunk_rows": 50}},
            }
        },
    )
    print("\n".join(failures(result)))
    return result.success


def grow_warehouse(root: Path, batch_id: str, mechanism: str) -> bool:
    warehouse = Warehouse(database=str(root / "warehouse.duckdb"))
    try:
        with warehouse.replace_batch([CUSTOMER_PURCHASES], batch_id) as conn:
            size = Path(warehouse.database).stat().st_size
            run_out_of_room(root, mechanism, size + GROWTH_BYTES, room=GROWTH_BYTES)
            conn.execute(
                f"INSERT INTO {CUSTOMER_PURCHASES} SELECT ?, uuid(), i, 0, 'P00001', 1.0, now()"
                " FROM range(1000000) AS t(i)",
                [batch_id],
            )
    except Exception as err:
        print(f"FAILED grow: {type(err).__name__}: {err}")
        return False
    return True


def main() -> None:
    root, batch_id = Path(sys.argv[1]), sys.argv[2]
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    if len(sys.argv) > 3 and sys.argv[3] == "grow":
        sys.exit(0 if grow_warehouse(root, batch_id, sys.argv[4]) else 1)
    if len(sys.argv) > 3:
        install_fault(root, sys.argv[3], sys.argv[4])
    sys.exit(0 if run_pipeline(root, batch_id) else 1)


if __name__ == "__main__":
    main()
