"""Erasing a customer everywhere (GDPR art. 17): every table of every batch, raw lines as
tombstones, storage rewritten so that no byte of them is left, a log without personal data; the
other customers' answers unchanged. On the DuckDB file and on DuckLake (catalog in PostgreSQL)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from pipeline_project.checks.input_checks import FILE_COMPLETE, ROWS_CONSERVED
from pipeline_project.core.erasure import ErasedMeanwhile, customer_hash
from pipeline_project.definitions import build_definitions
from pipeline_project.resources import Warehouse
from pipeline_project.resources.embeddings import HashingEmbedder
from pipeline_project.sample_data import CATEGORIES, write_catalog
from pipeline_project_tests.helpers import (
    alerts_of,
    query,
    run_stages,
    warehouse_of,
    write_lines,
)
from pipeline_project_tests.test_customer_identity import (
    ANY_CONFIDENCE,
    PER_CATEGORY,
    bought,
    product,
    record,
    uuid_of,
)

ERASED = 7  # the customer erased: in b1, b2 (twice: one line rejected as a duplicate) and b3
ERASED_EMAIL = "erase.me.7f3a9c@example.com"
OTHERS = [n for n in range(12) if n != ERASED]


def erased_record(ks: range) -> str:
    return record(ERASED, bought(ERASED, ks), email=ERASED_EMAIL)


BATCHES = {
    "b1": [record(n, bought(n, range(2))) for n in range(0, 6)] + [erased_record(range(2))],
    # the erased customer's first line is rejected (its ID comes again later in the file)
    "b2": [
        erased_record(range(1)),
        *[record(n, bought(n, range(2, 4))) for n in range(3, 12) if n != ERASED],
        erased_record(range(2, 4)),
    ],  # fmt: skip
    # in b3 they also buy in a second category: a profile text of theirs alone
    "b3": [record(n, bought(n, range(1, 5))) for n in (0, 1, 6, 8, 9, 10, 11)]
    + [
        record(
            ERASED,
            [*bought(ERASED, range(4, 5)), (product("garden", 0), 30.0, "2025-09-09T10:00:00Z")],
            email=ERASED_EMAIL,
        )
    ],  # fmt: skip
}


def forms(customer_id: str, email: str) -> dict[str, bytes]:
    """Every way the customer's ID and e-mail are written in the files: as text, as a UUID's 16
    bytes (Parquet), as DuckDB stores a UUID (a 128-bit integer, its top bit flipped, little
    endian)."""
    raw = uuid.UUID(customer_id).bytes
    upper = int.from_bytes(raw[:8], "big") ^ (1 << 63)
    lower = int.from_bytes(raw[8:], "big")
    return {
        "e-mail": email.encode(),
        "id as text": customer_id.encode(),
        "id as UUID bytes": raw,
        "id as DuckDB stores it": lower.to_bytes(8, "little") + upper.to_bytes(8, "little"),
    }


def files_under(*roots: Path) -> list[Path]:
    """The files among `roots` and under those that are folders."""
    found = [root for root in roots if root.is_file()]
    return found + [p for root in roots if root.is_dir() for p in root.rglob("*") if p.is_file()]


def found_in(paths: list[Path], patterns: dict[str, bytes]) -> dict[str, list[str]]:
    """Which of the patterns each file holds."""
    hits: dict[str, list[str]] = {}
    for path in paths:
        data = path.read_bytes()
        for name, pattern in patterns.items():
            if pattern in data:
                hits.setdefault(name, []).append(str(path))
    return hits


def catalog_dump(settings) -> bytes:
    """DuckLake: everything its catalog database holds (the rows inlined in it, the column
    statistics, the alerts), as pg_dump writes it."""
    from pgserver.postgres_server import POSTGRES_BIN_PATH

    fields = dict(part.split("=", 1) for part in settings.warehouse.ducklake_catalog.split())
    return subprocess.run(
        [str(POSTGRES_BIN_PATH / "pg_dump"), "-h", fields["host"], "-p", fields["port"],
         "-U", fields["user"], "--data-only", fields["dbname"]],
        env={**os.environ, "PGPASSWORD": os.environ["PIPELINE_DUCKLAKE_PASSWORD"]},
        check=True, capture_output=True,
    ).stdout  # fmt: skip


@pytest.fixture
def uncompressed(monkeypatch):
    """DuckDB files written without compression in this process, so that a scan for a
    customer's bytes can find them (compressed, a stored value need not appear as such); the
    lake's Parquet files are set uncompressed in the test."""
    import duckdb

    connect = duckdb.connect

    def uncompressed_connect(*args, config=None, **kwargs):
        return connect(*args, config={**(config or {}), "force_compression": "uncompressed"},
                       **kwargs)  # fmt: skip

    monkeypatch.setattr(duckdb, "connect", uncompressed_connect)


def test_an_erased_customer_leaves_no_byte_in_the_warehouse_and_nothing_else_changes(
    backend_settings, instance, uncompressed, tmp_path
):
    settings = backend_settings
    lake = settings.warehouse.backend == "ducklake"
    write_catalog(settings.catalog_path, n_products=len(CATEGORIES) * PER_CATEGORY, seed=2)
    for batch_id, lines in BATCHES.items():
        write_lines(settings.landing_dir / f"{batch_id}.jsonl", lines)
    defs = build_definitions(settings, embedder=HashingEmbedder(dimensions=32))
    warehouse = warehouse_of(settings)
    if lake:
        with warehouse.get_connection() as conn:
            conn.execute("CALL lake.set_option('parquet_compression', 'uncompressed')")
    assert defs.resolve_job_def("catalog_job").execute_in_process(instance=instance).success
    for batch_id in BATCHES:
        assert run_stages(defs, instance, batch_id, run_config=ANY_CONFIDENCE).success, batch_id

    target = uuid_of(ERASED)
    patterns = forms(target, ERASED_EMAIL)
    storage = [warehouse.files_dir]
    storage += [Path(str(settings.warehouse.ducklake_data_path))] if lake else [
        settings.duckdb_path, Path(f"{settings.duckdb_path}.wal"),
        settings.alerts_duckdb_path, Path(f"{settings.alerts_duckdb_path}.wal")]  # fmt: skip
    dagster_storage = Path(instance.root_directory)

    def everywhere() -> dict[str, list[str]]:
        hits = found_in(files_under(*storage) + files_under(dagster_storage), patterns)
        if lake:
            dump = catalog_dump(settings)
            for name in ("e-mail", "id as text"):
                if patterns[name] in dump:
                    hits.setdefault(name, []).append("the catalog database")
        return hits

    # a dead letter and an alert about them, and about someone else (which stay)
    other = uuid_of(OTHERS[0])
    with warehouse.transaction() as conn:
        for key in (target, other):
            conn.execute(
                "INSERT INTO dead_letter BY NAME SELECT 'b3' AS batch_id, 'inference' AS stage,"
                " ? AS record_key, 'inference_failed' AS reason, 'e' AS error, 3 AS attempts,"
                " ? AS payload, now() AS created_at",
                [key, f"profile of {key}"],
            )
    sink = alerts_of(settings)
    for key in (target, other):
        sink.emit(
            severity="warning",
            monitor="test",
            key=f"about:{key}",
            message=f"customer {key} looked odd",
            log=logging.getLogger(__name__),
        )
    # the embedding cache: their profile texts that nobody else uses go, the rest stays
    cache = "SELECT model, dimensions, text_hash FROM embedding_cache ORDER BY ALL"
    cache_before = query(settings, cache)
    theirs_alone = query(
        settings,
        "SELECT DISTINCT model, dimensions, text_hash FROM customer_embeddings AS e"
        " WHERE customer_id = ?::UUID AND NOT EXISTS (SELECT 1 FROM customer_embeddings AS o"
        "   WHERE o.text_hash = e.text_hash AND o.customer_id <> e.customer_id)"
        " AND NOT EXISTS (SELECT 1 FROM product_embeddings AS p WHERE p.text_hash = e.text_hash)"
        " ORDER BY ALL",
        [target],
    )
    shared = query(
        settings,
        "SELECT count(DISTINCT text_hash) FROM customer_embeddings AS e WHERE customer_id ="
        " ?::UUID AND EXISTS (SELECT 1 FROM customer_embeddings AS o"
        "   WHERE o.text_hash = e.text_hash AND o.customer_id <> e.customer_id)",
        [target],
    )
    assert theirs_alone and shared != [(0,)], "a text of theirs alone, and one shared"

    # the scan finds the customer before (it can fail), in the warehouse's own files
    before = everywhere()
    assert "e-mail" in before and "id as text" in before, before
    assert any(form.startswith("id as") and form != "id as text" for form in before), before
    rows_of = "SELECT count(*) FROM {} WHERE customer_id = ?::UUID"
    assert query(settings, rows_of.format("customers"), [target]) == [(3,)]
    others_before = _answers(settings, target)
    assert others_before["current"], "the other customers have recommendations to compare"

    result = defs.resolve_job_def("erase_customers").execute_in_process(
        instance=instance,
        run_config={
            "ops": {"erase_customer_rows": {"config": {"customers": [customer_hash(target)]}}}
        },  # fmt: skip
    )
    assert result.success
    figures = _output_metadata(result, "erase_customer_rows")
    assert figures["customers_found"] == 1 and figures["batches"] == ["b1", "b2", "b3"]
    assert figures["raw_lines"] == 4  # three records and the rejected duplicate
    assert figures["landing_files_holding_them"] == ["b1.jsonl", "b2.jsonl", "b3.jsonl"]

    # no byte of them anywhere: the warehouse's files, its staging, Dagster's storage
    assert everywhere() == {}
    for table in ("customers", "customer_purchases", "customer_embeddings", "prior_purchases",
                  "customer_segments", "validated_recommendations", "recommendations"):  # fmt: skip
        assert query(settings, rows_of.format(table), [target]) == [(0,)], table
    # the other customers' answers are what they were
    assert _answers(settings, target) == others_before
    assert query(settings, "SELECT record_key FROM dead_letter") == [(other,)]
    with sink._store().get_connection() as conn:
        assert conn.execute("SELECT alert_key FROM alerts WHERE monitor = 'test'").fetchall() == [
            (f"about:{other}",)
        ]
    gone = set(cache_before) - set(query(settings, cache))
    assert gone == set(theirs_alone), "only their own texts left the cache"
    # the log: the ID's hash, counts per table, nothing personal
    [(logged_hash, batches, raw_lines, removed)] = query(
        settings, "SELECT customer_hash, batches, raw_lines, rows_removed FROM erasure_log"
    )
    assert (logged_hash, batches, raw_lines) == (customer_hash(target), 3, 4)
    removed = json.loads(removed)
    assert removed["customers"] == 3 and removed["schema_errors"] == 1, removed
    assert removed["raw_customers"] == 4 and removed["validated_recommendations"] > 0, removed

    # every line still ends in exactly one place: validated again, b2's tombstones are blank
    again = run_stages(defs, instance, "b2", selection=["raw_customers", "customers",
                       "customer_purchases", "schema_errors"], run_config=ANY_CONFIDENCE)  # fmt: skip
    assert again.success
    checks = {e.check_name: e.passed for e in again.get_asset_check_evaluations()}
    assert checks[ROWS_CONSERVED] and checks[FILE_COMPLETE], checks
    raw = _materialization(again, "raw_customers")
    assert raw["erased_lines"] == 2 and raw["blank_lines"] == 2  # the landing file still has them
    assert query(settings, rows_of.format("customers"), [target]) == [(0,)]
    assert query(settings, "SELECT count(*) FROM customers WHERE batch_id = 'b2'") == [(8,)]
    assert everywhere() == {}


def _answers(settings, erased: str) -> dict[str, list[tuple]]:
    """The other customers' current and historical recommendations."""
    columns = "batch_id, customer_id::VARCHAR, rank, product_id, round(confidence, 9)"
    return {
        name: query(
            settings,
            f"SELECT {columns} FROM {view} WHERE customer_id <> ?::UUID ORDER BY ALL",
            [erased],
        )
        for name, view in (
            ("current", "current_recommendations"),
            ("history", "validated_recommendations"),
        )  # fmt: skip
    }


def _output_metadata(result, node: str) -> dict:
    [output] = [e for e in result.all_node_events
                if e.is_successful_output and e.node_handle.name == node]  # fmt: skip
    return {k: v.value for k, v in output.step_output_data.metadata.items()}


def _materialization(result, asset: str) -> dict:
    [materialization] = [
        m for m in result.get_asset_materialization_events()
        if m.asset_key.to_user_string() == asset
    ]  # fmt: skip
    return {k: v.value for k, v in materialization.materialization.metadata.items()}


def test_an_erasure_that_fails_halfway_already_holds_and_running_it_again_finishes_it(
    backend_settings, instance, uncompressed
):
    settings = backend_settings
    write_catalog(settings.catalog_path, n_products=len(CATEGORIES) * PER_CATEGORY, seed=2)
    write_lines(settings.landing_dir / "b1.jsonl", BATCHES["b1"])
    defs = build_definitions(settings, embedder=HashingEmbedder(dimensions=32))
    assert defs.resolve_job_def("catalog_job").execute_in_process(instance=instance).success
    assert run_stages(defs, instance, "b1", run_config=ANY_CONFIDENCE).success
    target = uuid_of(ERASED)
    config = {"ops": {"erase_customer_rows": {"config": {"customers": [customer_hash(target)]}}}}
    erase = defs.resolve_job_def("erase_customers")

    # storage cannot be rewritten (a lock held too long, a full disk): the run fails...
    def broken(self):
        raise OSError("no room left on the device")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Warehouse, "forget_deleted_rows", broken)
        failed = erase.execute_in_process(instance=instance, run_config=config,
                                          raise_on_error=False)  # fmt: skip
    assert not failed.success
    # ...but the rows are gone and the erasure holds: a re-delivery comes in tombstoned
    rows_of = "SELECT count(*) FROM customers WHERE customer_id = ?::UUID"
    assert query(settings, rows_of, [target]) == [(0,)]
    again = run_stages(defs, instance, "b1", run_config=ANY_CONFIDENCE)
    assert again.success and _materialization(again, "raw_customers")["erased_lines"] == 1
    assert query(settings, rows_of, [target]) == [(0,)]

    # running it again finishes it: the storage rewritten, nothing of them left
    result = erase.execute_in_process(instance=instance, run_config=config)
    assert result.success
    assert _output_metadata(result, "erase_customer_rows")["customers_found"] == 0
    storage = [warehouse_of(settings).files_dir]
    storage += [Path(str(settings.warehouse.ducklake_data_path))] if (
        settings.warehouse.backend == "ducklake") else [settings.duckdb_path]  # fmt: skip
    assert found_in(files_under(*storage), forms(target, ERASED_EMAIL)) == {}
    assert query(settings, "SELECT count(*) FROM erasure_log") == [(2,)]  # both runs


def test_a_write_holding_rows_read_before_an_erasure_is_refused_and_retried(backend_settings):
    settings = backend_settings
    step = warehouse_of(settings)  # a step's resource: it reads, then writes
    with step.get_connection() as conn:
        conn.execute("SELECT count(*) FROM customers").fetchall()
    with warehouse_of(settings).transaction(check_erasures=False) as conn:  # the erasure
        conn.execute(
            "INSERT INTO erasure_log BY NAME SELECT uuid() AS erasure_id, ? AS customer_hash,"
            " now() AS erased_at, 0 AS batches, 0 AS raw_lines, '{}'::JSON AS rows_removed",
            [customer_hash(uuid_of(ERASED))],
        )
    with pytest.raises(ErasedMeanwhile), step.transaction() as conn:
        conn.execute("INSERT INTO batch_publications BY NAME SELECT 'bx' AS batch_id,"
                     " now() AS published_at, 1 AS segment_model_version,"
                     " 0 AS customers, 0 AS recommendations")  # fmt: skip
    assert query(settings, "SELECT count(*) FROM batch_publications") == [(0,)]  # rolled back
    with step.transaction() as conn:  # the retry has read what the erasure left
        conn.execute("INSERT INTO batch_publications BY NAME SELECT 'bx' AS batch_id,"
                     " now() AS published_at, 1 AS segment_model_version,"
                     " 0 AS customers, 0 AS recommendations")  # fmt: skip
    assert query(settings, "SELECT count(*) FROM batch_publications") == [(1,)]


def test_an_erasure_given_a_plain_id_warns_that_the_run_keeps_it_and_never_logs_it(
    settings, instance
):
    settings.landing_dir.mkdir(parents=True, exist_ok=True)
    defs = build_definitions(settings, embedder=HashingEmbedder(dimensions=32))
    target = uuid_of(ERASED)
    result = defs.resolve_job_def("erase_customers").execute_in_process(
        instance=instance,
        run_config={"ops": {"erase_customer_rows": {"config": {"customers": [target]}}}},
    )
    assert result.success
    logs = [e.user_message for e in instance.all_logs(result.run_id) if e.user_message]
    assert any("1 of the customers were given as IDs" in m for m in logs), logs
    assert not any(target in m for m in logs)
    [(logged,)] = query(settings, "SELECT customer_hash FROM erasure_log")
    assert logged == customer_hash(target)  # nothing was held, the request is logged
    refused = defs.resolve_job_def("erase_customers").execute_in_process(
        instance=instance, raise_on_error=False,
        run_config={"ops": {"erase_customer_rows": {"config": {"customers": ["ada@x.org"]}}}},
    )  # fmt: skip
    [failure] = [e for e in refused.all_events if e.is_step_failure]
    message = failure.step_failure_data.error.message
    assert "neither a customer ID" in message and "ada@x.org" not in message


def test_a_line_naming_an_erased_id_in_any_case_or_field_or_broken_becomes_a_tombstone():
    import pyarrow as pa

    from pipeline_project.core.erasure import tombstone_erased

    erased, kept = uuid_of(ERASED), uuid_of(OTHERS[0])
    raw = [
        f'{{"id": "{erased.upper()}", "email": "{ERASED_EMAIL}"}}',
        f'{{"id": "{kept}", "referredBy": "{erased}"}}',
        f'{{"id": "{erased}", "email": ',  # cut: it would be a schema error
        f'{{"id": "{kept}"}}',
    ]
    chunk = pa.table({
        "line_no": pa.array(range(1, 5), pa.int64()), "raw": raw,
        "byte_length": pa.array([len(r) for r in raw], pa.int64()),
        "utf8_ok": [True] * 4, "read_error": pa.array([None] * 4, pa.string()),
    })  # fmt: skip
    lines, count = tombstone_erased(chunk, [customer_hash(erased)])
    assert count == 3
    assert lines["raw"].to_pylist() == ["", "", "", raw[3]]
    assert lines["byte_length"].to_pylist() == [0, 0, 0, len(raw[3])]
    assert tombstone_erased(chunk, []) == (chunk, 0)  # nothing erased: the chunk as it was
