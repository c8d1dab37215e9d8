"""One customer, one current answer, the same every time: customers who come back, purchases
delivered twice, batches re-delivered, run in any order, and customers served the promised N.
Each runs on the DuckDB file and on DuckLake (its catalog in a real PostgreSQL)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from pipeline_project.definitions import build_definitions
from pipeline_project.resources import Warehouse
from pipeline_project.resources.embeddings import HashingEmbedder
from pipeline_project.sample_data import CATEGORIES, write_catalog
from pipeline_project.tables import WAREHOUSE_TABLES
from pipeline_project_tests.helpers import (
    contents,
    customer,
    query,
    run_stages,
    settle,
    write_lines,
)

REPO = Path(__file__).resolve().parents[1]
PER_CATEGORY = 4  # a 40-product catalog: P00001-P00004 electronics, P00005-P00008 books, ...
LIKES = ["books", "toys", "garden"]
# Customers who buy in one category: affinity elsewhere is 0, so the confidence of the products
# after their category's is low; the rules keep them (this module is not about confidence).
# Their few purchases say nothing of most products: the profile's similarity speaks for them.
ANY_CONFIDENCE = {
    "ops": {
        "validated_recommendations": {"config": {"min_confidence": 0.0}},
        "recommendations": {"config": {"similarity_weight": 1.0}},
    }
}


def product(category: str, k: int) -> str:
    return f"P{CATEGORIES.index(category) * PER_CATEGORY + 1 + k % PER_CATEGORY:05d}"


def record(n: int, purchases: list[tuple[str, float, str]], email: str | None = None) -> str:
    """Customer n's line; purchases as (product, amount, date)."""
    return customer(
        id=f"5c1c2a3b-4d5e-4f60-8a7b-{n:012d}",
        email=email or f"c{n}@example.com",
        purchaseHistory=[{"productId": p, "amount": a, "date": d} for p, a, d in purchases],
    )


def uuid_of(n: int) -> str:
    return f"5c1c2a3b-4d5e-4f60-8a7b-{n:012d}"


def bought(n: int, ks: range) -> list[tuple[str, float, str]]:
    """Customer n's k-th purchases: a product of their favourite category, 30.0 each, a day
    apart from 2025-09-01."""
    category = LIKES[n % len(LIKES)]
    return [(product(category, k), 30.0, f"2025-09-{1 + k:02d}T10:00:00Z") for k in ks]


@pytest.fixture
def defs(backend_settings):
    write_catalog(backend_settings.catalog_path, n_products=len(CATEGORIES) * PER_CATEGORY, seed=2)
    backend_settings.landing_dir.mkdir(parents=True, exist_ok=True)
    return build_definitions(backend_settings, embedder=HashingEmbedder(dimensions=32))


def land(settings, batch_id: str, lines: list[str]) -> None:
    write_lines(settings.landing_dir / f"{batch_id}.jsonl", lines)


def load_catalog(defs, instance) -> None:
    assert defs.resolve_job_def("catalog_job").execute_in_process(instance=instance).success


# ---- 1. one customer, one current answer ---------------------------------------------------


def test_a_customer_who_comes_back_has_one_current_answer_built_from_all_their_history(
    backend_settings, defs, instance
):
    settings = backend_settings
    customers = range(12)
    # a CRM export each day: b1 the first purchases, b2 the whole history again and one new
    # purchase (each old one delivered twice), b3 only the newest purchase
    land(settings, "b1", [record(n, bought(n, range(2))) for n in customers])
    land(settings, "b2", [record(n, bought(n, range(3))) for n in customers])
    land(settings, "b3", [record(n, bought(n, range(3, 4)), email=f"new{n}@example.com")
                          for n in customers])  # fmt: skip
    load_catalog(defs, instance)
    instance.add_dynamic_partitions("batches", ["b1", "b2", "b3"])
    for batch_id in ("b1", "b2", "b3"):
        assert run_stages(defs, instance, batch_id, run_config=ANY_CONFIDENCE).success, batch_id

    # a purchase delivered twice counts once: b2 re-sent b1's, b3 relies on the earlier ones
    assert query(settings, "SELECT count(*) FROM prior_purchases WHERE batch_id = 'b2'") == [(0,)]
    assert query(
        settings,
        "SELECT count(*), sum(quantity) FROM prior_purchases WHERE batch_id = 'b3'",
    ) == [(36, 36)]
    history = query(
        settings,
        "SELECT customer_id::VARCHAR, count(*), sum(quantity) FROM customer_purchase_history"
        " GROUP BY ALL ORDER BY 1",
    )
    assert history == [(uuid_of(n), 4, 4) for n in customers]
    # the profile is everything known up to the batch: 4 shopping trips and 120 spent, not b3's
    # one purchase; its bands are the batch's quartiles of those
    from pipeline_project.core.profiles import AS_OF_SQL, profile_cuts
    from pipeline_project.tables import PRIOR_PURCHASES

    with Warehouse.from_settings(settings.warehouse).get_connection() as conn:
        [(as_of,)] = conn.execute(AS_OF_SQL, {"batch_id": "b3"}).fetchall()
        cuts = profile_cuts(conn, "b3", as_of, prior=PRIOR_PURCHASES)
    assert cuts["trip_cuts"] == [4, 4, 4] and cuts["spend_cuts"] == [120.0] * 3, cuts
    profiles = query(
        settings, "SELECT DISTINCT profile_text FROM customer_embeddings WHERE batch_id = 'b3'"
    )
    assert profiles and all("Shopping trips: occasional" in text for (text,) in profiles), profiles

    # one current record and one current list per customer, from the newest batch
    assert query(
        settings, "SELECT count(*), count(DISTINCT customer_id), min(batch_id), max(batch_id),"
        " min(email) FROM current_customers"
    ) == [(12, 12, "b3", "b3", "new0@example.com")]  # fmt: skip
    current = query(
        settings,
        "SELECT customer_id::VARCHAR, batch_id, count(*) FROM current_recommendations"
        " GROUP BY ALL ORDER BY 1",
    )
    assert [(c, b) for c, b, _ in current] == [(uuid_of(n), "b3") for n in customers]
    assert all(count == 5 for *_, count in current)
    # older batches' lists stay as history
    assert query(settings, "SELECT count(DISTINCT batch_id) FROM validated_recommendations") == [
        (3,)
    ]
    # nothing the customer bought in any batch known at the time is recommended
    rebought = query(
        settings,
        """SELECT count(*) FROM validated_recommendations AS v
           JOIN batches AS b USING (batch_id)
           JOIN customer_purchases AS p ON p.customer_id = v.customer_id
                                       AND p.product_id = v.product_id
           JOIN batches AS pb ON pb.batch_id = p.batch_id
           WHERE pb.arrival_seq <= b.arrival_seq""",
    )
    assert rebought == [(0,)]


# ---- 2. the same inputs give the same rows, in any order -------------------------------------

# b0 comes first (it trains the segment model); b1-b3 share customers two by two.
ORDER_BATCHES = {
    "b0": [record(100 + n, bought(n, range(2))) for n in range(9)],
    "b1": [record(n, bought(n, range(2))) for n in range(0, 6)],
    "b2": [record(n, bought(n, range(2, 4))) for n in range(3, 9)],
    "b3": [record(n, bought(n, range(1, 5))) for n in (0, 1, 6, 7, 8, 9)],
}
REGISTERED = list(ORDER_BATCHES)
# Every table a batch's run writes or reads, the embedding cache apart (a memo of texts seen).
COMPARED = [t for t in WAREHOUSE_TABLES if t not in ("embedding_cache", "warehouse_schema")]


def run_in_order(settings, instance, order: list[str]) -> None:
    defs = build_definitions(settings, embedder=HashingEmbedder(dimensions=32))
    for batch_id, lines in ORDER_BATCHES.items():
        land(settings, batch_id, lines)
    load_catalog(defs, instance)
    instance.add_dynamic_partitions("batches", REGISTERED)
    for batch_id in order:
        assert run_stages(defs, instance, batch_id).success, batch_id
    settle(defs, instance)


def test_batches_run_forward_backward_shuffled_or_two_at_a_time_leave_equal_tables(
    backend_settings, request, tmp_path, monkeypatch
):
    from pipeline_project_tests.conftest import backend_settings_in

    backend = backend_settings.warehouse.backend
    orders = {
        "forward": ["b0", "b1", "b2", "b3"],
        "backward": ["b0", "b3", "b2", "b1"],
        "shuffled": ["b0", *random.Random(7).sample(["b1", "b2", "b3"], 3)],
    }
    tables = {}
    for name, order in orders.items():
        settings = backend_settings_in(request, tmp_path / name, monkeypatch, backend)
        write_catalog(settings.catalog_path, n_products=len(CATEGORIES) * PER_CATEGORY, seed=2)
        (tmp_path / name / "home").mkdir()
        with dg.instance_for_test(temp_dir=str(tmp_path / name / "home")) as instance:
            run_in_order(settings, instance, order)
            tables[name] = contents(settings, COMPARED)
            if name == "forward":
                # re-running a batch without new input changes nothing
                defs = build_definitions(settings, embedder=HashingEmbedder(dimensions=32))
                for batch_id in ("b1", "b3"):
                    assert run_stages(defs, instance, batch_id).success
                assert settle(defs, instance) == []
                assert contents(settings, COMPARED) == tables["forward"]
    tables["two at a time"] = _two_at_a_time(request, tmp_path / "pair", monkeypatch, backend)
    assert tables["forward"]["validated_recommendations"]  # something to compare
    for name in ("backward", "shuffled", "two at a time"):
        for table in COMPARED:
            assert tables[name][table] == tables["forward"][table], (name, table)


def _two_at_a_time(request, root: Path, monkeypatch, backend: str) -> dict:
    """b0, then b1 and b2 in two processes at once, then b3; then re-scoring settles."""
    from pipeline_project_tests.conftest import backend_settings_in

    settings = backend_settings_in(request, root, monkeypatch, backend)
    write_catalog(settings.catalog_path, n_products=len(CATEGORIES) * PER_CATEGORY, seed=2)
    home = root / "home"
    home.mkdir()
    with dg.instance_for_test(temp_dir=str(home)) as instance:
        defs = build_definitions(settings, embedder=HashingEmbedder(dimensions=32))
        for batch_id, lines in ORDER_BATCHES.items():
            land(settings, batch_id, lines)
        load_catalog(defs, instance)
        instance.add_dynamic_partitions("batches", REGISTERED)
        assert run_stages(defs, instance, "b0").success
        env = {**os.environ, **_settings_env(settings), "DAGSTER_HOME": str(home)}
        children = [
            subprocess.Popen(
                [sys.executable, "-m", "pipeline_project_tests.batch_child", batch_id],
                env=env,
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            for batch_id in ("b1", "b2")
        ]
        for child in children:
            out, err = child.communicate(timeout=600)
            assert child.returncode == 0, err[-3000:]
            assert json.loads(out.strip().splitlines()[-1])["success"], err[-3000:]
        assert run_stages(defs, instance, "b3").success
        settle(defs, instance)
        return contents(settings, COMPARED)


def _settings_env(settings) -> dict[str, str]:
    env = {
        "PIPELINE_DUCKDB_PATH": str(settings.duckdb_path),
        "PIPELINE_LANDING_DIR": str(settings.landing_dir),
        "PIPELINE_CATALOG_PATH": str(settings.catalog_path),
        "PIPELINE_ALERTS_DUCKDB_PATH": str(settings.alerts_duckdb_path),
        "PIPELINE_WAREHOUSE_BACKEND": settings.warehouse.backend,
    }
    if settings.warehouse.backend == "ducklake":
        env["PIPELINE_DUCKLAKE_CATALOG"] = settings.warehouse.ducklake_catalog
        env["PIPELINE_DUCKLAKE_DATA_PATH"] = str(settings.warehouse.ducklake_data_path)
    return env


# ---- 3. a re-delivery replaces the whole answer ---------------------------------------------

DERIVED = [
    "customer_embeddings", "prior_purchases", "customer_segments", "recommendations",
    "recommendation_shortfalls", "validated_recommendations", "rejected_recommendations",
    "batch_publications", "dead_letter",
]  # fmt: skip


def test_a_re_delivered_file_that_fails_validation_leaves_nothing_of_the_old_file_live(
    backend_settings, defs, instance
):
    settings = backend_settings
    land(settings, "b1", [record(n, bought(n, range(2))) for n in range(10)])
    land(settings, "b2", [record(n, bought(n, range(2, 3))) for n in range(5, 15)])
    load_catalog(defs, instance)
    instance.add_dynamic_partitions("batches", ["b1", "b2"])
    assert run_stages(defs, instance, "b1", run_config=ANY_CONFIDENCE).success
    assert run_stages(defs, instance, "b2", run_config=ANY_CONFIDENCE).success
    # b2's customers 5-9 came back: their history holds b1's purchases
    assert query(settings, "SELECT count(*) FROM prior_purchases WHERE batch_id = 'b2'") == [(10,)]
    assert query(
        settings, "SELECT count(*) FROM current_recommendations WHERE batch_id = 'b1'"
    ) == [(25,)]

    # the supplier re-sends b1: other customers, 60% broken lines
    broken = ["{not json"] * 6 + [record(50 + n, bought(n, range(1))) for n in range(4)]
    land(settings, "b1", broken)
    rerun = run_stages(defs, instance, "b1", ["raw_customers", "customers", "customer_purchases",
                                               "schema_errors"])  # fmt: skip
    assert not rerun.success  # the hard ceiling stops it
    for table in DERIVED:
        assert query(settings, f"SELECT count(*) FROM {table} WHERE batch_id = 'b1'") == [(0,)], (
            table
        )
    assert query(settings, "SELECT accepted FROM batches WHERE batch_id = 'b1'") == [(False,)]
    assert query(
        settings, "SELECT count(*) FROM current_recommendations WHERE batch_id = 'b1'"
    ) == [(0,)]
    # customers 0-4 were only in the old b1: they have no current answer now
    assert query(settings, "SELECT count(*) FROM current_customers WHERE batch_id = 'b1'") == [(0,)]
    # the new content's rows are there, judged, not accepted
    assert query(settings, "SELECT count(*) FROM customers WHERE batch_id = 'b1'") == [(4,)]
    [ingestion] = [
        m for m in rerun.asset_materializations_for_node("raw_customers")
        if m.asset_key == dg.AssetKey("raw_customers")
    ]  # fmt: skip
    assert ingestion.metadata["content_changed"].value is True
    assert ingestion.metadata["rescore_batches"].value == ["b2"]
    # b2 read the old b1 as history: it is re-profiled without it
    assert settle(defs, instance) == ["b2"]
    assert query(settings, "SELECT count(*) FROM prior_purchases WHERE batch_id = 'b2'") == [(0,)]
    assert query(
        settings,
        "SELECT count(*) FROM validated_recommendations AS v JOIN customer_purchases AS p"
        " ON p.customer_id = v.customer_id AND p.product_id = v.product_id"
        " WHERE v.batch_id = 'b2' AND p.batch_id = 'b2'",
    ) == [(0,)]


# ---- 4. N recommendations where N are possible --------------------------------------------


def test_customers_get_top_n_whenever_that_many_products_clear_the_rules(
    backend_settings, defs, instance
):
    settings = backend_settings
    everything = [
        (f"P{p:05d}", 10.0, "2025-09-01T10:00:00Z") for p in range(1, len(CATEGORIES) * 4 - 1)
    ]
    lines = [record(n, bought(n, range(4))) for n in range(12)]  # their whole category
    lines.append(record(40, everything))  # all but the last two products
    land(settings, "b1", lines)
    load_catalog(defs, instance)
    # every customer is ranked over the whole catalog: what they bought never takes a place
    config = {"ops": {"validated_recommendations": {"config": {"min_confidence": 0.0}}}}
    result = run_stages(defs, instance, "b1", run_config=config)
    assert result.success
    in_stock = dict(query(settings, "SELECT product_id, in_stock FROM product_catalog"))
    counts = dict(
        query(
            settings,
            "SELECT s.customer_id::VARCHAR, count(v.product_id) FROM customer_segments AS s"
            " LEFT JOIN validated_recommendations AS v USING (batch_id, customer_id)"
            " GROUP BY ALL",
        )
    )
    assert all(counts[uuid_of(n)] == 5 for n in range(12)), counts
    left = sum(in_stock[f"P{p:05d}"] for p in (39, 40))
    assert counts[uuid_of(40)] <= left < 5
    assert query(
        settings, "SELECT customer_id::VARCHAR, candidates FROM recommendation_shortfalls"
    ) == [(uuid_of(40), left)]
    [served] = [
        e for e in result.get_asset_check_evaluations()
        if e.check_name == "every_customer_gets_top_n_or_a_reason"
    ]  # fmt: skip
    assert served.passed
    figures = {k: v.value for k, v in served.metadata.items()}
    assert figures["served_top_n"] == 12 and figures["served_fewer"] == 1
    assert figures["fewer_catalog_short"] == 1 and figures["fewer_without_reason"] == 0
    assert "1 got fewer" in served.description
    # nothing a customer bought, and nothing out of stock, took a slot
    assert query(
        settings,
        "SELECT count(*) FROM rejected_recommendations"
        " WHERE list_has_any(failed_rules, ['out_of_stock', 'already_purchased'])",
    ) == [(0,)]


# ---- after a retrain or a new catalog: what must be re-scored, and nothing else ---------------


def _three_batches(settings, defs, instance) -> None:
    """b1's customers all come back in b2 (b1 is history), b3 holds new ones."""
    land(settings, "b1", [record(n, bought(n, range(2))) for n in range(9)])
    land(settings, "b2", [record(n, bought(n, range(3))) for n in range(9)])
    land(settings, "b3", [record(20 + n, bought(n, range(1))) for n in range(9)])
    load_catalog(defs, instance)
    instance.add_dynamic_partitions("batches", ["b1", "b2", "b3"])
    for batch_id in ("b1", "b2", "b3"):
        assert run_stages(defs, instance, batch_id, run_config=ANY_CONFIDENCE).success


def test_a_retrain_re_scores_the_batches_holding_current_answers_the_same_in_any_order(
    backend_settings, defs, instance
):
    settings = backend_settings
    _three_batches(settings, defs, instance)
    history = contents(settings, ["validated_recommendations"])["validated_recommendations"]
    # another seed: other centroids (a tolerance of 1e-6: any move beyond rounding is a new version)
    trained = _retrain(defs, instance, seed=3, unchanged_tolerance=1e-6)
    assert trained.metadata["new_version"].value is True
    # b1's customers all came back in b2: b1 is history and keeps the answer it gave
    assert trained.metadata["rescore_batches"].value == ["b2", "b3"]
    assert trained.metadata["live_batches_left_on_older_versions"].value == 0
    rescored = sorted(settle(defs, instance))
    assert rescored == ["b2", "b3"]
    b1 = [row for row in history if row[0] == "b1"]
    after = contents(settings, ["validated_recommendations"])["validated_recommendations"]
    assert [row for row in after if row[0] == "b1"] == b1
    model_version = WAREHOUSE_TABLES["validated_recommendations"].column_names.index(
        "model_version"
    )
    assert {row[model_version] for row in after if row[0] != "b1"} == {2}  # the new version
    # the same version re-scored in the other order (with the configuration the re-scoring
    # runs had: the defaults) gives the same rows: affinity is the version's, not every
    # batch's purchases as they happen to be
    for batch_id in ("b3", "b2"):
        assert run_stages(
            defs, instance, batch_id, ["customer_segments", "recommendations",
                                       "validated_recommendations", "rejected_recommendations"],
        ).success  # fmt: skip
    assert contents(settings, ["validated_recommendations"])["validated_recommendations"] == after

    # the same data and seed again: the same model, no new version, nothing re-scored
    same = _retrain(defs, instance, seed=3, unchanged_tolerance=1e-6)
    assert same.metadata["new_version"].value is False, same.metadata["why"].value
    assert same.metadata["model_version"].value == 2
    assert same.metadata["centroid_shift"].value < 1e-6
    assert same.metadata["rescore_batches"].value == []
    # a new version (one segment: this data has three profiles, each a centroid of v2)
    # re-scores the newest batches holding current answers and counts the others
    newer = _retrain(defs, instance, seed=3, n_segments=1, rescore_newest_batches=1)
    assert newer.metadata["model_version"].value == 3, newer.metadata["why"].value
    assert newer.metadata["rescore_batches"].value == ["b3"]
    assert newer.metadata["live_batches_left_on_older_versions"].value == 1
    assert settle(defs, instance) == ["b3"]
    # asked again, it re-scores nothing more: b2 stays on v2 (not the next older one each time)
    again = _retrain(defs, instance, seed=3, n_segments=1, rescore_newest_batches=1)
    assert again.metadata["new_version"].value is False
    assert again.metadata["rescore_batches"].value == []
    assert again.metadata["live_batches_left_on_older_versions"].value == 1


def _retrain(defs, instance, **config) -> dg.AssetMaterialization:
    retrain = defs.resolve_job_def("segment_model_job").execute_in_process(
        instance=instance, run_config={"ops": {"segment_model": {"config": config}}}
    )
    assert retrain.success
    [trained] = retrain.asset_materializations_for_node("segment_model")
    return trained


def test_a_new_catalog_re_scores_the_batches_holding_current_answers(
    backend_settings, defs, instance
):
    settings = backend_settings
    _three_batches(settings, defs, instance)
    [(top,)] = query(
        settings,
        "SELECT product_id FROM validated_recommendations WHERE batch_id = 'b3' AND rank = 1"
        " GROUP BY 1 ORDER BY count(*) DESC LIMIT 1",
    )
    # the product most recommended in b3 goes out of stock
    path = settings.catalog_path
    path.write_text(
        "\n".join(
            line.replace(",True", ",False") if line.startswith(f"{top},") else line
            for line in path.read_text().splitlines()
        )
        + "\n"
    )
    loaded = defs.resolve_job_def("catalog_job").execute_in_process(instance=instance)
    assert loaded.success
    [embedded] = loaded.asset_materializations_for_node("product_embeddings")
    assert embedded.metadata["rescore_batches"].value == ["b2", "b3"]
    assert sorted(settle(defs, instance)) == ["b2", "b3"]
    assert query(
        settings,
        "SELECT count(*) FROM current_recommendations WHERE product_id = ?",
        [top],
    ) == [(0,)]
    assert query(
        settings, "SELECT DISTINCT catalog_version FROM batch_publications ORDER BY 1"
    ) == [(1,), (2,)]  # b1 is history: scored with the catalog of its time
