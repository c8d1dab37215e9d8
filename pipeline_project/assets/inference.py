"""AI inference: an embedding per customer profile, cached, retried, validated, dead-lettered."""

import time
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import duckdb
import numpy as np
from pydantic import Field

from pipeline_project.asset_metadata import one_table_metadata, with_table_figures
from pipeline_project.batch_history import failed_flags, recent_batches
from pipeline_project.checks.model_checks import (
    EMBEDDING_CHECK_SPECS,
    EMBEDDING_DRIFT,
    MODEL_PASSES_PROBES,
    DriftLimits,
    embedding_check_results,
    embedding_drift_result,
    probe_result,
)
from pipeline_project.checks.verdicts import NotJudged, Verdict, judged, not_judged
from pipeline_project.core import dead_letters
from pipeline_project.core.catalog import vocabulary
from pipeline_project.core.embedding_cache import missing_texts, text_characters
from pipeline_project.core.embedding_drift import batch_vectors, embedding_drift
from pipeline_project.core.inference import (
    CircuitBreakerOpen,
    InferenceOutcome,
    TextCost,
    batch_figures,
    embed_into_cache,
    embedding_models,
    merge_replay,
    replay_candidates,
    store_embeddings,
)
from pipeline_project.core.monitoring import StepUsage
from pipeline_project.core.probes import PROBE_TEXTS, probe_verdict
from pipeline_project.core.profiles import (
    STAGED_TEXTS_SQL,
    stage_prior_purchases,
    stage_profiles,
    store_prior_purchases,
)
from pipeline_project.policies import (
    MODEL_INFERENCE_POOL,
    batch_stage,
    fails_at_once_when_deterministic,
    per_batch_automation,
    warehouse_pool,
)
from pipeline_project.resources import AlertSink, Warehouse
from pipeline_project.resources.embeddings import Embedder
from pipeline_project.resources.warehouse import DUCKDB
from pipeline_project.tables import (
    BATCHES,
    CUSTOMER_EMBEDDINGS,
    CUSTOMER_PURCHASES,
    CUSTOMERS,
    EMBEDDING_CACHE,
    PRIOR_PURCHASES,
    PRODUCT_CATALOG,
)

INFERENCE_STAGE = "inference"
# A run with this tag (every run of dead_letter_replay_job) re-runs only the batch's pending
# dead letters, merges them in and marks them replayed; the rest of the batch is left as it is.
# A tag, not run config: a launch with no config (GraphQL, a sensor) still replays.
DEAD_LETTER_REPLAY_TAG = "pipeline/dead_letter_replay"


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
    drift_baseline_batches: int = Field(default=5, description="Recent batches in the baseline.")
    drift_min_baseline_batches: int = Field(
        default=3, description="No embedding-drift verdict before this many normal batches."
    )
    drift_factor: float = Field(
        default=3.0, description="Drift: the mean moved this many times the usual move..."
    )
    drift_min_distance: float = Field(
        default=0.002, description="...and at least this cosine distance."
    )
    drift_max_new_profile_share: float = Field(
        default=0.5,
        description="Drift: more customers than this with a never-seen profile (or, where"
        " normal batches bring more, than they do plus 25 points).",
    )
    min_vector_spread: float = Field(
        default=1e-3, description="Below this spread the batch's vectors are all alike."
    )
    cache_flush_texts: int = Field(
        default=512, description="Write new vectors to the cache every this many texts."
    )


def customer_embeddings_for(backend: str) -> dg.AssetsDefinition:
    """customer_embeddings for the warehouse's backend: in the writer pool on the DuckDB file
    (its cache flushes and its batch write open the file), in the model_inference pool on
    DuckLake (see policies.warehouse_pool).

    A multi_asset that can be subset: a check may be left without a result (not judged, see
    checks/verdicts.py), and a model that fails its probes yields nothing but that failure."""
    return dg.multi_asset(
        name=CUSTOMER_EMBEDDINGS,
        specs=[
            dg.AssetSpec(
                CUSTOMER_EMBEDDINGS,
                deps=[CUSTOMERS, CUSTOMER_PURCHASES, PRODUCT_CATALOG],
                description="Each valid customer's profile text and the key of its embedding in"
                " embedding_cache; customers whose embedding failed are in dead_letter instead.",
                kinds={"duckdb"},
                automation_condition=per_batch_automation(ignore=[PRODUCT_CATALOG]),
                skippable=True,
            )
        ],
        check_specs=EMBEDDING_CHECK_SPECS,
        can_subset=True,
        **batch_stage("inference", pool=warehouse_pool(backend, MODEL_INFERENCE_POOL)),
    )(_customer_embeddings)


@fails_at_once_when_deterministic
def _customer_embeddings(
    context: dg.AssetExecutionContext,
    config: InferenceConfig,
    warehouse: Warehouse,
    embedder: Embedder,
    alerts: AlertSink,
):
    """Each valid customer's profile text and the key of its embedding in embedding_cache;
    customers whose embedding failed are in dead_letter instead."""
    batch_id = context.partition_key
    if not context.selected_asset_keys:  # its checks alone: judged only with its batch
        return
    if context.run.tags.get(DEAD_LETTER_REPLAY_TAG) == "true":
        yield from replay_dead_letters(context, config, warehouse, embedder)
        return
    model, dimensions = embedder.model_id(), embedder.output_dimensions()
    started, usage = time.perf_counter(), StepUsage()
    # The model is judged before it embeds anything: one that fails its probe texts writes
    # nothing (the batch's previous embeddings and answer stay) and fails the step (blocking).
    probe = _probe_check(embedder)
    if isinstance(probe, dg.AssetCheckResult) and not probe.passed:
        context.log.error(f"{batch_id}: {probe.description}; nothing was embedded")
        yield probe
        return
    with warehouse.scratch_folder(batch_id) as scratch:
        staged = _stage(warehouse, batch_id, scratch, config, model, dimensions)
        context.log.info(
            f"{batch_id}: {staged.customers:,} customers, {staged.distinct:,} distinct profiles,"
            f" {len(staged.missing):,} not in the cache for {model}"
        )
        outcome = _embed(context, warehouse, embedder, staged.missing, config, batch_id)
        dead_by_reason, dead_letter_total = _store(
            warehouse, batch_id, staged, outcome, model, dimensions
        )
    seconds = time.perf_counter() - started
    checks = [probe, *_checks(context, warehouse, embedder, config)]
    figures = batch_figures(
        outcome, cost=_cost(embedder, staged.missing, staged.chars),
        customers_in=staged.customers, distinct_profiles=staged.distinct,
        cache_hits=staged.distinct - len(staged.missing), dead_by_reason=dead_by_reason,
        prior_purchases=staged.prior, returning_customers=staged.returning,
        dead_letter_total=dead_letter_total, model=model,
        dimensions=dimensions, seconds=seconds,
        usage={**usage.figures(), "commit_retries": warehouse.commit_retries()},
    )  # fmt: skip
    figures["error_rate_threshold"] = config.dead_letter_threshold
    yield _materialized(context, alerts, warehouse, figures, checks)
    yield from judged(checks)


# The default backend's; build_definitions builds it for the deployment's (see jobs.ASSETS).
customer_embeddings = customer_embeddings_for(DUCKDB)


@dataclass(frozen=True)
class _Staged:
    profiles: str  # the glob of the staged profiles' parts
    prior_file: Path
    prior: int  # prior purchases staged
    returning: int  # customers an earlier batch held
    customers: int
    distinct: int  # distinct profiles
    missing: list[tuple[str, str]]  # (text_hash, text) not in the cache for the model
    chars: int  # characters of the distinct texts
    vocabulary: str | None  # the catalog's, as the profiles read it (None: no catalog)


def _store(
    warehouse: Warehouse, batch_id: str, staged: _Staged, outcome, model: str, dimensions: int
) -> tuple[dict, int]:
    """The batch's prior purchases, embeddings and dead letters in one transaction; returns
    the dead letters by reason and the queue's pending total."""
    for attempt in warehouse.write_attempts():
        with (
            attempt,
            warehouse.replace_batch(
                [CUSTOMER_EMBEDDINGS, PRIOR_PURCHASES], batch_id,
                dead_letter_stage=INFERENCE_STAGE,
            ) as conn,
        ):  # fmt: skip
            store_prior_purchases(conn, staged.prior_file if staged.prior else None)
            # what the profiles read of the catalog: a new vocabulary rebuilds them
            conn.execute(
                f"UPDATE {BATCHES} SET profile_vocabulary = ? WHERE batch_id = ?",
                [staged.vocabulary, batch_id],
            )
            dead_by_reason = store_embeddings(
                conn, batch_id, INFERENCE_STAGE, model, dimensions, staged.profiles, outcome
            )
            dead_letter_total = dead_letters.pending_total(conn, INFERENCE_STAGE)
    return dead_by_reason, dead_letter_total


def _stage(
    warehouse: Warehouse, batch_id: str, scratch: Path, config: InferenceConfig, model: str,
    dimensions: int,
) -> _Staged:  # fmt: skip
    """The batch's prior purchases and profiles staged in `scratch`, and the texts to embed."""
    profiles = str(scratch / "*.parquet")
    prior_file = scratch / PRIOR_PURCHASES / "part-0.parquet"
    prior_file.parent.mkdir()
    with warehouse.get_connection() as conn:
        words = vocabulary(conn)
        prior, returning = stage_prior_purchases(conn, batch_id, prior_file)
        customers, distinct = stage_profiles(conn, batch_id, scratch, config.profile_chunk_rows)
        texts = {"profiles": profiles}
        missing = missing_texts(conn, STAGED_TEXTS_SQL, model, dimensions, texts)
        chars = text_characters(conn, STAGED_TEXTS_SQL, texts)
    return _Staged(
        profiles, prior_file, prior, returning, customers, distinct, missing, chars, words
    )


def _cost(embedder: Embedder, embedded: list[tuple[str, str]], chars: int) -> TextCost:
    """What the batch's texts cost: those sent to the model and those the cache served."""
    sent = sum(len(text) for _, text in embedded)
    return TextCost(sent, chars - sent, embedder.price_per_million_tokens)


def _materialized(
    context: dg.AssetExecutionContext,
    alerts: AlertSink,
    warehouse: Warehouse,
    figures: dict,
    checks: list[Verdict],
) -> dg.MaterializeResult:
    """The batch's materialization, once its error rate is alerted; flagged when it failed the
    embedding drift check (the last), so that it is nobody's baseline."""
    _alert_error_rate(context, alerts, figures["error_rate"], figures["error_rate_threshold"])
    figures = {**figures, **failed_flags(judged(checks[-1:])), **not_judged(checks, context.log)}
    return dg.MaterializeResult(
        asset_key=CUSTOMER_EMBEDDINGS,
        metadata=with_table_figures(warehouse, CUSTOMER_EMBEDDINGS, figures),
    )


def _alert_error_rate(
    context: dg.AssetExecutionContext, alerts: AlertSink, rate: float, threshold: float
) -> None:
    # Alerted here, whatever launched the run, at the dead-letter check's threshold (one
    # threshold: the alert fires exactly when the check fails); the sensor finds it stored.
    alerts.alert_error_rate(
        asset=CUSTOMER_EMBEDDINGS, batch_id=context.partition_key, rate=rate,
        threshold=threshold, log=context.log, run_id=context.run.run_id,
    )  # fmt: skip


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
    started = time.perf_counter()
    with warehouse.get_connection() as conn:
        _refuse_another_model(conn, batch_id, model, dimensions)
        replay, missing = replay_candidates(conn, batch_id, INFERENCE_STAGE, model, dimensions)
    context.log.info(
        f"{batch_id}: replaying {replay.num_rows:,} dead-lettered customers,"
        f" {len(missing):,} texts for {model}"
    )
    outcome = _embed(context, warehouse, embedder, missing, config, batch_id)
    for attempt in warehouse.write_attempts():
        with attempt, warehouse.transaction() as conn:
            merged = merge_replay(
                conn, batch_id, INFERENCE_STAGE, model, dimensions, replay, outcome
            )
            dead_letter_total = dead_letters.pending_total(conn, INFERENCE_STAGE)
    checks = _checks(context, warehouse, embedder, config)
    yield dg.MaterializeResult(
        asset_key=CUSTOMER_EMBEDDINGS,
        metadata={
            **failed_flags(judged(checks[-1:])),
            **not_judged(checks, context.log),
            **one_table_metadata(warehouse, CUSTOMER_EMBEDDINGS, merged.embedded),
            "mode": "dead-letter replay",
            "replay_candidates": replay.num_rows,
            "replayed": merged.replayed,
            "still_dead_lettered": merged.still_dead,
            "dead_letter_total": dead_letter_total,
            "texts_embedded": len(outcome.vectors),
            "model_calls": outcome.model_calls,
            "model": model,
            "dimensions": dimensions,
            "seconds": round(time.perf_counter() - started, 3),
        },
    )
    yield from judged([_probe_check(embedder), *checks])


def _refuse_another_model(
    conn: duckdb.DuckDBPyConnection, batch_id: str, model: str, dimensions: int
) -> None:
    """A replay embeds with the configured model: not into a batch embedded with another."""
    used = embedding_models(conn, batch_id)
    if used - {f"{model}/{dimensions}"}:
        raise dg.Failure(
            description=f"{batch_id} was embedded with {sorted(used)}, the replay would use"
            f" {model}/{dimensions}: materialize the whole batch instead",
            allow_retries=False,
        )


def _embed(
    context: dg.AssetExecutionContext,
    warehouse: Warehouse,
    embedder: Embedder,
    missing: list[tuple[str, str]],
    config: InferenceConfig,
    label: str,
) -> InferenceOutcome:
    """embed_into_cache; the circuit breaker fails the step (the vectors so far are kept)."""
    try:
        return embed_into_cache(
            missing, embedder, config, cache_writer(warehouse), context.log.info, label
        )
    except CircuitBreakerOpen as err:
        raise dg.Failure(description=str(err)) from err


def cache_writer(warehouse: Warehouse):
    """The transaction that adds vectors to the cache, locked against another worker adding the
    same texts at the same moment."""
    return lambda: warehouse.locked_transaction(EMBEDDING_CACHE)


def _checks(
    context: dg.AssetExecutionContext,
    warehouse: Warehouse,
    embedder: Embedder,
    config: InferenceConfig,
) -> list[Verdict]:
    """The batch's checks (its probe texts apart), the embedding drift last: against the recent
    normal batches embedded by the same model."""
    batch_id = context.partition_key
    model, dimensions = embedder.model_id(), embedder.output_dimensions()
    recent = [
        partition
        for partition, metadata in recent_batches(
            context.instance,
            CUSTOMER_EMBEDDINGS,
            exclude_partition=batch_id,
            batches=config.drift_baseline_batches,
            unless_failed=EMBEDDING_DRIFT,
        )  # fmt: skip
        if (entry := metadata.get("model")) is not None and entry.value == model
    ]
    limits = DriftLimits(
        config.drift_factor, config.drift_min_distance, config.drift_max_new_profile_share,
        config.min_vector_spread, config.drift_min_baseline_batches,
    )  # fmt: skip
    with warehouse.get_connection() as conn:
        results = embedding_check_results(
            conn, batch_id, INFERENCE_STAGE, config.dead_letter_threshold
        )
        current = batch_vectors(conn, batch_id, model, dimensions)
        baselines = [b for p in recent if (b := batch_vectors(conn, p, model, dimensions))]
    drift = embedding_drift(current, baselines) if current is not None else None
    return [*results, embedding_drift_result(drift, len(baselines), limits)]


def _probe_check(embedder: Embedder) -> Verdict:
    """The probe texts straight to the model (never the cache). A failed request is no
    verdict: the batch's own failed requests are dead-lettered and alerted already."""
    try:
        with embedder.open() as client:
            response = client.embed(PROBE_TEXTS)
    except Exception as err:  # noqa: BLE001 - whatever the model or its API raised
        return NotJudged(MODEL_PASSES_PROBES, f"the probe request failed ({type(err).__name__})")
    verdict = probe_verdict(np.asarray(response.vectors), embedder.output_dimensions())
    return probe_result(verdict, embedder.model_id())
