"""The data contract: each bad-row kind is rejected with a readable reason; valid edge cases pass."""

import json
from pathlib import Path

import duckdb
import pytest

from pipeline_project.resources import Warehouse
from pipeline_project.sample_data import BAD_KINDS, EDGE_KINDS, build_catalog, iter_batch_lines
from pipeline_project_tests.helpers import customer, store_and_validate, write_lines

OTHER_ID = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"


def validate_lines(
    tmp_path: Path, lines: list, chunk_rows: int = 1000, max_line_bytes: int = 1 << 20
):
    """Store `lines` as batch b1 and validate it; returns (summary, errors by line, customers)."""
    warehouse = Warehouse(database=str(tmp_path / "w.duckdb"))
    path = write_lines(tmp_path / "b1.jsonl", lines)
    _, summary = store_and_validate(warehouse, path, "b1", chunk_rows, max_line_bytes)
    with warehouse.get_connection() as conn:
        errors = dict(conn.execute("SELECT line_no, errors FROM schema_errors").fetchall())
        customers = conn.execute(
            "SELECT line_no, customer_id::VARCHAR, email, purchase_count, total_spend FROM customers"
            " ORDER BY line_no"
        ).fetchall()
    return summary, errors, customers


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('{"id": "6f1c2a3b-4d5e', ["line: must hold one JSON object (got invalid JSON)"]),
        ("[1, 2]", ["line: must hold one JSON object (got array)"]),
        (customer(email=None), ["email: is required"]),
        (
            customer(createdAt=None, purchaseHistory=None),
            ["createdAt: is required", "purchaseHistory: is required"],
        ),
        (customer(id=12345), ["id: must be a string (got number)"]),
        (customer(purchaseHistory="none"), ["purchaseHistory: must be an array (got string)"]),
        (customer(id="cust-000123"), ["id: must be a UUID (got 'cust-000123')"]),
        (
            customer(email="anna at example.com"),
            ["email: must be an email address (got 'anna at example.com')"],
        ),
        (
            customer(createdAt="2024-13-45T25:61:00Z"),
            ["createdAt: must be an ISO-8601 date-time (got '2024-13-45T25:61:00Z')"],
        ),
        (
            customer(createdAt="yesterday"),
            ["createdAt: must be an ISO-8601 date-time (got 'yesterday')"],
        ),
        (
            customer(purchaseHistory=[{"productId": "P1", "amount": -3, "date": "2024-01-01"}]),
            ["purchaseHistory[0].amount: must be a finite number > 0 (got '-3.0')"],
        ),
        (
            customer(purchaseHistory=[{"productId": "P1", "amount": 0, "date": "2024-01-01"}]),
            ["purchaseHistory[0].amount: must be a finite number > 0 (got '0.0')"],
        ),
        (
            '{"id": "6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b", "email": "a@b.io",'
            ' "createdAt": "2024-01-01T00:00:00Z",'
            ' "purchaseHistory": [{"productId": "P1", "amount": NaN, "date": "2024-01-01"}]}',
            ["purchaseHistory[0].amount: must be a finite number > 0 (got 'nan')"],
        ),
        (
            customer(purchaseHistory=[{"productId": "P1", "amount": 5, "date": "soon"}, 7]),
            [
                "purchaseHistory[1]: must be an object (got number)",
                "purchaseHistory[0].date: must be an ISO-8601 date-time (got 'soon')",
            ],
        ),
        (
            customer(purchaseHistory=[{"productId": " ", "amount": "5", "date": None}]),
            [
                "purchaseHistory[0].productId: must not be empty (got ' ')",
                "purchaseHistory[0].amount: must be a number (got string)",
                "purchaseHistory[0].date: must be a string (got null)",
            ],
        ),
    ],
)
def test_bad_line_lands_in_schema_errors_with_every_reason(tmp_path, line, expected):
    summary, errors, customers = validate_lines(tmp_path, [customer(id=OTHER_ID), line])
    assert [c[0] for c in customers] == [1]
    assert sorted(errors) == [2]
    assert sorted(errors[2]) == sorted(expected)
    assert (summary.valid, summary.invalid) == (1, 1)


def test_invalid_utf8_and_over_long_lines_are_rejected_with_their_reason(tmp_path):
    lines = [customer().encode()[:-2] + b'\xff"}', customer(id=OTHER_ID, email="x" * 500 + "@a.io")]
    _, errors, _ = validate_lines(tmp_path, lines, max_line_bytes=400)
    assert errors[1] == ["line: must hold one JSON object (got text that is not UTF-8)"]
    assert errors[2][0].startswith("line: must hold one JSON object (got a line of ")


KEPT = "id: duplicates the id of a later line, which is kept"


def test_an_id_on_several_valid_lines_keeps_the_last_even_across_chunks(tmp_path):
    lines = [customer(), customer(id=OTHER_ID), customer(email="other@example.com"), customer()]
    summary, errors, customers = validate_lines(tmp_path, lines, chunk_rows=2)
    assert [c[0] for c in customers] == [2, 4]
    assert errors == {1: [f"{KEPT} (got line 4)"], 3: [f"{KEPT} (got line 4)"]}
    assert (summary.valid, summary.invalid, summary.chunks) == (2, 2, 2)
    assert summary.errors_by_field["id"] == 2


def test_a_corrected_copy_after_an_invalid_line_is_kept(tmp_path):
    """The first line with an id is broken, a corrected copy follows: the copy is the
    customer (before, it was rejected as a duplicate and the customer vanished)."""
    lines = [customer(email="anna at example.com"), customer(id=OTHER_ID), customer()]
    summary, errors, customers = validate_lines(tmp_path, lines)
    assert [c[0] for c in customers] == [2, 3]
    assert errors == {1: ["email: must be an email address (got 'anna at example.com')"]}


def test_uppercase_uuid_counts_as_the_same_id_and_is_stored_lowercase(tmp_path):
    _, errors, customers = validate_lines(
        tmp_path, [customer(id=OTHER_ID.upper()), customer(id=OTHER_ID)]
    )
    assert [(c[0], c[1]) for c in customers] == [(2, OTHER_ID)]
    assert errors == {1: [f"{KEPT} (got line 2)"]}


def test_repeated_keys_absurd_amounts_and_future_purchases_are_rejected(tmp_path):
    repeated = customer()[:-1] + ', "id": "0a1b2c3d-4e5f-4a6b-8c7d-000000000000"}'
    entry = '{"productId": "P1", "amount": 5, "amount": 7, "date": "2024-01-01T00:00:00Z"}'
    entry_repeated = customer(id=OTHER_ID).replace(
        '"purchaseHistory": [', f'"purchaseHistory": [{entry}, '
    )
    lines = [
        repeated,
        entry_repeated,
        customer(id="11111111-2222-4333-8444-000000000003", purchaseHistory=[
            {"productId": "P1", "amount": 1e300, "date": "2024-01-01T00:00:00Z"}]),
        customer(id="11111111-2222-4333-8444-000000000004", purchaseHistory=[
            {"productId": "P1", "amount": 5, "date": "9999-12-31T00:00:00Z"}]),
        customer(id="11111111-2222-4333-8444-000000000005", createdAt="2024-03-01"),
    ]  # fmt: skip
    _, errors, customers = validate_lines(tmp_path, lines)
    assert customers == []
    assert errors == {
        1: ["line: must not repeat a key (got 'id')"],
        2: ["purchaseHistory[0]: must not repeat a key (got 'amount')"],
        3: [
            "purchaseHistory[0].amount: must not exceed the configured maximum amount (got '1e+300')"
        ],
        4: [
            "purchaseHistory[0].date: must not be later than the batch's arrival (plus the tolerance) (got '9999-12-31T00:00:00Z')"
        ],
        5: ["createdAt: must have a time of day, not a date alone (got '2024-03-01')"],
    }


def test_a_timestamp_without_an_offset_is_the_same_instant_on_any_host(tmp_path):
    """Every connection works in UTC: a host in New York stores 10:00 as 10:00 UTC too."""
    script = (
        "import sys; from pathlib import Path;"
        " from pipeline_project_tests.test_validation import validate_lines;"
        " from pipeline_project_tests.helpers import customer;"
        " validate_lines(Path(sys.argv[1]), [customer(createdAt='2024-01-05T10:00:00')])"
    )
    import os
    import subprocess
    import sys

    for zone in ("America/New_York", "Asia/Tokyo"):
        folder = tmp_path / zone.replace("/", "_")
        folder.mkdir()
        done = subprocess.run(
            [sys.executable, "-c", script, str(folder)], env={**os.environ, "TZ": zone},
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        with duckdb.connect(str(folder / "w.duckdb"), read_only=True) as conn:
            [(instant,)] = conn.execute("SELECT epoch(created_at) FROM customers").fetchall()
        assert instant == 1704448800  # 2024-01-05 10:00:00 UTC


def test_valid_edge_cases_pass_and_extra_fields_are_dropped(tmp_path):
    many = [
        {"productId": f"P{i}", "amount": 1.5, "date": "2024-05-01T00:00:00+02:00"}
        for i in range(300)
    ]
    lines = [
        customer(purchaseHistory=[]),
        customer(id=OTHER_ID, loyaltyTier="gold", nested={"a": [1, 2]}),
        customer(
            id="11111111-2222-4333-8444-555555555555",
            purchaseHistory=many,
            createdAt="2020-02-29T12:00:00Z",
        ),
    ]
    summary, errors, customers = validate_lines(tmp_path, lines)
    assert errors == {}
    assert [(c[0], c[3]) for c in customers] == [(1, 0), (2, 1), (3, 300)]
    assert customers[2][4] == pytest.approx(450.0)
    assert summary.error_rate == 0.0


def test_every_generated_kind_lands_in_its_place(tmp_path):
    catalog, _ = build_catalog()
    generated = list(iter_batch_lines(300, 0.15, 5, catalog))
    _, errors, customers = validate_lines(tmp_path, [line for _, line in generated], chunk_rows=64)
    kinds = {i + 1: kind for i, (kind, _) in enumerate(generated)}
    # a duplicate id is a later valid line with the first valid line's id: the last of them is
    # kept, the earlier ones (the first valid line among them) are rejected, naming it
    superseded = {n for n, messages in errors.items() if messages[0].startswith(KEPT)}
    assert "valid" in {kinds[n] for n in superseded} <= {"valid", "duplicate_id"}
    assert {kinds[n] for n in errors if n not in superseded} == set(BAD_KINDS) - {"duplicate_id"}
    accepted = {kinds[c[0]] for c in customers}
    assert accepted == {"valid", "duplicate_id", *EDGE_KINDS}
    assert len(errors) + len(customers) == 300
    for messages in errors.values():
        assert messages and all(": " in m for m in messages)


def test_purchases_of_valid_customers_are_stored_with_their_customer(tmp_path):
    warehouse_path = tmp_path / "w.duckdb"
    validate_lines(tmp_path, [customer(), customer(id=OTHER_ID, email="bad")])
    with duckdb.connect(str(warehouse_path), read_only=True) as conn:
        rows = conn.execute(
            "SELECT customer_id::VARCHAR, line_no, purchase_idx, product_id, amount,"
            " strftime(purchased_at, '%Y-%m-%dT%H:%M:%S') FROM customer_purchases"
        ).fetchall()
        raw = conn.execute("SELECT raw FROM schema_errors").fetchall()
    assert rows == [
        ("6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b", 1, 0, "P00001", 12.5, "2024-01-02T03:04:05")
    ]
    assert json.loads(raw[0][0])["email"] == "bad"


# What DuckDB's timestamp cast takes that is not an ISO-8601 date or date-time: its documented
# special inputs (epoch, infinity, -infinity, in any case and padding), PostgreSQL's words (not
# taken by the installed DuckDB, rejected all the same), and forms it reads leniently.
NOT_ISO_8601 = [
    "epoch", "EPOCH", " epoch ", "infinity", "INFINITY", "-infinity", "now", "today",
    "tomorrow", "yesterday", "allballs",
    "2024-1-5", "2024-01-5", "24-01-05", "2024-01-05 3:04", "2024-01-05T3:04:05Z",
    "2024-01-05T03:04+25:00", "2024-01-05T03:04:05+99", "2024-01-05T03:04:05+15:00",
    "2024-01-05T03:04:05+02:60", "2024-01-05T03:04:05+02:00:30", "2024-01-05T03:04:05+0200",
    "2024-01-05T03:04:05.Z", "2024-01-05T03:04:05Z+02:00", "2024-01-05T24:00:00",
    "12024-01-05", "294247-01-10", "-2024-01-05", "2024-01-05 (BC)", "2024-01-05 BC",
    "2024-01-05T03:04:05 UTC", "2024-01-05 03:04:05 Europe/Paris", " 2024-01-05", "2024-01-05 ",
    "2024-01-05T", "2024-01-05Z", "20240105", "2024-W01-1",
]  # fmt: skip


@pytest.mark.parametrize("value", NOT_ISO_8601)
def test_a_date_that_is_not_iso_8601_is_rejected_even_when_duckdb_parses_it(tmp_path, value):
    history = [{"productId": "P1", "amount": 5, "date": value}]
    lines = [customer(createdAt=value), customer(id=OTHER_ID, purchaseHistory=history)]
    summary, errors, _ = validate_lines(tmp_path, lines)
    assert errors == {
        1: [f"createdAt: must be an ISO-8601 date-time (got {value!r})"],
        2: [f"purchaseHistory[0].date: must be an ISO-8601 date-time (got {value!r})"],
    }
    assert summary.valid == 0


@pytest.mark.parametrize(
    ("value", "instant"),
    [
        ("2024-02-29T23:59", "2024-02-29 23:59:00.000000"),
        ("2024-01-05 03:04", "2024-01-05 03:04:00.000000"),
        ("2024-01-05T03:04:05", "2024-01-05 03:04:05.000000"),
        ("2024-01-05T03:04:05Z", "2024-01-05 03:04:05.000000"),
        ("2024-01-05T03:04:05.5Z", "2024-01-05 03:04:05.500000"),
        ("2024-01-05T03:04:05.123456789Z", "2024-01-05 03:04:05.123456"),
        ("2024-01-05T03:04:05+14:00", "2024-01-04 13:04:05.000000"),
        ("2024-01-05T03:04:05-12:30", "2024-01-05 15:34:05.000000"),
        ("2024-01-05T03:04:05-00:00", "2024-01-05 03:04:05.000000"),
        ("2024-01-05 03:04:05.25+02", "2024-01-05 01:04:05.250000"),
        ("0001-01-01T00:00:00Z", "0001-01-01 00:00:00.000000"),
    ],
)
def test_iso_8601_dates_and_date_times_are_accepted_as_their_instant(tmp_path, value, instant):
    history = [{"productId": "P1", "amount": 5, "date": value}]
    warehouse = tmp_path / "w.duckdb"
    _, errors, _ = validate_lines(tmp_path, [customer(createdAt=value, purchaseHistory=history)])
    assert errors == {}
    with duckdb.connect(str(warehouse), read_only=True) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        stored = conn.execute(
            "SELECT strftime(created_at, '%Y-%m-%d %H:%M:%S.%f'),"
            " strftime(purchased_at, '%Y-%m-%d %H:%M:%S.%f')"
            " FROM customers JOIN customer_purchases USING (batch_id, line_no)"
        ).fetchall()
    assert stored == [(instant, instant)]


def test_a_purchase_date_may_be_a_date_alone_created_at_may_not(tmp_path):
    history = [{"productId": "P1", "amount": 5, "date": "2024-01-05"}]
    lines = [customer(createdAt="2024-01-04T09:00:00Z", purchaseHistory=history)]
    _, errors, customers = validate_lines(tmp_path, lines)
    assert errors == {} and len(customers) == 1


# ---- the typed parse and the per-field path describe a line alike ---------------------------

P = {"productId": "P1", "amount": 2.5, "date": "2024-01-02"}
TRICKY_LINES = [
    customer(),
    customer(id="6F1C2A3B-4D5E-4F60-8A7B-9C0D1E2F3A4B"),  # the same id, upper case: a duplicate
    customer(id="0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d", email='a\u00e9"b@x.io'),  # JSON escapes
    customer(email="é@例え.jp", createdAt="2024-02-29 23:59:59.123+05:30"),
    customer(email={"a": "b@c.de"}),  # an object whose text looks like an email
    customer(email=["b@c.de"]),
    customer(email=True, createdAt=20240105),
    customer(email=False, id=-1.5e3),
    customer(id=None),
    '{"id": null, "email": null, "createdAt": null, "purchaseHistory": null}',
    "   " + customer(),  # whitespace before the object
    customer()[:-1] + ', "id": "0a1b2c3d-4e5f-4a6b-8c7d-000000000000"}',  # a repeated key
    customer(purchaseHistory=[]),
    customer(purchaseHistory={}),
    customer(purchaseHistory=[P, None, 1, "x", [P], {}]),
    customer(purchaseHistory=[{**P, "productId": 17}, {**P, "amount": "2.5"}]),
    customer(purchaseHistory=[{**P, "amount": True}, {**P, "amount": 1e300 * 10}]),
    customer(purchaseHistory=[{**P, "amount": None}, {**P, "date": None}, {**P, "extra": 1}]),
    customer(purchaseHistory=[{**P, "productId": "  "}, {**P, "date": "epoch"}]),
    customer(purchaseHistory=[{**P, "productId": "a\\b"}, {**P, "amount": -0.0}]),
    customer(createdAt="2024-01-05T10:00:00+25:00"),
    "[1, 2]",
    '"a string"',
    "42",
    "null",
    "{}",
    '{"id": "x"',
    "",
]


def test_the_typed_parse_gives_every_line_the_columns_of_the_per_field_path(tmp_path):
    """The fast path (one typed parse) against the per-field path on the same lines: the same
    columns, value for value, for lines the typed parse may only approximate (types it would
    coerce, nulls, escapes, entries of every kind)."""
    from pipeline_project.core import validation as v

    generated = iter_batch_lines(300, 0.3, 7, build_catalog()[0])
    lines = TRICKY_LINES + [line for _, line in generated]
    warehouse = Warehouse(database=str(tmp_path / "w.duckdb"))
    path = write_lines(tmp_path / "b1.jsonl", lines)
    store_and_validate(warehouse, path, "b1", 10_000, 1 << 20)
    raw_file = warehouse.raw_file("b1")
    with duckdb.connect() as conn:
        v.prepare_batch(conn)
        v.build_chunk_tables(conn, raw_file, 1, 10**6, 1 << 20)
        typed = [t.to_pylist() for t in v.fetch_chunk(conn, 1 << 20)]
        [(exact_before,)] = conn.execute("SELECT count(*) FROM chunk_exact").fetchall()
        conn.execute("INSERT INTO chunk_exact SELECT line_no FROM chunk_lines")
        per_field = [t.to_pylist() for t in v.fetch_chunk(conn, 1 << 20)]
    assert len(typed[0]) == len(lines)
    assert 0 < exact_before < len(lines) / 2  # most lines took the typed path
    for fast, slow in zip(typed, per_field, strict=True):
        for a, b in zip(fast, slow, strict=True):
            assert a == b or _same_nan(a, b), (a, b)


def _same_nan(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        x == y or (isinstance(x, float) and x != x and y != y)
        for x, y in zip(a.values(), b.values(), strict=True)
    )


ZERO = {"productId": "P00002", "amount": 0, "date": "2024-01-03T00:00:00Z"}
GOOD = {"productId": "P00001", "amount": 12.5, "date": "2024-01-02T03:04:05Z"}
AMOUNT_RULE = "amount: must be a finite number > 0"


def _dropped(tmp_path) -> list[tuple]:
    with duckdb.connect(str(tmp_path / "w.duckdb"), read_only=True) as conn:
        return conn.execute(
            "SELECT line_no, purchase_idx, customer_id::VARCHAR, product_id, amount,"
            " purchased_at, reasons FROM dropped_purchases ORDER BY line_no, purchase_idx"
        ).fetchall()


@pytest.mark.parametrize("policy", ["reject the customer", "drop the purchase"])
def test_a_purchase_rule_rejects_the_customer_or_drops_the_purchase_as_configured(tmp_path, policy):
    lines = [
        customer(purchaseHistory=[GOOD, ZERO]),  # a free item among paid ones
        # broken beyond the dropped rule: rejected, with every reason
        customer(id=OTHER_ID, email="bad", purchaseHistory=[ZERO]),
        customer(id="1a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d", purchaseHistory=[
            {**ZERO, "date": "yesterday"}, GOOD]),  # also a bad date: rejected
    ]  # fmt: skip
    drop = frozenset({AMOUNT_RULE}) if policy == "drop the purchase" else frozenset()
    warehouse = Warehouse(database=str(tmp_path / "w.duckdb"))
    path = write_lines(tmp_path / "b1.jsonl", lines)
    _, summary = store_and_validate(warehouse, path, "b1", 1000, 1 << 20, drop_rules=drop)
    with warehouse.get_connection() as conn:
        errors = dict(conn.execute("SELECT line_no, errors FROM schema_errors").fetchall())
        purchases = conn.execute(
            "SELECT line_no, purchase_idx, product_id FROM customer_purchases ORDER BY ALL"
        ).fetchall()
        counts = conn.execute(
            "SELECT line_no, purchase_count, total_spend FROM customers"
        ).fetchall()
    zero = "purchaseHistory[1].amount: must be a finite number > 0 (got '0.0')"
    assert errors[2] == [
        "email: must be an email address (got 'bad')",
        "purchaseHistory[0].amount: must be a finite number > 0 (got '0.0')",
    ]
    assert set(errors[3]) == {
        "purchaseHistory[0].amount: must be a finite number > 0 (got '0.0')",
        "purchaseHistory[0].date: must be an ISO-8601 date-time (got 'yesterday')",
    }
    if policy == "reject the customer":
        assert errors[1] == [zero]
        assert purchases == [] and counts == [] and _dropped(tmp_path) == []
        assert summary.invalid == 3 and summary.dropped_purchases == 0
        return
    # kept, its history without the free item; the item counted, visible, with its reason
    assert 1 not in errors and summary.invalid == 2 and summary.valid == 1
    assert purchases == [(1, 0, "P00001")] and counts == [(1, 1, 12.5)]
    assert _dropped(tmp_path) == [
        (1, 1, "6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b", "P00002", 0.0, "2024-01-03T00:00:00Z",
         [zero])
    ]  # fmt: skip
    assert summary.dropped_purchases == 1 and summary.dropped_by_rule == {AMOUNT_RULE: 1}
    # every entry of a kept record is in exactly one place
    assert summary.purchases + summary.dropped_purchases == 2


def test_an_unknown_rule_to_drop_for_is_refused_with_the_known_ones(tmp_path):
    from pipeline_project.assets.validation import ValidationConfig

    with pytest.raises(Exception, match="do not exist: \\['amount: is zero'\\]"):
        ValidationConfig(drop_purchases_breaking=["amount: is zero"]).drop_rules()


def test_long_lines_are_validated_in_smaller_chunks_every_line_once(tmp_path):
    from pipeline_project.core.validation import chunk_ranges

    # ten records, five of them holding 200 purchases each (long lines)
    many = [GOOD] * 200
    lines = [
        customer(id=f"6f1c2a3b-4d5e-4f60-8a7b-{n:012d}", purchaseHistory=many if n % 2 else [GOOD])
        for n in range(10)
    ]
    summary, errors, customers = validate_lines(tmp_path, lines)
    assert summary.valid == 10 and not errors
    warehouse = Warehouse(database=str(tmp_path / "w.duckdb"))
    with warehouse.get_connection() as conn:
        raw = str(warehouse.raw_file("b1"))
        [(largest,)] = conn.execute(
            "SELECT max(byte_length) FROM read_parquet(?)", [raw]
        ).fetchall()
        ranges = chunk_ranges(conn, warehouse.raw_file("b1"), 10, chunk_rows=4,
                              chunk_bytes=2 * largest)  # fmt: skip
        sizes = [
            conn.execute(
                "SELECT sum(byte_length) FROM read_parquet(?) WHERE line_no BETWEEN ? AND ?",
                [raw, first, last],
            ).fetchone()[0]
            for first, last in ranges
        ]
    # every line in exactly one range, in order; no range over the budget (lines alike)
    assert [n for first, last in ranges for n in range(first, last + 1)] == list(range(1, 11))
    assert len(ranges) > 3 and max(sizes) <= 2 * largest
