"""Helpers the test modules share: sample lines, settings in a folder, running a batch (also
up to its embeddings)."""

from __future__ import annotations

import json
import socket
import weakref
from pathlib import Path

import dagster as dg
import duckdb

from pipeline_project.core.landing_files import StoredLines, iter_raw_line_chunks, store_raw_lines
from pipeline_project.core.validation import (
    ValidationSummary,
    resolve_duplicate_ids,
    stage_duplicate_ids,
    validate_batch,
)
from pipeline_project.definitions import build_definitions
from pipeline_project.resources import AlertSink, Warehouse
from pipeline_project.resources.embeddings import OpenAIEmbedder
from pipeline_project.sample_data import CATEGORIES
from pipeline_project.settings import AlertSettings, LandingSettings, Settings, WarehouseSettings
from pipeline_project.tables import BATCH_TABLES_BY_STAGE, CUSTOMERS

# The stages of one batch up to inference (a run's asset selection).
INFERENCE_STAGES = [
    "raw_customers",
    "customers",
    "customer_purchases",
    "schema_errors",
    "customer_embeddings",
]


def settings_in(root: Path, duckdb_memory_limit: str = "512MB") -> Settings:
    """The project's default settings with every file in `root`."""
    return Settings(
        warehouse=WarehouseSettings(
            duckdb_path=root / "warehouse.duckdb", memory_limit=duckdb_memory_limit
        ),
        landing=LandingSettings(root / "landing", catalog_path=root / "catalog.csv"),
        alerts=AlertSettings(alerts_duckdb_path=root / "alerts.duckdb"),
    )


def write_lines(path: Path, lines: list[str | bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = b"".join((ln if isinstance(ln, bytes) else ln.encode()) + b"\n" for ln in lines)
    path.write_bytes(data)
    return path


def customer(**overrides) -> str:
    """One valid customer line; keyword arguments replace (or with None, remove) fields."""
    record = {
        "id": "6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b",
        "email": "anna.smith@example.com",
        "createdAt": "2023-04-01T10:00:00Z",
        "purchaseHistory": [
            {"productId": "P00001", "amount": 12.5, "date": "2024-01-02T03:04:05Z"}
        ],
    }
    for key, value in overrides.items():
        if value is None:
            record.pop(key, None)
        else:
            record[key] = value
    return json.dumps(record)


def run_batch(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    batch_id: str,
    run_config: dict | None = None,
) -> dg.ExecuteInProcessResult:
    if batch_id not in instance.get_dynamic_partitions("batches"):
        instance.add_dynamic_partitions("batches", [batch_id])
    job = defs.resolve_job_def("batch_ingestion_job")
    return job.execute_in_process(
        partition_key=batch_id, instance=instance, run_config=run_config or {}, raise_on_error=False
    )


def store_and_validate(
    warehouse: Warehouse,
    path: Path,
    batch_id: str,
    chunk_rows: int,
    max_line_bytes: int,
    drop_rules: frozenset[str] = frozenset(),
) -> tuple[StoredLines, ValidationSummary]:
    """Ingest a landing file as the batch's raw lines and validate them, as the two steps do."""
    with warehouse.replacing_raw_file(batch_id) as writer:
        stored = store_raw_lines(writer, iter_raw_line_chunks(path, chunk_rows, max_line_bytes))
    tables = BATCH_TABLES_BY_STAGE["validation"]
    superseded, found = [], []
    with warehouse.staged_batch(
        tables, batch_id, before_commit=lambda conn: superseded.extend(
            resolve_duplicate_ids(conn, batch_id, found[0]))
    ) as (conn, staging):  # fmt: skip
        summary = validate_batch(
            conn, batch_id, warehouse.raw_file(batch_id), staging,
            chunk_rows=chunk_rows, max_line_bytes=max_line_bytes, drop_rules=drop_rules,
        )  # fmt: skip
        found.append(stage_duplicate_ids(conn, staging[CUSTOMERS]))
    summary.supersede(*superseded)
    return stored, summary


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def table_rows(db: Path, table: str, batch_id: str | None = None) -> list[tuple]:
    """All rows of a table (one batch or all), sorted, without load timestamps."""
    time_columns = {"ingested_at", "detected_at"}
    with duckdb.connect(str(db), read_only=True) as conn:
        cols = [
            r[0] for r in conn.execute(f"DESCRIBE {table}").fetchall() if r[0] not in time_columns
        ]
        where = "WHERE batch_id = ?" if batch_id else ""
        sql = f"SELECT {', '.join(cols)} FROM {table} {where} ORDER BY ALL"
        return conn.execute(sql, [batch_id] if batch_id else []).fetchall()


def buyer(n: int, category: str, purchases: int = 1, amount: float = 20.0) -> str:
    """A customer whose purchases are all in one category (catalog: 50 products per category)."""
    product = f"P{CATEGORIES.index(category) * 50 + 1:05d}"
    history = [{"productId": product, "amount": amount, "date": "2025-10-01T00:00:00Z"}] * purchases
    return customer(
        id=f"6f1c2a3b-4d5e-4f60-8a7b-{n:012d}", email=f"c{n}@example.com", purchaseHistory=history
    )


# ---- customer_embeddings against the OpenAI backend (test_inference.py, test_openai_api.py) ----

FAKE_KEY = "sk-test-LEAKCHECK-0123456789"
FAST_RETRIES = {"backoff_initial_seconds": 0.01, "backoff_max_seconds": 0.05}


def openai_embedder(base_url: str, **overrides) -> OpenAIEmbedder:
    settings = dict(
        base_url=base_url, api_key=dg.EnvVar("PIPELINE_OPENAI_API_KEY"), model="test-embed",
        dimensions=16, request_timeout_seconds=2.0, client_max_retries=0, max_batch_size=2,
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


def rows(settings, sql: str, params: dict | None = None) -> list[tuple]:
    with duckdb.connect(str(settings.duckdb_path), read_only=True) as conn:
        return conn.execute(sql, params or {}).fetchall()


def rows_conserved_after(settings: Settings, batch_id: str, tamper_sql: str) -> dg.AssetCheckResult:
    """The rows_conserved check of a stored batch after `tamper_sql` changed its tables."""
    from pipeline_project.checks.input_checks import input_check_results

    warehouse = Warehouse(database=str(settings.duckdb_path))
    with warehouse.transaction() as conn:
        conn.execute(tamper_sql)
    with warehouse.get_connection() as conn:
        [conserved] = [c for c in input_check_results(conn, batch_id, 0.05, 0.5)
                       if c.check_name == "rows_conserved"]  # fmt: skip
    assert conserved.check_name == "rows_conserved"
    return conserved


# ---- any backend: reading the warehouse, running batches, letting re-scoring settle ----------

# Columns that say when a row was written: left out when two warehouses are compared.
TIME_COLUMNS = frozenset(
    {"ingested_at", "detected_at", "created_at", "trained_at", "replayed_at", "arrived_at",
     "validated_at", "published_at", "loaded_at", "applied_at"}
)  # fmt: skip


def warehouse_of(settings: Settings) -> Warehouse:
    """The warehouse resource as a step gets it (Dagster resolves the DuckLake password's
    EnvVar when a run starts; here it is read from the environment)."""
    import os

    warehouse = Warehouse.from_settings(settings.warehouse)
    if warehouse.is_lakehouse:
        password = os.environ["PIPELINE_DUCKLAKE_PASSWORD"]
        warehouse = warehouse.model_copy(update={"ducklake_password": password})
    return warehouse


def alerts_of(settings: Settings) -> AlertSink:
    """The alert sink as a step gets it (the DuckLake password's EnvVar read here)."""
    import os

    sink = AlertSink.from_settings(settings.alerts, warehouse=settings.warehouse)
    if sink.postgres:
        sink = sink.model_copy(
            update={"postgres_password": os.environ["PIPELINE_DUCKLAKE_PASSWORD"]}
        )
    return sink


def query(settings: Settings, sql: str, params=None) -> list[tuple]:
    with warehouse_of(settings).get_connection() as conn:
        return conn.execute(sql, params or []).fetchall()


def contents(settings: Settings, tables) -> dict[str, list[tuple]]:
    """warehouse_contents of the settings' warehouse."""
    return warehouse_contents(warehouse_of(settings), tables)


def warehouse_contents(warehouse: Warehouse, tables) -> dict[str, list[tuple]]:
    """Every row of each table, sorted, without the times rows were written; doubles to 9
    decimals (a sum's last bits depend on the order its parts were added in)."""
    found = {}
    with warehouse.get_connection() as conn:
        for table in tables:
            columns = [
                name
                for name, *_ in conn.execute(f"DESCRIBE {table}").fetchall()
                if name not in TIME_COLUMNS
            ]
            rows = conn.execute(f"SELECT {', '.join(columns)} FROM {table} ORDER BY ALL")
            found[table] = [
                tuple(round(v, 9) if isinstance(v, float) else v for v in row)
                for row in rows.fetchall()
            ]
    return found


def run_stages(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    batch_id: str,
    selection=None,
    run_config: dict | None = None,
    tags: dict | None = None,
) -> dg.ExecuteInProcessResult:
    """batch_pipeline_job for one batch (registered if new), all its stages or `selection`."""
    if batch_id not in instance.get_dynamic_partitions("batches"):
        instance.add_dynamic_partitions("batches", [batch_id])
    keys = [k if isinstance(k, dg.AssetKey) else dg.AssetKey(k) for k in selection or []]
    return defs.resolve_job_def("batch_pipeline_job").execute_in_process(
        partition_key=batch_id,
        instance=instance,
        asset_selection=keys or None,
        run_config=run_config or {},
        tags=tags,
        raise_on_error=False,
    )


_RESCORE_CURSORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def settle(defs: dg.Definitions, instance: dg.DagsterInstance, rounds: int = 10) -> list[str]:
    """What the daemon does with rescore_sensor: tick it (its cursor kept per instance), run
    what it asks for, until it asks for nothing; returns the batches re-run, in order."""
    sensor = defs.resolve_sensor_def("rescore_sensor")
    rerun = []
    for _ in range(rounds):
        cursor = _RESCORE_CURSORS.get(instance)
        result = sensor(dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs))
        _RESCORE_CURSORS[instance] = result.cursor
        if not result.run_requests:
            return rerun
        for request in result.run_requests:
            outcome = run_stages(
                defs, instance, request.partition_key, request.asset_selection, tags=request.tags
            )
            assert outcome.success, request
            rerun.append(request.partition_key)
    raise AssertionError(f"re-scoring did not settle in {rounds} rounds: {rerun}")


def not_judged(result: dg.ExecuteInProcessResult) -> dict[str, str]:
    """The run's checks that gave no verdict (too little data), and why: they have no
    evaluation at all, and their reason is in their asset's materialization."""
    from pipeline_project.checks.verdicts import NOT_JUDGED

    reasons: dict[str, str] = {}
    for event in result.get_asset_materialization_events():
        entry = event.event_specific_data.materialization.metadata.get(NOT_JUDGED)
        reasons |= entry.value if entry is not None else {}
    evaluated = {e.check_name for e in result.get_asset_check_evaluations()}
    assert not evaluated & set(reasons), "a check both judged and not judged"
    return reasons


def terminate(proc, timeout: float = 30) -> None:
    """Stop a server process the test started: SIGTERM, then SIGKILL if it will not go."""
    import subprocess

    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
