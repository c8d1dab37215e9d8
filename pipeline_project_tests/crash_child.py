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


def install_pause(root: Path, point: str) -> None:
    if point == "raw_file":
        import pipeline_project.assets.ingestion as ingestion

        store = ingestion.store_raw_lines

        def store_then_pause(writer, chunks, on_chunk=None):
            def counted(summary):
                if on_chunk is not None:
                    on_chunk(summary)
                if summary.chunks == 2:
                    pause(root)

            return store(writer, chunks, on_chunk=counted)

        ingestion.store_raw_lines = store_then_pause
    elif point == "staged_chunk":
        import pipeline_project.core.validation as validation

        stage = validation._stage_chunk

        def stage_then_pause(*args, **kwargs):
            stage(*args, **kwargs)
            pause(root)

        validation._stage_chunk = stage_then_pause
    elif point in ("validation_swap", "embeddings_swap"):
        table = "customers" if point == "validation_swap" else "customer_embeddings"
        replace = Warehouse.replace_batch

        @contextmanager
        def replace_then_pause(self, tables, batch_id, dead_letter_stage=None):
            with replace(self, tables, batch_id, dead_letter_stage) as conn:
                yield conn
                if table in tables:  # the new rows are in, the transaction is open
                    pause(root)

        Warehouse.replace_batch = replace_then_pause
    else:
        raise SystemExit(f"unknown pause point {point!r}")


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
