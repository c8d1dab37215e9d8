"""Embed texts in chunks: retries with backoff, every output validated, failures kept per text.

A chunk is one request to the model. A request that still fails after its attempts, or a
vector that is not a valid output, is reported per text so the caller can dead-letter those
records and go on with the rest. When too many chunks fail, the circuit breaker stops the
work: an outage must not quietly dead-letter a whole batch.

Below run_inference: filling the embedding cache with it, and the inference stage's writes
(customer_embeddings, its dead letters, their replay).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from itertools import islice
from typing import Protocol

import duckdb
import numpy as np
import pyarrow as pa
from tenacity import Retrying, stop_after_attempt, wait_exponential_jitter

from pipeline_project.core import dead_letters, embedding_cache
from pipeline_project.core.arrow_results import arrow_table
from pipeline_project.core.embedding_client import EmbeddingClient
from pipeline_project.progress import report
from pipeline_project.tables import CUSTOMER_EMBEDDINGS

INFERENCE_FAILED = "inference_failed"
INVALID_OUTPUT = "invalid_output"


@dataclass(frozen=True)
class TextFailure:
    reason: str  # INFERENCE_FAILED or INVALID_OUTPUT
    error: str
    attempts: int


@dataclass
class ChunkResult:
    keys: list[str]
    vectors: dict[str, np.ndarray]  # key -> valid vector
    failures: dict[str, TextFailure]
    attempts: int
    failed: bool  # the request failed, or no vector of the chunk was valid


@dataclass
class InferenceOutcome:
    chunks_total: int = 0
    chunks_done: int = 0
    chunks_failed: int = 0
    model_calls: int = 0
    tokens: int | None = None
    latencies: list[float] = field(default_factory=list)
    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    failures: dict[str, TextFailure] = field(default_factory=dict)

    def latency_percentiles(self) -> dict[str, float]:
        if not self.latencies:
            return {"p50": 0.0, "p95": 0.0, "p99": 0.0}
        p50, p95, p99 = np.percentile(self.latencies, [50, 95, 99])
        return {"p50": float(p50), "p95": float(p95), "p99": float(p99)}


class CircuitBreakerOpen(RuntimeError):
    def __init__(self, outcome: InferenceOutcome, share: float) -> None:
        super().__init__(
            f"circuit breaker open: {outcome.chunks_failed} of {outcome.chunks_total} chunks "
            f"failed (more than {share:.0%}); stopped instead of dead-lettering the batch"
        )
        self.outcome = outcome


def validate_vectors(vectors: np.ndarray, n_texts: int, dimensions: int) -> list[str | None]:
    """Per text: None when its vector is valid, else why not."""
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or vectors.shape[0] != n_texts:
        got = vectors.shape[0] if vectors.ndim >= 1 else 0
        return [f"model returned {got} vectors for {n_texts} texts"] * n_texts
    if vectors.shape[1] != dimensions:
        return [f"vector has {vectors.shape[1]} dimensions, expected {dimensions}"] * n_texts
    problems: list[str | None] = []
    for row in vectors:
        if not np.all(np.isfinite(row)):
            problems.append("vector holds NaN or infinite values")
        elif not np.any(row):
            problems.append("vector is all zeros")
        else:
            problems.append(None)
    return problems


def run_inference(
    items: Sequence[tuple[str, str]],
    client: EmbeddingClient,
    *,
    chunk_size: int,
    dimensions: int,
    max_concurrency: int = 1,
    attempts: int = 3,
    backoff_initial_seconds: float = 0.5,
    backoff_max_seconds: float = 30.0,
    max_failed_chunk_share: float = 0.25,
    redact: Callable[[str], str] = lambda text: text,
    on_chunk: Callable[[ChunkResult, InferenceOutcome], None] | None = None,
) -> InferenceOutcome:
    """Embed (key, text) pairs; returns valid vectors and failures, both by key.

    `on_chunk` runs in the calling thread after each chunk (to persist progress).
    Raises CircuitBreakerOpen once more than `max_failed_chunk_share` of all chunks failed.
    """
    if chunk_size < 1 or attempts < 1:
        raise ValueError("chunk_size and attempts must be at least 1")
    chunks = [list(items[i : i + chunk_size]) for i in range(0, len(items), chunk_size)]
    outcome = InferenceOutcome(chunks_total=len(chunks))
    lock = threading.Lock()

    def embed_chunk(chunk: list[tuple[str, str]]) -> ChunkResult:
        keys = [key for key, _ in chunk]
        texts = [text for _, text in chunk]
        retrying = Retrying(
            stop=stop_after_attempt(attempts),
            wait=wait_exponential_jitter(
                multiplier=backoff_initial_seconds, max=backoff_max_seconds
            ),
            reraise=True,
        )
        tries = 0
        try:
            for attempt in retrying:
                with attempt:
                    tries += 1
                    started = time.perf_counter()
                    try:
                        response = client.embed(texts)
                    finally:
                        with lock:
                            outcome.model_calls += 1
                            outcome.latencies.append(time.perf_counter() - started)
        except Exception as err:  # noqa: BLE001 - any failure of the call dead-letters the chunk
            error = redact(f"{type(err).__name__}: {err}")[:2000]
            failure = TextFailure(INFERENCE_FAILED, error, tries)
            return ChunkResult(keys, {}, dict.fromkeys(keys, failure), tries, failed=True)
        if response.tokens is not None:
            with lock:
                outcome.tokens = (outcome.tokens or 0) + response.tokens
        problems = validate_vectors(response.vectors, len(keys), dimensions)
        vectors = {
            k: response.vectors[i]
            for i, (k, p) in enumerate(zip(keys, problems, strict=True))
            if p is None
        }
        failures = {
            k: TextFailure(INVALID_OUTPUT, p, tries)
            for k, p in zip(keys, problems, strict=True)
            if p is not None
        }
        return ChunkResult(keys, vectors, failures, tries, failed=not vectors)

    workers = max(1, max_concurrency)
    queue = iter(chunks)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        # Only `workers` requests in flight: nothing queued is sent after the breaker trips.
        pending: set[Future] = {pool.submit(embed_chunk, c) for c in islice(queue, workers)}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                result = future.result()
                outcome.chunks_done += 1
                outcome.chunks_failed += int(result.failed)
                outcome.vectors.update(result.vectors)
                outcome.failures.update(result.failures)
                if on_chunk is not None:
                    on_chunk(result, outcome)
            if outcome.chunks_failed > max_failed_chunk_share * outcome.chunks_total:
                raise CircuitBreakerOpen(outcome, max_failed_chunk_share)
            pending |= {pool.submit(embed_chunk, c) for c in islice(queue, len(done))}
    return outcome


# ---- filling the embedding cache ---------------------------------------------------------


class EmbeddingBackend(Protocol):
    """An embedding model as embed_into_cache uses it (every Embedder resource is one)."""

    max_batch_size: int
    max_concurrency: int

    def model_id(self) -> str: ...

    def output_dimensions(self) -> int: ...

    def redact(self, text: str) -> str: ...

    def open(self) -> AbstractContextManager[EmbeddingClient]: ...


class ModelCallSettings(Protocol):
    """How the model is called (the fields of the stages' InferenceConfig)."""

    chunk_size: int
    request_attempts: int
    backoff_initial_seconds: float
    backoff_max_seconds: float
    max_failed_chunk_share: float
    cache_flush_texts: int


def embed_into_cache(
    missing: Sequence[tuple[str, str]],
    backend: EmbeddingBackend,
    settings: ModelCallSettings,
    transaction: Callable[[], AbstractContextManager[duckdb.DuckDBPyConnection]],
    log: Callable[[str], None],
    label: str,
) -> InferenceOutcome:
    """Embed (text_hash, text) pairs with the backend's model, adding the valid vectors to the
    cache as they come, each flush in one short `transaction()`.

    When the circuit breaker opens, the vectors so far are kept (the retry will not pay for
    them again) and CircuitBreakerOpen is raised.
    """
    model, dimensions = backend.model_id(), backend.output_dimensions()
    texts = dict(missing)
    pending: list[tuple[str, np.ndarray]] = []
    started = time.perf_counter()

    def flush() -> None:
        if pending:
            with transaction() as conn:
                embedding_cache.add_vectors(conn, model, dimensions, texts, pending)
            pending.clear()

    def on_chunk(result: ChunkResult, outcome: InferenceOutcome) -> None:
        pending.extend(result.vectors.items())
        if len(pending) >= settings.cache_flush_texts:
            flush()
        seconds = time.perf_counter() - started
        log(
            f"{label}: chunk {outcome.chunks_done}/{outcome.chunks_total} "
            f"({outcome.chunks_failed} failed), {len(outcome.vectors) / seconds:.1f} texts/s"
        )
        report(label, "embed", outcome.chunks_done, outcome.chunks_total, "chunks")

    try:
        with backend.open() as client:
            outcome = run_inference(
                missing,
                client,
                chunk_size=max(1, min(settings.chunk_size, backend.max_batch_size)),
                dimensions=dimensions,
                max_concurrency=backend.max_concurrency,
                attempts=settings.request_attempts,
                backoff_initial_seconds=settings.backoff_initial_seconds,
                backoff_max_seconds=settings.backoff_max_seconds,
                max_failed_chunk_share=settings.max_failed_chunk_share,
                redact=backend.redact,
                on_chunk=on_chunk,
            )
    except CircuitBreakerOpen:
        flush()
        raise
    flush()
    return outcome


# ---- the inference stage's writes ----------------------------------------------------------


def failures_table(outcome: InferenceOutcome) -> pa.Table:
    """The texts the model failed on, with reason, error and attempts."""
    return pa.table(
        {
            "text_hash": pa.array(list(outcome.failures), pa.string()),
            "reason": pa.array([f.reason for f in outcome.failures.values()], pa.string()),
            "error": pa.array([f.error for f in outcome.failures.values()], pa.string()),
            "attempts": pa.array([f.attempts for f in outcome.failures.values()], pa.int32()),
        }
    )


# The staged profiles ($profiles, see profiles.stage_profiles) as customer_embeddings rows.
_STAGED_ROWS_SQL = """
SELECT $batch_id AS batch_id, line_no, customer_id, $model AS model, $dimensions AS dimensions,
       text_hash, profile_text
FROM read_parquet($profiles)
"""
_STAGED_FAILURES_SQL = """
SELECT p.customer_id::VARCHAR AS record_key, f.reason, f.error, f.attempts,
       p.profile_text AS payload
FROM read_parquet($profiles) AS p JOIN inference_failures AS f USING (text_hash)
"""


def store_embeddings(
    conn: duckdb.DuckDBPyConnection,
    batch_id: str,
    stage: str,
    model: str,
    dimensions: int,
    profiles: str,
    outcome: InferenceOutcome,
) -> dict[str, int]:
    """Each customer of the staged `profiles` into customer_embeddings when its text is in the
    cache, or into dead_letter with its text's failure; returns the dead letters per reason."""
    params = {"batch_id": batch_id, "profiles": profiles}
    embedding_cache.insert_cached(
        conn, CUSTOMER_EMBEDDINGS, _STAGED_ROWS_SQL, model, dimensions, params
    )
    conn.register("inference_failures", failures_table(outcome))
    dead_letters.add(conn, batch_id, stage, _STAGED_FAILURES_SQL, {"profiles": profiles})
    conn.unregister("inference_failures")
    return dead_letters.counts_by_reason(conn, batch_id, stage)


def embedding_models(conn: duckdb.DuckDBPyConnection, batch_id: str) -> set[str]:
    """The models (as "model/dimensions") the batch's customer_embeddings come from."""
    return {
        m for (m,) in conn.execute(
            "SELECT DISTINCT model || '/' || dimensions FROM customer_embeddings"
            " WHERE batch_id = ?", [batch_id],
        ).fetchall()
    }  # fmt: skip


def replay_candidates(
    conn: duckdb.DuckDBPyConnection, batch_id: str, stage: str, model: str, dimensions: int
) -> tuple[pa.Table, list[tuple[str, str]]]:
    """The batch's dead-lettered customers waiting for a replay, with the profile they had
    (line_no, customer_id, profile_text, text_hash), and those texts the model has no vector
    for yet."""
    pending = dead_letters.pending_payloads(conn, batch_id, stage)
    conn.register("pending_dead_letters", pending)
    try:
        replay = arrow_table(
            conn,
            "SELECT c.line_no, c.customer_id, d.payload AS profile_text,"
            " md5(d.payload) AS text_hash FROM pending_dead_letters AS d"
            " JOIN customers AS c ON c.customer_id::VARCHAR = d.record_key"
            " WHERE c.batch_id = $batch_id",
            {"batch_id": batch_id},
        )
    finally:
        conn.unregister("pending_dead_letters")
    conn.register("replay", replay)
    try:
        missing = embedding_cache.missing_texts(
            conn, "SELECT text_hash, profile_text AS text FROM replay", model, dimensions
        )
    finally:
        conn.unregister("replay")
    return replay, missing


# Customers of the replay now in the cache get their row (once); see merge_replay.
_REPLAYED_ROWS_SQL = """
SELECT $batch_id AS batch_id, r.line_no, r.customer_id, $model AS model,
       $dimensions AS dimensions, r.text_hash, r.profile_text
FROM replay AS r
WHERE NOT EXISTS (
    SELECT 1 FROM customer_embeddings AS e
    WHERE e.batch_id = $batch_id AND e.customer_id = r.customer_id)
"""
_EMBEDDED_SQL = "SELECT customer_id::VARCHAR FROM customer_embeddings WHERE batch_id = $batch_id"
_REPLAY_FAILURES_SQL = """
SELECT r.customer_id::VARCHAR AS record_key, f.reason, f.error, f.attempts
FROM replay AS r JOIN replay_failures AS f USING (text_hash)
"""


@dataclass(frozen=True)
class ReplayOutcome:
    replayed: int  # dead letters marked replayed
    embedded: int  # the batch's customer_embeddings rows after the merge
    still_dead: int  # the batch's dead letters still pending


def merge_replay(
    conn: duckdb.DuckDBPyConnection,
    batch_id: str,
    stage: str,
    model: str,
    dimensions: int,
    replay: pa.Table,
    outcome: InferenceOutcome,
) -> ReplayOutcome:
    """Idempotent merge of a replay (`replay`: replay_candidates): customers now in the cache
    get their row and their dead letter is marked replayed; the others keep their dead
    letter, with the replay's error and attempts added."""
    conn.register("replay", replay)
    conn.register("replay_failures", failures_table(outcome))
    embedding_cache.insert_cached(
        conn, CUSTOMER_EMBEDDINGS, _REPLAYED_ROWS_SQL, model, dimensions, {"batch_id": batch_id}
    )
    replayed = dead_letters.mark_replayed(conn, batch_id, stage, _EMBEDDED_SQL)
    dead_letters.record_retry_failures(conn, batch_id, stage, _REPLAY_FAILURES_SQL)
    conn.unregister("replay")
    conn.unregister("replay_failures")
    [(embedded,)] = conn.execute(
        "SELECT count(*) FROM customer_embeddings WHERE batch_id = ?", [batch_id]
    ).fetchall()
    return ReplayOutcome(replayed, embedded, dead_letters.count_pending(conn, batch_id, stage))


# Without a count from the API, a token is taken to be four characters (the usual rule of
# thumb for English text and OpenAI's tokenizers).
CHARS_PER_TOKEN = 4.0


@dataclass(frozen=True)
class TextCost:
    """Characters of the texts a batch sent to the model and of those the cache served."""

    embedded_chars: int
    cached_chars: int
    price_per_million_tokens: float

    def figures(self, requests: int, reported_tokens: int | None) -> dict[str, float | int | str]:
        """Tokens used (the API's count, else estimated) and saved by the cache, their cost."""
        per_char = (
            reported_tokens / self.embedded_chars
            if reported_tokens and self.embedded_chars
            else 1 / CHARS_PER_TOKEN
        )
        used = (
            reported_tokens
            if reported_tokens is not None
            else round(self.embedded_chars * per_char)
        )
        saved = round(self.cached_chars * per_char)
        price = self.price_per_million_tokens / 1_000_000
        return {
            "requests": requests,
            "tokens_used": used,
            "tokens_counted_by": "the API" if reported_tokens is not None else "estimate",
            "tokens_saved_by_cache": saved,
            "estimated_cost": round(used * price, 6),
            "cost_saved_by_cache": round(saved * price, 6),
            "price_per_million_tokens": self.price_per_million_tokens,
        }


def batch_figures(
    outcome: InferenceOutcome,
    *,
    cost: TextCost,
    customers_in: int,
    distinct_profiles: int,
    cache_hits: int,
    prior_purchases: int,
    returning_customers: int,
    dead_by_reason: Mapping[str, int],
    dead_letter_total: int,
    model: str,
    dimensions: int,
    seconds: float,
    usage: Mapping[str, float],
) -> dict[str, int | float | str]:
    """The figures of one batch's inference, for its materialization; `usage`: the step's
    time, CPU and memory figures."""
    dead_lettered = sum(dead_by_reason.values())
    latency = outcome.latency_percentiles()
    figures = {
        "dagster/partition_row_count": customers_in - dead_lettered,
        "customers_in": customers_in,
        "dead_lettered": dead_lettered,
        # failed + invalid outputs over customers: the batch's model error rate
        "error_rate": round(dead_lettered / customers_in, 6) if customers_in else 0.0,
        "dead_letter_total": dead_letter_total,
        "dead_lettered_inference_failed": dead_by_reason.get(INFERENCE_FAILED, 0),
        "dead_lettered_invalid_output": dead_by_reason.get(INVALID_OUTPUT, 0),
        "distinct_profiles": distinct_profiles,
        # purchases of the batch's customers that earlier batches delivered (their history)
        "prior_purchases": prior_purchases,
        "returning_customers": returning_customers,
        "cache_hits": cache_hits,
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
        **usage,
    }
    if outcome.tokens is not None:
        figures["tokens"] = outcome.tokens
    return {**figures, **cost.figures(outcome.model_calls, outcome.tokens)}
