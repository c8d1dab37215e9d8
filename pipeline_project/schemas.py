"""pandera models for the data contract of a landing batch.

The SQL in `core/validation.py` only extracts each field from the raw line: its JSON type
(`<field>__type`, "missing" when absent), its value, and for timestamps what DuckDB's
TIMESTAMPTZ parser made of a value of ISO-8601 shape (`<field>__ts`; ISO_8601_PATTERN, matched
in that SQL, vectorized). Every rule of the contract lives here. Each check's `error` is the
rule in words; `core.validation` renders a failure as "field: rule (got value)".

The models use pandera's pyarrow backend: chunks go from DuckDB to pandera as Arrow tables,
with no pandas copy, which keeps validation fast and memory flat at millions of rows.
"""

from __future__ import annotations

import pandera.pyarrow as pa
import pyarrow
import pyarrow.compute as pc
from pandera.api.pyarrow.types import PyArrowData

UUID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
EMAIL_PATTERN = r"^[^@\s]+@[^@\s.]+(\.[^@\s.]+)+$"

# The ISO-8601 (RFC 3339-like) forms the contract accepts, matched whole (regexp_full_match):
# YYYY-MM-DD, or that with T or a space and HH:MM[:SS[.fraction]], then Z, ±HH:MM or ±HH (an
# offset that exists: hour <= 14). DuckDB's cast alone takes far more (epoch, infinity, 2024-1-5,
# +99, 12024-01-05, (BC), zone names) and makes real-looking instants of it; after this shape,
# the cast checks the calendar (no 2024-02-30).
ISO_8601_PATTERN = (
    r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"
    r"([T ]([01]\d|2[0-3]):[0-5]\d(:[0-5]\d(\.\d+)?)?(Z|[+-](0\d|1[0-4])(:[0-5]\d)?)?)?"
)

REQUIRED = "is required"
AMOUNT_POSITIVE = "must be a finite number > 0"
AMOUNT_CEILING = "must not exceed the configured maximum amount"
DATE_NOT_FUTURE = "must not be later than the batch's arrival (plus the tolerance)"
ISO_8601 = "must be an ISO-8601 date-time"
REPEATED_KEY = "must not repeat a key"
# a date-time, not a date alone: a time of day after the date
_WITH_TIME = r"^\d{4}-\d{2}-\d{2}[T ]"

_TEXT = pyarrow.string()
_INT = pyarrow.int64()
_TIMESTAMP = pyarrow.timestamp("us", tz="UTC")


def _column(data: PyArrowData, name: str | None = None) -> pyarrow.ChunkedArray:
    return data.table[name or data.key]


def _parsed(data: PyArrowData) -> pyarrow.BooleanArray:
    """The string value parsed as a timestamp (the `__ts` column next to it is not null)."""
    return pc.is_valid(_column(data, f"{data.key}__ts"))


class RawLineRecord(pa.DataFrameModel):
    """A landing line: readable UTF-8 text holding exactly one JSON object."""

    line_no: _INT = pa.Field(unique=True)
    line: _TEXT
    line__repeated_key: _TEXT = pa.Field(nullable=True)

    @pa.check("line", error="must hold one JSON object")
    def _one_json_object(cls, data: PyArrowData) -> pyarrow.BooleanArray:
        return pc.equal(_column(data), "object")

    @pa.check("line__repeated_key", error=REPEATED_KEY)
    def _keys_once(cls, data: PyArrowData) -> pyarrow.BooleanArray:
        return pc.is_null(_column(data))


class CustomerRecord(pa.DataFrameModel):
    """A customer: UUID id, email, ISO-8601 createdAt with a time of day, purchases. (An id on
    several valid lines: the last is kept, see core.validation.resolve_duplicate_ids.)"""

    line_no: _INT = pa.Field(unique=True)
    id__type: _TEXT
    id: _TEXT = pa.Field(nullable=True)
    email__type: _TEXT
    email: _TEXT = pa.Field(nullable=True)
    createdAt__type: _TEXT
    createdAt: _TEXT = pa.Field(nullable=True)
    createdAt__ts: _TIMESTAMP = pa.Field(nullable=True)
    purchaseHistory__type: _TEXT

    @pa.check("id__type", "email__type", "createdAt__type", "purchaseHistory__type", error=REQUIRED)
    def _required(cls, data: PyArrowData) -> pyarrow.BooleanArray:
        return pc.not_equal(_column(data), "missing")

    @pa.check("id__type", "email__type", "createdAt__type", error="must be a string")
    def _string(cls, data: PyArrowData) -> pyarrow.BooleanArray:
        return pc.is_in(_column(data), pyarrow.array(["string", "missing"]))

    @pa.check("purchaseHistory__type", error="must be an array")
    def _array(cls, data: PyArrowData) -> pyarrow.BooleanArray:
        return pc.is_in(_column(data), pyarrow.array(["array", "missing"]))

    @pa.check("id", error="must be a UUID")
    def _uuid(cls, data: PyArrowData) -> pyarrow.BooleanArray:
        return pc.match_substring_regex(_column(data), UUID_PATTERN)

    @pa.check("email", error="must be an email address")
    def _email(cls, data: PyArrowData) -> pyarrow.BooleanArray:
        return pc.match_substring_regex(_column(data), EMAIL_PATTERN)

    @pa.check("createdAt", error=ISO_8601)
    def _created_at(cls, data: PyArrowData) -> pyarrow.BooleanArray:
        return pc.or_kleene(pc.is_null(_column(data)), _parsed(data))

    @pa.check("createdAt", error="must have a time of day, not a date alone")
    def _created_at_time(cls, data: PyArrowData) -> pyarrow.BooleanArray:
        created = _column(data)
        has_time = pc.match_substring_regex(created, _WITH_TIME)
        return pc.or_kleene(pc.invert(_parsed(data)), has_time)


class PurchaseElement(pa.DataFrameModel):
    """An entry of purchaseHistory must be a JSON object."""

    purchase__type: _TEXT
    purchase__repeated_key: _TEXT = pa.Field(nullable=True)

    @pa.check("purchase__type", error="must be an object")
    def _object(cls, data: PyArrowData) -> pyarrow.BooleanArray:
        return pc.equal(_column(data), "object")

    @pa.check("purchase__repeated_key", error=REPEATED_KEY)
    def _keys_once(cls, data: PyArrowData) -> pyarrow.BooleanArray:
        return pc.is_null(_column(data))


# The rules of a purchase's fields, as "field: rule": a purchase that breaks one of them rejects
# its customer's whole record (the default), or, when the configuration says so for that rule
# (validated_customers' drop_purchases_breaking), is dropped from the history with its reasons
# (dropped_purchases) and the record is kept. A purchase that is not an object, or repeats a key,
# always rejects the record: there is no purchase to drop.
PURCHASE_RULES = (
    f"productId: {REQUIRED}",
    "productId: must be a string",
    "productId: must not be empty",
    f"amount: {REQUIRED}",
    "amount: must be a number",
    f"amount: {AMOUNT_POSITIVE}",
    f"amount: {AMOUNT_CEILING}",
    f"date: {REQUIRED}",
    "date: must be a string",
    f"date: {ISO_8601}",
    f"date: {DATE_NOT_FUTURE}",
)


class PurchaseRecord(pa.DataFrameModel):
    """A purchase: non-empty productId, finite amount > 0 and at most the configured maximum,
    ISO-8601 date no later than the batch's arrival (plus the configured tolerance)."""

    line_no: _INT
    purchase_idx: _INT = pa.Field(ge=0)
    productId__type: _TEXT
    productId: _TEXT = pa.Field(nullable=True)
    amount__type: _TEXT
    amount: pyarrow.float64() = pa.Field(nullable=True)
    date__type: _TEXT
    date: _TEXT = pa.Field(nullable=True)
    date__ts: _TIMESTAMP = pa.Field(nullable=True)
    amount__max: pyarrow.float64()
    date__latest: _TIMESTAMP

    @pa.check("productId__type", "amount__type", "date__type", error=REQUIRED)
    def _required(cls, data: PyArrowData) -> pyarrow.BooleanArray:
        return pc.not_equal(_column(data), "missing")

    @pa.check("productId__type", "date__type", error="must be a string")
    def _string(cls, data: PyArrowData) -> pyarrow.BooleanArray:
        return pc.is_in(_column(data), pyarrow.array(["string", "missing"]))

    @pa.check("amount__type", error="must be a number")
    def _number(cls, data: PyArrowData) -> pyarrow.BooleanArray:
        return pc.is_in(_column(data), pyarrow.array(["number", "missing"]))

    @pa.check("productId", error="must not be empty")
    def _product_id(cls, data: PyArrowData) -> pyarrow.BooleanArray:
        return pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(_column(data))), 0)

    @pa.check("amount", error=AMOUNT_POSITIVE)
    def _amount(cls, data: PyArrowData) -> pyarrow.BooleanArray:
        amount = _column(data)
        return pc.and_(pc.greater(amount, 0.0), pc.is_finite(amount))

    @pa.check("date", error=ISO_8601)
    def _date(cls, data: PyArrowData) -> pyarrow.BooleanArray:
        return pc.or_kleene(pc.is_null(_column(data)), _parsed(data))

    @pa.check("amount", error=AMOUNT_CEILING)
    def _amount_plausible(cls, data: PyArrowData) -> pyarrow.BooleanArray:
        amount = _column(data)
        # NULL (not a number) and NaN are judged by the rules above
        within = pc.less_equal(amount, _column(data, "amount__max"))
        return pc.or_kleene(pc.invert(pc.is_finite(amount)), within)

    @pa.check("date", error=DATE_NOT_FUTURE)
    def _date_not_future(cls, data: PyArrowData) -> pyarrow.BooleanArray:
        when = _column(data, "date__ts")
        return pc.or_kleene(pc.is_null(when), pc.less_equal(when, _column(data, "date__latest")))
