"""Deleting a batch that should never have been loaded: every table, its raw and landing files
and its partition, and the later batches that read its purchases re-profiled, so that the
warehouse equals one where the batch never arrived. On the DuckDB file and on DuckLake."""

from __future__ import annotations

import dagster as dg
import pytest

from pipeline_project.definitions import build_definitions
from pipeline_project.resources.embeddings import HashingEmbedder
from pipeline_project.sample_data import CATEGORIES, write_catalog
from pipeline_project_tests.helpers import (
    contents,
    query,
    run_batch,
    run_stages,
    settle,
    write_lines,
)
from pipeline_project_tests.test_customer_identity import COMPARED, ORDER_BATCHES, PER_CATEGORY

# The arrival order differs by construction: without b2, b3 arrives third.
_WITHOUT_ARRIVAL = "batches"


def _run(settings, instance, batch_ids: list[str]) -> dg.Definitions:
    write_catalog(settings.catalog_path, n_products=len(CATEGORIES) * PER_CATEGORY, seed=2)
    for batch_id in batch_ids:
        write_lines(settings.landing_dir / f"{batch_id}.jsonl", ORDER_BATCHES[batch_id])
    defs = build_definitions(settings, embedder=HashingEmbedder(dimensions=32))
    assert defs.resolve_job_def("catalog_job").execute_in_process(instance=instance).success
    instance.add_dynamic_partitions("batches", batch_ids)
    for batch_id in batch_ids:
        assert run_stages(defs, instance, batch_id).success, batch_id
    settle(defs, instance)
    return defs


def _tables(settings) -> dict[str, list[tuple]]:
    tables = contents(settings, [t for t in COMPARED if t != _WITHOUT_ARRIVAL])
    tables[_WITHOUT_ARRIVAL] = query(
        settings,
        "SELECT batch_id, landing_file, content_digest, lines, accepted, profile_vocabulary"
        " FROM batches ORDER BY ALL",
    )
    return tables


def _delete(defs, instance, *batch_ids: str) -> dg.ExecuteInProcessResult:
    return defs.resolve_job_def("delete_batches").execute_in_process(
        instance=instance,
        run_config={"ops": {"delete_batch_rows": {"config": {"batch_ids": list(batch_ids)}}}},
        raise_on_error=False,
    )


def test_a_deleted_batch_leaves_the_warehouse_as_if_it_never_arrived(
    backend_settings, request, tmp_path, monkeypatch
):
    from pipeline_project_tests.conftest import backend_settings_in

    backend = backend_settings.warehouse.backend
    never = backend_settings_in(request, tmp_path / "never", monkeypatch, backend)
    (tmp_path / "never" / "home").mkdir(parents=True)
    with dg.instance_for_test(temp_dir=str(tmp_path / "never" / "home")) as instance:
        _run(never, instance, ["b0", "b1", "b3"])
        expected = _tables(never)

    settings = backend_settings_in(request, tmp_path / "deleted", monkeypatch, backend)
    (tmp_path / "deleted" / "home").mkdir(parents=True)
    with dg.instance_for_test(temp_dir=str(tmp_path / "deleted" / "home")) as instance:
        defs = _run(settings, instance, ["b0", "b1", "b2", "b3"])
        assert _tables(settings) != expected  # b2's customers and purchases are there
        result = _delete(defs, instance, "b2")
        assert result.success
        [observation] = [
            e.asset_observation_data.asset_observation
            for e in result.all_events if e.event_type_value == "ASSET_OBSERVATION"
        ]  # fmt: skip
        assert observation.metadata["rescore_batches"].value == ["b3"]  # shares customers
        assert "b2" not in instance.get_dynamic_partitions("batches")
        assert not (settings.landing_dir / "b2.jsonl").exists()
        if backend == "duckdb":
            assert not (settings.duckdb_path.parent / "warehouse.duckdb.files" / "raw_customers"
                        / "batch_id=b2").exists()  # fmt: skip
        assert query(settings, "SELECT count(*) FROM raw_customers WHERE batch_id = 'b2'") == [(0,)]
        assert settle(defs, instance) == ["b3"]  # re-profiled without b2's purchases
        assert _tables(settings) == expected

        # a batch that does not exist: said so, nothing changed
        missing = _delete(defs, instance, "b2")
        assert not missing.success
        [failure] = [e for e in missing.all_events if e.is_step_failure]
        assert "no batch 'b2'" in failure.step_failure_data.error.message
        assert _tables(settings) == expected


@pytest.mark.parametrize("batch_id", ["../b1", "b 1"])
def test_a_batch_id_that_is_no_batch_id_is_refused(settings, instance, batch_id):
    defs = build_definitions(settings, embedder=HashingEmbedder(dimensions=32))
    result = _delete(defs, instance, batch_id)
    assert not result.success
    [failure] = [e for e in result.all_events if e.is_step_failure]
    assert "not a valid batch ID" in failure.step_failure_data.error.message


def test_a_deletion_naming_one_batch_that_does_not_exist_deletes_none(settings, instance):
    settings.landing_dir.mkdir(parents=True, exist_ok=True)
    write_lines(settings.landing_dir / "b1.jsonl", ORDER_BATCHES["b1"])
    defs = build_definitions(settings, embedder=HashingEmbedder(dimensions=32))
    assert run_batch(defs, instance, "b1").success
    result = _delete(defs, instance, "b1", "b9")
    assert not result.success
    [failure] = [e for e in result.all_events if e.is_step_failure]
    assert "no batch 'b9'" in failure.step_failure_data.error.message
    assert query(settings, "SELECT count(*) FROM customers WHERE batch_id = 'b1'") == [(6,)]
    assert (settings.landing_dir / "b1.jsonl").exists()
    assert "b1" in instance.get_dynamic_partitions("batches")
