"""What a Dagster user finds on each asset: columns, row counts, where the data lives, why a
batch failed; measured on two real batches through every stage, on a real DuckDB file."""

from __future__ import annotations

import inspect
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import duckdb
import pytest
import yaml

from pipeline_project.asset_metadata import PII_ASSETS, TABLE_ASSETS, column_schema
from pipeline_project.definitions import build_definitions
from pipeline_project.instance import INSTANCE_TEMPLATE
from pipeline_project.resources.embeddings import HashingEmbedder
from pipeline_project.sample_data import generate_batch, write_catalog
from pipeline_project.settings import Settings
from pipeline_project_tests.helpers import settings_in

BATCHES = {"b001": 300, "b002": 240}
PARTITIONED = TABLE_ASSETS - {"product_catalog", "product_embeddings", "segment_model"}


@dataclass
class Deployment:
    settings: Settings
    defs: dg.Definitions
    instance: dg.DagsterInstance

    def latest(self, asset: str, partition: str | None = None) -> dict:
        records = self.instance.fetch_materializations(
            dg.AssetRecordsFilter(
                asset_key=dg.AssetKey(asset),
                asset_partitions=[partition] if partition else None,
            ),
            limit=1,
        ).records
        return dict(records[0].asset_materialization.metadata)

    def sql(self, query: str, params=None) -> list[tuple]:
        with duckdb.connect(str(self.settings.duckdb_path), read_only=True) as conn:
            return conn.execute(query, params or []).fetchall()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> Deployment:
    """The catalog, then every stage of two batches, as the demo runs them."""
    root = tmp_path_factory.mktemp("deployment")
    settings = settings_in(root)
    catalog = write_catalog(settings.landing.catalog_path, seed=1)
    for number, (batch_id, rows) in enumerate(BATCHES.items(), start=1):
        generate_batch(settings.landing_dir / f"{batch_id}.jsonl", rows, 0.05, number, catalog)
    defs = build_definitions(settings, embedder=HashingEmbedder(dimensions=32))
    overrides = yaml.safe_load(INSTANCE_TEMPLATE.read_text())
    (root / "home").mkdir()
    with dg.instance_for_test(temp_dir=str(root / "home"), overrides=overrides) as instance:
        assert defs.resolve_job_def("catalog_job").execute_in_process(instance=instance).success
        instance.add_dynamic_partitions("batches", list(BATCHES))
        for batch_id in BATCHES:
            job = defs.resolve_job_def("batch_pipeline_job")
            assert job.execute_in_process(partition_key=batch_id, instance=instance).success
        yield Deployment(settings, defs, instance)


def _spec(defs: dg.Definitions, asset: str) -> dg.AssetSpec:
    return defs.resolve_assets_def(asset).specs_by_key[dg.AssetKey(asset)]


def _columns(schema: dg.TableSchema) -> list[tuple]:
    return [(c.name, c.type, c.constraints.nullable) for c in schema.columns]


def test_every_table_asset_shows_the_columns_of_its_stored_table_before_the_first_run(
    deployment,
):
    # The definition's schema comes from the DDL; the materialization's from the table as
    # DuckDB stores it after a real run: they must agree, column by column.
    for table in sorted(TABLE_ASSETS):
        declared = _spec(deployment.defs, table).metadata["dagster/column_schema"]
        stored = deployment.latest(table).get("dagster/column_schema")
        assert stored is not None, (table, sorted(deployment.latest(table)))
        stored = stored.schema
        assert _columns(declared) == _columns(stored), table
        assert all(c.description for c in declared.columns), table
    customers = {c.name: c for c in column_schema("customers").columns}
    assert customers["email"].type == "VARCHAR"
    assert customers["email"].constraints.nullable is False
    assert customers["customer_id"].type == "UUID"
    errors = {c.name: c.type for c in column_schema("schema_errors").columns}
    assert errors["errors"] == "VARCHAR[]"


def test_row_counts_are_the_batch_s_and_the_whole_table_s(deployment):
    for table in sorted(PARTITIONED):
        [(total,)] = deployment.sql(f"SELECT count(*) FROM {table}")
        for batch_id in BATCHES:
            metadata = deployment.latest(table, batch_id)
            [(in_batch,)] = deployment.sql(
                f"SELECT count(*) FROM {table} WHERE batch_id = ?", [batch_id]
            )
            assert metadata["dagster/partition_row_count"].value == in_batch, (table, batch_id)
        # the last batch's materialization saw both batches in the table
        assert deployment.latest(table, "b002")["dagster/row_count"].value == total, table
    assert deployment.latest("raw_customers", "b002")["dagster/row_count"].value == sum(
        BATCHES.values()
    )


def test_each_asset_says_where_its_data_lives_what_it_is_and_who_owns_it(deployment):
    defs, settings = deployment.defs, deployment.settings
    with duckdb.connect(str(settings.duckdb_path), read_only=True) as conn:
        [(database,)] = conn.execute("SELECT current_database()").fetchall()
    for table in sorted(TABLE_ASSETS):
        spec = _spec(defs, table)
        assert spec.metadata["dagster/table_name"] == f"{database}.main.{table}"
        assert Path(spec.metadata["warehouse_path"].path) == settings.duckdb_path.resolve()
        assert spec.owners == ["team:data"]
        assert (spec.tags.get("pii") == "email") == (table in PII_ASSETS), table
    assert {"parquet", "duckdb"} <= _spec(defs, "raw_customers").kinds
    assert {"hashing", "duckdb"} <= _spec(defs, "customer_embeddings").kinds
    raw_file = Path(deployment.latest("raw_customers", "b001")["raw_file"].path)
    assert raw_file.is_file() and "batch_id=b001" in str(raw_file)


def test_every_asset_links_to_the_function_that_computes_it(deployment):
    for key in deployment.defs.resolve_asset_graph().get_all_asset_keys():
        assets_def = deployment.defs.resolve_assets_def(key)
        metadata = assets_def.specs_by_key[key].metadata["dagster/code_references"]
        [reference] = metadata.code_references
        function = assets_def.op.compute_fn.decorated_fn
        lines, first = inspect.getsourcelines(function)
        assert Path(reference.file_path) == Path(inspect.getsourcefile(function)), key
        # the reference is where the definition starts: its decorator or its def line
        assert first <= reference.line_number < first + len(lines), key
        assert lines[reference.line_number - first].lstrip().startswith(("@", "def ")), key


def test_the_validation_report_counts_every_field_and_rule_of_the_rejected_lines(deployment):
    for batch_id in BATCHES:
        report = deployment.latest("customers", batch_id)["validation_report"]
        rows = [record.data for record in report.records]
        # independently: every reason of the batch's rejected lines, by field and rule
        expected: Counter = Counter()
        first_line: dict = {}
        records = deployment.sql(
            "SELECT line_no, errors FROM schema_errors WHERE batch_id = ? ORDER BY line_no",
            [batch_id],
        )
        for line_no, errors in records:
            for key in {_field_and_rule(message) for message in errors}:
                expected[key] += 1
                first_line.setdefault(key, line_no)
        assert {(r["field"], r["rule"]): r["failed_lines"] for r in rows} == dict(expected)
        assert all(r["example_line"] == first_line[(r["field"], r["rule"])] for r in rows)
        assert all(r["example"].startswith(f"{r['field']}: {r['rule']}") for r in rows)
        [(valid, invalid)] = deployment.sql(
            "SELECT (SELECT count(*) FROM customers WHERE batch_id = $1),"
            " (SELECT count(*) FROM schema_errors WHERE batch_id = $1)",
            [batch_id],
        )
        for row in rows:
            assert row["share"] == pytest.approx(row["failed_lines"] / (valid + invalid), abs=1e-6)
        counts = [r["failed_lines"] for r in rows]
        assert counts == sorted(counts, reverse=True) and len(rows) >= 3


def _field_and_rule(message: str) -> tuple[str, str]:
    field, rule = message.split(": ", 1)
    return field, re.sub(r" \(got .*$", "", rule, flags=re.S)


def test_a_figure_that_does_not_exist_is_left_out_not_written_as_a_sentinel(deployment):
    # The first batch had no earlier batches: the record-count check gave no verdict, and no
    # baseline figure stands in for one.
    history = deployment.instance.event_log_storage.get_asset_check_execution_history(
        dg.AssetCheckKey(dg.AssetKey("raw_customers"), "record_count_within_expected_range"),
        limit=10,
    )
    first = [r for r in history if r.partition == "b001" and r.event is not None]
    evaluated = [
        r for r in first if hasattr(r.event.dagster_event.event_specific_data, "metadata")
    ]  # planned, never evaluated
    assert evaluated == []
    raw = deployment.latest("raw_customers", "b001")
    assert "record_count_within_expected_range" in raw["not_judged"].value
    assert "baseline_mean" not in raw and "deviation" not in raw
    for asset in ("segment_model", "customer_segments", "recommendations"):
        values = [v.value for v in deployment.latest(asset).values()]
        assert -1.0 not in values, asset


def test_a_column_whose_type_changed_fails_its_column_schema_change_check(deployment):
    instance, defs = deployment.instance, deployment.defs
    health = defs.resolve_job_def("pipeline_health_job")
    result = health.execute_in_process(instance=instance)
    before = {e.asset_key.to_user_string(): e.passed for e in result.get_asset_check_evaluations()}
    assert before["product_catalog"] and before["customers"]
    # as a release that changed the DDL would leave it: the catalog's prices stored as FLOAT
    with duckdb.connect(str(deployment.settings.duckdb_path)) as conn:
        conn.execute("ALTER TABLE product_catalog ALTER price TYPE FLOAT")
    reload = defs.resolve_job_def("catalog_job").execute_in_process(
        instance=instance, asset_selection=[dg.AssetKey("product_catalog")]
    )
    assert reload.success
    result = health.execute_in_process(instance=instance, raise_on_error=False)
    after = {e.asset_key.to_user_string(): e for e in result.get_asset_check_evaluations()}
    assert not after["product_catalog"].passed
    assert "price" in after["product_catalog"].description
    assert after["customers"].passed
