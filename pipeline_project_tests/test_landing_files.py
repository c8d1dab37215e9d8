import gzip
import random
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from pipeline_project.core.landing_files import (
    BLANK_LINE_SQL,
    UTF8_BOM,
    is_blank_line,
    iter_raw_line_chunks,
)
from pipeline_project_tests.helpers import write_lines


def read_all(path: Path, chunk_rows: int = 1000, max_line_bytes: int = 1 << 20) -> list[dict]:
    chunks = list(iter_raw_line_chunks(path, chunk_rows, max_line_bytes))
    return pa.concat_tables(chunks).to_pylist() if chunks else []


def test_every_line_is_numbered_from_one_in_chunks(tmp_path):
    path = write_lines(tmp_path / "b.jsonl", [f'{{"n": {i}}}' for i in range(25)])
    chunks = list(iter_raw_line_chunks(path, chunk_rows=10, max_line_bytes=1000))
    assert [c.num_rows for c in chunks] == [10, 10, 5]
    rows = pa.concat_tables(chunks).to_pylist()
    assert [r["line_no"] for r in rows] == list(range(1, 26))
    assert rows[24]["raw"] == '{"n": 24}'


def test_crlf_blank_lines_and_missing_final_newline_are_kept_exactly(tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_bytes(b'{"a":1}\r\n\n   \n{"b":2}')
    rows = read_all(path)
    assert [r["raw"] for r in rows] == ['{"a":1}', "", "   ", '{"b":2}']
    assert [r["byte_length"] for r in rows] == [7, 0, 3, 7]


def test_invalid_utf8_is_kept_and_flagged(tmp_path):
    path = write_lines(tmp_path / "b.jsonl", [b'{"email": "\xff\xfe"}', b'{"ok": "\xc3\xa9"}'])
    rows = read_all(path)
    assert [r["utf8_ok"] for r in rows] == [False, True]
    assert "\ufffd" in rows[0]["raw"]
    assert rows[1]["raw"] == '{"ok": "é"}'


def test_over_long_line_keeps_its_head_and_true_length_without_reading_it_whole(tmp_path):
    long_line = b'{"x": "' + b"a" * 5000 + b'"}'
    path = write_lines(tmp_path / "b.jsonl", [long_line, b'{"y": 1}'])
    rows = read_all(path, max_line_bytes=100)
    assert rows[0]["byte_length"] == len(long_line)
    assert len(rows[0]["raw"]) == 100
    assert rows[1] == {**rows[1], "line_no": 2, "raw": '{"y": 1}', "byte_length": 8}


def test_gzip_batches_are_read(tmp_path):
    path = tmp_path / "b.jsonl.gz"
    with gzip.open(path, "wb") as f:
        f.write(b'{"a": 1}\n{"a": 2}\n')
    assert [r["raw"] for r in read_all(path)] == ['{"a": 1}', '{"a": 2}']


def test_truncated_gzip_keeps_what_was_read_and_records_the_read_error(tmp_path):
    payload = b"".join(b'{"n": %d}\n' % i for i in range(20000))
    whole = gzip.compress(payload)
    path = tmp_path / "b.jsonl.gz"
    path.write_bytes(whole[: len(whole) // 2])
    rows = read_all(path)
    assert rows[-1]["read_error"] is not None and "EOFError" in rows[-1]["read_error"]
    assert all(r["read_error"] is None for r in rows[:-1])
    assert 0 < len(rows) - 1 < 20000
    assert [r["line_no"] for r in rows] == list(range(1, len(rows) + 1))


def test_empty_file_gives_no_chunks(tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_bytes(b"")
    assert list(iter_raw_line_chunks(path, 10, 100)) == []


@pytest.mark.parametrize("block_bytes", [1, 7, 64, 1 << 20])
def test_lines_split_across_read_blocks_come_out_whole(tmp_path, block_bytes):
    rng = random.Random(block_bytes)
    lines = [
        bytes(rng.choice(b'ab{}":\r \xc3\xa9\xff\x00') for _ in range(rng.randrange(0, 40)))
        for _ in range(300)
    ]
    path = tmp_path / "b.jsonl"
    path.write_bytes(b"\n".join(line.replace(b"\n", b"") for line in lines))
    chunks = list(iter_raw_line_chunks(path, 50, 30, block_bytes=block_bytes))
    rows = pa.concat_tables(chunks).to_pylist()
    expected = path.read_bytes().split(b"\n")
    assert [r["line_no"] for r in rows] == list(range(1, len(expected) + 1))
    for row, line in zip(rows, expected, strict=True):
        if line.endswith(b"\r"):
            line = line[:-1] if row is not rows[-1] else line
        assert row["byte_length"] == len(line)
        head = line[:30]
        try:
            text, ok = head.decode("utf-8"), b"\x00" not in head
        except UnicodeDecodeError:
            text, ok = head.decode("utf-8", errors="replace"), False
        assert (row["raw"], row["utf8_ok"]) == (text.replace("\x00", "\ufffd"), ok)


@pytest.mark.parametrize("block_bytes", [1, 2, 3, 4, 1 << 20])
@pytest.mark.parametrize("name", ["b.jsonl", "b.jsonl.gz"])
def test_a_leading_byte_order_mark_is_stripped_from_the_first_line_only(
    tmp_path, name, block_bytes
):
    data = UTF8_BOM + b'{"a": 1}\r\n' + UTF8_BOM + b'{"b": 2}\n'
    path = tmp_path / name
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    chunks = list(iter_raw_line_chunks(path, 1000, 1 << 20, block_bytes=block_bytes))
    rows = pa.concat_tables(chunks).to_pylist()
    assert [(r["raw"], r["byte_length"]) for r in rows] == [
        ('{"a": 1}', 8),
        ('\ufeff{"b": 2}', 11),  # not the start of the file: kept, and fails validation
    ]


@pytest.mark.parametrize(
    ("data", "lines"),
    [(UTF8_BOM, []), (UTF8_BOM + b"\n", [""]), (UTF8_BOM[:2], ["\ufffd"]), (b"ab", ["ab"])],
)
def test_a_file_shorter_than_a_byte_order_mark_or_only_one_is_read_exactly(tmp_path, data, lines):
    path = tmp_path / "b.jsonl"
    path.write_bytes(data)
    assert [r["raw"] for r in read_all(path)] == lines


def test_blank_lines_are_the_same_in_arrow_and_in_sql(tmp_path):
    lines = [b"", b"   ", b"\t\r", b"\r", b" x ", b"\x0c", b"\xc2\xa0", b" " * 50, b"\xff ", b"{}"]
    path = write_lines(tmp_path / "b.jsonl", lines)
    lines_table = pa.concat_tables(iter_raw_line_chunks(path, 4, 40))  # 50 spaces cut: not blank
    arrow = is_blank_line(lines_table).to_pylist()
    assert arrow == [True, True, True, True, False, False, False, False, False, False]
    sql = duckdb.sql(f"SELECT {BLANK_LINE_SQL} FROM lines_table ORDER BY line_no").fetchall()
    assert [blank for (blank,) in sql] == arrow
