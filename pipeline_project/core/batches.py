"""The batch register (`batches`): arrival order, content, acceptance. All its SQL.

A batch's place in the arrival order is the order in which batches were registered (as
partitions, by the landing sensor or the demo), not the order their runs take: a backfill run
backward or two batches run at once give every batch the same place. A re-delivered file keeps
its batch's place; its new content replaces the old, and everything derived from the old content
is withdrawn in the same transaction that records the new content's digest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import duckdb

from pipeline_project.tables import BATCHES


@dataclass(frozen=True)
class Registered:
    arrival_seq: int
    new: bool  # first ingestion of the batch
    changed: bool  # its content differs from what the warehouse held (or it is new)


def register(
    conn: duckdb.DuckDBPyConnection,
    batch_id: str,
    *,
    registered_order: Sequence[str],
    landing_file: str,
    content_digest: str,
    lines: int,
) -> Registered:
    """Record the batch's content (inside the caller's transaction). `registered_order`: the
    batch IDs in the order they were registered (Dagster's dynamic partitions), this one among
    them. A new batch's arrival_seq is its position there, and after every batch registered
    before it (a batch deleted and registered again goes to the end)."""
    stored = conn.execute(
        f"SELECT arrival_seq, content_digest FROM {BATCHES} WHERE batch_id = ?", [batch_id]
    ).fetchall()
    if stored:
        [(seq, digest)] = stored
        changed = digest != content_digest
        conn.execute(
            f"UPDATE {BATCHES} SET landing_file = ?, content_digest = ?, lines = ?,"
            " ingested_at = now(),"
            " accepted = CASE WHEN ? THEN NULL ELSE accepted END,"
            " validated_at = CASE WHEN ? THEN NULL ELSE validated_at END"
            " WHERE batch_id = ?",
            [landing_file, content_digest, lines, changed, changed, batch_id],
        )
        return Registered(seq, new=False, changed=changed)
    position = registered_order.index(batch_id) if batch_id in registered_order else None
    earlier = list(registered_order[:position]) if position is not None else []
    [(after_earlier, after_all)] = conn.execute(
        f"SELECT coalesce(max(arrival_seq) FILTER (WHERE list_contains(?, batch_id)), -1) + 1,"
        f" coalesce(max(arrival_seq), -1) + 1 FROM {BATCHES}",
        [earlier],
    ).fetchall()
    seq = max(position, after_earlier) if position is not None else after_all
    conn.execute(
        f"INSERT INTO {BATCHES} BY NAME SELECT ? AS batch_id, ? AS arrival_seq,"
        " ? AS landing_file, ? AS content_digest, ? AS lines, now() AS arrived_at,"
        " now() AS ingested_at",
        [batch_id, seq, landing_file, content_digest, lines],
    )
    return Registered(seq, new=True, changed=True)


def was_accepted(conn: duckdb.DuckDBPyConnection, batch_id: str) -> bool | None:
    """Whether the batch's current content passed validation (None: not judged yet)."""
    rows = conn.execute(f"SELECT accepted FROM {BATCHES} WHERE batch_id = ?", [batch_id]).fetchall()
    return rows[0][0] if rows else None


def record_validation(conn: duckdb.DuckDBPyConnection, batch_id: str, accepted: bool) -> None:
    """The batch's content passed validation's blocking checks, or not (caller's transaction).
    A batch validated without being ingested through the register gets its row here."""
    if not conn.execute(f"SELECT 1 FROM {BATCHES} WHERE batch_id = ?", [batch_id]).fetchall():
        register(conn, batch_id, registered_order=[], landing_file="", content_digest="", lines=0)
    conn.execute(
        f"UPDATE {BATCHES} SET accepted = ?, validated_at = now() WHERE batch_id = ?",
        [accepted, batch_id],
    )


# The accepted batches that arrived after $batch_id and hold one of its customers: their
# profiles and recommendations read this batch's purchases as history.
_LATER_SHARING_SQL = f"""
SELECT DISTINCT later.batch_id
FROM customers AS mine
JOIN customers AS later ON later.customer_id = mine.customer_id AND later.batch_id <> mine.batch_id
JOIN {BATCHES} AS b ON b.batch_id = later.batch_id
WHERE mine.batch_id = $batch_id AND b.accepted
  AND b.arrival_seq > (SELECT arrival_seq FROM {BATCHES} WHERE batch_id = $batch_id)
ORDER BY 1
"""


def later_batches_sharing_customers(conn: duckdb.DuckDBPyConnection, batch_id: str) -> list[str]:
    """The later accepted batches (arrival order) that hold one of the batch's customers: what
    a change of this batch's content or acceptance makes stale."""
    return [b for (b,) in conn.execute(_LATER_SHARING_SQL, {"batch_id": batch_id}).fetchall()]


def arrival_seq(conn: duckdb.DuckDBPyConnection, batch_id: str) -> int | None:
    rows = conn.execute(
        f"SELECT arrival_seq FROM {BATCHES} WHERE batch_id = ?", [batch_id]
    ).fetchall()
    return rows[0][0] if rows else None
