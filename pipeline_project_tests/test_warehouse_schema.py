"""The warehouse can change shape: it records its schema version, a warehouse written by an
older version of the project opens and is migrated, a newer one is refused with what to do,
and every insert matches columns by name. On the DuckDB file and on DuckLake."""

from __future__ import annotations

import shutil
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline_project.definitions import build_definitions
from pipeline_project.resources import warehouse as warehouse_module
from pipeline_project.resources.embeddings import HashingEmbedder
from pipeline_project.resources.lakehouse import attach_ducklake
from pipeline_project.sample_data import generate_batch, write_catalog
from pipeline_project.schema import SCHEMA_VERSION, WarehouseSchemaError
from pipeline_project.tables import RECOMMENDATIONS, lakehouse_ddl
from pipeline_project_tests.helpers import query, run_stages, warehouse_of

V1 = Path(__file__).parent / "fixtures" / "warehouse_v1"
V1_TABLES = sorted(p.stem for p in V1.glob("*.parquet"))


def build_v1_warehouse(settings) -> None:
    """The fixture's warehouse, as the project wrote it before schema versions, on the
    settings' backend: its DDL, its rows and its raw files."""
    schema = (V1 / "schema.sql").read_text()
    lake = settings.warehouse.backend == "ducklake"
    if lake:
        import os

        conn = duckdb.connect(config={"autoinstall_known_extensions": False})
        attach_ducklake(
            conn,
            catalog=settings.warehouse.ducklake_catalog,
            password=os.environ["PIPELINE_DUCKLAKE_PASSWORD"],
            data_path=str(settings.warehouse.ducklake_data_path / "tables") + "/",
        )
        schema = lakehouse_ddl(schema)
        files = settings.warehouse.ducklake_data_path / "pipeline_files"
    else:
        settings.duckdb_path.parent.mkdir(parents=True, exist_ok=True)
        conn = duckdb.connect(str(settings.duckdb_path))
        files = settings.duckdb_path.with_name(f"{settings.duckdb_path.name}.files")
    for statement in filter(str.strip, schema.split(";")):
        conn.execute(statement)
    for table in V1_TABLES:
        conn.execute(
            f"INSERT INTO {table} SELECT * FROM read_parquet(?)", [str(V1 / f"{table}.parquet")]
        )
    conn.close()
    shutil.copytree(V1 / "raw_customers", files / "raw_customers")


@pytest.fixture
def v1(backend_settings):
    build_v1_warehouse(backend_settings)
    warehouse_module._LAKES.clear()  # as a new process would: attach (and check) again
    return backend_settings


def test_a_warehouse_of_the_previous_version_opens_migrated_and_runs(v1, instance):
    settings = v1
    before = {
        table: query(settings, f"SELECT * FROM {table} ORDER BY ALL")
        for table in ("customers", "validated_recommendations")
    }
    assert query(settings, "SELECT max(version) FROM warehouse_schema") == [(SCHEMA_VERSION,)]
    # what it held is registered: batches in order, accepted, published; the model's affinity
    assert query(settings, "SELECT batch_id, arrival_seq, accepted FROM batches ORDER BY 1") == [
        ("b001", 0, True),
        ("b002", 1, True),
    ]
    assert query(settings, "SELECT batch_id FROM batch_publications ORDER BY 1") == [
        ("b001",),
        ("b002",),
    ]
    [(affinity,)] = query(settings, "SELECT count(*) FROM segment_affinity")
    assert affinity > 0
    assert query(settings, "SELECT catalog_version, products FROM catalog_versions") == [(1, 60)]
    [(current,)] = query(settings, "SELECT count(*) FROM current_recommendations")
    assert current == sum(
        n for (n,) in query(settings, "SELECT count(*) FROM validated_recommendations")
    )
    for table, rows in before.items():  # nothing of the old rows changed
        assert query(settings, f"SELECT * FROM {table} ORDER BY ALL") == rows

    # and the new code runs a batch on it
    catalog = write_catalog(settings.catalog_path, n_products=60, seed=3)
    generate_batch(settings.landing_dir / "b003.jsonl", 30, 0.1, 103, catalog, population=5)
    defs = build_definitions(settings, embedder=HashingEmbedder(dimensions=32))
    assert defs.resolve_job_def("catalog_job").execute_in_process(instance=instance).success
    instance.add_dynamic_partitions("batches", ["b001", "b002", "b003"])
    assert run_stages(defs, instance, "b003").success
    assert query(settings, "SELECT batch_id, arrival_seq FROM batches WHERE batch_id = 'b003'") == [
        ("b003", 2)
    ]
    assert query(settings, "SELECT count(*) FROM batch_publications") == [(3,)]
    [(b003,)] = query(
        settings, "SELECT count(*) FROM current_recommendations WHERE batch_id = 'b003'"
    )
    assert b003 > 0


def test_a_warehouse_of_a_newer_version_is_refused_with_what_to_do(backend_settings):
    settings = backend_settings
    with warehouse_of(settings).transaction() as conn:  # a new warehouse, then "upgraded"
        conn.execute(
            "INSERT INTO warehouse_schema (version, project_version, applied_at)"
            " VALUES (99, '9.0', now())"
        )
    warehouse_module._LAKES.clear()
    with pytest.raises(WarehouseSchemaError) as refused, warehouse_of(settings).get_connection():
        pass
    message = str(refused.value)
    assert "schema version 99" in message and f"up to {SCHEMA_VERSION}" in message
    assert "Upgrade pipeline_project" in message


def test_a_column_changed_by_hand_stops_the_migration_and_says_which(settings):
    build_v1_warehouse(settings)
    with duckdb.connect(str(settings.duckdb_path)) as conn:
        conn.execute("ALTER TABLE customers ADD COLUMN loyalty_tier VARCHAR")
    refused = pytest.raises(WarehouseSchemaError, match="customers has columns .*loyalty_tier")
    with refused, warehouse_of(settings).get_connection():
        pass
    with duckdb.connect(str(settings.duckdb_path), read_only=True) as conn:  # rolled back
        tables = {t for (t,) in conn.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    assert "batches" not in tables and "warehouse_schema" not in tables


def test_staged_rows_are_matched_to_columns_by_name_not_position(backend_settings):
    """Two DOUBLE columns staged in another order than the table's are stored in their own
    columns (a positional insert stored them swapped, without an error)."""
    warehouse = warehouse_of(backend_settings)
    row = {
        "batch_id": ["b"], "line_no": [1], "customer_id": ["00000000-0000-4000-8000-000000000001"],
        "rank": pa.array([1], pa.int32()), "product_id": ["P1"],
        "segment_id": pa.array([0], pa.int32()), "confidence": [0.8], "predicted_value": [42.0],
        "segment_affinity": [0.5], "similarity": [0.1], "similarity_score": [0.2],
        "model_version": pa.array([1], pa.int32()),
    }  # fmt: skip
    shuffled = pa.table({k: row[k] for k in reversed(list(row))})
    with warehouse.staged_batch([RECOMMENDATIONS], "b") as (_, staging):
        pq.write_table(shuffled, staging[RECOMMENDATIONS] / "part-0.parquet")
    assert query(
        backend_settings, "SELECT confidence, predicted_value, similarity FROM recommendations"
    ) == [(0.8, 42.0, 0.1)]


def test_every_insert_of_the_code_names_its_columns():
    """No positional INSERT is left in the project: `INSERT INTO t SELECT ...` or `VALUES`
    without a column list or BY NAME would store a reordered or added column wrongly."""
    import re

    package = Path(__file__).resolve().parents[1] / "pipeline_project"
    positional = []
    for path in package.rglob("*.py"):
        for match in re.finditer(r"INSERT INTO \{?\w+\}?\s*[\"']?\s*\+?\s*(\S*)", path.read_text()):
            if match.group(1) not in ("BY", "(") and not match.group(1).startswith("("):
                positional.append(f"{path.name}: {match.group(0)}")
    assert positional == []
