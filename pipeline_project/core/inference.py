"""Embed texts in chunks: retries with backoff, every output validated, failures kept per text.

A chunk is one request to the model. A request that still fails after its attempts, or a
vector that is not a valid output, is reported per text so the caller can dead-letter those
records and go on with the rest. When too many chunks fail, the circuit breaker stops the
work: an outage must not quietly dead-letter a whole batch.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from itertools import islice

import numpy as np
from tenacity import Retrying, stop_after_attempt, wait_exponential_jitter

from pipeline_project.core.embedding_client import EmbeddingClient

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
