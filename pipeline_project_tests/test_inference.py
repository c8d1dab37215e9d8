"""customer_embeddings and core/inference.py: validation of vectors, the default local model and
the embedding cache, the circuit breaker, dead-letter replay."""

import dagster as dg
import duckdb
import numpy as np
import pytest

from pipeline_project.core.inference import CircuitBreakerOpen, run_inference, validate_vectors
from pipeline_project.definitions import build_definitions, build_resources
from pipeline_project.resources.embeddings import LocalE5Embedder, OpenAIEmbedder
from pipeline_project.sensors.alerting import run_failure_alert_sensor
from pipeline_project_tests.helpers import (
    FAKE_KEY,
    FAST_RETRIES,
    embedding_metadata,
    materialize,
    not_judged,
    openai_embedder,
    rows,
)
from pipeline_project_tests.openai_servers import FaultyEmbeddingsServer, Rule

# ---- the pure parts ---------------------------------------------------------------------


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


# ---- the asset on the local default model -----------------------------------------------


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


# ---- the circuit breaker ----------------------------------------------------------------


def test_circuit_breaker_fails_the_step_and_keeps_the_previous_batch(
    settings, instance, four_profiles, api_key
):
    healthy = FaultyEmbeddingsServer()
    with healthy.running() as url:
        assert materialize(settings, instance, openai_embedder(url)).success
    before = rows(settings, "SELECT customer_id, text_hash FROM customer_embeddings ORDER BY 1")

    # the same batch again, with another model (none of its texts cached) during an outage
    leaky = f"upstream said: bad token Bearer {FAKE_KEY}"
    outage = FaultyEmbeddingsServer(rules=[Rule("500", body=leaky)])
    with outage.running() as url:
        result = materialize(settings, instance, openai_embedder(url, model="test-embed-2"))
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
            base_url=url, api_key="x", model="m", dimensions=16, client_max_retries=0
        )
        with embedder.open() as client, pytest.raises(CircuitBreakerOpen) as raised:
            run_inference(items, client, chunk_size=1, dimensions=16, attempts=1, max_failed_chunk_share=0.1,
                          backoff_initial_seconds=0.01)  # fmt: skip
    assert raised.value.outcome.chunks_failed == 5  # 5 > 0.1 * 40 trips the breaker
    assert len(server.requests) == 5


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
        "embedding_model_passes_probe_texts": True,
    }
    assert "embedding_drift_below_threshold" in not_judged(replayed)  # the model's first batch

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
