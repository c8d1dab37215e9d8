"""Declarative automation: a batch's embeddings are requested once its validation lands and passed."""

import dagster as dg

from pipeline_project_tests.helpers import customer, run_batch, write_lines


def requested(result) -> set[tuple[str, str]]:
    return {
        (key.to_user_string(), partition)
        for key, subset in ((r.key, r.true_subset) for r in result.results)
        if subset.size
        for partition in (
            subset.get_internal_subset_value().get_partition_keys()
            if subset.is_partitioned
            else [None]
        )
    }


def test_embeddings_are_requested_after_validation_and_only_once(defs, instance, settings):
    write_lines(settings.landing_dir / "b1.jsonl", [customer()])
    tick = dg.evaluate_automation_conditions(defs=defs, instance=instance)
    assert ("customer_embeddings", "b1") not in requested(tick)

    assert run_batch(defs, instance, "b1").success  # ingestion + validation, no catalog yet
    tick = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=tick.cursor)
    assert ("customer_embeddings", "b1") in requested(tick)

    tick = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=tick.cursor)
    assert ("customer_embeddings", "b1") not in requested(tick)


def test_a_batch_above_the_hard_ceiling_does_not_flow_downstream(defs, instance, settings):
    write_lines(settings.landing_dir / "good.jsonl", [customer()])
    write_lines(settings.landing_dir / "bad.jsonl", ["{", "[]", customer()])
    tick = dg.evaluate_automation_conditions(defs=defs, instance=instance)
    assert run_batch(defs, instance, "good").success
    assert not run_batch(defs, instance, "bad").success
    tick = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=tick.cursor)
    batches = {p for key, p in requested(tick) if key == "customer_embeddings"}
    assert batches == {"good"}


def test_a_catalog_reload_does_not_re_embed_every_batch(defs, instance, settings, catalog):
    write_lines(settings.landing_dir / "b1.jsonl", [customer()])
    tick = dg.evaluate_automation_conditions(defs=defs, instance=instance)
    assert run_batch(defs, instance, "b1").success
    tick = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=tick.cursor)
    assert defs.resolve_job_def("catalog_job").execute_in_process(instance=instance).success
    tick = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=tick.cursor)
    assert not {p for key, p in requested(tick) if key == "customer_embeddings"}


def test_each_downstream_stage_follows_its_upstream_once(settings, instance, catalog):
    """Acts as the daemon: each tick's requests are run, until a tick requests nothing."""
    from pipeline_project.definitions import build_definitions
    from pipeline_project.resources.embeddings import LocalE5Embedder

    defs = build_definitions(settings, embedder=LocalE5Embedder())
    write_lines(settings.landing_dir / "b1.jsonl", [customer()])
    tick = dg.evaluate_automation_conditions(defs=defs, instance=instance)
    assert run_batch(defs, instance, "b1").success
    assert defs.resolve_job_def("catalog_job").execute_in_process(instance=instance).success
    job = defs.resolve_job_def("batch_pipeline_job")
    requests: list[set[str]] = []
    for _ in range(6):
        tick = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=tick.cursor)
        wanted = {key for key, partition in requested(tick) if partition == "b1"}
        if not wanted:
            break
        requests.append(wanted)
        result = job.execute_in_process(
            partition_key="b1", instance=instance, asset_selection=[dg.AssetKey(k) for k in wanted]
        )
        assert result.success
    downstream = {
        "customer_embeddings", "customer_segments", "recommendations",
        "validated_recommendations", "rejected_recommendations",
    }  # fmt: skip
    assert set().union(*requests) == downstream
    assert sum(len(r) for r in requests) == len(downstream)  # none requested twice
