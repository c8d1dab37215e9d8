"""A real process that runs one batch through the pipeline, for the crash and concurrency tests.

    python -m pipeline_project_tests.crash_child ROOT BATCH_ID [PAUSE_AT]

ROOT holds landing/, catalog.csv and warehouse.duckdb (see test_crash_safety).
With PAUSE_AT, the process stops at that point of the write (creates ROOT/paused, then sleeps)
so that the test can kill it there with SIGKILL:

- raw_file: two chunks of the new raw_customers file written, not yet renamed into place;
- staged_chunk: validation staged its first chunk, the swap transaction not yet begun;
- validation_swap: inside the swap transaction, the batch deleted and re-inserted, not committed;
- embeddings_swap: inside customer_embeddings' transaction, not committed.

Without PAUSE_AT it runs to the end and prints the run's start and end (epoch seconds).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import dagster as dg

from pipeline_project.definitions import build_definitions
from pipeline_project.resources import Warehouse
from pipeline_project.settings import Settings
from pipeline_project_tests.helpers import INFERENCE_STAGES, settings_in


def pause(root: Path) -> None:
    (root / "paused").touch()
    time.sleep(600)  # the test kills the process here
    raise SystemExit("not killed")


# The table whose swap transaction each swap point is inside.
SWAP_TABLES = {"validation_swap": "customers", "embeddings_swap": "customer_embeddings"}


def install_at(point: str, action: Callable[..., None]) -> None:
    """Call `action` at `point` of a batch's write (the points above): `action()` once two
    chunks of the raw file are written, or inside the swap transaction; after each staged
    validation chunk `action(staging=..., part=...)`, with the staging folders and its part."""
    if point == "raw_file":
        import pipeline_project.assets.ingestion as ingestion

        store = ingestion.store_raw_lines

        def store_then_act(writer, chunks, on_chunk=None, **kwargs):
            def counted(summary):
                if on_chunk is not None:
                    on_chunk(summary)
                if summary.chunks == 2:
                    action()

            return store(writer, chunks, on_chunk=counted, **kwargs)

        ingestion.store_raw_lines = store_then_act
    elif point == "staged_chunk":
        import pipeline_project.core.validation as validation

        stage = validation._stage_chunk

        def stage_then_act(batch_id, result, staging, part):
            stage(batch_id, result, staging, part)
            action(staging=staging, part=part)

        validation._stage_chunk = stage_then_act
    elif point in SWAP_TABLES:
        replace_batch = Warehouse.replace_batch

        @contextmanager
        def replace_then_act(self, tables, batch_id, dead_letter_stage=None):
            with replace_batch(self, tables, batch_id, dead_letter_stage) as conn:
                yield conn
                if SWAP_TABLES[point] in tables:  # the new rows are in, the transaction is open
                    action()

        Warehouse.replace_batch = replace_then_act
    else:
        raise SystemExit(f"unknown point {point!r}")


def install_pause(root: Path, point: str) -> None:
    install_at(point, lambda **_: pause(root))


def main() -> None:
    root, batch_id = Path(sys.argv[1]), sys.argv[2]
    if len(sys.argv) > 3:
        install_pause(root, sys.argv[3])
    # test_crash_safety picks the embedding backend through PIPELINE_EMBEDDING_BACKEND
    settings = replace(
        settings_in(root, duckdb_memory_limit="256MB"), embedding=Settings.from_env().embedding
    )
    defs = build_definitions(settings)
    with dg.instance_for_test() as instance:  # a temporary Dagster home of its own
        instance.add_dynamic_partitions("batches", [batch_id])
        started = time.time()
        assert defs.resolve_job_def("catalog_job").execute_in_process(instance=instance).success
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
        print(f"{batch_id} success={result.success} start={started} end={time.time()}")
    sys.exit(0 if result.success else 1)


if __name__ == "__main__":
    main()
