"""The embedding_cache table's owner: what is missing, what is added, what is joined to it;
and filling it from a model, flush by flush."""

from contextlib import contextmanager

import duckdb
import numpy as np
import pytest

from pipeline_project.assets.inference import InferenceConfig
from pipeline_project.core import embedding_cache
from pipeline_project.core.embedding_client import EmbeddingResponse
from pipeline_project.core.inference import CircuitBreakerOpen, embed_into_cache
from pipeline_project.tables import WAREHOUSE_DDL

MODEL, DIMS = "m", 3


@pytest.fixture
def conn(tmp_path):
    with duckdb.connect(str(tmp_path / "w.duckdb")) as conn:
        for ddl in WAREHOUSE_DDL.values():
            conn.execute(ddl)
        conn.execute(
            "CREATE TABLE texts AS SELECT * FROM (VALUES ('a', 'text a', 1), ('a', 'text a', 2),"
            " ('b', 'text b', 3), ('c', 'text c', 4)) AS t(text_hash, text, n)"
        )
        yield conn


def add(conn, *hashes, model=MODEL):
    vectors = [(h, np.full(DIMS, i + 1, dtype=np.float32)) for i, h in enumerate(hashes)]
    embedding_cache.add_vectors(conn, model, DIMS, {h: f"text {h}" for h in hashes}, vectors)


def test_missing_texts_are_the_distinct_texts_without_a_vector_for_the_model(conn):
    source = "SELECT text_hash, text FROM texts"
    assert embedding_cache.missing_texts(conn, source, MODEL, DIMS) == [
        ("a", "text a"), ("b", "text b"), ("c", "text c"),
    ]  # fmt: skip
    add(conn, "b")
    add(conn, "a", model="another model")
    assert embedding_cache.missing_texts(conn, source, MODEL, DIMS) == [
        ("a", "text a"), ("c", "text c"),
    ]  # fmt: skip


def test_missing_texts_fill_the_sources_own_parameters(conn):
    source = "SELECT text_hash, text FROM texts WHERE n >= $least"
    assert embedding_cache.missing_texts(conn, source, MODEL, DIMS, {"least": 3}) == [
        ("b", "text b"), ("c", "text c"),
    ]  # fmt: skip


def test_the_first_vector_of_a_text_wins(conn):
    add(conn, "a")
    embedding_cache.add_vectors(conn, MODEL, DIMS, {"a": "text a"}, [("a", np.zeros(DIMS))])
    [(embedding,)] = conn.execute("SELECT embedding FROM embedding_cache").fetchall()
    assert embedding == [1.0, 1.0, 1.0]


def test_only_rows_whose_text_is_cached_are_inserted(conn):
    add(conn, "a", "c")
    conn.execute("CREATE TABLE placed (text_hash VARCHAR, n INTEGER)")
    embedding_cache.insert_cached(
        conn, "placed", "SELECT text_hash, n FROM texts WHERE n < $most", MODEL, DIMS, {"most": 4}
    )
    assert conn.execute("SELECT * FROM placed ORDER BY n").fetchall() == [("a", 1), ("a", 2)]


def test_rows_come_with_their_vector_in_the_asked_order(conn):
    add(conn, "a", "b")
    table = embedding_cache.with_vectors(
        conn, "SELECT text_hash, n FROM texts", MODEL, DIMS, order_by="n"
    )
    rows = [tuple(row.values()) for row in table.to_pylist()]
    assert rows == [("a", 1, [1.0] * 3), ("a", 2, [1.0] * 3), ("b", 3, [2.0] * 3)]


# The stage's own config, with no waits between attempts.
FAST = {"request_attempts": 1, "backoff_initial_seconds": 0.0, "backoff_max_seconds": 0.0}


def inference_config(**overrides) -> InferenceConfig:
    return InferenceConfig(
        **{
            "chunk_size": 1,
            "max_failed_chunk_share": 0.5,
            "cache_flush_texts": 2,
            **FAST,
            **overrides,
        }
    )


class Backend:
    """A model that embeds each text as [1, 2, 3], or fails on texts holding "fail"."""

    max_batch_size = 64
    max_concurrency = 1

    def model_id(self) -> str:
        return MODEL

    def output_dimensions(self) -> int:
        return DIMS

    def redact(self, text: str) -> str:
        return text

    @contextmanager
    def open(self):
        yield self

    def embed(self, texts):
        if any("fail" in t for t in texts):
            raise RuntimeError("model down")
        return EmbeddingResponse(np.tile(np.arange(1, DIMS + 1, dtype=np.float32), (len(texts), 1)))


def fill(tmp_path, missing, settings=None):
    database, flushes, log = str(tmp_path / "w.duckdb"), [], []

    @contextmanager
    def transaction():
        with duckdb.connect(database) as conn:
            yield conn
        flushes.append(1)

    try:
        outcome = embed_into_cache(
            missing, Backend(), settings or inference_config(), transaction, log.append, "t"
        )
    finally:
        with duckdb.connect(database) as conn:
            cached = conn.execute("SELECT text_hash FROM embedding_cache ORDER BY 1").fetchall()
    return outcome, cached, len(flushes), log  # fmt: skip


def test_embedded_texts_are_flushed_into_the_cache_as_they_come(tmp_path, conn):
    missing = [(f"h{i}", f"text {i}") for i in range(5)]
    outcome, cached, flushes, log = fill(tmp_path, missing)
    assert cached == [(f"h{i}",) for i in range(5)] and len(outcome.vectors) == 5
    assert flushes == 3  # every 2 texts, and the rest at the end
    assert log[-1].startswith("t: chunk 5/5 (0 failed)")


def test_an_open_circuit_breaker_keeps_the_vectors_so_far(tmp_path, conn):
    missing = [("h0", "text 0"), ("h1", "fail 1"), ("h2", "fail 2")]
    with pytest.raises(CircuitBreakerOpen):
        fill(tmp_path, missing, inference_config(cache_flush_texts=100))
    with duckdb.connect(str(tmp_path / "w.duckdb")) as db:
        assert db.execute("SELECT text_hash FROM embedding_cache").fetchall() == [("h0",)]
