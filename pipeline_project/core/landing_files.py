"""Stream a landing file as Arrow chunks of (line_no, raw, byte_length, utf8_ok, read_error)."""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import duckdb
import pyarrow as pa

RAW_LINE_SCHEMA = pa.schema(
    [
        ("line_no", pa.int64()),
        ("raw", pa.string()),
        ("byte_length", pa.int64()),
        ("utf8_ok", pa.bool_()),
        ("read_error", pa.string()),
    ]
)

# Errors that end a file early: truncated or corrupt gzip, or a failing disk.
READ_ERRORS = (EOFError, OSError, zlib.error)


def open_landing_file(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")  # noqa: SIM115


def iter_raw_line_chunks(path: Path, chunk_rows: int, max_line_bytes: int) -> Iterator[pa.Table]:
    """Every line of the file, numbered from 1, in chunks of at most `chunk_rows` lines.

    Nothing is dropped: a line that is not UTF-8 is kept (decoded with replacement characters,
    utf8_ok=False); a line longer than `max_line_bytes` keeps its first `max_line_bytes` bytes
    and its true length; if the file cannot be read to the end (a truncated gzip, say), one last
    row records the read error, so the loss is visible downstream.
    """
    if chunk_rows < 1 or max_line_bytes < 1:
        raise ValueError("chunk_rows and max_line_bytes must be positive")
    line_no = 0
    cols: dict[str, list] = {name: [] for name in RAW_LINE_SCHEMA.names}

    def flush() -> pa.Table:
        table = pa.table(cols, schema=RAW_LINE_SCHEMA)
        for values in cols.values():
            values.clear()
        return table

    with open_landing_file(path) as f:
        while True:
            try:
                line = f.readline(max_line_bytes + 1)
                if not line:
                    break
                length = len(line)
                if length > max_line_bytes and not line.endswith(b"\n"):
                    line = line[:max_line_bytes]
                    length += _skip_rest_of_line(f)
            except READ_ERRORS as err:
                line_no += 1
                _append(cols, line_no, "", 0, True, f"{type(err).__name__}: {err}")
                break
            line_no += 1
            if line.endswith(b"\n"):
                line = line[:-1]
                length -= 1
                if line.endswith(b"\r"):
                    line = line[:-1]
                    length -= 1
            try:
                text, utf8_ok = line.decode("utf-8"), True
            except UnicodeDecodeError:
                text, utf8_ok = line.decode("utf-8", errors="replace"), False
            _append(cols, line_no, text, length, utf8_ok, None)
            if len(cols["line_no"]) >= chunk_rows:
                yield flush()
    if cols["line_no"]:
        yield flush()


def _append(cols: dict[str, list], line_no: int, raw: str, length: int, ok: bool, err: str | None):
    cols["line_no"].append(line_no)
    cols["raw"].append(raw.replace("\x00", "\ufffd"))
    cols["byte_length"].append(length)
    cols["utf8_ok"].append(ok and "\x00" not in raw)
    cols["read_error"].append(err)


def _skip_rest_of_line(f: BinaryIO, piece: int = 1 << 20) -> int:
    """Read past the rest of an over-long line without holding it; returns the bytes skipped."""
    skipped = 0
    while True:
        part = f.readline(piece)
        if not part:
            return skipped
        if part.endswith(b"\n"):
            return skipped + len(part) - 1  # the newline is not part of the line
        skipped += len(part)


@dataclass
class StoredLines:
    lines: int = 0
    chunks: int = 0
    read_errors: list[str] = field(default_factory=list)


def store_raw_lines(
    conn: duckdb.DuckDBPyConnection,
    batch_id: str,
    chunks: Iterator[pa.Table],
    on_chunk: Callable[[StoredLines], None] | None = None,
    table: str = "raw_customers",
) -> StoredLines:
    """Append line chunks to `table` (raw_customers or its staging table; a name from the
    code, never from data)."""
    stored = StoredLines()
    for chunk in chunks:
        conn.register("raw_chunk", chunk)
        try:
            conn.execute(
                f"INSERT INTO {table} SELECT ?, line_no, raw, byte_length, utf8_ok,"
                " read_error, now() FROM raw_chunk",
                [batch_id],
            )
        finally:
            conn.unregister("raw_chunk")
        stored.read_errors += [e for e in chunk["read_error"].to_pylist() if e is not None]
        stored.lines += chunk.num_rows
        stored.chunks += 1
        if on_chunk is not None:
            on_chunk(stored)
    return stored
