"""Erasing a customer: every row about them, in every table of every batch. All its SQL.

A customer is known by their ID. Their rows are deleted from the tables keyed by customer
(CUSTOMER_TABLES); the raw lines that hold their ID become tombstones (an empty line: no record,
counted with the blank lines, so that every line of a batch still ends in exactly one place);
their schema errors and dead letters go, and the embedding cache's vectors of their profile texts
that no other customer or product uses. The erasure log keeps what was done, with the ID hashed.

A batch delivered again later that still holds an erased customer is ingested with their lines
already tombstoned (`tombstone_erased`): an erased ID stays erased.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from pipeline_project.contract import UUID_PATTERN as CONTRACT_UUID_PATTERN
from pipeline_project.core import dead_letters, embedding_cache
from pipeline_project.core.deletes import delete_where
from pipeline_project.tables import (
    CUSTOMER_EMBEDDINGS,
    CUSTOMER_PURCHASES,
    CUSTOMER_SEGMENTS,
    CUSTOMERS,
    DEAD_LETTER,
    DROPPED_PURCHASES,
    EMBEDDING_CACHE,
    ERASURE_LOG,
    PRIOR_PURCHASES,
    RAW_CUSTOMERS,
    RECOMMENDATION_SHORTFALLS,
    RECOMMENDATIONS,
    REJECTED_RECOMMENDATIONS,
    SCHEMA_ERRORS,
    VALIDATED_RECOMMENDATIONS,
)

# The tables with a row per customer (and batch): the erased customer's rows are deleted.
CUSTOMER_TABLES = (
    CUSTOMERS,
    CUSTOMER_PURCHASES,
    DROPPED_PURCHASES,
    CUSTOMER_EMBEDDINGS,
    PRIOR_PURCHASES,
    CUSTOMER_SEGMENTS,
    RECOMMENDATIONS,
    RECOMMENDATION_SHORTFALLS,
    VALIDATED_RECOMMENDATIONS,
    REJECTED_RECOMMENDATIONS,
)

# The IDs of the erasure, as a relation (a parameter list of canonical UUID texts)
_IDS = "SELECT unnest($ids::UUID[])"
# The raw lines found (parameters $batches and $lines, the same length)
_LINES = "(batch_id, line_no) IN (SELECT unnest($batches), unnest($lines))"
# A UUID anywhere in a line (the contract's ID pattern, unanchored; either case: the tokens are
# lower-cased, not the lines): a line that names an erased customer's ID is about them,
# whatever field holds it and whether it parses.
UUID_PATTERN = CONTRACT_UUID_PATTERN.removeprefix("^").removesuffix("$")


class ErasedMeanwhile(RuntimeError):
    """A customer was erased while a step held rows read before: the step is retried (its
    retry reads the warehouse as the erasure left it)."""


class NotACustomerId(ValueError):
    """An entry to erase that is neither a UUID nor a SHA-256 (never repeated: it may be
    personal)."""


_SHA256 = re.compile(r"[0-9a-f]{64}")


def is_hash(entry: str) -> bool:
    """Whether an entry to erase is the SHA-256 of an ID (not the ID itself)."""
    return bool(_SHA256.fullmatch(str(entry).strip().lower()))


def requested_hashes(entries: Iterable[str]) -> list[str]:
    """The customers to erase as the hashes of their IDs, each once, in order. An entry is a
    customer ID (a UUID, as in the landing files' `id` field) or the SHA-256 of its canonical
    lower-case text (what `pipeline-project erase` sends, so that no ID reaches Dagster's run
    history)."""
    hashes: list[str] = []
    for n, raw in enumerate(entries, start=1):
        text = str(raw).strip().lower()
        if is_hash(text):
            digest = text
        else:
            try:
                digest = customer_hash(str(uuid.UUID(text)))
            except ValueError:
                raise NotACustomerId(
                    f"entry number {n} is neither a customer ID (a UUID) nor the SHA-256 of"
                    " one; nothing was erased"
                ) from None
        if digest not in hashes:
            hashes.append(digest)
    if not hashes:
        raise NotACustomerId("no customer given; nothing was erased")
    return hashes


def resolve_ids(conn: duckdb.DuckDBPyConnection, hashes: Sequence[str]) -> list[str]:
    """The customer IDs the warehouse holds whose hash is among `hashes`: in customers, or
    named by a raw line or a rejected line (a customer erased halfway, a record rejected)."""
    rows = conn.execute(
        f"""SELECT DISTINCT customer_id::VARCHAR FROM {CUSTOMERS}
            WHERE sha256(customer_id::VARCHAR) IN (SELECT unnest($hashes))
        UNION SELECT id FROM (
            SELECT lower(unnest(regexp_extract_all(raw, $pattern))) AS id
            FROM (SELECT raw FROM {RAW_CUSTOMERS} WHERE raw <> ''
                  UNION ALL SELECT raw FROM {SCHEMA_ERRORS}))
            WHERE sha256(id) IN (SELECT unnest($hashes))
        ORDER BY 1""",
        {"hashes": list(hashes), "pattern": UUID_PATTERN},
    ).fetchall()
    return [customer_id for (customer_id,) in rows]


def customer_hash(customer_id: str) -> str:
    """What the erasure log keeps of an ID: its SHA-256 (the same as DuckDB's sha256())."""
    return hashlib.sha256(customer_id.encode()).hexdigest()


def erased_hashes(conn: duckdb.DuckDBPyConnection) -> list[str]:
    """The hashes of every customer ID ever erased."""
    rows = conn.execute(f"SELECT DISTINCT customer_hash FROM {ERASURE_LOG}").fetchall()
    return [h for (h,) in rows]


def tombstone_erased(chunk: pa.Table, hashes: Sequence[str]) -> tuple[pa.Table, int]:
    """The chunk of raw lines with every line that names an erased ID (its hash among `hashes`)
    made a tombstone; and how many were. Cheap when nothing was ever erased."""
    if not hashes or not chunk.num_rows:
        return chunk, 0
    conn = duckdb.connect()
    try:
        conn.register("chunk", chunk.select(["line_no", "raw"]))
        named = conn.execute(
            "SELECT line_no FROM chunk WHERE list_has_any(list_transform(regexp_extract_all("
            "raw, $pattern), lambda x: sha256(lower(x))), $hashes)",
            {"pattern": UUID_PATTERN, "hashes": list(hashes)},
        ).fetchall()
    finally:
        conn.close()
    if not named:
        return chunk, 0
    erased = pc.is_in(chunk["line_no"], value_set=pa.array([n for (n,) in named], pa.int64()))
    count = len(named)
    return tombstoned(chunk, erased), count


def tombstoned(lines: pa.Table, erased: pa.Array) -> pa.Table:
    """`lines` with the lines where `erased` is true replaced by tombstones: an empty text of
    0 bytes, readable and whole (a blank line to validation: no record)."""
    replaced = {
        "raw": pa.scalar("", pa.string()),
        "byte_length": pa.scalar(0, pa.int64()),
        "utf8_ok": pa.scalar(True),
        "read_error": pa.scalar(None, pa.string()),
    }
    for name, value in replaced.items():
        index = lines.schema.get_field_index(name)
        lines = lines.set_column(index, name, pc.if_else(erased, value, lines[name]))
    return lines


@dataclass
class Found:
    """What the warehouse holds about the customers being erased."""

    lines: dict[str, list[int]] = field(default_factory=dict)  # batch -> raw line numbers
    texts: list[tuple[str, int, str]] = field(default_factory=list)  # their cached profiles

    @property
    def batches(self) -> list[str]:
        return sorted(self.lines)


def find(conn: duckdb.DuckDBPyConnection, ids: Sequence[str]) -> Found:
    """The raw lines (per batch) that are the customers' records or name their IDs, and the
    profile texts of theirs that the embedding cache holds. Nothing for no ID (an empty
    pattern would match every line)."""
    if not ids:
        return Found()
    params = {"ids": list(ids), "pattern": "|".join(ids)}
    rows = conn.execute(
        f"""SELECT batch_id, line_no FROM {CUSTOMERS} WHERE customer_id IN ({_IDS})
        UNION SELECT batch_id, line_no FROM {RAW_CUSTOMERS}
              WHERE raw <> '' AND regexp_matches(lower(raw), $pattern)
        UNION SELECT batch_id, line_no FROM {SCHEMA_ERRORS}
              WHERE regexp_matches(lower(raw), $pattern)
        ORDER BY ALL""",
        params,
    ).fetchall()
    found = Found()
    for batch_id, line_no in rows:
        found.lines.setdefault(batch_id, []).append(line_no)
    found.texts = conn.execute(
        f"SELECT DISTINCT model, dimensions, text_hash FROM {CUSTOMER_EMBEDDINGS}"
        f" WHERE customer_id IN ({_IDS})",
        {"ids": list(ids)},
    ).fetchall()
    return found


def delete_rows(
    conn: duckdb.DuckDBPyConnection, ids: Sequence[str], found: Found, tombstone_raw: bool
) -> dict[str, int]:
    """Delete the customers' rows (inside the caller's transaction); with `tombstone_raw` (the
    raw lines are a table: DuckLake) make their raw lines tombstones too. Rows removed per
    table (their raw lines under raw_customers, made tombstones here or by the caller). Nothing
    for no ID (an empty pattern would match every row)."""
    if not ids:
        return {}
    params = {"ids": list(ids), "pattern": "|".join(ids)}
    removed: dict[str, int] = {}
    for table in CUSTOMER_TABLES:
        removed[table] = delete_where(conn, table, f"customer_id IN ({_IDS})", {"ids": list(ids)})
    lines = {"batches": [b for b, numbers in found.lines.items() for _ in numbers],
             "lines": [n for numbers in found.lines.values() for n in numbers]}  # fmt: skip
    removed[SCHEMA_ERRORS] = delete_where(
        conn,
        SCHEMA_ERRORS,
        f"regexp_matches(lower(raw), $pattern) OR {_LINES}",
        {"pattern": params["pattern"], **lines},
    )
    removed[DEAD_LETTER] = dead_letters.delete_naming(conn, ids, params["pattern"])
    # a cached vector of one of their profile texts that no one else's profile (nor a product)
    # still uses: profile texts of customers who behave alike are shared
    removed[EMBEDDING_CACHE] = embedding_cache.delete_unused(conn, found.texts)
    removed[RAW_CUSTOMERS] = len(lines["lines"])
    if tombstone_raw and lines["lines"]:
        conn.execute(
            f"UPDATE {RAW_CUSTOMERS} SET raw = '', byte_length = 0, utf8_ok = true,"
            f" read_error = NULL WHERE {_LINES}",
            lines,
        )
    return {table: n for table, n in removed.items() if n}


def log(
    conn: duckdb.DuckDBPyConnection, hashes: Sequence[str], found: Found, removed: dict[str, int]
) -> None:
    """One erasure-log row per customer (their ID's hash), when, and for the request as a whole
    the batches and raw lines touched and the rows removed per table."""
    lines = sum(len(numbers) for numbers in found.lines.values())
    for digest in hashes:
        conn.execute(
            f"INSERT INTO {ERASURE_LOG} BY NAME SELECT uuid() AS erasure_id,"
            " ? AS customer_hash, now() AS erased_at, ? AS batches, ? AS raw_lines,"
            " ?::JSON AS rows_removed",
            [digest, len(found.lines), lines, json.dumps(removed)],
        )
