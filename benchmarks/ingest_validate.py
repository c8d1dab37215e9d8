"""Ingestion + validation throughput through Dagster, at a given size. Prints figures only.

python benchmarks/ingest_validate.py --rows 200000 [--bad-rate 0.01] [--chunk-rows 100000]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import dagster as dg

from pipeline_project.definitions import build_definitions
from pipeline_project.sample_data import generate_batch, write_catalog
from pipeline_project.settings import AlertSettings, LandingSettings, Settings, WarehouseSettings


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--bad-rate", type=float, default=0.01)
    parser.add_argument("--chunk-rows", type=int, default=100_000)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        landing = LandingSettings(root / "landing", catalog_path=root / "catalog.csv")
        settings = Settings(
            warehouse=WarehouseSettings(duckdb_path=root / "warehouse.duckdb", memory_limit="1GB"),
            landing=landing,
            alerts=AlertSettings(alerts_duckdb_path=root / "alerts.duckdb"),
        )
        started = time.perf_counter()
        catalog = write_catalog(landing.catalog_path)
        generate_batch(landing.landing_dir / "bench.jsonl", args.rows, args.bad_rate, 1, catalog)
        size_mb = (landing.landing_dir / "bench.jsonl").stat().st_size / 1e6
        seconds = time.perf_counter() - started
        print(f"generated {args.rows:,} rows ({size_mb:,.0f} MB) in {seconds:.1f} s")

        defs = build_definitions(settings)
        job = defs.resolve_job_def("batch_ingestion_job")
        config = {
            "ops": {
                name: {"config": {"chunk_rows": args.chunk_rows}}
                for name in ("raw_customers", "validated_customers")
            }
        }
        with dg.instance_for_test() as instance:
            instance.add_dynamic_partitions("batches", ["bench"])
            started = time.perf_counter()
            result = job.execute_in_process(
                partition_key="bench", instance=instance, run_config=config
            )
            total = time.perf_counter() - started
        meta = {}
        for event in result.get_asset_materialization_events():
            m = event.event_specific_data.materialization
            meta[m.asset_key.to_user_string()] = {k: v.value for k, v in m.metadata.items()}

    print(f"{'stage':<22}{'seconds':>10}{'rows/s':>12}")
    for asset in ("raw_customers", "customers"):
        print(f"{asset:<22}{meta[asset]['seconds']:>10.2f}{meta[asset]['rows_per_second']:>12,}")
    print(f"{'run (with Dagster)':<22}{total:>10.2f}{round(args.rows / total):>12,}")
    print(f"error rate {meta['customers']['error_rate']:.2%}, peak RSS {peak_rss_mib():,.0f} MiB")


if __name__ == "__main__":
    main()
