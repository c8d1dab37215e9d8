"""One batch through every stage of the pipeline, and the same data through the baselines.

Each size runs in its own process, each step in its own process, as the job's own executor
(Dagster's multiprocess one) runs them, so each step's peak RSS is its own.
Prints a per-stage table (wall time, rows/s, peak RSS) and the totals.
Figures only, never pass/fail.

    python benchmarks/pipeline_scale.py --rows 2000000 [--backend hashing] [--baselines]
    python benchmarks/pipeline_scale.py --rows 200000,1000000,2000000 --backend hashing

--backend: the embedding backend (PIPELINE_EMBEDDING_BACKEND). `hashing` takes the model's
time out (scikit-learn's HashingVectorizer, no neural model); `local` is the default model.
--baselines: also run benchmarks/duckdb_script.py and benchmarks/notebook_way.py on the same
file, with the pipeline's own vectors, and print the ratios (measured in this one run).
Several sizes print the peak-RSS curve of every step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dagster as dg
import duckdb
import yaml

HERE = Path(__file__).parent
STAGES = [
    ("raw_customers", "raw_customers"),
    ("validated_customers", "customers"),
    ("customer_embeddings", "customer_embeddings"),
    ("customer_segments", "customer_segments"),
    ("recommendations", "recommendations"),
    ("validated_recommendations", "validated_recommendations"),
]


def build_job() -> dg.JobDefinition:
    """Module-level, so that each step process can rebuild it: the job as deployed, with its
    own executor."""
    from pipeline_project.definitions import build_definitions

    return build_definitions().resolve_job_def("batch_pipeline_job")


def run_pipeline(rows: int, bad_rate: float, root: Path) -> dict:
    """Generate (or reuse) the batch file, run the pipeline job; per-stage figures."""
    os.environ.update(
        PIPELINE_LANDING_DIR=str(root / "landing"),
        PIPELINE_DUCKDB_PATH=str(root / "warehouse.duckdb"),
        PIPELINE_ALERTS_DUCKDB_PATH=str(root / "alerts.duckdb"),
        PIPELINE_CATALOG_PATH=str(root / "catalog.csv"),
    )
    from pipeline_project.definitions import build_definitions
    from pipeline_project.instance import INSTANCE_TEMPLATE
    from pipeline_project.sample_data import generate_batch, write_catalog

    catalog = write_catalog(root / "catalog.csv")
    batch_file = root / "landing" / "scale.jsonl"
    if not batch_file.exists():
        started = time.perf_counter()
        generate_batch(batch_file, rows, bad_rate, 1, catalog)
        print(f"generated {rows:,} rows, {batch_file.stat().st_size / 1e6:,.0f} MB "
              f"in {time.perf_counter() - started:.1f} s")  # fmt: skip
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
            wall = time.perf_counter() - started
            success = result.success
            # a failed step by its error's first line: the table says which stage and why
            failed = {
                e.step_key: e.step_failure_data.error.message.strip().splitlines()[0][:300]
                for e in result.all_events
                if e.event_type_value == "STEP_FAILURE" and e.step_failure_data.error
            }
        meta = {}
        for _, asset in STAGES:
            event = instance.get_latest_materialization_event(dg.AssetKey(asset))
            if event is not None:
                m = event.asset_materialization
                meta[asset] = {
                    k: v.value
                    for k, v in m.metadata.items()
                    if isinstance(v.value, int | float | str | bool)  # plain figures only
                }
    return {"rows": rows, "wall": wall, "success": success, "meta": meta, "file": batch_file,
            "failed": failed}  # fmt: skip


RESULT_MARK = "pipeline_scale result: "


def run_in_own_process(rows: int, bad_rate: float, root: Path) -> dict:
    """run_pipeline in a fresh process: a job is reconstructed once per process, so each size
    needs its own for its own settings."""
    out = subprocess.run(
        [sys.executable, "-W", "ignore", __file__, "--one-size", str(rows), "--bad-rate",
         str(bad_rate), "--workdir", str(root)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines = out.stdout.strip().splitlines()
    # the result is the line with its mark: a step's output (progress bars, logs) may come
    # after it or instead of it (the child died)
    results = [line for line in lines if line.startswith(RESULT_MARK)]
    print("\n".join(line for line in lines if not line.startswith(RESULT_MARK)))
    if not results:
        raise SystemExit(f"the {rows:,}-row run printed no result (exit code {out.returncode})")
    run = json.loads(results[-1].removeprefix(RESULT_MARK))
    return {**run, "file": Path(run["file"])}


def print_stages(run: dict) -> None:
    rows = run["rows"]
    print(f"\n{'stage':<28}{'seconds':>9}{'rows/s':>12}{'cpu s':>8}{'peak RSS MiB':>14}")
    total = 0.0
    for step, asset in STAGES:
        if step in run.get("failed", {}):
            print(f"{asset:<28}  FAILED: {run['failed'][step]}")
            continue
        if asset not in run["meta"]:
            print(f"{asset:<28}  not run")
            continue
        m = run["meta"].get(asset, {})
        seconds = m.get("step_seconds", 0.0)
        total += seconds
        print(f"{asset:<28}{seconds:>9.1f}{round(rows / seconds) if seconds else 0:>12,}"
              f"{m.get('cpu_seconds', 0.0):>8.1f}{m.get('peak_rss_mib', 0.0):>14,.0f}")  # fmt: skip
    ingest = sum(
        run["meta"].get(a, {}).get("step_seconds", 0.0) for a in ("raw_customers", "customers")
    )
    print(f"{'sum of stages':<28}{total:>9.1f}{round(rows / total) if total else 0:>12,}")
    print(f"{'run wall (with Dagster)':<28}{run['wall']:>9.1f}{round(rows / run['wall']):>12,}")
    print(
        f"ingestion + validation: {ingest:.1f} s, {round(rows / ingest) if ingest else 0:,} rows/s"
    )
    emb = run["meta"].get("customer_embeddings", {})
    print(f"success={run['success']}  distinct profiles={emb.get('distinct_profiles')}  "
          f"model calls={emb.get('model_calls')}  model={emb.get('model')}")  # fmt: skip


# The pipeline's stages against the DuckDB script's (benchmarks/duckdb_script.py) stages.
SCRIPT_STAGES = [
    ("ingest + validate", ("raw_customers", "customers"), "ingest_validate"),
    ("profiles and vectors", ("customer_embeddings",), "profiles_vectors"),
    ("segments", ("customer_segments",), "segments"),
    ("recommendations", ("recommendations",), "recommendations"),
    ("business rules", ("validated_recommendations",), "business_rules"),
]


def print_ratios(run: dict, script: dict, floor: dict) -> None:
    """Per-stage ratios against the DuckDB script (when it finished), ingest + validate against
    the floor, and Dagster's share of the run (its wall minus the stages' own time), all from
    this run."""
    stages_total = sum(run["meta"].get(asset, {}).get("step_seconds", 0.0) for _, asset in STAGES)
    if "failed" not in script:
        print(f"\n{'stage':<24}{'pipeline s':>12}{'script s':>10}{'ratio':>8}")
        for name, assets, key in SCRIPT_STAGES:
            mine = sum(run["meta"].get(a, {}).get("step_seconds", 0.0) for a in assets)
            theirs = script["seconds"].get(key, 0.0)
            ratio = mine / theirs if theirs else float("inf")
            print(f"{name:<24}{mine:>12.1f}{theirs:>10.2f}{ratio:>7.1f}x")
    ingest = sum(run["meta"].get(a, {}).get("step_seconds", 0.0) for a in SCRIPT_STAGES[0][1])
    if "failed" not in floor and (least := floor.get("ingest_validate")):
        print(f"ingest + validate against the floor script: {ingest:.1f} s /"
              f" {least:.2f} s = {ingest / least:.1f}x")  # fmt: skip
    wall = run["wall"]
    print(f"Dagster's share of the run: {wall - stages_total:.1f} s of {wall:.1f} s"
          f" = {(wall - stages_total) / wall:.0%}")  # fmt: skip


def export_vectors(root: Path) -> tuple[Path, Path]:
    """The pipeline's profile and product vectors, as the baselines' input."""
    vectors, products = root / "vectors.parquet", root / "product_vectors.parquet"
    with duckdb.connect(str(root / "warehouse.duckdb"), read_only=True) as conn:
        conn.execute(
            "COPY (SELECT text_hash, text, embedding FROM embedding_cache) TO"
            f" '{vectors}' (FORMAT parquet)"
        )
        conn.execute(
            "COPY (SELECT p.product_id, c.embedding FROM product_embeddings AS p"
            " JOIN embedding_cache AS c USING (model, dimensions, text_hash)) TO"
            f" '{products}' (FORMAT parquet)"
        )
    return vectors, products


def run_baseline(script: str, *args: Path) -> dict:
    """The script's figures, or why it did not finish (the notebook way runs out of memory)."""
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, str(HERE / script), *map(str, args)], capture_output=True, text=True
    )
    if out.returncode != 0:
        how = "killed (SIGKILL: out of memory)" if out.returncode == -9 else out.stderr[-500:]
        return {"failed": how, "after_seconds": round(time.perf_counter() - started, 1)}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="200000", help="a size, or sizes separated by commas")
    parser.add_argument("--bad-rate", type=float, default=0.01)
    parser.add_argument("--backend", default=os.environ.get("PIPELINE_EMBEDDING_BACKEND", "local"))
    parser.add_argument("--baselines", action="store_true")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument(
        "--notebook-max-rows", type=int, default=2_000_000,
        help="the notebook way is not run above this (it cannot finish 2M rows here)",
    )  # fmt: skip
    parser.add_argument("--one-size", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ["PIPELINE_EMBEDDING_BACKEND"] = args.backend
    if args.one_size is not None:  # the child of run_in_own_process
        run = run_pipeline(args.one_size, args.bad_rate, args.workdir)
        print(RESULT_MARK + json.dumps({**run, "file": str(run["file"])}, default=str))
        return
    base = args.workdir or Path(tempfile.mkdtemp(prefix="pipeline_scale_"))
    runs = []
    for rows in [int(r) for r in args.rows.split(",")]:
        root = base / f"rows_{rows}"
        root.mkdir(parents=True, exist_ok=True)
        (root / "warehouse.duckdb").unlink(missing_ok=True)
        run = run_in_own_process(rows, args.bad_rate, root)
        print(f"\n== {rows:,} rows, backend {args.backend} ==")
        print_stages(run)
        runs.append(run)
        if args.baselines:
            vectors, products = export_vectors(root)
            work = root / "baseline"
            script = run_baseline("duckdb_script.py", run["file"], root / "catalog.csv",
                                  vectors, products, work)  # fmt: skip
            floor = run_baseline("floor_script.py", run["file"], work / "floor")
            notebook = (
                run_baseline(
                    "notebook_way.py", run["file"], root / "catalog.csv", vectors, products
                )  # fmt: skip
                if rows <= args.notebook_max_rows
                else {
                    "failed": f"not run above --notebook-max-rows {args.notebook_max_rows:,}",
                    "after_seconds": 0.0,
                }  # fmt: skip
            )
            print(f"\nhand-written DuckDB script: {json.dumps(script)}")
            print(f"floor script:               {json.dumps(floor)}")
            print(f"notebook way:               {json.dumps(notebook)}")
            print_ratios(run, script, floor)
            wall = run["wall"]
            for name, figures in (("DuckDB script", script), ("notebook way", notebook)):
                if "failed" in figures:
                    after = figures["after_seconds"]
                    print(f"{name}: did not finish, {figures['failed']} after {after} s;"
                          f" pipeline run wall {wall:.1f} s")  # fmt: skip
                else:
                    total = figures["total_seconds"]
                    print(f"{name}: {total:.1f} s; pipeline run wall {wall:.1f} s = "
                          f"{wall / total:.2f}x its time ({total / wall:.1f}x faster)")  # fmt: skip
    if len(runs) > 1:
        print(f"\npeak RSS MiB per step\n{'stage':<28}"
              + "".join(f"{r['rows']:>12,}" for r in runs) + f"{'max/min':>10}")  # fmt: skip
        for _, asset in STAGES:
            peaks = [r["meta"].get(asset, {}).get("peak_rss_mib", 0.0) for r in runs]
            spread = max(peaks) / min(peaks) if min(peaks) else 0.0
            print(f"{asset:<28}" + "".join(f"{p:>12,.0f}" for p in peaks) + f"{spread:>10.2f}")


if __name__ == "__main__":
    main()
