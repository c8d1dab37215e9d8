"""AI inference: an embedding per customer profile, cached, retried, validated, dead-lettered."""

import time
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from pipeline_project.checks.model_checks import EMBEDDING_CHECK_SPECS, embedding_check_results
from pipeline_project.core.inference import (
    INFERENCE_FAILED,
    INVALID_OUTPUT,
    ChunkResult,
    CircuitBreakerOpen,
    InferenceOutcome,
    run_inference,
)
from pipeline_project.core.monitoring import StepUsage
from pipeline_project.core.profiles import AS_OF_SQL, PROFILES_SQL
from pipeline_project.core.staging import write_staged
from pipeline_project.core.vectors import matrix_to_list_array
from pipeline_project.partitions import batches
from pipeline_project.policies import MODEL_INFERENCE_POOL, STAGE_RETRY_POLICY
from pipeline_project.resources import Warehouse
from pipeline_project.resources.embeddings import Embedder
from pipeline_project.tables import CUSTOMER_EMBEDDINGS

INFERENCE_STAGE = "inference"
# A run with this tag (every run of dead_letter_replay_job) re-runs only the batch's pending
# dead letters, merges them in and marks them replayed; the rest of the batch is left as it is.
# A tag, not run config: a launch with no config (GraphQL, a sensor) still replays.
DEAD_LETTER_REPLAY_TAG = "pipeline/dead_letter_replay"

# Distinct profile texts of the batch (its staged profile files) not in the cache yet.
_MISSING_TEXTS_SQL = """
SELECT text_hash, any_value(profile_text) AS profile_text
FROM read_parquet($profiles) AS p
WHERE NOT EXISTS (
    SELECT 1 FROM embedding_cache AS c
    WHERE c.model = $model AND c.dimensions = $dimensions AND c.text_hash = p.text_hash)
GROUP BY text_hash
ORDER BY text_hash
"""


class InferenceConfig(dg.Config):
    chunk_size: int = Field(
        default=64, description="Texts per model request (capped at the backend's batch limit)."
    )
    request_attempts: int = Field(default=3, description="Attempts per request before it fails.")
    backoff_initial_seconds: float = Field(default=0.5, description="First retry wait.")
    backoff_max_seconds: float = Field(default=30.0, description="Longest retry wait.")
    max_failed_chunk_share: float = Field(
        default=0.25, description="Circuit breaker: above this share of failed chunks, stop."
    )
    dead_letter_threshold: float = Field(
        default=0.01, description="Dead-lettered share of customers above which a WARN check fails."
    )
    profile_chunk_rows: int = Field(
        default=200_000, description="Customers profiled per query (bounds memory)."
    )
    cache_flush_texts: int = Field(
        default=512, description="Write new vectors to the cache every this many texts."
    )


@dg.asset(
    partitions_def=batches,
    deps=["customers", "customer_purchases", "product_catalog"],
    check_specs=EMBEDDING_CHECK_SPECS,
    pool=MODEL_INFERENCE_POOL,
    retry_policy=STAGE_RETRY_POLICY,
    group_name="inference",
    kinds={"duckdb"},
    metadata={"dagster/table_name": CUSTOMER_EMBEDDINGS},
    automation_condition=(
        dg.AutomationCondition.eager() & dg.AutomationCondition.all_deps_blocking_checks_passed()
    ).ignore(dg.AssetSelection.assets("product_catalog")),
)
def customer_embeddings(
    context: dg.AssetExecutionContext,
    config: InferenceConfig,
    warehouse: Warehouse,
    embedder: Embedder,
):
    """Each valid customer's profile text and the key of its embedding in embedding_cache;
    customers whose embedding failed are in dead_letter instead."""
    batch_id = context.partition_key
    if context.run.tags.get(DEAD_LETTER_REPLAY_TAG) == "true":
        yield from replay_dead_letters(context, config, warehouse, embedder)
        return
    model, dimensions = embedder.model_id(), embedder.output_dimensions()
    params = {"batch_id": batch_id, "model": model, "dimensions": dimensions}
    started = time.perf_counter()
    usage = StepUsage()
    with warehouse.scratch_folder(batch_id) as scratch:
        profiles = str(scratch / "*.parquet")
        with warehouse.get_connection() as conn:
            _stage_profiles(conn, batch_id, scratch, config.profile_chunk_rows)
            missing = conn.execute(
                _MISSING_TEXTS_SQL, {"profiles": profiles, "model": model, "dimensions": dimensions}
            ).fetchall()
            [(customers_in, distinct_profiles)] = conn.execute(
                "SELECT count(*), count(DISTINCT text_hash) FROM read_parquet(?)", [profiles]
            ).fetchall()
        context.log.info(
            f"{batch_id}: {customers_in:,} customers, {distinct_profiles:,} distinct profiles, "
            f"{len(missing):,} not in the cache for {model}"
        )

        outcome = embed_into_cache(context, warehouse, embedder, missing, config, label=batch_id)

        failures = _failures_table(outcome)
        with warehouse.replace_batch(
            [CUSTOMER_EMBEDDINGS], batch_id, dead_letter_stage=INFERENCE_STAGE
        ) as conn:
            conn.execute(
                "INSERT INTO customer_embeddings SELECT $batch_id, p.line_no, p.customer_id,"
                " $model, $dimensions, p.text_hash, p.profile_text FROM read_parquet($profiles)"
                " AS p JOIN embedding_cache AS c ON c.model = $model"
                " AND c.dimensions = $dimensions AND c.text_hash = p.text_hash",
                {**params, "profiles": profiles},
            )
            conn.register("inference_failures", failures)
            conn.execute(
                "INSERT INTO dead_letter SELECT $batch_id, $stage, p.customer_id::VARCHAR,"
                " f.reason, f.error, f.attempts, p.profile_text, now(), NULL"
                " FROM read_parquet($profiles) AS p JOIN inference_failures AS f USING (text_hash)",
                {"batch_id": batch_id, "stage": INFERENCE_STAGE, "profiles": profiles},
            )
            conn.unregister("inference_failures")
            dead_by_reason = dict(
                conn.execute(
                    "SELECT reason, count(*) FROM dead_letter WHERE batch_id = ? AND stage = ?"
                    " GROUP BY reason",
                    [batch_id, INFERENCE_STAGE],
                ).fetchall()
            )
            dead_letter_total = _pending_dead_letters(conn)
    seconds = time.perf_counter() - started
    with warehouse.get_connection() as conn:
        checks = embedding_check_results(
            conn, batch_id, INFERENCE_STAGE, config.dead_letter_threshold
        )

    dead_lettered = sum(dead_by_reason.values())
    latency = outcome.latency_percentiles()
    metadata = {
        "dagster/row_count": customers_in - dead_lettered,
        "customers_in": customers_in,
        "dead_lettered": dead_lettered,
        # failed + invalid outputs over customers: the batch's model error rate
        "error_rate": round(dead_lettered / customers_in, 6) if customers_in else 0.0,
        "dead_letter_total": dead_letter_total,
        "dead_lettered_inference_failed": dead_by_reason.get(INFERENCE_FAILED, 0),
        "dead_lettered_invalid_output": dead_by_reason.get(INVALID_OUTPUT, 0),
        "distinct_profiles": distinct_profiles,
        "cache_hits": distinct_profiles - len(missing),
        "texts_embedded": len(outcome.vectors),
        "model_calls": outcome.model_calls,
        "chunks_done": outcome.chunks_done,
        "chunks_total": outcome.chunks_total,
        "chunks_failed": outcome.chunks_failed,
        "latency_p50_seconds": round(latency["p50"], 4),
        "latency_p95_seconds": round(latency["p95"], 4),
        "latency_p99_seconds": round(latency["p99"], 4),
        "model": model,
        "dimensions": dimensions,
        "seconds": round(seconds, 3),
        "customers_per_second": round(customers_in / seconds) if seconds else 0,
        **usage.figures(),
    }
    if outcome.tokens is not None:
        metadata["tokens"] = outcome.tokens
    yield dg.MaterializeResult(metadata=metadata)
    yield from checks


def _pending_dead_letters(conn) -> int:
    """Dead-lettered customers of every batch that wait for a replay."""
    [(total,)] = conn.execute(
        "SELECT count(*) FROM dead_letter WHERE stage = ? AND replayed_at IS NULL",
        [INFERENCE_STAGE],
    ).fetchall()
    return total


# The batch's dead-lettered customers waiting for a replay, with the profile they had.
_REPLAY_SQL = """
SELECT c.line_no, c.customer_id, d.payload AS profile_text, md5(d.payload) AS text_hash
FROM dead_letter AS d
JOIN customers AS c ON c.batch_id = d.batch_id AND c.customer_id::VARCHAR = d.record_key
WHERE d.batch_id = $batch_id AND d.stage = $stage AND d.replayed_at IS NULL
  AND d.payload IS NOT NULL
"""
_REPLAY_MISSING_SQL = """
SELECT DISTINCT text_hash, profile_text FROM replay AS r
WHERE NOT EXISTS (
    SELECT 1 FROM embedding_cache AS c
    WHERE c.model = $model AND c.dimensions = $dimensions AND c.text_hash = r.text_hash)
ORDER BY text_hash
"""
# Idempotent merge: customers now in the cache get their row (once) and are marked replayed;
# the others keep their dead letter, with the replay's error and attempts added.
_MERGE_REPLAYED_SQL = """
INSERT INTO customer_embeddings
SELECT $batch_id, r.line_no, r.customer_id, $model, $dimensions, r.text_hash, r.profile_text
FROM replay AS r
JOIN embedding_cache AS c
  ON c.model = $model AND c.dimensions = $dimensions AND c.text_hash = r.text_hash
WHERE NOT EXISTS (
    SELECT 1 FROM customer_embeddings AS e
    WHERE e.batch_id = $batch_id AND e.customer_id = r.customer_id)
"""
_MARK_REPLAYED_SQL = """
UPDATE dead_letter SET replayed_at = now()
WHERE batch_id = $batch_id AND stage = $stage AND replayed_at IS NULL
  AND record_key IN (
      SELECT customer_id::VARCHAR FROM customer_embeddings WHERE batch_id = $batch_id)
"""
_STILL_FAILING_SQL = """
UPDATE dead_letter AS d
SET reason = f.reason, error = f.error, attempts = d.attempts + f.attempts
FROM replay AS r JOIN replay_failures AS f USING (text_hash)
WHERE d.batch_id = $batch_id AND d.stage = $stage AND d.replayed_at IS NULL
  AND d.record_key = r.customer_id::VARCHAR
"""


def replay_dead_letters(
    context: dg.AssetExecutionContext,
    config: InferenceConfig,
    warehouse: Warehouse,
    embedder: Embedder,
):
    """The dead-letter replay of one batch: only its pending dead-lettered customers go to the
    model again; a second replay finds none and changes nothing."""
    batch_id = context.partition_key
    model, dimensions = embedder.model_id(), embedder.output_dimensions()
    params = {"batch_id": batch_id, "model": model, "dimensions": dimensions}
    keys = {"batch_id": batch_id, "stage": INFERENCE_STAGE}
    started = time.perf_counter()
    with warehouse.get_connection() as conn:
        used = {
            m for (m,) in conn.execute(
                "SELECT DISTINCT model || '/' || dimensions FROM customer_embeddings"
                " WHERE batch_id = ?", [batch_id],
            ).fetchall()
        }  # fmt: skip
        if used - {f"{model}/{dimensions}"}:
            raise dg.Failure(
                description=f"{batch_id} was embedded with {sorted(used)}, the replay would use"
                f" {model}/{dimensions}: materialize the whole batch instead",
                allow_retries=False,
            )
        replay = conn.sql(_REPLAY_SQL, params=keys).to_arrow_table()
        conn.register("replay", replay)
        missing = conn.execute(
            _REPLAY_MISSING_SQL, {"model": model, "dimensions": dimensions}
        ).fetchall()
        conn.unregister("replay")
    context.log.info(
        f"{batch_id}: replaying {replay.num_rows:,} dead-lettered customers,"
        f" {len(missing):,} texts for {model}"
    )
    outcome = embed_into_cache(context, warehouse, embedder, missing, config, label=batch_id)
    failures = _failures_table(outcome)
    with warehouse.transaction() as conn:
        conn.register("replay", replay)
        conn.register("replay_failures", failures)
        conn.execute(_MERGE_REPLAYED_SQL, params)
        [(replayed,)] = conn.execute(_MARK_REPLAYED_SQL, keys).fetchall()
        conn.execute(_STILL_FAILING_SQL, keys)
        conn.unregister("replay")
        conn.unregister("replay_failures")
        [(embedded, still_dead)] = conn.execute(
            "SELECT (SELECT count(*) FROM customer_embeddings WHERE batch_id = $batch_id),"
            " (SELECT count(*) FROM dead_letter WHERE batch_id = $batch_id AND stage = $stage"
            " AND replayed_at IS NULL)",
            keys,
        ).fetchall()
        dead_letter_total = _pending_dead_letters(conn)
    with warehouse.get_connection() as conn:
        checks = embedding_check_results(
            conn, batch_id, INFERENCE_STAGE, config.dead_letter_threshold
        )
    yield dg.MaterializeResult(
        metadata={
            "dagster/row_count": embedded,
            "mode": "dead-letter replay",
            "replay_candidates": replay.num_rows,
            "replayed": replayed,
            "still_dead_lettered": still_dead,
            "dead_letter_total": dead_letter_total,
            "texts_embedded": len(outcome.vectors),
            "model_calls": outcome.model_calls,
            "model": model,
            "dimensions": dimensions,
            "seconds": round(time.perf_counter() - started, 3),
        }
    )
    yield from checks


def _failures_table(outcome: InferenceOutcome) -> pa.Table:
    """The texts the model failed on, with reason, error and attempts."""
    return pa.table(
        {
            "text_hash": pa.array(list(outcome.failures), pa.string()),
            "reason": pa.array([f.reason for f in outcome.failures.values()], pa.string()),
            "error": pa.array([f.error for f in outcome.failures.values()], pa.string()),
            "attempts": pa.array([f.attempts for f in outcome.failures.values()], pa.int32()),
        }
    )


_PROFILE_SCHEMA = pa.schema(
    [
        ("line_no", pa.int64()),
        ("customer_id", pa.uuid()),
        ("profile_text", pa.string()),
        ("text_hash", pa.string()),
    ]
)


def _stage_profiles(conn, batch_id: str, folder: Path, chunk_rows: int) -> None:
    """The batch's customer profiles as Parquet parts in `folder`, one line range at a time."""
    [(as_of,)] = conn.execute(AS_OF_SQL, {"batch_id": batch_id}).fetchall()
    [(last_line,)] = conn.execute(
        "SELECT coalesce(max(line_no), 0) FROM customers WHERE batch_id = ?", [batch_id]
    ).fetchall()
    pq.write_table(_PROFILE_SCHEMA.empty_table(), folder / "part-empty.parquet")
    for part, first in enumerate(range(1, last_line + 1, chunk_rows)):
        params = {"batch_id": batch_id, "as_of": as_of, "first": first,
                  "last": first + chunk_rows - 1}  # fmt: skip
        write_staged(folder, part, conn.sql(PROFILES_SQL, params=params).to_arrow_table())


def embed_into_cache(
    context: dg.AssetExecutionContext,
    warehouse: Warehouse,
    embedder: Embedder,
    missing: list[tuple[str, str]],
    config: InferenceConfig,
    label: str,
) -> InferenceOutcome:
    """Embed (text_hash, text) pairs with the configured model, writing valid vectors to the
    cache as they come; the circuit breaker fails the step (vectors so far are kept)."""
    model, dimensions = embedder.model_id(), embedder.output_dimensions()
    texts = dict(missing)
    pending: list[tuple[str, np.ndarray]] = []
    started = time.perf_counter()

    def flush() -> None:
        if pending:
            _write_cache(warehouse, model, dimensions, texts, pending)
            pending.clear()

    def on_chunk(result: ChunkResult, outcome: InferenceOutcome) -> None:
        pending.extend(result.vectors.items())
        if len(pending) >= config.cache_flush_texts:
            flush()
        seconds = time.perf_counter() - started
        context.log.info(
            f"{label}: chunk {outcome.chunks_done}/{outcome.chunks_total} "
            f"({outcome.chunks_failed} failed), {len(outcome.vectors) / seconds:.1f} texts/s"
        )

    try:
        with embedder.open() as client:
            outcome = run_inference(
                missing,
                client,
                chunk_size=max(1, min(config.chunk_size, embedder.max_batch_size)),
                dimensions=dimensions,
                max_concurrency=embedder.max_concurrency,
                attempts=config.request_attempts,
                backoff_initial_seconds=config.backoff_initial_seconds,
                backoff_max_seconds=config.backoff_max_seconds,
                max_failed_chunk_share=config.max_failed_chunk_share,
                redact=embedder.redact,
                on_chunk=on_chunk,
            )
    except CircuitBreakerOpen as err:
        flush()  # keep what was embedded: the retry will not pay for it again
        raise dg.Failure(description=str(err)) from err
    flush()
    return outcome


def _write_cache(
    warehouse: Warehouse,
    model: str,
    dimensions: int,
    texts: dict[str, str],
    vectors: list[tuple[str, np.ndarray]],
) -> None:
    """Add new vectors to embedding_cache in one short transaction (first writer wins)."""
    hashes = [h for h, _ in vectors]
    rows = pa.table(
        {
            "text_hash": pa.array(hashes, pa.string()),
            "text": pa.array([texts[h] for h in hashes], pa.string()),
            "embedding": matrix_to_list_array(np.stack([v for _, v in vectors])),
        }
    )
    with warehouse.transaction() as conn:
        conn.register("new_vectors", rows)
        conn.execute(
            "INSERT INTO embedding_cache SELECT $model, $dimensions, text_hash, text, embedding,"
            " now() FROM new_vectors ON CONFLICT DO NOTHING",
            {"model": model, "dimensions": dimensions},
        )
        conn.unregister("new_vectors")
