"""customer_embeddings against a real OpenAI-compatible server on 127.0.0.1 that injects faults:
500s, 429 with Retry-After, hangs, malformed bodies, wrong counts, NaN; the key never leaks."""

import json

import duckdb
import pytest

from pipeline_project.core.inference import TextCost
from pipeline_project.definitions import build_definitions
from pipeline_project_tests.helpers import (
    FAKE_KEY,
    embedding_metadata,
    free_port,
    materialize,
    not_judged,
    openai_embedder,
    rows,
)
from pipeline_project_tests.openai_servers import FaultyEmbeddingsServer, Rule


def run_with_faults(
    settings, instance, rules, config=None, server=None, port=0, **embedder_settings
):
    """The batch up to inference against the loopback server with these fault rules."""
    server = server or FaultyEmbeddingsServer(rules=rules, port=port)
    with server.running() as url:
        result = materialize(
            settings, instance, openai_embedder(url, **embedder_settings), config=config
        )
    return server, result


def test_failing_chunk_is_dead_lettered_and_the_rest_of_the_batch_is_stored(
    settings, instance, four_profiles, api_key
):
    server, result = run_with_faults(
        settings, instance, [Rule("500", contains="garden")],
        config={"max_failed_chunk_share": 0.5}, max_batch_size=1,
    )  # fmt: skip
    assert result.success
    meta = embedding_metadata(result)
    assert meta["dead_lettered_inference_failed"] == 2 and meta["dagster/partition_row_count"] == 6
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
    server, result = run_with_faults(
        settings, instance, [Rule("429", times=1, retry_after=1.0)],
        config={"request_attempts": 1}, client_max_retries=2, max_concurrency=1,
    )  # fmt: skip
    assert result.success
    assert embedding_metadata(result)["dead_lettered"] == 0
    first, retry = server.requests[0], server.requests[1]
    assert first.action == "429" and retry.texts == first.texts
    assert retry.at - first.at >= 0.95


def test_hanging_server_times_out_and_the_chunk_is_dead_lettered(
    settings, instance, four_profiles, api_key
):
    _, result = run_with_faults(
        settings, instance, [Rule("hang", contains="toys", hang_seconds=3.0)],
        config={"request_attempts": 2, "max_failed_chunk_share": 0.5},
        request_timeout_seconds=0.5, max_batch_size=1,
    )  # fmt: skip
    assert result.success
    dead = rows(settings, "SELECT reason, attempts, error FROM dead_letter")
    assert len(dead) == 2
    assert all(r == "inference_failed" and a == 2 and "Timeout" in e for r, a, e in dead)


def test_malformed_body_wrong_count_and_nan_are_each_dead_lettered_with_their_reason(
    settings, instance, four_profiles, api_key
):
    rules = [
        Rule("malformed", contains="books"),
        Rule("wrong_count", contains="toys"),
        Rule("nan", contains="garden"),
    ]
    _, result = run_with_faults(
        settings, instance, rules, config={"max_failed_chunk_share": 0.9}, max_batch_size=1
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
    _, result = run_with_faults(
        settings, instance, [Rule("nan", contains="garden")], max_batch_size=4, max_concurrency=1
    )
    assert result.success
    assert embedding_metadata(result)["dead_lettered_invalid_output"] == 2
    assert rows(settings, "SELECT count(*) FROM customer_embeddings") == [(6,)]


def test_api_key_never_reaches_logs_metadata_or_the_dead_letter_table(
    settings, instance, four_profiles, api_key
):
    leaky = f"upstream said: bad token Bearer {FAKE_KEY}"
    server, result = run_with_faults(
        settings, instance, [Rule("500", contains="garden", body=leaky)],
        config={"max_failed_chunk_share": 0.5}, max_batch_size=1,
    )  # fmt: skip
    assert result.success
    assert all(r.authorization == f"Bearer {FAKE_KEY}" for r in server.requests)  # it was used
    dead = rows(settings, "SELECT error FROM dead_letter")
    assert dead and all("***" in e and FAKE_KEY not in e for (e,) in dead)
    for record in instance.all_logs(result.run_id):
        assert FAKE_KEY not in json.dumps(
            record.to_json() if hasattr(record, "to_json") else str(record), default=str
        )
    assert FAKE_KEY not in repr(embedding_metadata(result))
    with duckdb.connect(str(settings.duckdb_path), read_only=True) as conn:
        for (table,) in conn.execute("SELECT table_name FROM information_schema.tables").fetchall():
            assert FAKE_KEY not in str(conn.execute(f"SELECT * FROM {table}").fetchall())


def test_each_batch_reports_its_tokens_requests_and_cost_and_what_the_cache_saved(
    settings, instance, four_profiles, api_key
):
    price = 2.0  # per million tokens
    port = free_port()  # one endpoint: one model in the cache's key
    server, first = run_with_faults(
        settings, instance, [], port=port, price_per_million_tokens=price
    )
    assert first.success
    meta = embedding_metadata(first)
    texts = sum(len(r.texts) for r in server.requests)
    assert meta["texts_embedded"] == texts == 4
    assert meta["requests"] == meta["model_calls"] == len(server.requests)
    assert meta["tokens_used"] == 3 * texts  # the server's own usage count
    assert meta["tokens_counted_by"] == "the API"
    assert meta["estimated_cost"] == pytest.approx(3 * texts * price / 1e6)
    assert meta["tokens_saved_by_cache"] == 0 and meta["cost_saved_by_cache"] == 0
    # the same batch again: every text from the cache, nothing sent; with no count from the
    # API in this run, the saving is estimated from the texts' characters
    server, second = run_with_faults(
        settings, instance, [], port=port, price_per_million_tokens=price
    )
    again = embedding_metadata(second)
    assert server.requests == [] and again["requests"] == 0 and again["tokens_used"] == 0
    assert len(server.probe_requests) == 1  # the model itself is probed at every run
    assert again["cache_hits"] == 4
    assert again["tokens_saved_by_cache"] > 0
    assert again["cost_saved_by_cache"] == pytest.approx(
        again["tokens_saved_by_cache"] * price / 1e6
    )
    # the health summary adds up both runs
    defs = build_definitions(settings)
    health = defs.resolve_job_def("pipeline_health_job").execute_in_process(instance=instance)
    [summary] = health.asset_materializations_for_node("pipeline_health")
    assert summary.metadata["estimated_cost"].value == pytest.approx(meta["estimated_cost"])
    assert summary.metadata["cost_saved_by_cache"].value == pytest.approx(
        again["cost_saved_by_cache"]
    )


def test_without_a_count_from_the_model_tokens_are_estimated_from_characters():
    cost = TextCost(embedded_chars=400, cached_chars=800, price_per_million_tokens=1.0)
    estimated = cost.figures(requests=2, reported_tokens=None)
    assert estimated["tokens_counted_by"] == "estimate"
    assert (estimated["tokens_used"], estimated["tokens_saved_by_cache"]) == (100, 200)
    counted = cost.figures(requests=2, reported_tokens=50)  # 8 characters a token here
    assert (counted["tokens_used"], counted["tokens_saved_by_cache"]) == (50, 100)
    assert counted["estimated_cost"] == pytest.approx(50e-6)


def probe_check(result):
    [check] = [
        e for e in result.get_asset_check_evaluations()
        if e.check_name == "embedding_model_passes_probe_texts"
    ]  # fmt: skip
    return check, {k: v.value for k, v in check.metadata.items()}


def test_a_model_returning_well_formed_random_vectors_fails_the_probe_texts(
    settings, instance, four_profiles, api_key
):
    port = free_port()
    sane, result = run_with_faults(settings, instance, [], port=port)
    check, meta = probe_check(result)
    assert check.passed and meta["misplaced_texts"] == 0 and meta["margin"] > 0
    assert len(sane.probe_requests) == 1 and len(sane.probe_requests[0].texts) == 10
    before = rows(settings, "SELECT * FROM customer_embeddings ORDER BY ALL")
    # the same API, its model now returning random unit vectors (every vector valid): the
    # probes, judged before anything is embedded, stop the batch (blocking), naming the model
    nonsense = FaultyEmbeddingsServer(meaning=False, port=port)
    _, result = run_with_faults(settings, instance, [], server=nonsense)
    assert not result.success and nonsense.requests == []  # nothing sent but the probes
    check, meta = probe_check(result)
    assert not check.passed and check.severity.value == "ERROR"
    assert meta["misplaced_texts"] > 0 and meta["margin"] < 0
    assert "do not follow meaning" in meta["verdict"]
    assert meta["model"] in check.description and "fails its probe texts" in check.description
    assert rows(settings, "SELECT * FROM customer_embeddings ORDER BY ALL") == before


def test_a_failed_probe_request_is_no_verdict_and_leaks_nothing(
    settings, instance, four_profiles, api_key
):
    leaky = f"upstream said: bad token Bearer {FAKE_KEY}"
    down = FaultyEmbeddingsServer(rules=[Rule("500", body=leaky)], fault_probes=True)
    _, result = run_with_faults(
        settings, instance, [], server=down, config={"max_failed_chunk_share": 1.0}
    )
    assert len(down.probe_requests) == 1 and down.probe_requests[0].action == "500"
    # no verdict: no result at all (never "passed"), and why, with nothing of the answer
    assert not [
        e for e in result.get_asset_check_evaluations()
        if e.check_name == "embedding_model_passes_probe_texts"
    ]  # fmt: skip
    reason = not_judged(result)["embedding_model_passes_probe_texts"]
    assert reason.startswith("the probe request failed")
    assert FAKE_KEY not in reason
