"""Batches in parallel: the file backend (one writer, batches serialized) against DuckLake with
1, 2 and 4 runs at once, on the same batch files. Figures only, never pass/fail.

    .venv-lake/bin/python benchmarks/scale_out.py [--batches 8] [--rows 250000] [--runs 1,2,4]
        [--replays 0]

Run it with the scale-out environment's Python (DuckDB 1.5.5 and the extension wheels, see
README "Scaling out"); the file backend runs with `--file-python` (default `.venv/bin/python`,
DuckDB 2.0.1), as each backend is deployed. Every batch is one run in its own worker process
(`pipeline_project_tests/lake_child.py`, as a run launcher would start it), the embedding
backend is `hashing` (the model's time out), and PostgreSQL 16 comes from the `pgserver` wheel
on 127.0.0.1 (catalog and Dagster's state). Prints per configuration the wall time, batches per
minute, the mean run, the largest run process's peak RSS, the ratio to the file backend, and a
projection for several worker machines from the measured per-batch cost. The file backend
and DuckLake one run at a time are measured alternately, batch by batch (file first on odd
batches, DuckLake first on even ones), so that a machine busier in one half of the run does not
decide the ratio; the per-batch ratio is printed for wall time and for CPU. `--replays R` then
re-runs every batch R times with the most runs at once (replays: deletes that conflict with
the other writers' inserts) and prints how many commits were retried and the most for one
step.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline_project.instance import INSTANCE_TEMPLATE  # noqa: E402
from pipeline_project.sample_data import generate_batch, write_catalog  # noqa: E402
from pipeline_project_tests.postgres_server import postgres_server  # noqa: E402


def worker(python: str, env: dict, mode: str, arg: str) -> dict:
    started, cpu = time.perf_counter(), _children_cpu()
    out = subprocess.run(
        [python, "-m", "pipeline_project_tests.lake_child", mode, arg],
        env={**os.environ, **env}, cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    if out.returncode != 0:
        raise SystemExit(f"{mode} {arg} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # the process's wall and CPU (meaningful one process at a time: children's CPU is summed)
    return {**result, "process_wall": time.perf_counter() - started,
            "process_cpu": _children_cpu() - cpu}  # fmt: skip


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def add_partitions(python: str, env: dict, batch_ids: list[str], writer_slots: int) -> None:
    script = (
        "import dagster as dg, sys\n"
        "with dg.DagsterInstance.get() as i:\n"
        f"    i.add_dynamic_partitions('batches', {batch_ids!r})\n"
        f"    i.event_log_storage.set_concurrency_slots('duckdb_writer', {writer_slots})\n"
        "    i.event_log_storage.set_concurrency_slots('model_inference', 1)\n"
    )
    subprocess.run([python, "-c", script], env={**os.environ, **env}, check=True, cwd=REPO)


def prepare(python: str, env: dict, batch_ids: list[str], runs: int) -> None:
    """The batches as partitions, the writer slots, and the catalog loaded."""
    Path(env["PIPELINE_TEST_ROOT"], "go").touch()
    add_partitions(python, env, batch_ids, writer_slots=runs)
    worker(python, env, "catalog", "-")


def summary(outcomes: list[dict], wall: float) -> dict:
    failed = [o["failures"] for o in outcomes if not o["success"]]
    if failed:
        raise SystemExit(f"runs failed: {failed}")
    return {
        "wall": wall,
        "mean_run": sum(o["end"] - o["start"] for o in outcomes) / len(outcomes),
        "cpu": sum(o["process_cpu"] for o in outcomes),
        "peak_rss_mib": max(o["peak_rss_mib"] for o in outcomes),
    }


def alternated(configs: dict[str, tuple[str, dict]], batch_ids: list[str]) -> dict:
    """Every batch one run at a time on each configuration in turn, the order reversed on every
    other batch; per configuration the sum of its runs' process wall times."""
    outcomes: dict[str, list[dict]] = {name: [] for name in configs}
    for n, batch_id in enumerate(batch_ids):
        order = list(configs) if n % 2 == 0 else list(reversed(configs))
        for name in order:
            python, env = configs[name]
            outcomes[name].append(worker(python, env, "pipeline", batch_id))
    return {
        name: summary(runs, sum(o["process_wall"] for o in runs)) for name, runs in outcomes.items()
    }


def run_config(python: str, env: dict, batch_ids: list[str], runs: int) -> dict:
    """Every batch as its own run, at most `runs` at once."""
    started = time.perf_counter()
    with ThreadPoolExecutor(runs) as pool:
        outcomes = list(pool.map(lambda b: worker(python, env, "pipeline", b), batch_ids))
    return summary(outcomes, time.perf_counter() - started)


def replays(python: str, env: dict, batch_ids: list[str], rounds: int, runs: int) -> dict:
    """Every batch re-run `rounds` times, `runs` at once: each re-run deletes its batch's rows
    and inserts them again, which conflicts with any other writer's insert into the same table;
    the conflicting commits are retried as whole transactions (commit_retries per step)."""
    outcomes = []
    started = time.perf_counter()
    with ThreadPoolExecutor(runs) as pool:
        jobs = [b for _ in range(rounds) for b in batch_ids]
        outcomes = list(pool.map(lambda b: worker(python, env, "pipeline", b), jobs))
    steps = [n for o in outcomes for n in o["commit_retries"].values()]
    return {
        "wall": time.perf_counter() - started,
        "runs": len(outcomes),
        "succeeded": sum(o["success"] for o in outcomes),
        "steps": len(steps),
        "steps_retried": sum(1 for n in steps if n),
        "commit_retries": sum(steps),
        "most_for_one_step": max(steps, default=0),
        "failures": [o["failures"] for o in outcomes if not o["success"]],
    }


def shared(root: Path, landing: Path, catalog: Path) -> dict:
    (root / "home").mkdir(parents=True)
    return {
        "PIPELINE_TEST_ROOT": str(root),
        "PIPELINE_LANDING_DIR": str(landing),
        "PIPELINE_CATALOG_PATH": str(catalog),
        "PIPELINE_ALERTS_DUCKDB_PATH": str(root / "alerts.duckdb"),
        "PIPELINE_EMBEDDING_BACKEND": "hashing",
        "DAGSTER_HOME": str(root / "home"),
    }


def lake_env(pg, root: Path, landing: Path, catalog_path: Path, runs: int) -> dict:
    env = shared(root, landing, catalog_path)
    # the deploy instance, its compute logs (on S3 there) kept in the Dagster home
    instance = yaml.safe_load((REPO / "deploy" / "dagster.yaml").read_text())
    del instance["compute_logs"]
    (Path(env["DAGSTER_HOME"]) / "dagster.yaml").write_text(yaml.safe_dump(instance))
    env.update(
        PIPELINE_WAREHOUSE_BACKEND="ducklake",
        PIPELINE_DUCKLAKE_CATALOG=pg.dsn(pg.create_database(f"lake_{runs}")),
        PIPELINE_DUCKLAKE_PASSWORD=pg.password,
        PIPELINE_DUCKLAKE_DATA_PATH=str(root / "lake"),
        PIPELINE_DAGSTER_PG_HOST=pg.host,
        PIPELINE_DAGSTER_PG_PORT=str(pg.port),
        PIPELINE_DAGSTER_PG_USER=pg.user,
        PIPELINE_DAGSTER_PG_PASSWORD=pg.password,
        PIPELINE_DAGSTER_PG_DB=pg.create_database(f"dagster_{runs}"),
    )
    return env


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--rows", type=int, default=250_000)
    parser.add_argument("--runs", default="1,2,4", help="DuckLake runs at once")
    parser.add_argument("--file-python", default=str(REPO / ".venv" / "bin" / "python"))
    parser.add_argument(
        "--replays", type=int, default=0,
        help="then re-run every batch this many times, as many at once as the most --runs",
    )  # fmt: skip
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="scale_out_"))
    landing, catalog_path = base / "landing", base / "catalog.csv"
    catalog = write_catalog(catalog_path, seed=1)
    batch_ids = [f"b{n:03d}" for n in range(1, args.batches + 1)]
    started = time.perf_counter()
    for n, batch_id in enumerate(batch_ids):
        generate_batch(landing / f"{batch_id}.jsonl", args.rows, 0.01, n + 1, catalog)
    print(f"generated {args.batches} batches of {args.rows:,} rows in "
          f"{time.perf_counter() - started:.1f} s under {base}")  # fmt: skip

    file_env = shared(base / "file", landing, catalog_path)
    shutil.copy(INSTANCE_TEMPLATE, Path(file_env["DAGSTER_HOME"]) / "dagster.yaml")
    file_env["PIPELINE_DUCKDB_PATH"] = str(base / "file" / "warehouse.duckdb")
    prepare(args.file_python, file_env, batch_ids, runs=1)
    counts = [int(r) for r in args.runs.split(",")]

    with postgres_server() as pg:
        envs = {runs: lake_env(pg, base / f"lake_{runs}", landing, catalog_path, runs)
                for runs in counts}  # fmt: skip
        for runs, env in envs.items():
            prepare(sys.executable, env, batch_ids, runs)
        configs = {"file backend, serialized": (args.file_python, file_env)}
        if 1 in envs:
            configs["DuckLake, 1 at once"] = (sys.executable, envs[1])
        results = alternated(configs, batch_ids)
        for name, r in results.items():
            print(f"{name}: {r}", flush=True)
        for runs in counts:
            if runs == 1:
                continue
            results[f"DuckLake, {runs} at once"] = run_config(
                sys.executable, envs[runs], batch_ids, runs
            )
            print(f"DuckLake {runs}: {results[f'DuckLake, {runs} at once']}", flush=True)
        if args.replays:
            most = max(counts)
            replayed = replays(sys.executable, envs[most], batch_ids, args.replays, most)
            print(f"\nreplays, {most} at once: {replayed}", flush=True)

    file_wall = results["file backend, serialized"]["wall"]
    print(f"\n{args.batches} batches of {args.rows:,} rows, {os.cpu_count()} cores")
    print(f"{'configuration':<28}{'wall s':>9}{'batches/min':>13}{'mean run s':>12}"
          f"{'peak RSS MiB':>14}{'vs file':>9}")  # fmt: skip
    for name, r in results.items():
        rate, ratio = args.batches / r["wall"] * 60, r["wall"] / file_wall
        print(f"{name:<28}{r['wall']:>9.1f}{rate:>13.2f}{r['mean_run']:>12.1f}"
              f"{r['peak_rss_mib']:>14,.0f}{ratio:>8.2f}x")  # fmt: skip
    one = results.get("DuckLake, 1 at once")
    if one:
        per_batch = one["wall"] / args.batches
        file_cpu = results["file backend, serialized"]["cpu"]
        print(f"\nDuckLake per batch, one run at a time, alternated with the file backend: "
              f"{per_batch:.1f} s wall, {one['cpu'] / args.batches:.1f} s CPU (file backend "
              f"{file_wall / args.batches:.1f} s, {file_cpu / args.batches:.1f} s CPU): "
              f"{one['wall'] / file_wall:.2f}x wall, {one['cpu'] / file_cpu:.2f}x CPU")  # fmt: skip
        print("projection, if the catalog keeps up (one run per core, the measured cost):")
        for machines in (1, 2, 4, 8):
            rate = machines * 2 * 60 / per_batch
            print(f"  {machines} worker machines of 2 cores: about {rate:.1f} batches/min")


if __name__ == "__main__":
    main()
