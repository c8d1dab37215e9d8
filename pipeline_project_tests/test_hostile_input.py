"""Bad input tried broadly (hypothesis): arbitrary bytes, truncated gzip, huge lines, other
encodings, deeply nested JSON and hostile batch names never crash ingestion, validation or the
landing sensor, and every line ends in exactly one place."""

import gzip
import json
import os
import tempfile
from pathlib import Path

import dagster as dg
import duckdb
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline_project.core.landing_files import BLANK_LINE_SQL, UTF8_BOM
from pipeline_project.definitions import build_definitions, build_resources
from pipeline_project.partitions import BATCH_ID_PATTERN, batch_id_for_file_name
from pipeline_project.resources import Warehouse
from pipeline_project_tests.helpers import customer, settings_in, store_and_validate

EXAMPLES = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

_json = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)
_line = st.one_of(
    st.binary(max_size=120).map(lambda b: b.replace(b"\n", b"")),  # any bytes, NUL included
    st.just(customer().encode()),
    _json.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {"id": _json, "email": _json, "createdAt": _json, "purchaseHistory": _json}
    ).map(lambda d: json.dumps(d).encode()),
    st.integers(1, 20_000).map(lambda depth: b"[" * depth + b"]" * depth),  # deep nesting
    st.integers(1, 20_000).map(lambda depth: b'{"a":' * depth + b"1" + b"}" * depth),
    st.sampled_from(["utf-16", "utf-32", "latin-1", "cp1252"]).map(
        lambda enc: customer(email="jürgen.öl@example.com").encode(enc).replace(b"\n", b"")
    ),
    st.integers(300, 5_000).map(lambda n: customer(email="a" * n + "@example.com").encode()),
    st.sampled_from([b"", b"   ", b"\t\r", UTF8_BOM, UTF8_BOM + customer().encode()]),  # exports
)


def expected_lines(data: bytes) -> int:
    """What a reader of lines counts: every newline ends one, and a last unterminated one (a
    leading byte-order mark is no text)."""
    data = data.removeprefix(UTF8_BOM)
    return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


def ingest_and_validate(root: Path, path: Path, chunk_rows: int, max_line_bytes: int) -> dict:
    """Store the file as batch b1 and validate it; the line numbers in each place."""
    warehouse = Warehouse(database=str(root / "w.duckdb"))
    stored, summary = store_and_validate(warehouse, path, "b1", chunk_rows, max_line_bytes)
    with warehouse.get_connection() as conn:

        def line_numbers(sql: str) -> list[int]:
            return [n for (n,) in conn.execute(sql).fetchall()]

        places = {
            "raw": line_numbers("SELECT line_no FROM raw_customers ORDER BY 1"),
            "valid": line_numbers("SELECT line_no FROM customers ORDER BY 1"),
            "rejected": line_numbers(
                "SELECT line_no FROM schema_errors WHERE error_count > 0 ORDER BY 1"
            ),
            "blank": line_numbers(
                f"SELECT line_no FROM raw_customers WHERE {BLANK_LINE_SQL} ORDER BY 1"
            ),
            "orphan_purchases": line_numbers(
                "SELECT line_no FROM customer_purchases EXCEPT SELECT line_no FROM customers"
            ),
        }
    assert summary.rows_in == stored.lines == len(places["raw"])
    assert summary.blank_lines == stored.blank_lines == len(places["blank"])
    return {**places, "read_errors": stored.read_errors}


def assert_each_line_in_one_place(places: dict, lines: int) -> None:
    assert places["raw"] == list(range(1, lines + 1))
    assert sorted(places["valid"] + places["rejected"] + places["blank"]) == places["raw"]
    assert places["orphan_purchases"] == []


@pytest.mark.slow
@EXAMPLES
@given(
    lines=st.lists(_line, max_size=25),
    separator=st.sampled_from([b"\n", b"\r\n"]),
    final_newline=st.booleans(),
    chunk_rows=st.integers(1, 7),
    max_line_bytes=st.sampled_from([256, 4096, 1 << 20]),
)
def test_any_bytes_every_line_ends_valid_or_rejected_exactly_once(
    lines, separator, final_newline, chunk_rows, max_line_bytes
):
    data = separator.join(lines) + (separator if final_newline and lines else b"")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "b1.jsonl"
        path.write_bytes(data)
        places = ingest_and_validate(Path(tmp), path, chunk_rows, max_line_bytes)
    assert_each_line_in_one_place(places, expected_lines(data))
    assert places["read_errors"] == []


@pytest.mark.slow
@EXAMPLES
@given(
    lines=st.lists(_line, min_size=1, max_size=25),
    keep=st.floats(0.0, 0.999),
    chunk_rows=st.integers(1, 7),
)
def test_truncated_gzip_keeps_the_lines_read_and_says_where_it_stopped(lines, keep, chunk_rows):
    data = b"\n".join(lines) + b"\n"
    packed = gzip.compress(data)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "b1.jsonl.gz"
        path.write_bytes(packed[: max(1, int(len(packed) * keep))])  # empty: no gzip at all
        places = ingest_and_validate(Path(tmp), path, chunk_rows, 1 << 20)
        with duckdb.connect(str(Path(tmp) / "w.duckdb"), read_only=True) as conn:
            raw = conn.sql(
                "SELECT raw, utf8_ok, read_error FROM raw_customers ORDER BY line_no"
            ).fetchall()
    assert_each_line_in_one_place(places, len(places["raw"]))
    # the file ends early and the batch says so, in a last line of its own
    assert len(places["read_errors"]) == 1 and raw[-1][0] == "" and raw[-1][2] is not None
    whole = data.removeprefix(UTF8_BOM).split(b"\n")
    for i, (text, utf8_ok, _) in enumerate(raw[:-1]):
        if utf8_ok:  # lines before the cut are intact (the CR of a CRLF end is no text); the
            # cut line keeps what was read
            assert whole[i].removesuffix(b"\r") == text.encode() if i < len(raw) - 2 else (
                whole[i].startswith(text.encode()))  # fmt: skip


_name_text = st.text(st.characters(blacklist_characters="/\x00", blacklist_categories=["Cs"]))
_name_bytes = st.binary(min_size=1, max_size=40).map(  # not UTF-8 at all, as Linux allows
    lambda b: os.fsdecode(b.replace(b"/", b"_").replace(b"\x00", b"_"))
)


@pytest.mark.slow
@EXAMPLES
@given(
    names=st.lists(
        (_name_text | _name_bytes).map(lambda stem: stem + ".jsonl")
        | _name_text.filter(lambda n: n != ""),
        max_size=8,
        unique=True,
    )
)
def test_hostile_file_names_never_crash_the_sensor_and_only_valid_batches_run(instance, names):
    # one instance for every example: the sensor only reads it (partitions are not added here)
    names = [n for n in names if n not in (".", "..") and len(os.fsencode(n)) <= 200]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        settings_ = settings_in(root)
        settings_.landing_dir.mkdir()
        for name in names:
            (settings_.landing_dir / name).write_bytes(customer().encode() + b"\n")
        before = sorted(p.name for p in root.iterdir())
        defs, resources = build_definitions(settings_), build_resources(settings_)
        sensor = defs.resolve_sensor_def("landing_batches_sensor")
        with dg.build_sensor_context(
            instance=instance, definitions=defs, resources=resources
        ) as context:
            result = sensor(context)
        after = sorted(p.name for p in root.iterdir())
    visible = [n for n in names if not n.startswith(".")]
    valid = sorted(b for n in visible if (b := batch_id_for_file_name(n)) is not None)
    assert sorted(r.partition_key for r in result.run_requests) == valid
    assert all(BATCH_ID_PATTERN.fullmatch(r.partition_key) for r in result.run_requests)
    # nothing but the alerts store appears next to the landing folder
    assert set(after) - set(before) <= {"alerts.duckdb", "alerts.duckdb.wal"}


@EXAMPLES
@given(batch_id=st.text(max_size=80))
def test_any_batch_id_is_refused_or_maps_inside_the_warehouse_folder(tmp_path, batch_id):
    warehouse = Warehouse(database=str(tmp_path / "w.duckdb"))
    if BATCH_ID_PATTERN.fullmatch(batch_id) is None:
        with pytest.raises(ValueError, match="not a valid batch ID"):
            warehouse.raw_file(batch_id)
        with pytest.raises(ValueError), warehouse.scratch_folder(batch_id):
            pass
        return
    raw = warehouse.raw_file(batch_id).resolve()
    assert raw.is_relative_to(warehouse.raw_dir.resolve())
    with warehouse.scratch_folder(batch_id) as folder:
        assert folder.resolve().is_relative_to(warehouse.files_dir.resolve())
