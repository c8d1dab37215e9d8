"""Segments: streaming k-means, stable IDs, bootstrap, retrain."""

import json

import dagster as dg
import duckdb
import numpy as np

from pipeline_project.core.segmentation import (
    VERSIONED_TABLES,
    assign_segments,
    centroid_shift,
    stable_order,
    train_segments,
)
from pipeline_project.definitions import build_definitions
from pipeline_project.resources.embeddings import HashingEmbedder, LocalE5Embedder
from pipeline_project_tests.helpers import buyer, not_judged, write_lines

SEGMENT_STAGES = [
    "raw_customers", "customers", "customer_purchases", "schema_errors",
    "customer_embeddings", "customer_segments",
]  # fmt: skip


def blobs(seed: int = 0, per_blob: int = 60) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = np.eye(3, 16, dtype=np.float32) * 5
    labels = np.repeat(np.arange(3), per_blob)
    x = centers[labels] + rng.normal(scale=0.1, size=(len(labels), 16)).astype(np.float32)
    return x, labels, rng.integers(1, 50, len(labels)).astype(float)


def test_streaming_kmeans_finds_the_clusters_reading_the_data_in_chunks():
    x, labels, weights = blobs()
    calls = []

    def chunks():
        calls.append(1)
        for start in range(0, len(x), 50):
            yield x[start : start + 50], weights[start : start + 50]

    model = train_segments(chunks, 3, epochs=2, seed=1)
    segment, distance = assign_segments(x, model.centroids)
    for blob in range(3):  # each blob lands in one segment, and segments differ
        assert len(set(segment[labels == blob])) == 1
    assert len(set(segment)) == 3
    assert model.weights.sum() == weights.sum()
    assert model.silhouette is not None and model.silhouette > 0.9
    assert np.all(distance < 1.0)
    assert len(calls) >= 3  # the data is read again per pass, never held whole


def test_fewer_distinct_vectors_than_segments_gives_fewer_segments():
    x, _, weights = blobs(per_blob=1)
    model = train_segments(lambda: iter([(x, weights)]), 8)
    assert len(model.centroids) == 3


def test_stable_order_keeps_ids_when_a_retrain_permutes_centroids():
    old = np.eye(4, 8, dtype=np.float32)
    new = old[[2, 0, 3, 1]] + 0.01
    order = stable_order(old, new)
    assert np.allclose(new[order], old + 0.01)
    assert list(stable_order(None, new)) == [0, 1, 2, 3]


def materialize(settings, instance, batch_id, stages=SEGMENT_STAGES, embedder=None, config=None):
    defs = build_definitions(settings, embedder=embedder or LocalE5Embedder())
    catalog = defs.resolve_job_def("catalog_job").execute_in_process(
        instance=instance, asset_selection=[dg.AssetKey("product_catalog")]
    )
    assert catalog.success
    if batch_id not in instance.get_dynamic_partitions("batches"):
        instance.add_dynamic_partitions("batches", [batch_id])
    result = defs.resolve_job_def("batch_pipeline_job").execute_in_process(
        partition_key=batch_id,
        instance=instance,
        asset_selection=[dg.AssetKey(s) for s in stages],
        run_config={"ops": {"customer_segments": {"config": config}}} if config else {},
    )
    assert result.success
    return defs, result


def segments_by_profile(settings, batch_id) -> dict[str, tuple[int, int]]:
    with duckdb.connect(str(settings.duckdb_path), read_only=True) as conn:
        return {
            text_hash: (segment, version)
            for text_hash, segment, version in conn.execute(
                "SELECT text_hash, segment_id, model_version FROM customer_segments WHERE batch_id = ?",
                [batch_id],
            ).fetchall()
        }


CATEGORY_MIX = ["books", "garden", "toys", "grocery", "electronics", "beauty"]


def test_first_batch_bootstraps_the_model_and_ids_stay_stable_for_the_next(
    settings, instance, catalog
):
    lines = [
        buyer(i, CATEGORY_MIX[i % 6], purchases=1 + i % 4, amount=15.0 * (1 + i % 5))
        for i in range(24)
    ]
    write_lines(settings.landing_dir / "b1.jsonl", lines)
    write_lines(settings.landing_dir / "b2.jsonl", list(reversed(lines)))

    _, first = materialize(settings, instance, "b1")
    segments_meta, model_meta = (
        next(
            m
            for m in first.asset_materializations_for_node("customer_segments")
            if m.asset_key == dg.AssetKey(k)
        )
        for k in ("customer_segments", "segment_model")
    )
    assert model_meta.metadata["model_version"].value == 1
    assert segments_meta.metadata["trained_segment_model"].value is True
    model_events = instance.fetch_materializations(dg.AssetKey("segment_model"), limit=5).records
    assert (
        len(model_events) == 1
        and "trained by customer_segments" in model_events[0].asset_materialization.description
    )

    _, second = materialize(settings, instance, "b2")
    [segments_meta] = second.asset_materializations_for_node("customer_segments")  # no bootstrap
    assert segments_meta.metadata["trained_segment_model"].value is False
    b1, b2 = segments_by_profile(settings, "b1"), segments_by_profile(settings, "b2")
    assert b1 == b2 and len(b1) >= 4
    assert {version for _, version in b1.values()} == {1}
    assert len({segment for segment, _ in b1.values()}) > 1


def test_retrain_makes_a_new_version_only_when_the_model_moved_and_keeps_segment_ids(
    settings, instance, catalog
):
    lines = [buyer(i, CATEGORY_MIX[i % 6], purchases=1 + i % 4) for i in range(24)]
    write_lines(settings.landing_dir / "b1.jsonl", lines)
    defs, _ = materialize(settings, instance, "b1")
    before = segments_by_profile(settings, "b1")

    def retrain(**config) -> dg.AssetMaterialization:
        result = defs.resolve_job_def("segment_model_job").execute_in_process(
            instance=instance, run_config={"ops": {"segment_model": {"config": config}}}
        )
        assert result.success
        [meta] = result.asset_materializations_for_node("segment_model")
        return meta

    # the same data: the same centroids and product shares, no new version
    same = retrain()
    assert same.metadata["model_version"].value == 1
    assert same.metadata["new_version"].value is False
    assert same.metadata["centroid_shift"].value < 1e-6
    assert same.metadata["affinity_shift"].value < 1e-6
    assert "v1 kept" in same.metadata["why"].value
    # a second batch of other tastes moves the model beyond the default tolerance
    other = [buyer(100 + i, CATEGORY_MIX[i % 2], purchases=4) for i in range(48)]
    write_lines(settings.landing_dir / "b2.jsonl", other)
    materialize(settings, instance, "b2")
    # with a tolerance above the move, the version is kept
    assert retrain(unchanged_tolerance=10.0).metadata["model_version"].value == 1
    moved = retrain()
    assert moved.metadata["model_version"].value == 2, moved.metadata["why"].value
    assert moved.metadata["new_version"].value is True
    # the product shares are compared only when the centroids stayed within the tolerance
    shifts = [moved.metadata[k].value for k in ("centroid_shift", "affinity_shift")
              if k in moved.metadata]  # fmt: skip
    assert max(shifts) > 0.05, shifts
    for key in ("inertia", "silhouette", "segment_sizes", "n_segments"):
        assert key in moved.metadata
    # b1 segmented again by v2: the segment IDs of its profiles stay where the model did not
    # move them (stable_order), and every customer is on v2
    materialize(settings, instance, "b1", stages=["customer_segments"])
    after = segments_by_profile(settings, "b1")
    assert {v for _, v in after.values()} == {2}
    kept = sum(after[h][0] == s for h, (s, _) in before.items())
    assert kept >= len(before) // 2, (before, after)
    with duckdb.connect(str(settings.duckdb_path), read_only=True) as conn:
        for table in VERSIONED_TABLES:  # nothing left of the versions not kept
            versions = {v for (v,) in conn.execute(f"SELECT model_version FROM {table}").fetchall()}
            assert versions <= {1, 2}, table
            if table in ("segment_model", "segment_affinity"):
                assert versions == {1, 2}, table


def test_a_retrain_whose_segments_buy_other_products_makes_a_new_version(
    settings, instance, catalog
):
    """The same profiles (so the same centroids) whose customers now also buy the category's
    next product: the segments' product shares moved, and that is a new version."""

    def lines(first: int, product_offset: int) -> list[str]:
        out = []
        for i in range(24):
            line = json.loads(buyer(first + i, CATEGORY_MIX[i % 6], purchases=1 + i % 4))
            for purchase in line["purchaseHistory"]:
                number = int(purchase["productId"][1:]) + product_offset
                purchase["productId"] = f"P{number:05d}"
            out.append(json.dumps(line))
        return out

    write_lines(settings.landing_dir / "b1.jsonl", lines(0, 0))
    defs, _ = materialize(settings, instance, "b1")
    write_lines(settings.landing_dir / "b2.jsonl", lines(100, 1))
    materialize(settings, instance, "b2")
    result = defs.resolve_job_def("segment_model_job").execute_in_process(instance=instance)
    [meta] = result.asset_materializations_for_node("segment_model")
    why = meta.metadata["why"].value
    assert meta.metadata["centroid_shift"].value <= 0.05, why
    assert meta.metadata["affinity_shift"].value > 0.05, why
    assert meta.metadata["new_version"].value is True and meta.metadata["model_version"].value == 2


def test_centroid_shift_is_relative_and_zero_for_the_same_centroids():
    old = np.array([[3.0, 4.0], [0.0, 5.0]])
    assert centroid_shift(old, old.copy()) == 0.0
    assert abs(centroid_shift(old, old + [[0.5, 0.0], [0.0, 0.0]]) - 0.1) < 1e-12


def test_a_second_embedding_model_gets_a_segment_model_of_its_own_version(
    settings, instance, catalog
):
    """Versions count across embedding models: the batches segmented with one version (the
    affinity and popularity tables' purchases) are never another model's."""
    write_lines(
        settings.landing_dir / "b1.jsonl", [buyer(i, CATEGORY_MIX[i % 6]) for i in range(12)]
    )
    write_lines(
        settings.landing_dir / "b2.jsonl", [buyer(i, CATEGORY_MIX[i % 3]) for i in range(12)]
    )
    materialize(settings, instance, "b1")
    _, hashed = materialize(settings, instance, "b2", embedder=HashingEmbedder())
    [model_meta] = [
        m for m in hashed.asset_materializations_for_node("customer_segments")
        if m.asset_key == dg.AssetKey("segment_model")
    ]  # fmt: skip
    assert model_meta.metadata["model_version"].value == 2
    assert {v for _, v in segments_by_profile(settings, "b1").values()} == {1}
    assert {v for _, v in segments_by_profile(settings, "b2").values()} == {2}


def test_retrain_is_on_demand_and_weekly(defs):
    schedule = defs.resolve_schedule_def("weekly_segment_model_retrain")
    assert schedule.cron_schedule == "0 3 * * 1"
    assert schedule.job_name == "segment_model_job"
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING


def test_segment_share_drift_warns_on_a_shifted_batch_and_not_on_a_normal_one(
    settings, instance, catalog
):
    mixed = [buyer(i, CATEGORY_MIX[i % 6], purchases=1 + i % 3) for i in range(24)]
    for i in range(3):
        write_lines(settings.landing_dir / f"base{i}.jsonl", mixed)
        materialize(settings, instance, f"base{i}")
    write_lines(settings.landing_dir / "normal.jsonl", mixed)
    write_lines(
        settings.landing_dir / "shifted.jsonl", [buyer(100 + i, "garden") for i in range(24)]
    )

    def drift(batch_id):
        _, result = materialize(settings, instance, batch_id)
        [evaluation] = [
            e
            for e in result.get_asset_check_evaluations()
            if e.check_name == "segment_share_drift_below_threshold"
        ]
        return evaluation

    normal, shifted = drift("normal"), drift("shifted")
    assert normal.passed and normal.metadata["baseline_batches"].value == 3
    assert not shifted.passed and shifted.metadata["psi"].value > 0.25
    # the shifted batch is nobody's baseline: the next normal batch is judged against the
    # four normal ones before it
    write_lines(settings.landing_dir / "after.jsonl", mixed)
    after = drift("after")
    assert after.passed and after.metadata["baseline_batches"].value == 4


def test_segment_share_drift_gives_no_verdict_before_three_earlier_batches(
    settings, instance, catalog
):
    mixed = [buyer(i, CATEGORY_MIX[i % 6], purchases=1 + i % 3) for i in range(24)]
    write_lines(settings.landing_dir / "base0.jsonl", mixed)
    materialize(settings, instance, "base0")
    write_lines(
        settings.landing_dir / "shifted.jsonl", [buyer(100 + i, "garden") for i in range(24)]
    )
    _, result = materialize(settings, instance, "shifted")
    # no verdict, neither passed nor failed: no evaluation, and the reason in the metadata
    assert "segment_share_drift_below_threshold" not in {
        e.check_name for e in result.get_asset_check_evaluations()
    }
    assert (
        "1 earlier comparable batches, fewer than 3"
        in (not_judged(result)["segment_share_drift_below_threshold"])
    )


def test_a_model_trained_on_fewer_profiles_than_the_minimum_is_retrained_by_the_next_batch(
    settings, instance, catalog
):
    """The first small batch must not rule until the weekly retrain: while the model was
    trained on fewer distinct profiles than min_training_profiles, the next batch segmented
    retrains it on everything there is (and says why); once enough, the model stays."""

    def batch(first: int) -> list[str]:
        return [buyer(first + i, CATEGORY_MIX[i % 6], purchases=1 + i % 4,
                      amount=15.0 * (1 + i % 5)) for i in range(24)]  # fmt: skip

    def trained(result) -> tuple[bool, int]:
        [segments] = [
            m for m in result.asset_materializations_for_node("customer_segments")
            if m.asset_key == dg.AssetKey("customer_segments")
        ]  # fmt: skip
        return segments.metadata["trained_segment_model"].value, segments.metadata[
            "model_version"
        ].value

    small = {"min_training_profiles": 10_000}
    for i, batch_id in enumerate(["b1", "b2"]):
        write_lines(settings.landing_dir / f"{batch_id}.jsonl", batch(100 * i))
        _, result = materialize(settings, instance, batch_id, config=small)
        assert trained(result) == (True, i + 1)
    with duckdb.connect(str(settings.duckdb_path), read_only=True) as conn:
        [(batches, profiles)] = conn.execute(
            "SELECT DISTINCT trained_batches, trained_profiles FROM segment_model"
            " WHERE model_version = 2"
        ).fetchall()
    assert batches == 2 and profiles > 0
    events = instance.fetch_materializations(dg.AssetKey("segment_model"), limit=1).records
    assert "trained on 1 batches" in events[0].asset_materialization.metadata["why"].value
    # the same batch again adds nothing to train on: no retrain
    _, again = materialize(settings, instance, "b2", config=small)
    assert trained(again) == (False, 2)
    # a model trained on enough is kept
    write_lines(settings.landing_dir / "b3.jsonl", batch(300))
    _, third = materialize(settings, instance, "b3", config={"min_training_profiles": 1})
    assert trained(third) == (False, 2)
