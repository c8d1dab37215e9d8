"""What a weekly retrain of the segment model costs after 30 and after 365 daily batches.

    python benchmarks/retrain_cost.py [--days 30,365] [--rows 200] [--backend hashing]

For each history length: a fresh warehouse (the file backend, in-process runs, as the demo
runs them), one batch a day (drawn from one customer base, 30% of each day's lines the day
before's customers again), every stage of each. Then three retrains through `segment_model_job`,
each followed by the re-scoring it asks for (rescore_sensor's requests, run one after another
as the daemon would launch them behind new batches):

1. the catch-up retrain (the first model was trained by the first day's batch alone);
2. a week later (7 more daily batches): the weekly retrain, what it costs in steady state;
3. the same retrain again on unchanged data: what a retrain costs when nothing changed.

Prints, per retrain: the training's wall time, whether it made a new version and how far the
model moved, the batches re-scored and their wall time, the batches holding current answers
left on an older version; and how many batches re-scoring every batch holding a current answer
(`rescore_newest_batches: null`, the behaviour before) would have re-run. Figures only, measured
in this one run, never pass/fail.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.project_instance import project_instance  # noqa: E402

WEEK = 7


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--days", default="30,365", help="history lengths, comma-separated")
    parser.add_argument("--rows", type=int, default=200, help="lines per daily batch")
    parser.add_argument("--backend", default="hashing")
    args = parser.parse_args()
    for days in (int(d) for d in args.days.split(",")):
        history(days, args.rows, args.backend)


def history(days: int, rows: int, backend: str) -> None:
    root = Path(tempfile.mkdtemp(prefix=f"retrain_cost_{days}_"))
    os.environ.update(
        PIPELINE_LANDING_DIR=str(root / "landing"),
        PIPELINE_DUCKDB_PATH=str(root / "warehouse.duckdb"),
        PIPELINE_ALERTS_DUCKDB_PATH=str(root / "alerts.duckdb"),
        PIPELINE_CATALOG_PATH=str(root / "catalog.csv"),
        PIPELINE_EMBEDDING_BACKEND=backend,
    )
    from pipeline_project.core.publications import live_batches
    from pipeline_project.definitions import build_definitions
    from pipeline_project.resources import Warehouse
    from pipeline_project.sample_data import BatchSpec, generate_batch, write_catalog
    from pipeline_project.settings import Settings

    catalog = write_catalog(root / "catalog.csv")
    population = 20 * rows
    batch_ids = [f"d{n:04d}" for n in range(1, days + WEEK + 1)]
    previous = None
    for n, batch_id in enumerate(batch_ids):
        # the day before's customers come back (the day before's own returning lines are not
        # generated again: a chain of 365 days would be generated 365 times)
        generate_batch(root / "landing" / f"{batch_id}.jsonl", rows, 0.01, n + 1, catalog,
                       population=population, returning=0.3, previous=previous)  # fmt: skip
        previous = BatchSpec(rows, 0.01, n + 1, population)
    warehouse = Warehouse.from_settings(Settings.from_env().warehouse)
    with project_instance(root) as instance:
        defs = build_definitions()
        assert defs.resolve_job_def("catalog_job").execute_in_process(instance=instance).success
        pipeline = defs.resolve_job_def("batch_pipeline_job")
        cursor: dict = {}

        def land(ids: list[str]) -> float:
            instance.add_dynamic_partitions("batches", ids)
            started = time.perf_counter()
            for batch_id in ids:
                result = pipeline.execute_in_process(instance=instance, partition_key=batch_id)
                assert result.success, batch_id
            return time.perf_counter() - started

        def retrain(label: str) -> None:
            nonlocal cursor
            from pipeline_project.sensors.rescore import rescore_requests

            started = time.perf_counter()
            result = defs.resolve_job_def("segment_model_job").execute_in_process(instance=instance)
            train = time.perf_counter() - started
            assert result.success
            [meta] = result.asset_materializations_for_node("segment_model")
            figures = {k: v.value for k, v in meta.metadata.items()}
            with warehouse.get_connection() as conn:
                every_live = len(live_batches(conn, "true"))
            requests, cursor = rescore_requests(instance, cursor)
            started = time.perf_counter()
            for request in requests:
                outcome = pipeline.execute_in_process(
                    instance=instance, partition_key=request.partition_key,
                    asset_selection=request.asset_selection, tags=request.tags,
                )  # fmt: skip
                assert outcome.success, request.partition_key
            rescore = time.perf_counter() - started
            per_batch = rescore / len(requests) if requests else 0.0
            print(
                f"  {label}: training {train:.1f} s, v{figures['model_version']}"
                f" {'new' if figures['new_version'] else 'kept'} ({figures['why']});"
                f" re-scored {len(requests)} batches in {rescore:.1f} s"
                f" ({per_batch:.1f} s each); {figures['live_batches_left_on_older_versions']}"
                f" batches holding current answers left on an older version; re-scoring every"
                f" batch holding a current answer would re-run {every_live}"
                + (f" (about {every_live * per_batch:.0f} s at that rate)" if per_batch else ""),
                flush=True,
            )

        landed = land(batch_ids[:days])
        print(f"\n{days} daily batches of {rows} lines: every stage of each in {landed:.0f} s"
              f" ({landed / days:.1f} s a batch), {os.cpu_count()} cores, backend {backend}",
              flush=True)  # fmt: skip
        retrain("the catch-up retrain (the first model was the first day's)")
        week = land(batch_ids[days:])
        print(f"  a week: {WEEK} more batches in {week:.0f} s", flush=True)
        retrain("the weekly retrain")
        retrain("the same retrain again, nothing changed")


if __name__ == "__main__":
    main()
