"""The dead_letter table: records a stage gave up on, until a replay places them. All its SQL.

A dead letter is keyed by batch, stage and record; it is pending until `replayed_at` is set.
Statements that combine it with another table take that part as `source`: a SELECT from the
code, never from data.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

import duckdb
import pyarrow as pa

from pipeline_project.core.arrow_results import arrow_table
from pipeline_project.core.deletes import delete_where

# The pending dead letters (not replayed yet) of batch $batch_id and stage $stage, for queries
# that compose them with other tables (the conservation check).
PENDING_SQL = """
SELECT * FROM dead_letter
WHERE batch_id = $batch_id AND stage = $stage AND replayed_at IS NULL
"""


def delete_batch(conn: duckdb.DuckDBPyConnection, batch_id: str, stage: str | None) -> None:
    """Remove the stage's dead letters of the batch (pending and replayed): it is re-run, or
    (stage None) withdrawn, every stage's."""
    if stage is None:
        conn.execute("DELETE FROM dead_letter WHERE batch_id = ?", [batch_id])
    else:
        conn.execute("DELETE FROM dead_letter WHERE batch_id = ? AND stage = ?", [batch_id, stage])


def add(
    conn: duckdb.DuckDBPyConnection,
    batch_id: str,
    stage: str,
    source: str,
    params: Mapping[str, object] | None = None,
) -> None:
    """Dead-letter the records `source` returns (record_key, reason, error, attempts, payload)."""
    conn.execute(
        "INSERT INTO dead_letter BY NAME SELECT $batch_id AS batch_id, $stage AS stage,"
        " s.record_key, s.reason, s.error, s.attempts, s.payload, now() AS created_at"
        f" FROM ({source}) AS s",
        {**(params or {}), "batch_id": batch_id, "stage": stage},
    )


def counts_by_reason(conn: duckdb.DuckDBPyConnection, batch_id: str, stage: str) -> dict[str, int]:
    """The stage's dead letters of the batch per reason."""
    return dict(
        conn.execute(
            "SELECT reason, count(*) FROM dead_letter WHERE batch_id = ? AND stage = ?"
            " GROUP BY reason",
            [batch_id, stage],
        ).fetchall()
    )


def count_pending(conn: duckdb.DuckDBPyConnection, batch_id: str, stage: str) -> int:
    """The stage's dead letters of the batch that wait for a replay."""
    [(pending,)] = conn.execute(
        f"SELECT count(*) FROM ({PENDING_SQL})", {"batch_id": batch_id, "stage": stage}
    ).fetchall()
    return pending


def pending_total(conn: duckdb.DuckDBPyConnection, stage: str) -> int:
    """The stage's dead letters of every batch that wait for a replay."""
    [(total,)] = conn.execute(
        "SELECT count(*) FROM dead_letter WHERE stage = ? AND replayed_at IS NULL", [stage]
    ).fetchall()
    return total


def pending_by_stage(conn: duckdb.DuckDBPyConnection) -> dict[str, int]:
    """Dead letters waiting for a replay, per stage (every batch)."""
    return dict(
        conn.execute(
            "SELECT stage, count(*) FROM dead_letter WHERE replayed_at IS NULL GROUP BY stage"
        ).fetchall()
    )


def pending_payloads(conn: duckdb.DuckDBPyConnection, batch_id: str, stage: str) -> pa.Table:
    """The batch's pending dead letters of the stage that have a payload: record_key, payload."""
    return arrow_table(
        conn,
        f"SELECT record_key, payload FROM ({PENDING_SQL}) WHERE payload IS NOT NULL",
        {"batch_id": batch_id, "stage": stage},
    )


def mark_replayed(
    conn: duckdb.DuckDBPyConnection,
    batch_id: str,
    stage: str,
    placed: str,
    params: Mapping[str, object] | None = None,
) -> int:
    """Mark the pending dead letters whose record_key `placed` returns as replayed; how many."""
    [(replayed,)] = conn.execute(
        "UPDATE dead_letter SET replayed_at = now()"
        " WHERE batch_id = $batch_id AND stage = $stage AND replayed_at IS NULL"
        f" AND record_key IN ({placed})",
        {**(params or {}), "batch_id": batch_id, "stage": stage},
    ).fetchall()
    return replayed


def record_retry_failures(
    conn: duckdb.DuckDBPyConnection,
    batch_id: str,
    stage: str,
    failures: str,
    params: Mapping[str, object] | None = None,
) -> None:
    """Pending dead letters that failed again keep waiting, with the retry's reason and error
    and its attempts added; `failures` returns record_key, reason, error, attempts."""
    conn.execute(
        "UPDATE dead_letter AS d"
        " SET reason = f.reason, error = f.error, attempts = d.attempts + f.attempts"
        f" FROM ({failures}) AS f"
        " WHERE d.batch_id = $batch_id AND d.stage = $stage AND d.replayed_at IS NULL"
        " AND d.record_key = f.record_key",
        {**(params or {}), "batch_id": batch_id, "stage": stage},
    )


def summary(
    conn: duckdb.DuckDBPyConnection,
) -> list[tuple[str, str, str, int, int, datetime]]:
    """Per batch, stage and reason: pending and replayed dead letters, and the newest one."""
    return conn.execute(
        "SELECT batch_id, stage, reason, count(*) FILTER (WHERE replayed_at IS NULL),"
        " count(*) FILTER (WHERE replayed_at IS NOT NULL), max(created_at)"
        " FROM dead_letter GROUP BY ALL ORDER BY ALL"
    ).fetchall()


def records(
    conn: duckdb.DuckDBPyConnection, batch_id: str, limit: int, pending_only: bool = True
) -> list[tuple]:
    """The batch's dead letters by record key: record_key, stage, reason, attempts, error,
    payload, replayed_at (only pending ones unless `pending_only` is false)."""
    pending = " AND replayed_at IS NULL" if pending_only else ""
    return conn.execute(
        "SELECT record_key, stage, reason, attempts, error, payload, replayed_at"
        f" FROM dead_letter WHERE batch_id = ?{pending} ORDER BY record_key LIMIT ?",
        [batch_id, limit],
    ).fetchall()


def delete_naming(conn: duckdb.DuckDBPyConnection, ids: list[str], pattern: str) -> int:
    """Delete the dead letters of the customers `ids` (lower-case UUID texts): keyed by one, or
    whose payload matches `pattern` (their IDs, lower-cased); how many (an erasure)."""
    return delete_where(
        conn,
        "dead_letter",
        "list_contains($ids, lower(record_key))"
        " OR regexp_matches(lower(coalesce(payload, '')), $pattern)",
        {"ids": ids, "pattern": pattern},
    )


def delete_replayed_before(conn: duckdb.DuckDBPyConnection, cutoff: datetime) -> int:
    """Delete the dead letters replayed before `cutoff` (pending ones never); how many."""
    return delete_where(conn, "dead_letter", "replayed_at < ?", [cutoff])
