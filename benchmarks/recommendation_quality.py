"""Recommendation quality on real purchase data: the published recommendations against three
baselines on the same split, in one run. Figures only, never pass/fail (the suite's small
version: pipeline_project_tests/test_real_data.py).

    python benchmarks/recommendation_quality.py [--households N] [--batches 4]
        [--backend local|hashing] [--zero-amounts keep|drop] [--catalog-products N]
        [--catalog-reload N] [--json]

The data: "The Complete Journey" (the optional extra `real-data`), converted by
benchmarks/real_data.py into landing files with each household's last basket held out (see
there). The pipeline: the production job (`batch_pipeline_job`, in process) on every batch in
order, after catalog_job, in a fresh warehouse and Dagster instance in a temporary folder; what
it publishes is read from `current_recommendations`. The baselines (most popular products,
item-item cosine, user-user cosine with 50 neighbours) recommend the top 5 in stock and never
bought by the customer. A customer is hit when a product of their held-out basket they never
bought before is among their (at most 5) recommendations.

A larger catalog: `--catalog-products 100000` pads the real catalog (92,348 products) with
variants of its products (a real product's name and category, "multipack xK": a text of its
own, never bought) up to that many; `--catalog-reload N` then adds N more variants and loads
the catalog again after the batches, which embeds only the texts not in the cache. The catalog
job's time and texts embedded are printed, and the process's peak RSS bounds every step's.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import dagster as dg  # noqa: E402
import numpy as np  # noqa: E402
import real_data  # noqa: E402

from pipeline_project.contract import AMOUNT_POSITIVE  # noqa: E402
from pipeline_project.definitions import build_definitions  # noqa: E402
from pipeline_project.instance import write_instance_yaml  # noqa: E402
from pipeline_project.resources.embeddings import HashingEmbedder, LocalE5Embedder  # noqa: E402
from pipeline_project.settings import (  # noqa: E402
    AlertSettings,
    LandingSettings,
    Settings,
    WarehouseSettings,
)


def pad_catalog(path: Path, products: int = 0, more: int = 0, seed: int = 0) -> int:
    """Append variants of the catalog's products ("<name> multipack xK", the same category,
    in stock, never bought) until it holds `products`, or `more` of them; returns how many were
    added."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))[1:]
    products = max(products, len(rows) + more)
    rng = np.random.default_rng(seed + len(rows))
    have = {row[0] for row in rows}
    added = []
    for n, at in enumerate(rng.integers(len(rows), size=max(0, products - len(rows)))):
        _, name, category, price, _ = rows[at]
        k = 2 + n % 11
        pid = f"V{len(rows) + n:07d}"
        assert pid not in have
        added.append([pid, f"{name} multipack x{k} #{len(rows) + n}", category,
                      f"{float(price) * k * 0.9:.2f}", "true"])  # fmt: skip
    with open(path, "a", newline="") as f:
        csv.writer(f).writerows(added)
    return len(added)


def _catalog_run(defs, instance, run_config, outcome: dict, key: str, log) -> None:
    started = time.perf_counter()
    result = defs.resolve_job_def("catalog_job").execute_in_process(
        instance=instance, run_config=run_config, raise_on_error=False
    )
    embedded = [
        m.metadata["texts_embedded"].value
        for m in result.asset_materializations_for_node("product_embeddings")
    ]
    outcome[key] = {
        "success": result.success,
        "seconds": round(time.perf_counter() - started, 1),
        "texts_embedded": embedded[0] if embedded else None,
    }
    log(f"{key}: {outcome[key]}")


def run_pipeline(
    root: Path, backend: str, log=print, scoring: dict | None = None, retrain: bool = True,
    measured=None, catalog_reload: int = 0,
) -> dict:  # fmt: skip
    """catalog_job, then batch_pipeline_job for each landed batch in name order; then (with
    `retrain`) the weekly retrain (segment_model_job) and every batch re-scored with the new
    model, as rescore_sensor does. `measured(label)` is called after each phase. With
    `catalog_reload`, that many products are added and the catalog loaded again at the end.
    Returns the failed checks per batch and the runs' outcome."""
    settings = Settings(
        warehouse=WarehouseSettings(duckdb_path=root / "warehouse.duckdb"),
        landing=LandingSettings(root / "landing", catalog_path=root / "catalog.csv"),
        alerts=AlertSettings(alerts_duckdb_path=root / "alerts.duckdb"),
    )
    embedder = HashingEmbedder() if backend == "hashing" else LocalE5Embedder()
    defs = build_definitions(settings, embedder=embedder)
    home = root / "dagster_home"
    home.mkdir()
    write_instance_yaml(home)
    quiet = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}
    # a real feed's free items (sales value 0) are dropped from the history, not the customer
    drop = {"drop_purchases_breaking": [f"amount: {AMOUNT_POSITIVE}"]}
    batch_config = {
        **quiet,
        "ops": {"recommendations": {"config": scoring or {}},
                "validated_customers": {"config": drop}},
    }  # fmt: skip
    outcome: dict = {"batches": {}}
    with dg.DagsterInstance.from_config(str(home)) as instance:
        _catalog_run(defs, instance, quiet, outcome, "catalog_job", log)
        job = defs.resolve_job_def("batch_pipeline_job")
        paths = sorted(settings.landing.landing_dir.glob("*.jsonl"))
        instance.add_dynamic_partitions("batches", [path.stem for path in paths])
        phases = [("after each batch", paths)]
        if retrain:
            phases.append(("after the weekly retrain", paths))
        for phase, (label, batch_paths) in enumerate(phases):
            if phase == 1:
                retrained = defs.resolve_job_def("segment_model_job").execute_in_process(
                    instance=instance, run_config=quiet, raise_on_error=False
                )
                log(f"segment_model_job (the weekly retrain): success={retrained.success}")
            _run_batches(job, instance, batch_config, batch_paths, outcome, label, log)
            if measured is not None:
                measured(label)
        if catalog_reload:
            pad_catalog(settings.landing.catalog_path, more=catalog_reload)
            _catalog_run(defs, instance, quiet, outcome, "catalog_job (reloaded)", log)
    return outcome


def _run_batches(job, instance, batch_config, paths, outcome, label, log) -> None:
    for path in paths:
        batch_id = path.stem
        started = time.perf_counter()
        result = job.execute_in_process(
            partition_key=batch_id, instance=instance, run_config=batch_config,
            raise_on_error=False,
        )  # fmt: skip
        evaluations = result.get_asset_check_evaluations()
        dropped = [
            m.metadata["dropped_purchases"].value
            for m in result.asset_materializations_for_node("validated_customers")
            if m.asset_key.to_user_string() == "customers"
        ]
        outcome["batches"][f"{batch_id} ({label})"] = {
            "success": result.success,
            "dropped_purchases": dropped[0] if dropped else None,
            "seconds": round(time.perf_counter() - started, 1),
            "failed_checks": sorted(e.check_name for e in evaluations if not e.passed),
        }
        log(f"{batch_id} ({label}): {outcome['batches'][f'{batch_id} ({label})']}")


def published(split: real_data.Split, warehouse: Path, label: str) -> real_data.Rate:
    return real_data.rate(split, f"published (current_recommendations), {label}",
                          split.published(warehouse))  # fmt: skip


def baselines(split: real_data.Split) -> list[real_data.Rate]:
    rates = []
    rates.append(real_data.rate(split, "most popular, in stock, not bought", split.popularity()))
    rates.append(real_data.rate(split, "co-purchase neighbours (item-item cosine)",
                                split.item_item()))  # fmt: skip
    rates.append(real_data.rate(split, "similar customers (user-user cosine, 50)",
                                split.user_user()))  # fmt: skip
    return rates


def table(rates: list[real_data.Rate]) -> str:
    batches = sorted({b for r in rates for b in r.per_batch})
    lines = [
        "| what | hit rate | evaluated | products each | " + " | ".join(batches) + " |",
        "|---|---|---|---|" + "---|" * len(batches),
    ]
    for r in rates:
        per = " | ".join(f"{r.per_batch.get(b, float('nan')):.3f}" for b in batches)
        lines.append(f"| {r.name} | {r.hit_rate:.4f} | {r.evaluated:,} | {r.recommended:.2f} |"
                     f" {per} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--households", type=int, default=None, help="a sample (default: all)")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--backend", choices=["local", "hashing"], default="local")
    parser.add_argument("--zero-amounts", choices=["keep", "drop"], default="keep")
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder, kept")
    parser.add_argument(
        "--scoring",
        type=json.loads,
        default={},
        help="the recommendations step's config, as JSON (e.g. its weights)",
    )
    parser.add_argument(
        "--no-retrain",
        action="store_true",
        help="measure after the batches only, not after the weekly retrain",
    )
    parser.add_argument(
        "--catalog-products",
        type=int,
        default=0,
        help="pad the catalog with variants of its products up to this many",
    )
    parser.add_argument(
        "--catalog-reload",
        type=int,
        default=0,
        help="then add this many and load the catalog again",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("dagster").setLevel(logging.ERROR)
    log = (lambda *_: None) if args.json else print
    with tempfile.TemporaryDirectory(prefix="recommendation_quality_") as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        stats = real_data.convert(root, seed=args.seed, batches=args.batches,
                                  households=args.households,
                                  zero_amounts=args.zero_amounts)  # fmt: skip
        if args.catalog_products:
            stats["catalog_variants"] = pad_catalog(
                root / "catalog.csv", args.catalog_products, seed=args.seed
            )
        log(f"converted in {time.perf_counter() - started:.1f} s: {stats}")
        split = real_data.Split.read(root)
        rates = []
        outcome = run_pipeline(
            root, args.backend, log, args.scoring, retrain=not args.no_retrain,
            measured=lambda label: rates.append(
                published(split, root / "warehouse.duckdb", label)),
            catalog_reload=args.catalog_reload,
        )  # fmt: skip
        rates += baselines(split)
    # every run ran in this process: its peak bounds every step's
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    log(f"peak RSS of the whole benchmark process: {peak:,.0f} MiB")
    if args.json:
        print(json.dumps({"stats": stats, "pipeline": outcome,
                          "rates": [r.__dict__ for r in rates]}))  # fmt: skip
    else:
        print(table(rates))


if __name__ == "__main__":
    main()
