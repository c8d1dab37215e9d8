"""One batch through every stage, each step in its own process (multiprocess executor), so each
step's peak RSS is its own. Prints a per-stage table. Figures only, never pass/fail.

    python benchmarks/pipeline_scale.py --rows 200000 [--bad-rate 0.01] [--workdir DIR]

The embedding model is the default local one; its time depends on the number of distinct
customer profiles (each embedded once), not on the number of customers.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import dagster as dg
import yaml

STAGES = [
    ("raw_customers", "raw_customers"),
    ("validated_customers", "customers"),
    ("customer_embeddings", "customer_embeddings"),
    ("customer_segments", "customer_segments"),
    ("recommendations", "recommendations"),
    ("validated_recommendations", "validated_recommendations"),
]


def build_job() -> dg.JobDefinition:
    """Module-level, so the multiprocess executor can rebuild it in each step process."""
    from pipeline_project.definitions import build_definitions

    defs = build_definitions()
    return dg.Definitions(
        assets=list(defs.assets),
        jobs=[defs.resolve_job_def("batch_pipeline_job")],
        resources=defs.resources,
        executor=dg.multiprocess_executor.configured({"max_concurrent": 1}),
    ).resolve_job_def("batch_pipeline_job")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--bad-rate", type=float, default=0.01)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="pipeline_scale_"))
    os.environ.update(
        PIPELINE_LANDING_DIR=str(root / "landing"),
        PIPELINE_DUCKDB_PATH=str(root / "warehouse.duckdb"),
        PIPELINE_ALERTS_DUCKDB_PATH=str(root / "alerts.duckdb"),
        PIPELINE_CATALOG_PATH=str(root / "catalog.csv"),
    )
    from pipeline_project.core.sample_data import generate_batch, write_catalog
    from pipeline_project.definitions import build_definitions
    from pipeline_project.instance import INSTANCE_TEMPLATE

    started = time.perf_counter()
    catalog = write_catalog(root / "catalog.csv")
    batch_file = root / "landing" / "scale.jsonl"
    if not batch_file.exists():
        generate_batch(batch_file, args.rows, args.bad_rate, 1, catalog)
    print(f"data: {args.rows:,} rows, {batch_file.stat().st_size / 1e6:,.0f} MB "
          f"({time.perf_counter() - started:.1f} s to generate)")  # fmt: skip

    home = root / "dagster_home"
    home.mkdir(exist_ok=True)
    overrides = yaml.safe_load(INSTANCE_TEMPLATE.read_text())
    with dg.instance_for_test(temp_dir=str(home), overrides=overrides) as instance:
        defs = build_definitions()
        assert defs.resolve_job_def("catalog_job").execute_in_process(instance=instance).success
        instance.add_dynamic_partitions("batches", ["scale"])
        started = time.perf_counter()
        with dg.execute_job(
            dg.reconstructable(build_job), instance=instance, tags={"dagster/partition": "scale"}
        ) as result:
            total = time.perf_counter() - started
            ok = result.success
        meta = {}
        for _, asset in STAGES:
            event = instance.get_latest_materialization_event(dg.AssetKey(asset))
            if event is not None:
                m = event.asset_materialization
                meta[asset] = {k: v.value for k, v in m.metadata.items()}

    print(f"\n{'stage':<28}{'seconds':>9}{'rows/s':>11}{'cpu s':>8}{'peak RSS MiB':>14}")
    for _, asset in STAGES:
        m = meta.get(asset, {})
        seconds = m.get("step_seconds", 0.0)
        rows_per_s = round(args.rows / seconds) if seconds else 0
        print(f"{asset:<28}{seconds:>9.1f}{rows_per_s:>11,}{m.get('cpu_seconds', 0.0):>8.1f}"
              f"{m.get('peak_rss_mib', 0.0):>14,.0f}")  # fmt: skip
    print(f"{'run (wall, with Dagster)':<28}{total:>9.1f}{round(args.rows / total):>11,}")
    emb = meta.get("customer_embeddings", {})
    print(f"\nsuccess={ok}  distinct profiles={emb.get('distinct_profiles')}  "
          f"model calls={emb.get('model_calls')}  workdir={root}")  # fmt: skip


if __name__ == "__main__":
    main()
