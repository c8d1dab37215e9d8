"""A real worker process of the scale-out tests: runs stages of one batch against DuckLake, with
Dagster's own state in PostgreSQL, configured by the environment like a deployed run worker.

    python -m pipeline_project_tests.lake_child pipeline BATCH_ID    (every stage of the batch)
    python -m pipeline_project_tests.lake_child catalog -             (the catalog job)
    python -m pipeline_project_tests.lake_child segments BATCH_ID    (customer_segments only)
    python -m pipeline_project_tests.lake_child inference BATCH_ID [PAUSE_AT]
        (the stages up to inference; PAUSE_AT as in crash_child: stop there to be killed)
    python -m pipeline_project_tests.lake_child embed TEXTS_FILE     (the texts into the cache)

Says it is ready in ROOT/ready (PIPELINE_TEST_ROOT) and waits for ROOT/go before it starts
(`embed`: once it has looked up which texts are missing), so that the test can start several at
the same moment; prints one JSON line: success, run start and end (epoch seconds).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import dagster as dg

from pipeline_project.definitions import build_definitions, build_resources
from pipeline_project.resources.embeddings import HashingEmbedder
from pipeline_project_tests.helpers import INFERENCE_STAGES

ROOT = Path(os.environ["PIPELINE_TEST_ROOT"])


def wait_for_go(root: Path) -> None:
    """Says this worker is ready (ROOT/ready/PID), then waits for the test's go."""
    (root / "ready").mkdir(exist_ok=True)
    (root / "ready" / str(os.getpid())).touch()
    while not (root / "go").exists():
        time.sleep(0.02)


def run_stages(batch_id: str, selection: list[str] | None) -> dict:
    defs = build_definitions(embedder=HashingEmbedder(dimensions=32))
    job = defs.resolve_job_def("batch_pipeline_job")
    with dg.DagsterInstance.get() as instance:
        started = time.time()
        result = job.execute_in_process(
            partition_key=batch_id,
            instance=instance,
            asset_selection=[dg.AssetKey(key) for key in selection] if selection else None,
            raise_on_error=False,
        )
        failures = (
            [
                f"{e.step_key}: {e.event_specific_data.error.message.strip()}"
                for e in result.all_events
                if e.event_type == dg.DagsterEventType.STEP_FAILURE
            ]
            + [
                f"check {e.asset_check_evaluation_data.check_name} failed: "
                f"{ {k: v.value for k, v in e.asset_check_evaluation_data.metadata.items()} }"
                for e in result.all_events
                if e.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION
                and not e.asset_check_evaluation_data.passed
                and e.asset_check_evaluation_data.severity == dg.AssetCheckSeverity.ERROR
            ]
            + [
                str(getattr(e.event_specific_data, "error", None) or e.message)[-1500:]
                for e in result.all_events
                if e.event_type == dg.DagsterEventType.RUN_FAILURE
            ]
        )
        retries: dict[str, int] = {}  # writes retried after a commit conflict, per step
        for e in result.get_asset_materialization_events():
            value = e.materialization.metadata.get("commit_retries")
            if value is not None:
                retries[e.step_key] = max(retries.get(e.step_key, 0), int(value.value))
        return {"success": result.success, "start": started, "end": time.time(),
                "run_id": result.run_id, "peak_rss_mib": _peak_rss_mib(),
                "failures": failures, "commit_retries": retries}  # fmt: skip


def run_catalog() -> dict:
    defs = build_definitions(embedder=HashingEmbedder(dimensions=32))
    with dg.DagsterInstance.get() as instance:
        started = time.time()
        result = defs.resolve_job_def("catalog_job").execute_in_process(instance=instance)
        return {"success": result.success, "start": started, "end": time.time()}


def _peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def embed(texts_file: Path) -> dict:
    """The texts into the cache as customer_embeddings does it, with the step's resource."""
    from pipeline_project.settings import Settings

    embedder = HashingEmbedder(dimensions=32)
    resources = build_resources(Settings.from_env(), embedder)
    with dg.build_resources({"warehouse": resources["warehouse"]}) as started:
        return _embed_texts(started.warehouse, embedder, json.loads(texts_file.read_text()))


def _embed_texts(warehouse, embedder, texts: list[str]) -> dict:
    from pipeline_project.assets.inference import InferenceConfig, cache_writer
    from pipeline_project.core import embedding_cache
    from pipeline_project.core.inference import embed_into_cache

    source = "SELECT md5(t) AS text_hash, t AS text FROM (SELECT unnest($texts) AS t)"
    with warehouse.get_connection() as conn:
        missing = embedding_cache.missing_texts(
            conn, source, embedder.model_id(), 32, {"texts": texts}
        )
    wait_for_go(ROOT)  # every worker has found the same texts missing: now all embed at once
    started = time.time()
    outcome = embed_into_cache(
        missing, embedder, InferenceConfig(cache_flush_texts=16), cache_writer(warehouse),
        lambda _: None, "texts",
    )  # fmt: skip
    return {"success": not outcome.failures, "start": started, "end": time.time(),
            "embedded": len(outcome.vectors)}  # fmt: skip


def main() -> None:
    mode, arg = sys.argv[1], sys.argv[2]
    if mode == "embed":
        outcome = embed(Path(arg))
    elif mode == "catalog":
        outcome = run_catalog()
    else:
        if mode == "inference" and len(sys.argv) > 3:
            from pipeline_project_tests.crash_child import install_pause

            install_pause(ROOT, sys.argv[3])
        selection = {"segments": ["customer_segments"], "inference": INFERENCE_STAGES}
        wait_for_go(ROOT)
        outcome = run_stages(arg, selection.get(mode))
    print(json.dumps(outcome), flush=True)


if __name__ == "__main__":
    main()
