"""Retention in the warehouse: what is deleted once it is older than its retention, and how.

Each purge takes a cutoff (an instant: rows older than it go) and returns counts only, never a
row's content. Every write runs in its own transaction through the warehouse's write attempts,
so a commit that conflicts with another writer (DuckLake) is retried from the start; each purge
can run again at any time (what is gone stays gone, nothing younger is touched).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb

from pipeline_project.core import dead_letters
from pipeline_project.core.deletes import delete_where
from pipeline_project.tables import BATCHES, RAW_CUSTOMERS, SCHEMA_ERRORS

if TYPE_CHECKING:  # the resource imports Dagster; the core does not
    from pipeline_project.resources.warehouse import Warehouse

# The batches whose raw lines were ingested before the cutoff and may still be stored (on
# DuckLake: a row of raw_customers is left).
_EXPIRED_BATCHES_SQL = f"""
SELECT batch_id FROM {BATCHES} AS b
WHERE ingested_at < $cutoff
  AND ($files OR EXISTS (SELECT 1 FROM {RAW_CUSTOMERS} AS r WHERE r.batch_id = b.batch_id))
ORDER BY ingested_at, batch_id
"""


@dataclass(frozen=True)
class RawPurge:
    batches: int  # batches whose raw lines were deleted
    lines: int  # the raw lines they held


def expired_raw_batches(
    conn: duckdb.DuckDBPyConnection, cutoff: datetime, files: bool
) -> list[str]:
    """The batches ingested before `cutoff` that may still hold raw lines (`files`: the file
    backend, where the batch's file says whether it does)."""
    rows = conn.execute(_EXPIRED_BATCHES_SQL, {"cutoff": cutoff, "files": files}).fetchall()
    return [batch_id for (batch_id,) in rows]


def _still_expired(conn: duckdb.DuckDBPyConnection, batch_id: str, cutoff: datetime) -> bool:
    """Checked again inside the deleting transaction: a batch ingested anew meanwhile is kept."""
    return bool(
        conn.execute(
            f"SELECT 1 FROM {BATCHES} WHERE batch_id = ? AND ingested_at < ?", [batch_id, cutoff]
        ).fetchall()
    )


def purge_raw_lines(warehouse: Warehouse, cutoff: datetime) -> RawPurge:
    """Delete the raw lines of every batch ingested (batches.ingested_at) before `cutoff`.

    The file backend: the batch's Parquet file and its folder (with any temporary file a killed
    run left there), then the raw_customers view is rebuilt over the files left (an empty view
    once none is left) in the same transaction, so no connection sees a view of a deleted file.
    DuckLake: the batch's rows of raw_customers. A later validation of the batch fails, saying
    it has no raw lines (Warehouse.raw_lines_file)."""
    with warehouse.get_connection() as conn:
        expired = expired_raw_batches(conn, cutoff, files=not warehouse.is_lakehouse)
    if not warehouse.is_lakehouse:  # a transaction only for the batches that have a file
        expired = [batch_id for batch_id in expired if _raw_folder(warehouse, batch_id)]
    purge = _purge_lake_raw_lines if warehouse.is_lakehouse else _purge_raw_file
    batches = lines = 0
    for batch_id in expired:
        for attempt in warehouse.write_attempts():
            with attempt, warehouse.transaction() as conn:
                deleted = purge(warehouse, conn, batch_id, cutoff)
        if deleted is not None:
            batches, lines = batches + 1, lines + deleted
    return RawPurge(batches, lines)


def _purge_raw_file(
    warehouse: Warehouse, conn: duckdb.DuckDBPyConnection, batch_id: str, cutoff: datetime
) -> int | None:
    """The batch's raw file and folder deleted (the lines it held), or None when it had none.
    Inside the transaction: the file backend's one writer holds the database meanwhile."""
    if _raw_folder(warehouse, batch_id) is None or not _still_expired(conn, batch_id, cutoff):
        return None
    return warehouse.delete_raw_file(batch_id, conn)


def _raw_folder(warehouse: Warehouse, batch_id: str) -> Path | None:
    """The folder of the batch's raw file, if there is one."""
    try:
        folder = warehouse.raw_file(batch_id).parent
    except ValueError:  # not a batch ID a file was ever written for
        return None
    return folder if folder.is_dir() else None


def _purge_lake_raw_lines(
    warehouse: Warehouse, conn: duckdb.DuckDBPyConnection, batch_id: str, cutoff: datetime
) -> int | None:
    """The batch's rows of raw_customers deleted (the lines they were), or None when it was
    ingested anew meanwhile."""
    if not _still_expired(conn, batch_id, cutoff):
        return None
    return delete_where(conn, RAW_CUSTOMERS, "batch_id = ?", [batch_id])


def purge_schema_errors(warehouse: Warehouse, cutoff: datetime) -> int:
    """Delete the schema_errors rows (invalid lines as they came) detected before `cutoff`;
    how many."""
    for attempt in warehouse.write_attempts():
        with attempt, warehouse.transaction() as conn:
            deleted = delete_where(conn, SCHEMA_ERRORS, "detected_at < ?", [cutoff])
    return deleted


def purge_dead_letters(warehouse: Warehouse, cutoff: datetime) -> int:
    """Delete the dead letters replayed before `cutoff` (pending ones never); how many."""
    for attempt in warehouse.write_attempts():
        with attempt, warehouse.transaction() as conn:
            deleted = dead_letters.delete_replayed_before(conn, cutoff)
    return deleted
