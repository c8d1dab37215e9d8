"""Row-level validation of a batch: DuckDB extracts fields, pandera judges them, chunk by chunk.

Every raw line ends in exactly one place: `customers` (with its purchases in
`customer_purchases`), `schema_errors` with every `field: message` problem of the line, or,
when it is blank (no record at all, see landing_files.BLANK_LINE_SQL), the blank line count.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import pyarrow
import pyarrow.compute as pc

from pipeline_project.contract import (
    CONTRACT,
    ISO_8601_PATTERN,
    LATEST,
    MAX_AMOUNT,
    Contract,
    Field,
)
from pipeline_project.core.arrow_results import arrow_table
from pipeline_project.core.errors import ContractError
from pipeline_project.core.landing_files import BLANK_LINE_SQL
from pipeline_project.core.personal_data import mask_personal
from pipeline_project.core.staging import write_staged

if TYPE_CHECKING:  # pandera is imported where a chunk is judged: only validation needs it
    import pandera.pyarrow as pa

_JSON_KIND_MACRO = """
CREATE OR REPLACE TEMP MACRO json_kind(t) AS CASE
    WHEN t IS NULL THEN 'missing'
    WHEN t = 'VARCHAR' THEN 'string'
    WHEN t IN ('BIGINT', 'UBIGINT', 'HUGEINT', 'DOUBLE') THEN 'number'
    ELSE lower(t) END
"""

# What a JSON text is, from its first character (JSON texts from DuckDB are never blank), and
# its value when it is a string: the text between the quotes when it holds no escape, else
# DuckDB unescapes it. Both are string operations, not a parse.
_JSON_TEXT_MACROS = [
    """CREATE OR REPLACE TEMP MACRO json_text_kind(j) AS CASE
        WHEN j IS NULL THEN NULL
        WHEN left(j, 1) = '"' THEN 'string'
        WHEN left(j, 1) = '{' THEN 'object'
        WHEN left(j, 1) = '[' THEN 'array'
        WHEN left(j, 1) IN ('t', 'f') THEN 'boolean'
        WHEN left(j, 1) = 'n' THEN 'null'
        ELSE 'number' END""",
    """CREATE OR REPLACE TEMP MACRO json_text_string(j) AS CASE
        WHEN left(j, 1) = '"' THEN CASE WHEN contains(j, '\\') THEN j ->> '$'
                                        ELSE (j::VARCHAR)[2:-2] END END""",
]

# A raw line that can hold JSON, and its parseable document (NULL when it cannot hold JSON).
_READABLE = "read_error IS NULL AND utf8_ok AND byte_length <= $max_line_bytes"
_DOC = f"CASE WHEN {_READABLE} THEN try_cast(raw AS JSON) END"


# The first key an object repeats (JSON text `j`, an object), else NULL: `{"id": A, "id": B}`
# would otherwise be read as its first value and the second dropped without a word.
def _repeated_key(keys: str) -> str:
    return f"list_filter({keys}, lambda k, i: list_position({keys}, k) <> i)[1]"


def _extract(doc: str, names: list[str]) -> str:
    """Every field of `doc` in ONE parse: `<field>__j`, its JSON text (NULL when absent), and
    `<field>__t`, its JSON type. Asking the document for each field would parse it each time."""
    paths = ", ".join(f"'$.{name}'" for name in names)
    return f"""SELECT *, {
        ", ".join(
            f"f[{i}] AS {name}__j, json_type(f[{i}]) AS {name}__t"
            for i, name in enumerate(names, start=1)
        )
    } FROM (SELECT *, json_extract({doc}, [{paths}]) AS f FROM {{source}})"""


def _iso_instant(text: str) -> str:
    """What DuckDB's TIMESTAMPTZ parser makes of a string of ISO-8601 shape (NULL: not a date).
    The shape comes first: the parser alone turns 'epoch' or '2024-1-5' into instants."""
    return f"""try_cast(CASE WHEN regexp_full_match({text}, '{ISO_8601_PATTERN}')
                        THEN {text} END AS TIMESTAMPTZ)"""


def _instant(name: str) -> str:
    """`<field>__ts`: the instant of `<field>__parsed`, when it is a finite one."""
    return f"CASE WHEN isfinite({name}__parsed) THEN {name}__parsed END AS {name}__ts"


def _kind(f: Field, kind: str) -> str:
    """A field's kind column from its JSON kind; an optional field's null is 'missing'."""
    if not f.required:
        kind = f"coalesce(nullif({kind}, 'null'), 'missing')"
    return f"{kind} AS {f.key}__type"


# How each field of the contract is read, two ways: from the per-field path (`<key>__j`, `__t`
# of _extract; `<key>__parsed` for a timestamp) and from the typed parse (`x`, the field's JSON
# text, NULL when absent; see _JSON_TEXT_MACROS). Both give the same columns: `<key>__type`,
# `<key>` (a string's text, a number's value) and a timestamp's `<key>__ts`.
def _columns_of(f: Field, kind: str, text: str, number: str) -> str:
    """A field's columns from the SQL of its JSON kind, its string's text, its number."""
    columns = [_kind(f, kind)]
    if f.kind in ("string", "timestamp"):
        columns.append(f"{text} AS {f.key}")
    if f.kind == "number":
        columns.append(f"{number} AS {f.key}")
    if f.kind == "timestamp":
        columns.append(_instant(f.key))
    return ", ".join(columns)


def _field_text(key: str) -> str:
    return f"CASE WHEN {key}__t = 'VARCHAR' THEN {key}__j ->> '$' END"


def _field_columns(f: Field) -> str:
    k = f.key
    number = f"CASE WHEN json_kind({k}__t) = 'number' THEN ({k}__j ->> '$')::DOUBLE END"
    return _columns_of(f, f"json_kind({k}__t)", _field_text(k), number)


def _field_parsed(f: Field) -> str:
    return _iso_instant(_field_text(f.key))


def _typed_columns(f: Field, x: str) -> str:
    if f.kind == "list":  # the typed path reads only lines whose list is one
        return f"'array' AS {f.key}__type"
    number = f"CASE WHEN json_text_kind({x}) = 'number' THEN {x}::VARCHAR::DOUBLE END"
    kind = f"coalesce(json_text_kind({x}), 'missing')"
    return _columns_of(f, kind, f"json_text_string({x})", number)


def _typed_parsed(fields: tuple[Field, ...], parent: str) -> str:
    """`<key>__parsed` of each timestamp field from the typed parse (see _field_parsed)."""
    return "".join(
        f", {_iso_instant(f'json_text_string({parent}.{f.key})')} AS {f.key}__parsed"
        for f in fields if f.kind == "timestamp"
    )  # fmt: skip


def _parsed_of(fields: tuple[Field, ...]) -> str:
    timestamps = [f for f in fields if f.kind == "timestamp"]
    return "".join(f", {_field_parsed(f)} AS {f.key}__parsed" for f in timestamps)


def _typed_struct(fields: tuple[Field, ...]) -> str:
    """The typed parse's structure: each field as its JSON text, the list as JSON texts."""
    kinds = {f.key: '["JSON"]' if f.kind == "list" else '"JSON"' for f in fields}
    parts = ", ".join(f'"{key}": {kind}' for key, kind in kinds.items())
    return "'{" + parts + "}'"


def _any_absent(parent: str, fields: tuple[Field, ...]) -> str:
    """SQL: a required field is absent (or null) in the typed parse."""
    required = [f"{parent}.{f.key} IS NULL" for f in fields if f.required]
    return " OR ".join(required) or "false"


# The `line` kind of a blank line: no record, counted apart and never judged.
BLANK = "blank"

# The lines the typed parse cannot describe exactly (see _ChunkSql), for the per-field path.
_RAW_CHUNK = """chunk_lines WHERE line_no IN (SELECT line_no FROM chunk_exact)"""
_CHUNK_TABLES = ["chunk_lines", "chunk_entries", "chunk_exact"]


@dataclass(frozen=True)
class _ChunkSql:
    """A chunk's SQL, from the contract. `build`: the chunk in three temp tables. chunk_lines:
    the raw lines, and for each readable line that starts an object its typed parse `t`.
    chunk_entries: the entries of the list of purchases of those, each object entry parsed into
    its fields `f`. chunk_exact: the lines the typed parse cannot describe exactly (unreadable,
    blank, not an object, a required field missing or null: the parse gives NULL for both, and
    an entry missing a required field), whose columns come from the per-field path instead.
    `lines`, `purchases`: the columns the schemas judge, for every line of the chunk."""

    build: tuple[str, ...]
    lines: str
    purchases: str


@cache
def chunk_sql(contract: Contract = CONTRACT) -> _ChunkSql:
    customer, purchase, items = contract.customer, contract.purchase, contract.items
    keys = [f.key for f in customer]
    lines_exact = f"""
    WITH src AS (
        SELECT line_no, raw, byte_length, utf8_ok, read_error, {_DOC} AS doc FROM {_RAW_CHUNK}
    ), fields AS (
        {_extract("doc", keys).format(source="src")}
    ), parsed AS (
        SELECT *, json_type(doc) AS doc__t{_parsed_of(customer)} FROM fields
    )
    SELECT
        parsed.line_no,
        raw,
        CASE WHEN {BLANK_LINE_SQL} THEN '{BLANK}'
             WHEN read_error IS NOT NULL THEN 'an unreadable line (' || read_error || ')'
             WHEN NOT utf8_ok THEN 'text that is not UTF-8'
             WHEN byte_length > $max_line_bytes
                 THEN 'a line of ' || byte_length || ' bytes, over the limit of ' || $max_line_bytes
             WHEN doc IS NULL THEN 'invalid JSON'
             ELSE json_kind(doc__t) END AS line,
        CASE WHEN doc__t = 'OBJECT' THEN {_repeated_key("json_keys(doc)")} END
            AS line__repeated_key,
        {", ".join(_field_columns(f) for f in customer)}
    FROM parsed"""
    purchases_exact = f"""
    WITH src AS (
        SELECT line_no, {_DOC} AS doc FROM {_RAW_CHUNK}
    ), lists AS (
        SELECT line_no, json_extract(doc, '$.{items}[*]') AS items
        FROM src
        WHERE json_type(doc, '$.{items}') = 'ARRAY'
    ), elems AS (
        SELECT line_no, generate_subscripts(items, 1) - 1 AS purchase_idx, unnest(items) AS e
        FROM lists
    ), fields AS (
        {_extract("e", [f.key for f in purchase]).format(source="elems")}
    ), parsed AS (
        SELECT *, json_type(e) AS e__t{_parsed_of(purchase)} FROM fields
    )
    SELECT
        line_no,
        purchase_idx,
        json_kind(e__t) AS purchase__type,
        CASE WHEN e__t = 'OBJECT' THEN {_repeated_key("json_keys(e)")} END
            AS purchase__repeated_key,
        {", ".join(_field_columns(f) for f in purchase)}
    FROM parsed"""
    build = (
        f"""CREATE OR REPLACE TEMP TABLE chunk_lines AS
        SELECT line_no, raw, byte_length, utf8_ok, read_error, t,
               CASE WHEN t IS NOT NULL THEN {_repeated_key("json_keys(raw)")} END AS repeated_key
        FROM (SELECT *, CASE WHEN {_READABLE} AND starts_with(raw, '{{')
                             THEN try(json_transform(raw, {_typed_struct(customer)})) END AS t
              FROM read_parquet($raw_path) WHERE line_no BETWEEN $first AND $last)""",
        f"""CREATE OR REPLACE TEMP TABLE chunk_entries AS
        SELECT line_no, purchase_idx, e,
               CASE WHEN json_text_kind(e) = 'object'
                    THEN json_transform(e, {_typed_struct(purchase)}) END AS f,
               CASE WHEN json_text_kind(e) = 'object' THEN {_repeated_key("json_keys(e)")} END
                   AS repeated_key
        FROM (SELECT line_no, generate_subscripts(t.{items}, 1) - 1 AS purchase_idx,
                     unnest(t.{items}) AS e
              FROM chunk_lines WHERE t.{items} IS NOT NULL)""",
        f"""CREATE OR REPLACE TEMP TABLE chunk_exact AS
        SELECT line_no FROM chunk_lines WHERE {_any_absent("t", customer)}
        UNION
        SELECT line_no FROM chunk_entries
        WHERE f IS NOT NULL AND ({_any_absent("f", purchase)})""",
    )
    lines = f"""
    SELECT line_no, raw, 'object' AS line, repeated_key AS line__repeated_key,
           {", ".join(_typed_columns(f, f"t.{f.key}") for f in customer)}
    FROM (SELECT *{_typed_parsed(customer, "t")} FROM chunk_lines) AS chunk_lines
    WHERE t.{items} IS NOT NULL AND line_no NOT IN (SELECT line_no FROM chunk_exact)
    UNION ALL BY NAME
    ({lines_exact})
    ORDER BY line_no"""
    # an entry that is not an object has no fields ('missing', as json_extract gives for it)
    purchases = f"""
    SELECT line_no, purchase_idx,
           coalesce(json_text_kind(e), 'null') AS purchase__type,
           repeated_key AS purchase__repeated_key,
           {", ".join(_typed_columns(f, f"f.{f.key}") for f in purchase)}
    FROM (SELECT *{_typed_parsed(purchase, "f")}
          FROM chunk_entries WHERE line_no NOT IN (SELECT line_no FROM chunk_exact))
    UNION ALL BY NAME
    ({purchases_exact})
    ORDER BY line_no, purchase_idx"""
    return _ChunkSql(build, lines, purchases)


_NO_MESSAGES = pyarrow.table(
    {"line_no": pyarrow.array([], pyarrow.int64()), "message": pyarrow.array([], pyarrow.string())}
)


@dataclass
class ChunkResult:
    """Valid customers and purchases of a chunk, every invalid line with its messages, and the
    count of its blank lines."""

    customers: pyarrow.Table
    purchases: pyarrow.Table
    errors: pyarrow.Table  # line_no, errors (list of "field: message"), raw
    blank_lines: int = 0
    # purchases dropped from kept records (drop_rules): line_no, purchase_idx, fields, reasons
    dropped: pyarrow.Table = field(default_factory=lambda: _dropped_schema().empty_table())


@dataclass
class ValidationSummary:
    """Lines in = valid + invalid + blank lines; the error rate is over records (not blanks)."""

    rows_in: int = 0
    valid: int = 0
    invalid: int = 0
    blank_lines: int = 0
    purchases: int = 0
    chunks: int = 0
    errors_by_field: Counter = field(default_factory=Counter)
    dropped_purchases: int = 0  # dropped from kept records (drop_rules)
    dropped_by_rule: Counter = field(default_factory=Counter)

    @property
    def records(self) -> int:
        return self.rows_in - self.blank_lines

    def supersede(self, lines: int, purchases: int) -> None:
        """`lines` valid lines (with `purchases`) moved to the errors: their id a later valid
        line repeats."""
        self.valid -= lines
        self.invalid += lines
        self.purchases -= purchases
        if lines:
            self.errors_by_field[CONTRACT.id_field.key] += lines

    @property
    def error_rate(self) -> float:
        return self.invalid / self.records if self.records else 0.0


@dataclass(frozen=True)
class Limits:
    """What the contract refuses as absurd, from configuration: a purchase amount above
    `max_amount`; a purchase dated more than `date_tolerance` after the batch arrived."""

    max_amount: float = 100_000.0
    date_tolerance: timedelta = timedelta(days=1)


def validate_batch(
    conn: duckdb.DuckDBPyConnection,
    batch_id: str,
    raw_path: Path,
    staging: dict[str, Path],
    *,
    chunk_rows: int,
    max_line_bytes: int,
    limits: Limits = Limits(),
    on_chunk: Callable[[ValidationSummary], None] | None = None,
    drop_rules: frozenset[str] | None = None,
    contract: Contract = CONTRACT,
) -> ValidationSummary:
    """Validate the batch's raw lines (its raw_customers Parquet file) chunk by chunk, against
    `contract`; a purchase breaking only `drop_rules` (None: the rules the contract declares
    dropping) is dropped, not its customer.

    Each chunk's valid customers, their purchases and the invalid lines are written as Parquet
    parts into `staging` (the folder of customers, customer_purchases and schema_errors; see
    Warehouse.staged_batch, which loads them in one transaction). Memory holds two chunks:
    the one being judged and the next one being extracted.
    """
    prepare_batch(conn)
    [(last_line, arrived)] = conn.execute(
        "SELECT coalesce(max(line_no), 0), max(ingested_at) FROM read_parquet(?)",
        [str(raw_path)],
    ).fetchall()
    latest = (arrived or datetime.now(UTC)) + limits.date_tolerance
    summary = ValidationSummary()

    def extract(lines: tuple[int, int]) -> tuple[pyarrow.Table, pyarrow.Table]:
        build_chunk_tables(conn, raw_path, *lines, max_line_bytes, contract)
        return fetch_chunk(conn, max_line_bytes, contract)

    # DuckDB extracts the next chunk (in a worker thread, without the GIL) while pandera
    # judges this one; only the worker uses the connection until the loop ends.
    starts = chunk_ranges(conn, raw_path, last_line, chunk_rows)
    with ThreadPoolExecutor(max_workers=1) as worker:
        pending = worker.submit(extract, starts[0]) if starts else None
        for part in range(len(starts)):
            lines, purchases = pending.result()
            if part + 1 < len(starts):
                pending = worker.submit(extract, starts[part + 1])
            result = validate_chunk(
                lines, purchases, limits.max_amount, latest, drop_rules, contract
            )
            _stage_chunk(batch_id, result, staging, part)
            summary.rows_in += lines.num_rows
            summary.valid += result.customers.num_rows
            summary.invalid += result.errors.num_rows
            summary.blank_lines += result.blank_lines
            summary.purchases += result.purchases.num_rows
            summary.dropped_purchases += result.dropped.num_rows
            for reasons in result.dropped.column("reasons").to_pylist():
                summary.dropped_by_rule.update({_rule_of(m) for m in reasons})
            summary.chunks += 1
            for messages in result.errors.column("errors").to_pylist():
                summary.errors_by_field.update(
                    {m.split(":", 1)[0].split("[", 1)[0] for m in messages}
                )
            if on_chunk is not None:
                on_chunk(summary)
    for table in _CHUNK_TABLES:
        conn.execute(f"DROP TABLE IF EXISTS {table}")
    return summary


# At most this many bytes of lines per 2,048 lines of a chunk (DuckDB parses a vector of 2,048
# lines at once, and a parsed JSON document takes many times its text): real records can be
# long (a household's year of grocery line items: 44 KB on average, some 300 KB), and 618 such
# lines (27 MB) in one chunk ran out of DuckDB's 512 MB. Generated records (400 bytes) stay in
# chunks of chunk_rows lines.
CHUNK_BYTES = 8 * 1024 * 1024
_VECTOR = 2048


def chunk_ranges(
    conn: duckdb.DuckDBPyConnection, raw_path: Path, last_line: int, chunk_rows: int,
    chunk_bytes: int = CHUNK_BYTES,
) -> list[tuple[int, int]]:  # fmt: skip
    """The batch's lines in ranges of at most `chunk_rows` lines, a range cut into equal parts
    where its lines hold more than `chunk_bytes` bytes per 2,048 lines."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1 (got {chunk_rows})")
    sizes = dict(
        conn.execute(
            "SELECT (line_no - 1) // $rows, sum(byte_length) FROM read_parquet($path) GROUP BY ALL",
            {"rows": chunk_rows, "path": str(raw_path)},
        ).fetchall()
    )
    ranges = []
    for first in range(1, last_line + 1, chunk_rows):
        last = min(first + chunk_rows - 1, last_line)
        budget = chunk_bytes * -(-(last - first + 1) // _VECTOR)
        parts = max(1, -(-int(sizes.get((first - 1) // chunk_rows) or 0) // budget))
        step = -(-(last - first + 1) // parts)
        ranges += [(start, min(start + step - 1, last)) for start in range(first, last + 1, step)]
    return ranges


def prepare_batch(conn: duckdb.DuckDBPyConnection) -> None:
    """The macros of the extraction SQL."""
    for macro in [_JSON_KIND_MACRO, *_JSON_TEXT_MACROS]:
        conn.execute(macro)


# The batch's valid lines whose customer ID a later valid line repeats: the later one is kept
# (a file's later line corrects an earlier one), the earlier ones go to schema_errors naming it.
# Judged among valid lines only: an invalid line with the ID never takes it from a valid one.
# Read from the staged lines before the swap (a plain connection: the aggregate over every
# line may spill), so that the swap transaction only applies the few lines found.
_SUPERSEDED_SQL = """
SELECT c.line_no, d.kept_line
FROM read_parquet($staged) AS c
JOIN (SELECT customer_id, max(line_no) AS kept_line FROM read_parquet($staged)
      GROUP BY customer_id HAVING count(*) > 1) AS d
    USING (customer_id)
WHERE c.line_no < d.kept_line
"""
DUPLICATE_ID = "duplicates the id of a later line, which is kept"


def stage_duplicate_ids(conn: duckdb.DuckDBPyConnection, staged: Path) -> Path | None:
    """Before the swap: the staged valid lines (Parquet parts in `staged`) whose customer ID a
    later one repeats, and the line kept, into `staged`'s sibling superseded.parquet; None
    when no line was staged."""
    if not any(staged.glob("*.parquet")):
        return None
    out = staged.parent / "superseded.parquet"
    conn.sql(_SUPERSEDED_SQL, params={"staged": str(staged / "*.parquet")}).write_parquet(str(out))
    return out


def resolve_duplicate_ids(
    conn: duckdb.DuckDBPyConnection, batch_id: str, superseded: Path | None
) -> tuple[int, int]:
    """Inside the swap transaction, once the batch's rows are in: every valid line but the last
    of each customer ID (`superseded`, from stage_duplicate_ids) moves from customers (and its
    purchases) to schema_errors, with the line kept as its reason; returns how many lines, and
    purchases of them, moved."""
    if superseded is None:
        return 0, 0
    params = {"batch_id": batch_id}
    conn.execute(
        "CREATE OR REPLACE TEMP TABLE superseded_lines AS SELECT * FROM read_parquet(?)",
        [str(superseded)],
    )
    [(moved,)] = conn.execute("SELECT count(*) FROM superseded_lines").fetchall()
    purchases = 0
    if moved:
        # a semi-join on the few lines found (a correlated count would aggregate every
        # purchase of the batch by line, inside the transaction)
        [(purchases,)] = conn.execute(
            "SELECT count(*) FROM customer_purchases WHERE batch_id = $batch_id"
            " AND line_no IN (SELECT line_no FROM superseded_lines)",
            params,
        ).fetchall()
        conn.execute(
            f"""INSERT INTO schema_errors BY NAME
            SELECT $batch_id AS batch_id, s.line_no, r.raw,
                   ['{CONTRACT.id_field.key}: {DUPLICATE_ID} (got line ' || s.kept_line || ')']
                       AS errors,
                   1 AS error_count, now() AS detected_at
            FROM superseded_lines AS s
            JOIN raw_customers AS r ON r.batch_id = $batch_id AND r.line_no = s.line_no""",
            params,
        )
        for table in ("customer_purchases", "customers"):
            conn.execute(
                f"DELETE FROM {table} WHERE batch_id = $batch_id"
                " AND line_no IN (SELECT line_no FROM superseded_lines)",
                params,
            )
    conn.execute("DROP TABLE superseded_lines")
    return moved, int(purchases)


def build_chunk_tables(
    conn: duckdb.DuckDBPyConnection, raw_path: Path, first: int, last: int, max_line_bytes: int,
    contract: Contract = CONTRACT,
) -> None:  # fmt: skip
    """The chunk's temp tables (chunk_sql) for lines `first` to `last` of the raw file."""
    params = {"raw_path": str(raw_path), "first": first, "last": last,
              "max_line_bytes": max_line_bytes}  # fmt: skip
    for sql in chunk_sql(contract).build:
        conn.execute(sql, {k: v for k, v in params.items() if f"${k}" in sql})


def fetch_chunk(
    conn: duckdb.DuckDBPyConnection, max_line_bytes: int, contract: Contract = CONTRACT
) -> tuple[pyarrow.Table, pyarrow.Table]:
    """The chunk's lines and purchases (the columns the pandera schemas judge)."""
    params = {"max_line_bytes": max_line_bytes}
    sql = chunk_sql(contract)
    return _fetch(conn, sql.lines, params), _fetch(conn, sql.purchases, params)


def validate_chunk(
    lines: pyarrow.Table,
    purchases: pyarrow.Table,
    max_amount: float = Limits.max_amount,
    latest: datetime | None = None,
    drop_rules: frozenset[str] | None = None,
    contract: Contract = CONTRACT,
) -> ChunkResult:
    """Judge one chunk of extracted lines and their purchases against the contract's pandera
    schemas; blank lines are counted, not judged. `max_amount` and `latest` (the latest
    purchase date accepted; None: no limit) are the contract's limits from configuration. A
    purchase whose every failure is one of `drop_rules` ("field: rule",
    Contract.purchase_rules; None: those the contract declares dropping) is dropped from its
    record's history (ChunkResult.dropped, with its reasons) instead of rejecting the record; a
    record rejected anyway keeps every reason, those too. The kept rows carry the contract's
    warehouse columns (Contract.stored_customer, stored_purchase)."""
    if drop_rules is None:
        drop_rules = contract.dropping_rules
    purchases = with_limits(purchases, max_amount, latest)
    blank = pc.equal(lines["line"], BLANK)
    blank_lines = pc.sum(blank).as_py() or 0
    if blank_lines:
        lines = lines.filter(pc.invert(blank))
    from pipeline_project.schemas import (
        PURCHASE_ELEMENT,
        RAW_LINE,
        customer_schema,
        purchase_schema,
    )

    items = contract.items
    messages = [_line_messages(RAW_LINE, lines)]
    objects = lines.filter(pc.equal(lines["line"], "object"))
    messages.append(_line_messages(customer_schema(contract), objects))
    messages.append(_purchase_messages(PURCHASE_ELEMENT, purchases, items, element_level=True))
    object_purchases = purchases.filter(pc.equal(purchases["purchase__type"], "object"))
    record_messages = _purchase_messages(purchase_schema(contract), object_purchases, items)
    dropped_keys = _droppable(record_messages, drop_rules)
    droppable = pc.is_in(record_messages["key"], value_set=dropped_keys)
    messages.append(record_messages.filter(pc.invert(droppable)).select(["line_no", "message"]))

    rejecting = pyarrow.concat_tables(messages)
    bad_lines = pc.unique(rejecting["line_no"])
    # a rejected record carries every reason, a dropped purchase's too
    all_messages = pyarrow.concat_tables(
        [rejecting, record_messages.filter(droppable).select(["line_no", "message"])]
    )
    all_messages = all_messages.filter(pc.is_in(all_messages["line_no"], value_set=bad_lines))
    good = objects.filter(pc.invert(pc.is_in(objects["line_no"], value_set=bad_lines)))
    of_good = pc.is_in(object_purchases["line_no"], value_set=good["line_no"].combine_chunks())
    keys = _purchase_keys(object_purchases)
    dropped = pc.is_in(keys, value_set=dropped_keys)
    good_purchases = object_purchases.filter(pc.and_(of_good, pc.invert(dropped)))
    errors = _group_messages(all_messages)
    return ChunkResult(
        customers=_stored(good, ["line_no"], contract.stored_customer),
        purchases=_stored(good_purchases, ["line_no", "purchase_idx"], contract.stored_purchase),
        errors=errors.append_column(
            "raw", lines["raw"].take(pc.index_in(errors["line_no"], value_set=lines["line_no"]))
        ),
        blank_lines=blank_lines,
        dropped=_dropped_purchases(
            object_purchases.filter(pc.and_(of_good, dropped)),
            record_messages.filter(droppable),
            contract,
        ),
    )


def _stored(table: pyarrow.Table, keys: list[str], fields: tuple[Field, ...]) -> pyarrow.Table:
    """`keys` and each field's value as its warehouse column (a timestamp's instant; an
    identifier lower-cased)."""
    columns = {key: table[key] for key in keys}
    for f in fields:
        values = table[f"{f.key}__ts" if f.kind == "timestamp" else f.key]
        columns[f.column] = pc.utf8_lower(values) if f.lower else values
    return pyarrow.table(columns)


def _purchase_keys(table: pyarrow.Table) -> pyarrow.Array:
    """One int64 per purchase: its line and its index in the line's purchaseHistory."""
    return pc.add(
        pc.multiply(table["line_no"].cast(pyarrow.int64()), _KEY_SPAN),
        table["purchase_idx"].cast(pyarrow.int64()),
    )


_KEY_SPAN = 1_000_000_000  # more entries than a line of at most max_line_bytes can hold


def _droppable(record_messages: pyarrow.Table, drop_rules: frozenset[str]) -> pyarrow.Array:
    """The keys of the purchases whose every failure is a rule of `drop_rules`."""
    if not drop_rules or record_messages.num_rows == 0:
        return pyarrow.array([], pyarrow.int64())
    flags = record_messages.append_column(
        "drop", pc.is_in(record_messages["rule"], value_set=pyarrow.array(sorted(drop_rules)))
    )
    per_purchase = flags.group_by("key", use_threads=False).aggregate([("drop", "all")])
    return per_purchase.filter(per_purchase["drop_all"])["key"].combine_chunks()


@cache
def _dropped_schema(contract: Contract = CONTRACT) -> pyarrow.Schema:
    """A dropped purchase: where it was, its values as landed (a column each), its reasons."""
    landed = {"DOUBLE": pyarrow.float64(), "VARCHAR": pyarrow.string()}
    return pyarrow.schema(
        [("line_no", pyarrow.int64()), ("purchase_idx", pyarrow.int64())]
        + [(f.column, landed[f.landed_type]) for f in contract.stored_purchase]
        + [("reasons", pyarrow.list_(pyarrow.string()))]
    )


def _dropped_purchases(
    purchases: pyarrow.Table, messages: pyarrow.Table, contract: Contract
) -> pyarrow.Table:
    """The dropped purchases of kept records, each with every reason it was dropped for."""
    schema = _dropped_schema(contract)
    if purchases.num_rows == 0:
        return schema.empty_table()
    reasons = _group_messages(messages.select(["key", "message"]).rename_columns(
        ["line_no", "message"]
    ))  # fmt: skip
    at = pc.index_in(_purchase_keys(purchases), value_set=reasons["line_no"])
    columns = {
        "line_no": purchases["line_no"],
        "purchase_idx": purchases["purchase_idx"].cast(pyarrow.int64()),
    }
    columns |= {f.column: purchases[f.key] for f in contract.stored_purchase}
    columns["reasons"] = reasons["errors"].take(at)
    return pyarrow.table(columns, schema=schema)


def with_limits(
    purchases: pyarrow.Table, max_amount: float, latest: datetime | None
) -> pyarrow.Table:
    """The purchases with the limits they are judged against, a column each (see
    contract.MAX_AMOUNT, LATEST): the schemas are fixed, the limits configuration."""
    n = purchases.num_rows
    latest = latest or datetime.max.replace(tzinfo=UTC)
    return purchases.append_column(
        MAX_AMOUNT, pyarrow.repeat(pyarrow.scalar(float(max_amount)), n)
    ).append_column(
        LATEST, pyarrow.repeat(pyarrow.scalar(latest, pyarrow.timestamp("us", "UTC")), n)
    )


def _fetch(conn: duckdb.DuckDBPyConnection, sql: str, params: dict) -> pyarrow.Table:
    """Run an extraction query; timestamps are relabelled to UTC (instants are unchanged), so
    the models see one type whatever time zone the DuckDB session reports."""
    table = arrow_table(conn, sql, params)
    for i, column in enumerate(table.schema):
        if pyarrow.types.is_timestamp(column.type) and column.type.tz is not None:
            table = table.set_column(i, column.name, table[i].cast(pyarrow.timestamp("us", "UTC")))
    return table


def _rule_of(message: str) -> str:
    """ "purchaseHistory[3].amount: must be ... (got 0.0)" -> "amount: must be ..."."""
    path, rule = message.split(": ", 1)
    return f"{path.rsplit('.', 1)[-1]}: {rule.split(' (got ', 1)[0]}"


def render_failure(field_name: str, rule: str, got: str | None) -> str:
    return f"{field_name}: {rule}" if got is None else f"{field_name}: {rule} (got {got})"


# A batch's failures by field and rule (the message without its "(got ...)"), with the first
# line that failed that way as the example. A rule's wording never holds " (got ".
_REPORT_SQL = """
    WITH reasons AS (
        SELECT line_no, unnest(errors) AS message FROM schema_errors WHERE batch_id = $batch_id
    ), parts AS (
        SELECT line_no, message, split_part(message, ': ', 1) AS field,
               split_part(substr(message, strpos(message, ': ') + 2), ' (got ', 1) AS rule
        FROM reasons
    )
    SELECT field, rule, count(DISTINCT line_no) AS lines, min(line_no) AS example_line,
           arg_min(message, line_no) AS example
    FROM parts GROUP BY field, rule
    ORDER BY lines DESC, field, rule
    LIMIT $limit"""


@dataclass(frozen=True)
class FailureCount:
    field: str
    rule: str
    lines: int
    example_line: int
    example: str


def failure_report(
    conn: duckdb.DuckDBPyConnection, batch_id: str, limit: int = 50
) -> list[FailureCount]:
    """Why the batch's lines were rejected: lines per field and rule, most frequent first."""
    rows = conn.execute(_REPORT_SQL, {"batch_id": batch_id, "limit": limit}).fetchall()
    # the report goes into the batch's metadata: its examples never carry personal data
    return [FailureCount(*row[:4], mask_personal(row[4])) for row in rows]


def _failures(model: pa.DataFrameSchema, table: pyarrow.Table) -> list[dict]:
    """pandera's failure cases as dicts (column, check, failure_case, index); [] when all pass."""
    import pandera.pyarrow as pa

    try:
        model.validate(table, lazy=True)
    except pa.errors.SchemaErrors as err:
        cases = err.failure_cases.to_pylist()
        if any(case["index"] is None for case in cases):
            # A table-level failure (missing column, wrong type) is a bug in the extraction SQL,
            # not bad data: fail loudly instead of rejecting every line.
            raise ContractError(f"{model.name} could not check the chunk: {cases[:5]}") from err
        return cases
    return []


def _got(column: str, rule: str, value: str | None) -> str | None:
    if rule == "is required":
        return None
    if column.endswith("__type") or column == "line":
        return value
    if column.endswith("__first_line"):
        return f"line {value}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _field(column: str) -> str:
    return column.split("__", 1)[0]


def _line_messages(model: pa.DataFrameSchema, lines: pyarrow.Table) -> pyarrow.Table:
    cases = _failures(model, lines)
    if not cases:
        return _NO_MESSAGES
    line_no = lines["line_no"].take([c["index"] for c in cases])
    rendered = [
        render_failure(
            _field(c["column"]), c["check"], _got(c["column"], c["check"], c["failure_case"])
        )
        for c in cases
    ]
    return pyarrow.table({"line_no": line_no, "message": pyarrow.array(rendered, pyarrow.string())})


def _purchase_messages(
    model: pa.DataFrameSchema, purchases: pyarrow.Table, items: str, element_level: bool = False
) -> pyarrow.Table:
    """line_no and message per failure (at `items[i]`, the purchase's place in its list); of a
    purchase's fields (not `element_level`) also the purchase's key (_purchase_keys) and the
    rule as "field: rule" (Contract.purchase_rules)."""
    cases = _failures(model, purchases)
    if not cases:
        return _NO_MESSAGES if element_level else _NO_RECORD_MESSAGES
    rows = purchases.select(["line_no", "purchase_idx"]).take([c["index"] for c in cases])
    rendered, rules = [], []
    for case, idx in zip(cases, rows["purchase_idx"].to_pylist(), strict=True):
        path = f"{items}[{idx}]"
        if not element_level:
            path += "." + _field(case["column"])
        got = _got(case["column"], case["check"], case["failure_case"])
        rendered.append(render_failure(path, case["check"], got))
        rules.append(f"{_field(case['column'])}: {case['check']}")
    table = pyarrow.table(
        {"line_no": rows["line_no"], "message": pyarrow.array(rendered, pyarrow.string())}
    )
    if element_level:
        return table
    return table.append_column("key", _purchase_keys(rows)).append_column(
        "rule", pyarrow.array(rules, pyarrow.string())
    )


_NO_RECORD_MESSAGES = _NO_MESSAGES.append_column(
    "key", pyarrow.array([], pyarrow.int64())
).append_column("rule", pyarrow.array([], pyarrow.string()))


def _group_messages(messages: pyarrow.Table) -> pyarrow.Table:
    """One row per invalid line with all its messages, in the order they were found."""
    if messages.num_rows == 0:
        return pyarrow.table(
            {
                "line_no": pyarrow.array([], pyarrow.int64()),
                "errors": pyarrow.array([], pyarrow.list_(pyarrow.string())),
            }
        )
    numbered = messages.append_column(
        "seq", pyarrow.array(range(messages.num_rows), pyarrow.int64())
    )
    grouped = (
        numbered.sort_by([("line_no", "ascending"), ("seq", "ascending")])
        .group_by("line_no", use_threads=False)
        .aggregate([("message", "list")])
    )
    return pyarrow.table({"line_no": grouped["line_no"], "errors": grouped["message_list"]})


def _stage_chunk(batch_id: str, result: ChunkResult, staging: dict[str, Path], part: int) -> None:
    """The chunk's rows of customers, customer_purchases, dropped_purchases and schema_errors
    as Parquet parts (loaded by column name); DuckDB casts the id text to UUID when it loads
    them."""
    customers, purchases, errors = result.customers, result.purchases, result.errors
    dropped = result.dropped
    customer_ids = customers["customer_id"]
    per_line = purchases.group_by("line_no", use_threads=False).aggregate(
        [("amount", "count"), ("amount", "sum")]
    )
    at = pc.index_in(customers["line_no"], value_set=per_line["line_no"])
    batch = pyarrow.scalar(batch_id)

    def of_batch(table: pyarrow.Table) -> pyarrow.Table:
        return table.add_column(0, "batch_id", pyarrow.repeat(batch, table.num_rows))

    def owned(table: pyarrow.Table) -> pyarrow.Table:
        """With the customer ID of each row's line."""
        owner = pc.index_in(table["line_no"], value_set=customers["line_no"])
        return of_batch(table).append_column("customer_id", customer_ids.take(owner))

    count = pc.coalesce(per_line["amount_count"].take(at), 0).cast(pyarrow.int32())
    spend = pc.coalesce(per_line["amount_sum"].take(at), 0.0)
    tables = {
        "customers": of_batch(customers)
        .append_column("purchase_count", count)
        .append_column("total_spend", spend),
        "customer_purchases": owned(_int32_idx(purchases)),
        "dropped_purchases": owned(_int32_idx(dropped)),
        "schema_errors": pyarrow.table(
            {
                "batch_id": pyarrow.repeat(batch, errors.num_rows),
                "line_no": errors["line_no"],
                "raw": errors["raw"],
                "errors": errors["errors"],
                "error_count": pc.list_value_length(errors["errors"]).cast(pyarrow.int32()),
                "detected_at": pyarrow.repeat(
                    pyarrow.scalar(datetime.now(UTC), pyarrow.timestamp("us", "UTC")),
                    errors.num_rows,
                ),
            }
        ),
    }
    for table, rows in tables.items():
        write_staged(staging[table], part, rows)


def _int32_idx(table: pyarrow.Table) -> pyarrow.Table:
    at = table.schema.get_field_index("purchase_idx")
    return table.set_column(at, "purchase_idx", table["purchase_idx"].cast(pyarrow.int32()))
