"""The landing record's contract, declared once: its fields, their types, their rules and what
breaking a rule does.

A landing line holds one customer as a JSON object: the fields of CUSTOMER, one of them the list
of purchases (`CONTRACT.items`), each purchase an object with the fields of PURCHASE. Everything
else follows from this declaration:

- the extraction SQL (core/validation.py: one typed parse per line, each field's JSON kind and
  value, a timestamp's parsed instant);
- the pandera schemas that judge each chunk (schemas.py): per field "is required" (unless
  optional), its kind ("must be a string", "must be a number", ...), then its rules in order;
- the warehouse columns that store the fields (tables.py: customers, customer_purchases,
  dropped_purchases), their descriptions in the UI (asset_metadata.py), and which hold
  personal data (masked wherever a value leaves the tables: core/personal_data.py);
- the purchase rules a configuration may turn from "reject the customer" into "drop the
  purchase" (validated_customers' `drop_purchases_breaking`).

Adapting the project to another feed: add a `Field` here (and to the profile, in
core/profiles.py, if it should count). An optional field may be missing or null (stored as
NULL); a required one must be present, of its kind. A field with no `column` is judged but not
stored. A new column reaches an existing warehouse through its migration (schema.py), as NULL
for the rows written before.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

import pyarrow
import pyarrow.compute as pc

if TYPE_CHECKING:  # annotations only: pandera loads where a chunk is judged
    from pandera.api.pyarrow.types import PyArrowData

UUID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
EMAIL_PATTERN = r"^[^@\s]+@[^@\s.]+(\.[^@\s.]+)+$"

# The ISO-8601 (RFC 3339-like) forms a timestamp field accepts, matched whole (regexp_full_match):
# YYYY-MM-DD, or that with T or a space and HH:MM[:SS[.fraction]], then Z, ±HH:MM or ±HH (an
# offset that exists: hour <= 14). DuckDB's cast alone takes far more (epoch, infinity, 2024-1-5,
# +99, 12024-01-05, (BC), zone names) and makes real-looking instants of it; after this shape,
# the cast checks the calendar (no 2024-02-30).
ISO_8601_PATTERN = (
    r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"
    r"([T ]([01]\d|2[0-3]):[0-5]\d(:[0-5]\d(\.\d+)?)?(Z|[+-](0\d|1[0-4])(:[0-5]\d)?)?)?"
)

# The rules every field has by its declaration (schemas.py applies them).
REQUIRED = "is required"
ISO_8601 = "must be an ISO-8601 date-time"
KIND_RULES = {
    "string": "must be a string",
    "timestamp": "must be a string",
    "number": "must be a number",
    "list": "must be an array",
}
Kind = Literal["string", "number", "timestamp", "list"]
# DuckDB type of a stored value by kind (a timestamp is stored as its instant); `Field.sql_type`
# overrides it
SQL_TYPES = {"string": "VARCHAR", "number": "DOUBLE", "timestamp": "TIMESTAMPTZ"}

AMOUNT_POSITIVE = "must be a finite number > 0"
AMOUNT_CEILING = "must not exceed the configured maximum amount"
DATE_NOT_FUTURE = "must not be later than the batch's arrival (plus the tolerance)"

# The limits from configuration a rule can compare with: a column each, next to the values
# (core/validation.with_limits). MAX_AMOUNT: a float; LATEST: a UTC instant.
MAX_AMOUNT = "limit__max_amount"
LATEST = "limit__latest"


def value(data: PyArrowData) -> pyarrow.ChunkedArray:
    """The field's values (a string field's text, a number's value, a timestamp's text)."""
    return data.table[data.key]


def instant(data: PyArrowData) -> pyarrow.ChunkedArray:
    """A timestamp field's parsed instant (NULL: not an ISO-8601 date-time)."""
    return data.table[f"{data.key}__ts"]


def limit(data: PyArrowData, name: str) -> pyarrow.ChunkedArray:
    return data.table[name]


@dataclass(frozen=True)
class Rule:
    """`check` gives, per value of the field, True where the value keeps the rule (NULL values,
    of another kind or absent, are judged by the kind's own rules, not here). `wording` is the
    reason a failure is recorded with ("field: wording (got value)"); a rule's wording never
    holds " (got ". `policy` "drop" (a purchase field's rule only): a purchase breaking only
    such rules is dropped from its customer's history, not the customer; configuration can
    choose it per rule as well."""

    wording: str
    check: Callable[[PyArrowData], pyarrow.Array]
    policy: Literal["reject", "drop"] = "reject"


@dataclass(frozen=True)
class Field:
    """A field of the landing record: its JSON `key`, its `kind`, the warehouse `column` that
    stores it (None: judged, not stored), that column's `sql_type` (default by kind) and
    `description`, its `rules` in the order they are judged, whether it may be missing or null
    (`required`), whether it is `personal` data (masked outside the tables), and whether its
    text is stored lower-cased (`lower`, for identifiers compared case-insensitively)."""

    key: str
    kind: Kind
    column: str | None
    description: str = ""
    rules: tuple[Rule, ...] = ()
    required: bool = True
    personal: bool = False
    lower: bool = False
    sql_type: str | None = None

    @property
    def stored_type(self) -> str:
        return self.sql_type or SQL_TYPES[self.kind]

    @property
    def landed_type(self) -> str:
        """The type of its value as landed (dropped_purchases keeps a broken purchase's
        values as they came: a timestamp as its text)."""
        return "DOUBLE" if self.kind == "number" else "VARCHAR"


@dataclass(frozen=True)
class Contract:
    """The customer record's fields, and of them `items`, the key of the list of purchases."""

    customer: tuple[Field, ...]
    purchase: tuple[Field, ...]
    items: str = "purchaseHistory"

    def __post_init__(self) -> None:
        lists = [f.key for f in self.customer if f.kind == "list"]
        if lists != [self.items]:
            raise ValueError(f"the record has one list, {self.items!r}: got {lists}")
        for fields in (self.customer, self.purchase):
            names = [f.key for f in fields]
            if len(set(names)) != len(names) or not all(k.isidentifier() for k in names):
                raise ValueError(f"field keys must be distinct identifiers: {names}")
            columns = [f.column for f in fields if f.column]
            if len(set(columns)) != len(columns):
                raise ValueError(f"two fields stored in one column: {columns}")
            for f in fields:
                if f.kind not in KIND_RULES:
                    raise ValueError(f"{f.key}: unknown kind {f.kind!r}")
        if any(f.kind == "list" for f in self.purchase):
            raise ValueError("a purchase holds no list")
        if any(r.policy == "drop" for f in self.customer for r in f.rules):
            raise ValueError("only a purchase's rules can drop: a customer has nothing to drop")
        # the columns the stages after validation read (profiles, segments, recommendations)
        needed = [
            (self.customer, "customer_id", "string"),
            (self.purchase, "product_id", "string"),
            (self.purchase, "amount", "number"),
            (self.purchase, "purchased_at", "timestamp"),
        ]
        for fields, column, kind in needed:
            if [f.kind for f in fields if f.column == column] != [kind]:
                raise ValueError(f"the pipeline reads a {kind} field stored as {column}")

    @property
    def id_field(self) -> Field:
        return next(f for f in self.customer if f.column == "customer_id")

    @property
    def fields(self) -> tuple[Field, ...]:
        """The customer's fields but the list of purchases."""
        return tuple(f for f in self.customer if f.kind != "list")

    @property
    def stored_customer(self) -> tuple[Field, ...]:
        return tuple(f for f in self.fields if f.column)

    @property
    def stored_purchase(self) -> tuple[Field, ...]:
        return tuple(f for f in self.purchase if f.column)

    @property
    def purchase_rules(self) -> tuple[str, ...]:
        """Every rule of a purchase's fields as "key: wording", the kind's rules first: the
        rules whose policy a configuration can choose."""
        return tuple(f"{f.key}: {wording}" for f in self.purchase for wording in rule_wordings(f))

    @property
    def dropping_rules(self) -> frozenset[str]:
        """The purchase rules declared to drop the purchase (not the customer)."""
        return frozenset(
            f"{f.key}: {r.wording}" for f in self.purchase for r in f.rules if r.policy == "drop"
        )

    @property
    def personal_keys(self) -> tuple[str, ...]:
        return tuple(f.key for f in (*self.customer, *self.purchase) if f.personal)

    @property
    def personal_columns(self) -> tuple[str, ...]:
        return tuple(f.column for f in (*self.customer, *self.purchase) if f.personal and f.column)

    def with_fields(self, customer: tuple[Field, ...] = (), purchase: tuple[Field, ...] = ()):
        """This contract and more fields (appended)."""
        return replace(self, customer=self.customer + customer, purchase=self.purchase + purchase)


def rule_wordings(f: Field) -> list[str]:
    """Every rule a field is judged by, in order: required, its kind, its own rules."""
    kind = [KIND_RULES[f.kind]] + ([ISO_8601] if f.kind == "timestamp" else [])
    return ([REQUIRED] if f.required else []) + kind + [r.wording for r in f.rules]


def _matches(pattern: str) -> Callable[[PyArrowData], pyarrow.Array]:
    return lambda data: pc.match_substring_regex(value(data), pattern)


def _has_time(data: PyArrowData) -> pyarrow.Array:
    # a date-time, not a date alone: a time of day after the date (judged on parsed values)
    has_time = pc.match_substring_regex(value(data), r"^\d{4}-\d{2}-\d{2}[T ]")
    return pc.or_kleene(pc.is_null(instant(data)), has_time)


def _not_blank(data: PyArrowData) -> pyarrow.Array:
    return pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(value(data))), 0)


def _positive(data: PyArrowData) -> pyarrow.Array:
    return pc.and_(pc.greater(value(data), 0.0), pc.is_finite(value(data)))


def _at_most_max(data: PyArrowData) -> pyarrow.Array:
    amount = value(data)
    # NaN and infinities are judged by the rule above
    within = pc.less_equal(amount, limit(data, MAX_AMOUNT))
    return pc.or_kleene(pc.invert(pc.is_finite(amount)), within)


def _not_future(data: PyArrowData) -> pyarrow.Array:
    when = instant(data)
    return pc.or_kleene(pc.is_null(when), pc.less_equal(when, limit(data, LATEST)))


CUSTOMER = (
    Field(
        "id", "string", "customer_id", "The customer's UUID (`id` in the landing line).",
        rules=(Rule("must be a UUID", _matches(UUID_PATTERN)),), lower=True, sql_type="UUID",
    ),
    Field(
        "email", "string", "email", "E-mail address (personal data).",
        rules=(Rule("must be an email address", _matches(EMAIL_PATTERN)),), personal=True,
    ),
    Field(
        "createdAt", "timestamp", "created_at", "`createdAt` of the landing line.",
        rules=(Rule("must have a time of day, not a date alone", _has_time),),
    ),
    Field("purchaseHistory", "list", None, "The customer's purchases."),
)  # fmt: skip

PURCHASE = (
    Field(
        "productId", "string", "product_id", "Product of the catalog.",
        rules=(Rule("must not be empty", _not_blank),),
    ),
    Field(
        "amount", "number", "amount", "Amount paid.",
        rules=(Rule(AMOUNT_POSITIVE, _positive), Rule(AMOUNT_CEILING, _at_most_max)),
    ),
    Field(
        "date", "timestamp", "purchased_at", "`date` of the entry, as an instant (UTC).",
        rules=(Rule(DATE_NOT_FUTURE, _not_future),),
    ),
)  # fmt: skip

CONTRACT = Contract(CUSTOMER, PURCHASE)
