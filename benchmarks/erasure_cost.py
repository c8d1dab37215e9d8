"""What erasing a customer costs on a warehouse of N rows, and what an erasure log costs ingestion.

    python benchmarks/erasure_cost.py [--rows 1000000] [--batches 2] [--backend hashing]

Runs every stage of each batch (the file backend, in-process), then erases one customer of the
first batch through the `erase_customers` job (as `pipeline-project erase` does: the SHA-256 of
the ID), and ingests the first batch again, now with one erased ID to look for. Prints the
erasure's wall time and what it did (rows, raw lines, the DuckDB file's bytes before and after
its rewrite), and ingestion's time without and with the erasure log, measured in this one run.
Figures only, never pass/fail.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import dagster as dg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.project_instance import project_instance  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--backend", default="hashing")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="erasure_cost_"))
    os.environ.update(
        PIPELINE_LANDING_DIR=str(root / "landing"),
        PIPELINE_DUCKDB_PATH=str(root / "warehouse.duckdb"),
        PIPELINE_ALERTS_DUCKDB_PATH=str(root / "alerts.duckdb"),
        PIPELINE_CATALOG_PATH=str(root / "catalog.csv"),
        PIPELINE_EMBEDDING_BACKEND=args.backend,
    )
    from pipeline_project.core.erasure import customer_hash
    from pipeline_project.definitions import build_definitions
    from pipeline_project.resources import Warehouse
    from pipeline_project.sample_data import generate_batch, write_catalog
    from pipeline_project.settings import Settings

    catalog = write_catalog(root / "catalog.csv")
    batch_ids = [f"b{n:03d}" for n in range(1, args.batches + 1)]
    for n, batch_id in enumerate(batch_ids):
        generate_batch(root / "landing" / f"{batch_id}.jsonl", args.rows, 0.01, n + 1, catalog)
    warehouse = Warehouse.from_settings(Settings.from_env().warehouse)
    with project_instance(root) as instance:
        defs = build_definitions()
        assert defs.resolve_job_def("catalog_job").execute_in_process(instance=instance).success
        instance.add_dynamic_partitions("batches", batch_ids)
        pipeline = defs.resolve_job_def("batch_pipeline_job")
        for batch_id in batch_ids:
            started = time.perf_counter()
            assert pipeline.execute_in_process(instance=instance, partition_key=batch_id).success
            print(f"{batch_id}: every stage in {time.perf_counter() - started:.1f} s", flush=True)
        ingest_before = _ingest_seconds(defs, instance, batch_ids[0])

        with warehouse.get_connection() as conn:
            [(target,)] = conn.execute(
                "SELECT customer_id::VARCHAR FROM customers WHERE batch_id = ? LIMIT 1",
                [batch_ids[0]],
            ).fetchall()
            [(total,)] = conn.execute("SELECT count(*) FROM raw_customers").fetchall()
        started = time.perf_counter()
        result = defs.resolve_job_def("erase_customers").execute_in_process(
            instance=instance,
            run_config={
                "ops": {"erase_customer_rows": {"config": {"customers": [customer_hash(target)]}}}
            },  # fmt: skip
        )
        erase_wall = time.perf_counter() - started
        assert result.success
        [output] = [e for e in result.all_node_events if e.is_successful_output]
        figures = {k: v.value for k, v in output.step_output_data.metadata.items()}
        ingest_after = _ingest_seconds(defs, instance, batch_ids[0])

    print(f"\n{args.batches} batches of {args.rows:,} rows ({total:,} raw lines), {os.cpu_count()}"
          f" cores, backend {args.backend}")  # fmt: skip
    storage = figures["storage"]
    print(f"erase one customer: {erase_wall:.1f} s; {figures['raw_lines']} raw lines in"
          f" {len(figures['batches'])} batches, {figures['rows_removed']} rows removed; the DuckDB"
          f" file {storage['bytes_before'] / 1e6:,.0f} MB before its rewrite,"
          f" {storage['bytes_after'] / 1e6:,.0f} MB after")  # fmt: skip
    print(
        f"ingest {batch_ids[0]} again: {ingest_before:.1f} s with an empty erasure log,"
        f" {ingest_after:.1f} s with one erased ID ({ingest_after / ingest_before:.2f}x)"
    )


def _ingest_seconds(defs: dg.Definitions, instance: dg.DagsterInstance, batch_id: str) -> float:
    """raw_customers of the batch alone, as its step reports it."""
    result = defs.resolve_job_def("batch_pipeline_job").execute_in_process(
        instance=instance, partition_key=batch_id, asset_selection=[dg.AssetKey("raw_customers")]
    )
    assert result.success
    [materialization] = result.asset_materializations_for_node("raw_customers")
    return materialization.metadata["seconds"].value


if __name__ == "__main__":
    main()
