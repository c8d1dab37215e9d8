"""Stream a landing file as Arrow chunks of (line_no, raw, byte_length, utf8_ok, read_error)."""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import xxhash

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

# Bytes read (decompressed) per block; lines are split out of a block with numpy and Arrow.
BLOCK_BYTES = 16 << 20

# The UTF-8 byte-order mark that Windows and spreadsheet exports put at the start of a file: it
# marks the encoding and is no part of the first line.
UTF8_BOM = b"\xef\xbb\xbf"

# A blank line holds no record: nothing but JSON whitespace (space, tab, a stray CR), read whole
# (not cut at the length limit), readable and UTF-8. It is kept in raw_customers and counted
# apart. The same rule in Arrow (ingestion's count) and in SQL (validation and its checks).
BLANK_LINE_PATTERN = r"[ \t\r]*"
BLANK_LINE_SQL = f"""(read_error IS NULL AND utf8_ok AND byte_length = strlen(raw)
    AND regexp_full_match(raw, '{BLANK_LINE_PATTERN}'))"""


def open_landing_file(path: Path | str, filesystem=None) -> BinaryIO:
    """The landing file's bytes as a stream (decompressed when gzipped): a local file, or with
    `filesystem` (a pyarrow FileSystem, e.g. S3) the object at `path` on it, streamed."""
    name = str(path)
    if filesystem is not None:
        raw = filesystem.open_input_stream(name, compression=None)  # gzip is read below
        return gzip.GzipFile(fileobj=raw, mode="rb") if name.endswith(".gz") else raw
    return gzip.open(path, "rb") if name.endswith(".gz") else open(path, "rb")  # noqa: SIM115


def iter_raw_line_chunks(
    path: Path | str,
    chunk_rows: int,
    max_line_bytes: int,
    block_bytes: int = BLOCK_BYTES,
    digest: Digest | None = None,
    filesystem=None,
) -> Iterator[pa.Table]:
    """Every line of the file, numbered from 1, in chunks of at most `chunk_rows` lines.

    Nothing is dropped: a line that is not UTF-8 is kept (decoded with replacement characters,
    utf8_ok=False); a line longer than `max_line_bytes` keeps its first `max_line_bytes` bytes
    and its true length; if the file cannot be read to the end (a truncated gzip, say), one last
    row records the read error, so the loss is visible downstream. Only a UTF-8 byte-order mark
    at the start of the (decompressed) file is left out. Memory is bounded by the block size and
    the longest kept line head, whatever the file size. `digest`, if given, is updated with
    every byte read (decompressed): the content's fingerprint.
    """
    if chunk_rows < 1 or max_line_bytes < 1:
        raise ValueError("chunk_rows and max_line_bytes must be positive")
    for table in _iter_blocks_as_lines(path, max_line_bytes, block_bytes, digest, filesystem):
        for start in range(0, table.num_rows, chunk_rows):
            yield table.slice(start, chunk_rows)


class Digest(Protocol):
    def update(self, data: bytes, /) -> None: ...


def content_digest() -> xxhash.xxh3_128:
    """The fingerprint of a landing file's content (xxh3, 128 bits: a non-cryptographic hash
    at memory speed; it tells a re-delivered file from the one before, it guards no secret)."""
    return xxhash.xxh3_128()


def _iter_blocks_as_lines(
    path: Path | str, max_line_bytes: int, block_bytes: int, digest: Digest | None = None,
    filesystem=None,
) -> Iterator[pa.Table]:  # fmt: skip
    line_no = 0
    carry = b""  # the start of a line whose newline has not been read yet
    long_head: bytes | None = None  # an over-long line being skipped: its kept head ...
    long_length = 0  # ... its length so far ...
    long_last = b""  # ... and its last byte read (a \r there belongs to the line end)
    with open_landing_file(path, filesystem) as f:
        start, error = _read_block(f, len(UTF8_BOM))
        if digest is not None:
            digest.update(start)
        start = start.removeprefix(UTF8_BOM)
        while True:
            data, error = _read_block(f, block_bytes) if error is None else (b"", error)
            if digest is not None and data:
                digest.update(data)
            at_end = error is not None or not data
            if start:  # the file's first bytes, read apart to find the byte-order mark
                data, start = start + data, b""
            if long_head is not None and data:
                newline = data.find(b"\n")
                if newline < 0:
                    long_length += len(data)
                    long_last, data = data[-1:], b""
                else:
                    before = data[newline - 1 : newline] if newline else long_last
                    long_length += newline - (before == b"\r")
                    table = _lines_table([long_head], [long_length], line_no)
                    line_no += 1
                    yield table
                    long_head, data = None, data[newline + 1 :]
            buffer = carry + data if carry else data
            end = buffer.rfind(b"\n") + 1
            if end:
                table = _split_lines(buffer[:end], line_no, max_line_bytes)
                line_no += table.num_rows
                yield table
            carry = buffer[end:]
            if len(carry) > max_line_bytes:
                long_head, long_length, long_last = carry[:max_line_bytes], len(carry), carry[-1:]
                carry = b""
            if at_end:
                break
        if long_head is not None:
            yield _lines_table([long_head], [long_length], line_no)
            line_no += 1
        elif carry:  # a last line without a newline
            yield _lines_table([carry], [len(carry)], line_no)
            line_no += 1
        if error is not None:
            yield pa.table(
                {
                    "line_no": [line_no + 1],
                    "raw": [""],
                    "byte_length": [0],
                    "utf8_ok": [True],
                    "read_error": [f"{type(error).__name__}: {error}"],
                },
                schema=RAW_LINE_SCHEMA,
            )


def _read_block(f: BinaryIO, size: int) -> tuple[bytes, BaseException | None]:
    """Up to `size` bytes, and the error that ended the file early, if any. Reads in pieces so
    that what was read before the error (a truncated gzip) is kept."""
    pieces: list[bytes] = []
    got = 0
    try:
        while got < size:
            piece = f.read1(size - got)
            if not piece:
                break
            pieces.append(piece)
            got += len(piece)
    except READ_ERRORS as err:
        return b"".join(pieces), err
    return b"".join(pieces), None


def _split_lines(buffer: bytes, first_line_no: int, max_line_bytes: int) -> pa.Table:
    """The lines of `buffer` (which ends with a newline), without their line ends (\\n, \\r\\n)."""
    data = np.frombuffer(buffer, dtype=np.uint8)
    newlines = np.flatnonzero(data == 10)
    starts = np.concatenate(([0], newlines[:-1] + 1))
    ends = newlines - ((newlines > starts) & (data[newlines - 1] == 13))
    lengths = ends - starts
    if lengths.max(initial=0) <= max_line_bytes and not (data == 0).any():
        # Fast path: lines are slices of one buffer; Arrow checks the UTF-8 of all at once.
        offsets = np.concatenate(([0], newlines + 1)).astype(np.int64)
        lines = pa.LargeBinaryArray.from_buffers(
            pa.large_binary(), len(newlines), [None, pa.py_buffer(offsets), pa.py_buffer(buffer)]
        )
        cut = pc.binary_slice(lines, 0, -1)  # the \n
        crlf = ends < newlines
        if crlf.any():
            cut = pc.if_else(pa.array(crlf), pc.binary_slice(cut, 0, -1), cut)  # the \r of \r\n
        try:
            text = cut.cast(pa.large_string()).cast(pa.string())
        except pa.ArrowInvalid:
            text = None  # some line is not UTF-8: the slow path finds which
        if text is not None:
            return pa.table(
                {
                    "line_no": np.arange(first_line_no + 1, first_line_no + 1 + len(lengths)),
                    "raw": text,
                    "byte_length": lengths.astype(np.int64),
                    "utf8_ok": np.ones(len(lengths), dtype=bool),
                    "read_error": pa.nulls(len(lengths), pa.string()),
                },
                schema=RAW_LINE_SCHEMA,
            )
    heads = [buffer[s : s + min(n, max_line_bytes)] for s, n in zip(starts, lengths, strict=True)]
    return _lines_table(heads, lengths.tolist(), first_line_no)


def _lines_table(heads: list[bytes], lengths: list[int], first_line_no: int) -> pa.Table:
    """Lines one by one: the way for text that is not clean UTF-8 (or holds NUL bytes)."""
    raw, ok = [], []
    for head in heads:
        try:
            text, utf8_ok = head.decode("utf-8"), True
        except UnicodeDecodeError:
            text, utf8_ok = head.decode("utf-8", errors="replace"), False
        raw.append(text.replace("\x00", "\ufffd"))
        ok.append(utf8_ok and "\x00" not in text)
    return pa.table(
        {
            "line_no": range(first_line_no + 1, first_line_no + 1 + len(heads)),
            "raw": raw,
            "byte_length": lengths,
            "utf8_ok": ok,
            "read_error": pa.nulls(len(heads), pa.string()),
        },
        schema=RAW_LINE_SCHEMA,
    )


def is_blank_line(chunk: pa.Table) -> pa.ChunkedArray:
    """Which lines of a chunk are blank (see BLANK_LINE_SQL, the same rule)."""
    whole = pc.equal(chunk["byte_length"], pc.binary_length(chunk["raw"]))
    clean = pc.and_(pc.is_null(chunk["read_error"]), chunk["utf8_ok"])
    blank = pc.match_substring_regex(chunk["raw"], f"^{BLANK_LINE_PATTERN}$")
    return pc.and_(pc.and_(clean, whole), blank)


@dataclass
class StoredLines:
    lines: int = 0
    blank_lines: int = 0  # tombstones of erased customers included
    erased_lines: int = 0
    chunks: int = 0
    read_errors: list[str] = field(default_factory=list)


# Small row groups: a chunk of lines spans several, so DuckDB reads it on every core, and a
# line-number range skips the rest of the file.
RAW_ROW_GROUP_ROWS = 20_000


def store_raw_lines(
    writer: pq.ParquetWriter,
    chunks: Iterator[pa.Table],
    on_chunk: Callable[[StoredLines], None] | None = None,
    erased: Sequence[str] = (),
) -> StoredLines:
    """Write line chunks to the batch's raw_customers file; a line that names an erased
    customer's ID (its hash among `erased`, see core/erasure.py) is stored as a tombstone."""
    from pipeline_project.core.erasure import tombstone_erased

    stored = StoredLines()
    ingested_at = pa.scalar(datetime.now(UTC), pa.timestamp("us", tz="UTC"))
    for chunk in chunks:
        chunk, erased_lines = tombstone_erased(chunk, erased)
        stored.erased_lines += erased_lines
        writer.write_table(
            chunk.append_column("ingested_at", pa.repeat(ingested_at, chunk.num_rows)),
            row_group_size=RAW_ROW_GROUP_ROWS,
        )
        errors = chunk["read_error"].drop_null()
        stored.read_errors += errors.to_pylist() if len(errors) else []
        stored.lines += chunk.num_rows
        stored.blank_lines += pc.sum(is_blank_line(chunk)).as_py() or 0
        stored.chunks += 1
        if on_chunk is not None:
            on_chunk(stored)
    return stored
