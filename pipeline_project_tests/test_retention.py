"""Retention: what is older than its retention is deleted, what is younger or still needed stays.

The real pipeline runs small batches into a real warehouse (the DuckDB file, and DuckLake with
its catalog in a real PostgreSQL) and a real Dagster instance; rows are aged by moving their
timestamps back, and retention_job runs through Dagster."""

from __future__ import annotations

import logging
import os
import time
from datetime import UTC, datetime, timedelta

import dagster as dg
import duckdb
import pytest

from pipeline_project.core import dead_letters, retention
from pipeline_project.definitions import build_definitions
from pipeline_project.resources.embeddings import HashingEmbedder
from pipeline_project.retention import purge_run_history
from pipeline_project.sample_data import write_catalog
from pipeline_project_tests.helpers import (
    alerts_of,
    customer,
    query,
    run_batch,
    warehouse_of,
    write_lines,
)

LOG = logging.getLogger(__name__)
OLD = timedelta(days=40)  # beyond the 30 days of raw lines, schema errors, dead letters
ANCIENT = timedelta(days=100)  # beyond the 90 days of alerts and runs
JOB = "retention_job"
# A retention of a moment (1e-6 days, 86 ms): every run that ended before it is past it.
A_MOMENT = 1e-6


def lines(batch: int, valid: int = 20) -> list[str]:
    """`valid` customers and one line that is no JSON (a schema error); 1 in 21 is below the
    5% error threshold, so the batch is accepted."""
    records = [
        customer(
            id=f"7e1c2a3b-4d5e-4f60-8a7b-{batch:04d}{n:08d}", email=f"c{batch}x{n}@example.com"
        )
        for n in range(valid)
    ]
    return [*records, '{"id": "broken']


@pytest.fixture
def defs(backend_settings):
    write_catalog(backend_settings.catalog_path, n_products=40, seed=2)
    backend_settings.landing_dir.mkdir(parents=True, exist_ok=True)
    return build_definitions(backend_settings, embedder=HashingEmbedder(dimensions=8))


def land(settings, batch_id: str, content: list[str]) -> None:
    write_lines(settings.landing_dir / f"{batch_id}.jsonl", content)


def ingest(defs, instance, batch_id: str) -> dg.ExecuteInProcessResult:
    result = run_batch(defs, instance, batch_id)
    assert result.success, batch_id
    return result


def write(settings, sql: str, params=None) -> None:
    """A change the test makes to the warehouse (ageing rows), in a transaction."""
    with warehouse_of(settings).transaction() as conn:
        conn.execute(sql, params or [])


def age_alerts(settings, key: str, by: timedelta) -> None:
    with alerts_of(settings)._store().transaction() as conn:
        conn.execute("UPDATE alerts SET created_at = created_at - ? WHERE alert_key = ?", [by, key])


def alert_keys(settings) -> list[str]:
    with alerts_of(settings)._store().get_connection() as conn:
        return sorted(k for (k,) in conn.execute("SELECT alert_key FROM alerts").fetchall())


def retain(defs, instance, raise_on_error: bool = True, **config) -> dg.ExecuteInProcessResult:
    return defs.resolve_job_def(JOB).execute_in_process(
        instance=instance,
        run_config={"ops": {"purge_expired_data": {"config": config}}},
        raise_on_error=raise_on_error,
    )


def counts(result: dg.ExecuteInProcessResult) -> dict:
    [output] = [e for e in result.all_events if e.event_type_value == "STEP_OUTPUT"]
    return {k: v.value for k, v in output.event_specific_data.metadata.items()}


def dead_letter_rows(settings) -> list[tuple]:
    return query(
        settings,
        "SELECT batch_id, stage, record_key, replayed_at IS NULL FROM dead_letter ORDER BY ALL",
    )


# ---- the warehouse and the alerts, on both backends -----------------------------------------


def test_what_is_older_than_its_retention_is_deleted_and_what_is_younger_stays(
    backend_settings, defs, instance
):
    settings = backend_settings
    land(settings, "b1", lines(1))
    land(settings, "b2", lines(2))
    ingest(defs, instance, "b1")
    ingest(defs, instance, "b2")
    # b1 arrived 40 days ago, b2 today
    write(settings, "UPDATE batches SET ingested_at = ingested_at - ? WHERE batch_id = 'b1'", [OLD])
    write(settings, "UPDATE schema_errors SET detected_at = detected_at - ? WHERE batch_id = 'b1'",
          [OLD])  # fmt: skip
    # dead letters: b1's two replayed 40 days ago; b2's one replayed then beside a pending one;
    # b3's pending one, created 40 days ago
    letters = "SELECT * FROM (VALUES ('k1'), ('k2')) AS t(record_key)"
    source = f"SELECT record_key, 'failed' AS reason, 'e' AS error, 1 AS attempts, NULL AS payload FROM ({letters})"  # fmt: skip
    with warehouse_of(settings).transaction() as conn:
        for batch_id in ("b1", "b2", "b3"):
            dead_letters.add(conn, batch_id, "inference", source)
        dead_letters.mark_replayed(conn, "b1", "inference", letters)
        dead_letters.mark_replayed(conn, "b2", "inference", "SELECT 'k1'")
        conn.execute("DELETE FROM dead_letter WHERE batch_id = 'b3' AND record_key = 'k2'")
    write(settings, "UPDATE dead_letter SET replayed_at = replayed_at - ?, created_at = created_at - ?",
          [OLD, OLD])  # fmt: skip
    with warehouse_of(settings).transaction() as conn:  # b4's two replayed today
        dead_letters.add(conn, "b4", "inference", source)
        dead_letters.mark_replayed(conn, "b4", "inference", letters)
    # alerts: one raised 100 days ago, one today
    sink = alerts_of(settings)
    for key in ("old", "new"):
        sink.emit(severity="warning", monitor="test", key=key, message=key, log=LOG)
    age_alerts(settings, "old", ANCIENT)
    b2_raw = query(settings, "SELECT count(*) FROM raw_customers WHERE batch_id = 'b2'")

    done = counts(retain(defs, instance))

    assert done["raw_batches_deleted"] == 1 and done["raw_lines_deleted"] == 21
    assert done["schema_errors_deleted"] == 1
    assert done["dead_letters_deleted"] == 3  # b1's two and b2's replayed one
    assert done["alerts_deleted"] == 1
    assert done["runs_deleted"] == 0  # every run ended today
    assert query(settings, "SELECT DISTINCT batch_id FROM raw_customers") == [("b2",)]
    assert query(settings, "SELECT count(*) FROM raw_customers") == b2_raw == [(21,)]
    if not warehouse_of(settings).is_lakehouse:
        b1_file = warehouse_of(settings).raw_file("b1")
        assert not b1_file.parent.exists() and warehouse_of(settings).raw_file("b2").exists()
    assert query(settings, "SELECT batch_id, count(*) FROM schema_errors GROUP BY ALL") == [
        ("b2", 1)
    ]
    assert dead_letter_rows(settings) == [
        ("b2", "inference", "k2", True),  # pending: never deleted
        ("b3", "inference", "k1", True),
        ("b4", "inference", "k1", False),  # replayed today
        ("b4", "inference", "k2", False),
    ]
    assert alert_keys(settings) == ["new"]
    # what validation stored of b1 stays (only its raw lines went)
    assert query(settings, "SELECT count(*) FROM customers WHERE batch_id = 'b1'") == [(20,)]
    # a second pass finds nothing more
    again = counts(retain(defs, instance))
    assert [again[k] for k in ("raw_batches_deleted", "schema_errors_deleted",
                               "dead_letters_deleted", "alerts_deleted")] == [0, 0, 0, 0]  # fmt: skip


def test_validating_a_batch_whose_raw_lines_were_deleted_fails_clearly_and_changes_nothing(
    backend_settings, defs, instance
):
    settings = backend_settings
    land(settings, "b1", lines(1))
    ingest(defs, instance, "b1")
    write(settings, "UPDATE batches SET ingested_at = ingested_at - ? WHERE batch_id = 'b1'", [OLD])
    assert counts(retain(defs, instance))["raw_batches_deleted"] == 1
    # the last raw file is gone: the view over the files reads as empty
    assert query(settings, "SELECT count(*) FROM raw_customers") == [(0,)]

    validation = [dg.AssetKey(k) for k in ("customers", "customer_purchases", "schema_errors",
                                           "dropped_purchases")]  # fmt: skip
    result = defs.resolve_job_def("batch_pipeline_job").execute_in_process(
        partition_key="b1", instance=instance, asset_selection=validation, raise_on_error=False
    )
    assert not result.success
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    message = failure.step_failure_data.error.message
    assert "b1" in message and "no raw" in message and "materialize raw_customers" in message
    assert not [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    assert query(settings, "SELECT count(*) FROM customers WHERE batch_id = 'b1'") == [(20,)]

    # a new batch is still ingested and read through raw_customers
    land(settings, "b2", lines(2))
    ingest(defs, instance, "b2")
    assert query(settings, "SELECT batch_id, count(*) FROM raw_customers GROUP BY ALL") == [
        ("b2", 21)
    ]


def test_the_database_file_s_raw_view_reads_as_empty_once_the_last_raw_file_is_deleted(
    settings, instance
):
    defs = build_definitions(settings, embedder=HashingEmbedder(dimensions=8))
    land(settings, "b1", lines(1))
    ingest(defs, instance, "b1")
    write(settings, "UPDATE batches SET ingested_at = ingested_at - ? WHERE batch_id = 'b1'", [OLD])
    purged = retention.purge_raw_lines(
        warehouse_of(settings), datetime.now(UTC) - timedelta(days=30)
    )
    assert (purged.batches, purged.lines) == (1, 21)
    # as the file holds it, for any reader (the DuckDB CLI): no view of a file that is gone
    with duckdb.connect(str(settings.duckdb_path), read_only=True) as conn:
        assert conn.execute("SELECT count(*) FROM raw_customers").fetchall() == [(0,)]


def test_alerts_mentioning_a_text_are_deleted_whatever_its_case_and_only_those(backend_settings):
    settings = backend_settings
    sink = alerts_of(settings)
    customer_id = "7E1C2A3B-4D5E-4F60-8A7B-000100000001"
    raised = {
        "in_message": {"message": f"customer {customer_id.lower()} failed"},
        f"key:{customer_id.lower()}": {"message": "nothing here"},
        "in_figures": {"message": "see figures", "figures": {"who": [customer_id], "n": 1}},
        "accented": {"message": "see figures", "figures": {"name": "Zoë Ångström"}},
        "other": {"message": "customer 11111111-2222-3333-4444-555555555555 failed"},
    }
    for key, fields in raised.items():
        sink.emit(severity="warning", monitor="test", key=key, log=LOG, **fields)

    assert sink.delete_mentioning([customer_id.upper(), "zoë ångström"]) == 4
    assert alert_keys(settings) == ["other"]
    assert sink.delete_mentioning([customer_id]) == 0
    assert sink.delete_mentioning([]) == 0
    for wrong in ([""], ["  "]):
        with pytest.raises(ValueError, match="every alert"):
            sink.delete_mentioning(wrong)
    with pytest.raises(TypeError):
        sink.delete_mentioning("other")  # one string, not a sequence of texts
    assert alert_keys(settings) == ["other"]


def test_alerts_older_than_the_cutoff_are_deleted(backend_settings):
    settings = backend_settings
    sink = alerts_of(settings)
    for key in ("a", "b", "c"):
        sink.emit(severity="warning", monitor="test", key=key, message=key, log=LOG)
    age_alerts(settings, "a", timedelta(days=3))
    age_alerts(settings, "b", timedelta(days=1))
    assert sink.delete_older_than(datetime.now(UTC) - timedelta(days=2)) == 1
    assert alert_keys(settings) == ["b", "c"]
    assert sink.delete_older_than(datetime.now(UTC) - timedelta(hours=1)) == 1
    assert alert_keys(settings) == ["c"]


# ---- the configuration ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"raw_lines_days": 0},
        {"alerts_days": -1},
        {"run_history_days": float("inf")},
        {"schema_errors_days": 1e12},
        {"max_runs_deleted": 0},
    ],  # fmt: skip
    ids=["zero", "negative", "infinite", "beyond_dates", "no_runs_per_execution"],
)
def test_a_retention_of_no_days_or_less_is_refused_and_nothing_is_deleted(settings, instance, bad):
    defs = build_definitions(settings, embedder=HashingEmbedder(dimensions=8))
    sink = alerts_of(settings)
    sink.emit(severity="warning", monitor="test", key="old", message="old", log=LOG)
    age_alerts(settings, "old", ANCIENT)

    result = retain(defs, instance, raise_on_error=False, **bad)

    assert not result.success
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    message = failure.step_failure_data.error.message
    [name] = bad
    assert "Retention refused, nothing was deleted" in message and name in message
    assert failure.step_failure_data.user_failure_data is not None  # a dg.Failure
    assert not [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    assert alert_keys(settings) == ["old"]


def test_a_retention_left_unset_keeps_that_kind_for_ever(settings, instance):
    defs = build_definitions(settings, embedder=HashingEmbedder(dimensions=8))
    sink = alerts_of(settings)
    sink.emit(severity="warning", monitor="test", key="old", message="old", log=LOG)
    age_alerts(settings, "old", timedelta(days=10_000))
    done = counts(retain(defs, instance, alerts_days=None))
    assert "alerts_deleted" not in done and done["alerts_cutoff"] == "kept for ever"
    assert alert_keys(settings) == ["old"]
    assert counts(retain(defs, instance))["alerts_deleted"] == 1  # the default: 90 days


def test_the_defaults_are_30_days_for_personal_rows_and_90_for_alerts_and_runs():
    from pipeline_project.retention import RetentionConfig

    config = RetentionConfig()
    assert (config.raw_lines_days, config.schema_errors_days,
            config.replayed_dead_letters_days) == (30, 30, 30)  # fmt: skip
    assert (config.alerts_days, config.run_history_days) == (90, 90)


def test_the_job_and_its_daily_schedule_are_in_the_definitions(settings):
    defs = build_definitions(settings, embedder=HashingEmbedder(dimensions=8))
    assert defs.resolve_job_def(JOB) is not None
    schedule = defs.resolve_schedule_def("daily_retention")
    assert schedule.cron_schedule == "30 3 * * *" and schedule.job_name == JOB
    assert schedule.execution_timezone == "UTC"
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING


# ---- Dagster's run history ------------------------------------------------------------------


def latest_run(instance, asset: str, partition: str) -> str:
    [record] = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition]), limit=1
    ).records
    return record.run_id


def test_old_runs_are_deleted_except_those_holding_a_latest_result_or_not_ended(settings, instance):
    defs = build_definitions(settings, embedder=HashingEmbedder(dimensions=8))
    settings.landing_dir.mkdir(parents=True, exist_ok=True)
    land(settings, "b1", lines(1))
    land(settings, "b2", lines(2))
    superseded = ingest(defs, instance, "b1").run_id
    latest_b1 = ingest(defs, instance, "b1").run_id
    latest_b2 = ingest(defs, instance, "b2").run_id
    failed_b3 = run_batch(defs, instance, "b3")  # no landing file: its latest attempt failed
    assert not failed_b3.success
    nothing = retain(defs, instance).run_id  # a run without any asset
    running = instance.create_run_for_job(
        job_def=defs.resolve_job_def(JOB), status=dg.DagsterRunStatus.STARTED
    ).run_id
    logs = instance.compute_log_manager._base_dir  # the local compute logs, one folder per run
    assert os.path.isdir(os.path.join(logs, superseded))
    time.sleep(0.2)

    first = retain(defs, instance, run_history_days=A_MOMENT, max_runs_deleted=1)
    done = counts(first)
    assert done["runs_deleted"] == 1 and done["runs_left_for_next_time"] is True
    assert instance.get_run_by_id(superseded) is None  # the oldest goes first
    assert instance.get_records_for_run(superseded).records == []  # its event log too
    assert not os.path.exists(os.path.join(logs, superseded))  # and what its steps printed
    assert instance.get_run_by_id(nothing) is not None  # left for the next execution

    time.sleep(0.2)
    done = counts(retain(defs, instance, run_history_days=A_MOMENT))
    assert done["runs_deleted"] == 2 and done["runs_left_for_next_time"] is False
    for gone in (nothing, first.run_id):
        assert instance.get_run_by_id(gone) is None
    # each partition's latest materialization and attempt stays, with its run
    assert done["runs_kept_holding_latest"] == 3
    for kept in (latest_b1, latest_b2, failed_b3.run_id, running):
        assert instance.get_run_by_id(kept) is not None
    assert latest_run(instance, "raw_customers", "b1") == latest_b1
    assert latest_run(instance, "customers", "b2") == latest_b2
    materialized = instance.get_materialized_partitions(dg.AssetKey("raw_customers"))
    assert materialized == {"b1", "b2"}


def test_a_run_holding_only_the_latest_check_execution_is_kept(instance):
    @dg.asset
    def toy() -> None:
        pass

    @dg.asset_check(asset=toy)
    def toy_ok() -> dg.AssetCheckResult:
        return dg.AssetCheckResult(passed=True)

    checks_only = dg.AssetSelection.checks(toy_ok)
    first = dg.materialize([toy, toy_ok], instance=instance).run_id  # toy and its check
    checked = dg.materialize([toy, toy_ok], instance=instance, selection=checks_only).run_id
    time.sleep(0.2)
    cutoff = datetime.now(UTC)
    done = purge_run_history(instance, cutoff, page_size=1, max_deleted=10)
    assert (done.deleted, done.kept_latest) == (0, 2)  # the materialization's, the check's

    rechecked = dg.materialize([toy, toy_ok], instance=instance, selection=checks_only).run_id
    time.sleep(0.2)
    done = purge_run_history(instance, datetime.now(UTC), page_size=1, max_deleted=10)
    assert (done.deleted, done.kept_latest) == (1, 2)
    assert instance.get_run_by_id(checked) is None
    assert instance.get_run_by_id(first) is not None
    assert instance.get_run_by_id(rechecked) is not None


def test_a_run_holding_only_the_latest_failed_attempt_is_kept(instance):
    fail = {"now": False}

    @dg.asset
    def flaky() -> None:
        if fail["now"]:
            raise RuntimeError("down")

    succeeded = dg.materialize([flaky], instance=instance).run_id
    fail["now"] = True
    failed = dg.materialize([flaky], instance=instance, raise_on_error=False)
    assert not failed.success
    superseded = dg.materialize([flaky], instance=instance, raise_on_error=False).run_id
    failed_again = dg.materialize([flaky], instance=instance, raise_on_error=False).run_id
    time.sleep(0.2)
    done = purge_run_history(instance, datetime.now(UTC), page_size=10, max_deleted=10)
    # the latest materialization's run, and the latest attempt's (why the asset failed)
    assert (done.deleted, done.kept_latest) == (2, 2)
    assert instance.get_run_by_id(succeeded) is not None
    assert instance.get_run_by_id(failed_again) is not None
    assert instance.get_run_by_id(failed.run_id) is None
    assert instance.get_run_by_id(superseded) is None
