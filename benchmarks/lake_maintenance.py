"""Storage after re-runs of one batch on DuckLake, before and after the maintenance job.
Figures only, never pass/fail.

    .venv-lake/bin/python benchmarks/lake_maintenance.py [--reruns 100] [--rows 2000]

A fresh lakehouse (catalog in PostgreSQL from the `pgserver` wheel on 127.0.0.1, data in a
temporary folder), the catalog and one batch through `batch_pipeline_job` in process (hashing
embedder), then the same batch re-run `--reruns` times, then `warehouse_maintenance_job` with
nothing kept (snapshots and grace 0 h: every file no current snapshot references goes).
Prints the files and bytes under the lake's data folder after one run, after the re-runs and
after the maintenance, their ratios to one run's, and what the maintenance did.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import dagster as dg  # noqa: E402

from pipeline_project.definitions import build_definitions  # noqa: E402
from pipeline_project.resources.embeddings import HashingEmbedder  # noqa: E402
from pipeline_project.sample_data import generate_batch, write_catalog  # noqa: E402
from pipeline_project.settings import (  # noqa: E402
    AlertSettings,
    LandingSettings,
    Settings,
    WarehouseSettings,
)
from pipeline_project_tests.postgres_server import postgres_server  # noqa: E402

QUIET = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}


def measure(reruns: int, rows: int, root: Path, log=print) -> dict:
    with postgres_server() as server:
        os.environ["PIPELINE_DUCKLAKE_PASSWORD"] = server.password
        settings = Settings(
            warehouse=WarehouseSettings(
                backend="ducklake",
                duckdb_path=root / "unused.duckdb",
                ducklake_catalog=server.dsn(server.create_database("lake")),
                ducklake_data_path=root / "lake",
            ),
            landing=LandingSettings(root / "landing", catalog_path=root / "catalog.csv"),
            alerts=AlertSettings(alerts_duckdb_path=root / "alerts.duckdb"),
        )
        catalog = write_catalog(settings.catalog_path, seed=3)
        generate_batch(settings.landing_dir / "b001.jsonl", rows, 0.05, 7, catalog)
        defs = build_definitions(settings, embedder=HashingEmbedder(dimensions=32))
        warehouse = defs.resources["warehouse"].model_copy(
            update={"ducklake_password": server.password}
        )
        job = defs.resolve_job_def("batch_pipeline_job")
        figures: dict = {"reruns": reruns, "rows": rows}
        with dg.DagsterInstance.ephemeral() as instance:
            catalog_job = defs.resolve_job_def("catalog_job")
            assert catalog_job.execute_in_process(instance=instance, run_config=QUIET).success
            instance.add_dynamic_partitions("batches", ["b001"])
            started = time.perf_counter()
            for n in range(reruns + 1):
                result = job.execute_in_process(
                    partition_key="b001", instance=instance, run_config=QUIET
                )
                assert result.success
                if n == 0:
                    figures["one_run"] = warehouse.storage()
                elif n % 10 == 0:
                    seconds = time.perf_counter() - started
                    log(f"{n} re-runs: {warehouse.storage()} ({seconds:.0f} s)")
            figures["after_reruns"] = warehouse.storage()
            started = time.perf_counter()
            config = {"keep_snapshots_hours": 0, "grace_hours": 0}
            maintained = defs.resolve_job_def("warehouse_maintenance_job").execute_in_process(
                instance=instance,
                run_config={**QUIET, "ops": {"maintain_warehouse": {"config": config}}},
            )
            figures["maintenance_seconds"] = round(time.perf_counter() - started, 1)
            assert maintained.success
            [output] = [e for e in maintained.all_events if e.event_type_value == "STEP_OUTPUT"]
            figures["maintenance"] = {
                k: v.value for k, v in output.event_specific_data.metadata.items()
            }
            figures["after_maintenance"] = warehouse.storage()
    one = figures["one_run"]
    for key in ("after_reruns", "after_maintenance"):
        files, size = figures[key]
        figures[f"{key}_ratio"] = [round(files / one[0], 2), round(size / one[1], 2)]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reruns", type=int, default=100)
    parser.add_argument("--rows", type=int, default=2000)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("dagster").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="lake_maintenance_") as tmp:
        figures = measure(args.reruns, args.rows, Path(tmp))
    print(json.dumps(figures, indent=1))
    print(
        f"one run: {figures['one_run'][0]} files, {figures['one_run'][1]:,} bytes;"
        f" after {args.reruns} re-runs: x{figures['after_reruns_ratio'][0]} files,"
        f" x{figures['after_reruns_ratio'][1]} bytes; after the maintenance"
        f" ({figures['maintenance_seconds']} s): x{figures['after_maintenance_ratio'][0]}"
        f" files, x{figures['after_maintenance_ratio'][1]} bytes"
    )


if __name__ == "__main__":
    main()
