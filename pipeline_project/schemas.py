"""pandera schemas that judge a landing batch, chunk by chunk, built from the record's contract
(contract.py).

The SQL in `core/validation.py` only extracts each field from the raw line: its JSON kind
(`<key>__type`, "missing" when absent), its value, and for a timestamp what DuckDB's TIMESTAMPTZ
parser made of a value of ISO-8601 shape (`<key>__ts`; contract.ISO_8601_PATTERN, matched in
that SQL, vectorized). Every rule is judged here. A check's `error` is the rule in words;
`core.validation` renders a failure as "field: rule (got value)".

The schemas use pandera's pyarrow backend: chunks go from DuckDB to pandera as Arrow tables,
with no pandas copy, which keeps validation fast and memory flat at millions of rows.
"""

from __future__ import annotations

from functools import cache

import pandera.pyarrow as pa
import pyarrow
import pyarrow.compute as pc
from pandera.api.pyarrow.types import PyArrowData

from pipeline_project.contract import (
    CONTRACT,
    ISO_8601,
    KIND_RULES,
    LATEST,
    MAX_AMOUNT,
    REQUIRED,
    Contract,
    Field,
    instant,
    value,
)

REPEATED_KEY = "must not repeat a key"

_TEXT = pyarrow.string()
_INT = pyarrow.int64()
_TIMESTAMP = pyarrow.timestamp("us", tz="UTC")
_VALUE_TYPES = {"string": _TEXT, "timestamp": _TEXT, "number": pyarrow.float64()}
_JSON_KINDS = {"string": "string", "timestamp": "string", "number": "number", "list": "array"}


def _present(data: PyArrowData) -> pyarrow.Array:
    return pc.not_equal(value(data), "missing")


def _of_kind(kind: str):
    allowed = pyarrow.array([_JSON_KINDS[kind], "missing"])
    return lambda data: pc.is_in(value(data), allowed)


def _iso_8601(data: PyArrowData) -> pyarrow.Array:
    return pc.or_kleene(pc.is_null(value(data)), pc.is_valid(instant(data)))


def _on_values(check):
    """A declared rule judges values only: an absent value (or one of another kind, NULL here)
    passes it, whatever the rule makes of NULL (the kind's own rules judge it)."""
    return lambda data: pc.or_kleene(pc.is_null(value(data)), check(data))


def _columns(f: Field) -> dict[str, pa.Column]:
    """A field's columns as extracted: its kind, its value, a timestamp's instant."""
    kind_checks = [pa.Check(_present, error=REQUIRED)] if f.required else []
    kind_checks.append(pa.Check(_of_kind(f.kind), error=KIND_RULES[f.kind]))
    columns = {f"{f.key}__type": pa.Column(_TEXT, checks=kind_checks)}
    if f.kind == "list":
        return columns
    checks = [pa.Check(_iso_8601, error=ISO_8601)] if f.kind == "timestamp" else []
    checks += [pa.Check(_on_values(rule.check), error=rule.wording) for rule in f.rules]
    columns[f.key] = pa.Column(_VALUE_TYPES[f.kind], checks=checks, nullable=True)
    if f.kind == "timestamp":
        columns[f"{f.key}__ts"] = pa.Column(_TIMESTAMP, nullable=True)
    return columns


def _no_repeated_key(data: PyArrowData) -> pyarrow.Array:
    return pc.is_null(value(data))


# A landing line: readable UTF-8 text holding exactly one JSON object.
RAW_LINE = pa.DataFrameSchema(
    {
        "line_no": pa.Column(_INT, unique=True),
        "line": pa.Column(
            _TEXT, checks=pa.Check(lambda d: pc.equal(value(d), "object"),
                                   error="must hold one JSON object"),
        ),
        "line__repeated_key": pa.Column(
            _TEXT, checks=pa.Check(_no_repeated_key, error=REPEATED_KEY), nullable=True
        ),
    },
    name="RawLineRecord",
)  # fmt: skip

# An entry of the list of purchases must be a JSON object.
PURCHASE_ELEMENT = pa.DataFrameSchema(
    {
        "purchase__type": pa.Column(
            _TEXT,
            checks=pa.Check(lambda d: pc.equal(value(d), "object"), error="must be an object"),
        ),
        "purchase__repeated_key": pa.Column(
            _TEXT, checks=pa.Check(_no_repeated_key, error=REPEATED_KEY), nullable=True
        ),
    },
    name="PurchaseElement",
)


@cache
def customer_schema(contract: Contract = CONTRACT) -> pa.DataFrameSchema:
    """A customer record: its fields (an id on several valid lines: the last is kept, see
    core.validation.resolve_duplicate_ids)."""
    columns = {"line_no": pa.Column(_INT, unique=True)}
    for f in contract.customer:
        columns |= _columns(f)
    return pa.DataFrameSchema(columns, name="CustomerRecord")


@cache
def purchase_schema(contract: Contract = CONTRACT) -> pa.DataFrameSchema:
    """A purchase (an object entry of the list): its fields, and the configured limits a rule
    can compare with (a column each, see core.validation.with_limits)."""
    columns = {"line_no": pa.Column(_INT), "purchase_idx": pa.Column(_INT, pa.Check.ge(0))}
    for f in contract.purchase:
        columns |= _columns(f)
    columns[MAX_AMOUNT] = pa.Column(pyarrow.float64())
    columns[LATEST] = pa.Column(_TIMESTAMP)
    return pa.DataFrameSchema(columns, name="PurchaseRecord")
