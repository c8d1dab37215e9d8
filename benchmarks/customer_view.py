"""The cost of knowing customers across batches: a second batch where half the customers come
back, against the first, and reading the customer views.

Two batches of N rows through every stage (each step in its own process, as the job runs them;
the model's time taken out with `--backend hashing`): b001 of new customers, then b002 where
`--returning` of the lines bring back a b001 customer (their whole history again and new
purchases, as a CRM's daily export). Prints each stage of both batches (seconds, peak RSS,
growth), then the time and peak RSS of reading current_customers, current_recommendations and
customer_purchase_history whole (each in a fresh process, written to Parquet). Figures only.

    python benchmarks/customer_view.py --rows 2000000 --backend hashing
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dagster as dg
import yaml

HERE = Path(__file__).parent
STAGES = [
    "raw_customers",
    "customers",
    "customer_embeddings",
    "customer_segments",
    "recommendations",
    "validated_recommendations",
]
VIEWS = ["current_customers", "current_recommendations", "customer_purchase_history"]


def build_job() -> dg.JobDefinition:
    from pipeline_project.definitions import build_definitions

    return build_definitions().resolve_job_def("batch_pipeline_job")


def environment(root: Path) -> None:
    os.environ.update(
        PIPELINE_LANDING_DIR=str(root / "landing"),
        PIPELINE_DUCKDB_PATH=str(root / "warehouse.duckdb"),
        PIPELINE_ALERTS_DUCKDB_PATH=str(root / "alerts.duckdb"),
        PIPELINE_CATALOG_PATH=str(root / "catalog.csv"),
    )


def run_batches(rows: int, returning: float, root: Path) -> dict:
    """Generate both batches, run them one after the other; per-stage figures of each."""
    environment(root)
    from pipeline_project.definitions import build_definitions
    from pipeline_project.instance import INSTANCE_TEMPLATE
    from pipeline_project.sample_data import BatchSpec, generate_batch, write_catalog

    catalog = write_catalog(root / "catalog.csv")
    first = BatchSpec(rows, 0.01, 1)
    started = time.perf_counter()
    files = [root / "landing" / f"b00{n}.jsonl" for n in (1, 2)]
    if all(f.exists() for f in files):  # the same arguments give the same files: reused
        print(f"reusing {files[0].parent}", flush=True)
    else:
        generate_batch(files[0], rows, 0.01, 1, catalog)
        kinds = generate_batch(
            files[1], rows, 0.01, 2, catalog, returning=returning, previous=first
        )
        print(f"generated 2 x {rows:,} rows ({kinds['returning']:,} returning customers in"
              f" b002) in {time.perf_counter() - started:.0f} s", flush=True)  # fmt: skip
    home = root / "dagster_home"
    home.mkdir(exist_ok=True)
    overrides = yaml.safe_load(INSTANCE_TEMPLATE.read_text())
    figures: dict = {}
    with dg.instance_for_test(temp_dir=str(home), overrides=overrides) as instance:
        defs = build_definitions()
        assert defs.resolve_job_def("catalog_job").execute_in_process(instance=instance).success
        instance.add_dynamic_partitions("batches", ["b001", "b002"])
        for batch_id in ("b001", "b002"):
            started = time.perf_counter()
            with dg.execute_job(
                dg.reconstructable(build_job), instance=instance,
                tags={"dagster/partition": batch_id},
            ) as result:  # fmt: skip
                success = result.success
                failed = [e.step_key for e in result.get_step_failure_events()]
            wall = time.perf_counter() - started
            stages = {}
            for asset in STAGES:
                records = instance.fetch_materializations(
                    dg.AssetRecordsFilter(
                        asset_key=dg.AssetKey(asset), asset_partitions=[batch_id]
                    ),
                    limit=1,
                ).records
                if records:
                    m = records[0].asset_materialization.metadata
                    stages[asset] = {
                        k: m[k].value
                        for k in ("step_seconds", "peak_rss_mib", "rss_growth_mib",
                                  "prior_purchases", "returning_customers",
                                  "dagster/partition_row_count")
                        if k in m
                    }  # fmt: skip
            figures[batch_id] = {"success": success, "failed": failed, "wall": wall,
                                 "stages": stages}  # fmt: skip
    return figures


def read_view(root: Path, view: str) -> dict:
    """Read a view whole, as a consumer would (to a Parquet file); time and peak RSS."""
    environment(root)
    from pipeline_project.definitions import build_resources
    from pipeline_project.settings import Settings

    warehouse = build_resources(Settings.from_env())["warehouse"]
    started = time.perf_counter()
    with warehouse.get_connection() as conn:
        conn.execute(f"COPY (SELECT * FROM {view}) TO '{root / view}.parquet' (FORMAT parquet)")
        [(rows,)] = conn.execute(f"SELECT count(*) FROM '{root / view}.parquet'").fetchall()
    return {
        "seconds": round(time.perf_counter() - started, 2),
        "rows": rows,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def in_own_process(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-W", "ignore", __file__, *args], stdout=subprocess.PIPE, text=True
    )
    lines = out.stdout.strip().splitlines()
    if lines[:-1]:
        print("\n".join(lines[:-1]), flush=True)
    if out.returncode != 0 or not lines:
        return {"failed": f"exit code {out.returncode}"}
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--returning", type=float, default=0.5)
    parser.add_argument("--backend", default=os.environ.get("PIPELINE_EMBEDDING_BACKEND", "local"))
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ["PIPELINE_EMBEDDING_BACKEND"] = args.backend
    if args.child:  # a step of this benchmark in its own process
        what, root = args.child[0], Path(args.child[1])
        if what == "batches":
            result = run_batches(args.rows, args.returning, root)
        else:
            result = read_view(root, what)
        print(json.dumps(result, default=str))
        return
    root = args.workdir or Path(tempfile.mkdtemp(prefix="customer_view_"))
    root.mkdir(parents=True, exist_ok=True)
    for old in ("warehouse.duckdb", "warehouse.duckdb.files", "dagster_home"):  # a run before
        path = root / old
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    run = in_own_process("--rows", str(args.rows), "--returning", str(args.returning),
                         "--child", "batches", str(root))  # fmt: skip
    print(f"\n== 2 x {args.rows:,} rows, {args.returning:.0%} of b002 returning,"
          f" backend {args.backend} ==")  # fmt: skip
    if "failed" in run:
        print(f"the run failed: {run['failed']}")
        return
    print(f"{'stage':<28}{'b001 s':>9}{'b002 s':>9}{'b001 peak':>11}{'b002 peak':>11}"
          f"{'b002 growth':>13}")  # fmt: skip
    for stage in STAGES:
        a, b = run["b001"]["stages"].get(stage, {}), run["b002"]["stages"].get(stage, {})
        print(f"{stage:<28}{a.get('step_seconds', 0):>9.1f}{b.get('step_seconds', 0):>9.1f}"
              f"{a.get('peak_rss_mib', 0):>11,.0f}{b.get('peak_rss_mib', 0):>11,.0f}"
              f"{b.get('rss_growth_mib', 0):>13,.0f}")  # fmt: skip
    for batch_id in ("b001", "b002"):
        r = run[batch_id]
        inference = r["stages"].get("customer_embeddings", {})
        print(f"{batch_id}: success={r['success']} failed steps={r['failed']}"
              f" run wall {r['wall']:.1f} s, returning customers"
              f" {inference.get('returning_customers')}, prior purchases"
              f" {inference.get('prior_purchases')}")  # fmt: skip
    print(f"\n{'view (read whole)':<28}{'rows':>14}{'seconds':>9}{'peak RSS MiB':>14}")
    for view in VIEWS:
        v = in_own_process("--child", view, str(root))
        if "failed" in v:
            print(f"{view:<28} failed: {v['failed']}")
            continue
        print(f"{view:<28}{v['rows']:>14,}{v['seconds']:>9.1f}{v['peak_rss_mib']:>14,}")


if __name__ == "__main__":
    main()
