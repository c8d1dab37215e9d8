"""The dead_letter table's owner: records in, counted, replayed, retried, deleted per stage."""

import duckdb
import pytest

from pipeline_project.core import dead_letters
from pipeline_project.tables import WAREHOUSE_DDL

FAILED = (
    "SELECT * FROM (VALUES ('k1', 'inference_failed', 'timeout', 3, 'p1'),"
    " ('k2', 'invalid_output', 'NaN', 1, 'p2'), ('k3', 'inference_failed', 'timeout', 3, NULL))"
    " AS t(record_key, reason, error, attempts, payload)"
)


@pytest.fixture
def conn(tmp_path):
    with duckdb.connect(str(tmp_path / "w.duckdb")) as conn:
        for ddl in WAREHOUSE_DDL.values():
            conn.execute(ddl)
        dead_letters.add(conn, "b1", "inference", FAILED)
        retried = f"SELECT * FROM ({FAILED}) WHERE attempts > $n"
        dead_letters.add(conn, "b2", "inference", retried, {"n": 1})
        dead_letters.add(conn, "b1", "other", FAILED)
        yield conn


def test_added_dead_letters_are_pending_and_counted_per_reason_batch_and_stage(conn):
    assert dead_letters.counts_by_reason(conn, "b1", "inference") == {
        "inference_failed": 2, "invalid_output": 1,
    }  # fmt: skip
    assert dead_letters.count_pending(conn, "b2", "inference") == 2
    assert dead_letters.pending_total(conn, "inference") == 5
    assert dead_letters.pending_by_stage(conn) == {"inference": 5, "other": 3}


def test_replayed_dead_letters_stop_being_pending(conn):
    placed = "SELECT * FROM (VALUES ('k1'), ('k3')) AS t(k)"
    assert dead_letters.mark_replayed(conn, "b1", "inference", placed) == 2
    assert dead_letters.mark_replayed(conn, "b1", "inference", placed) == 0  # idempotent
    assert dead_letters.count_pending(conn, "b1", "inference") == 1
    assert dead_letters.pending_by_stage(conn) == {"inference": 3, "other": 3}
    assert [r[0] for r in dead_letters.records(conn, "b1", limit=10)] == ["k1", "k2", "k2", "k3"]
    assert [r[0] for r in dead_letters.records(conn, "b1", 10, pending_only=False)] == [
        "k1", "k1", "k2", "k2", "k3", "k3",
    ]  # fmt: skip


def test_pending_payloads_leave_out_records_without_one(conn):
    table = dead_letters.pending_payloads(conn, "b1", "inference")
    rows = [tuple(row.values()) for row in table.to_pylist()]
    assert sorted(rows) == [("k1", "p1"), ("k2", "p2")]


def test_a_failed_retry_keeps_the_dead_letter_pending_with_its_new_error(conn):
    retry = "SELECT 'k2' AS record_key, 'inference_failed' AS reason, 'down' AS error, 2 AS attempts"  # fmt: skip
    dead_letters.record_retry_failures(conn, "b1", "inference", retry)
    [row] = [r for r in dead_letters.records(conn, "b1", 10) if r[:2] == ("k2", "inference")]
    assert row[2:5] == ("inference_failed", 3, "down")
    assert dead_letters.counts_by_reason(conn, "b2", "inference") == {"inference_failed": 2}


def test_deleting_a_batch_removes_only_that_stage_of_that_batch(conn):
    dead_letters.delete_batch(conn, "b1", "inference")
    assert dead_letters.pending_by_stage(conn) == {"inference": 2, "other": 3}
    summary = dead_letters.summary(conn)
    assert [row[:5] for row in summary] == [
        ("b1", "other", "inference_failed", 2, 0),
        ("b1", "other", "invalid_output", 1, 0),
        ("b2", "inference", "inference_failed", 2, 0),
    ]
