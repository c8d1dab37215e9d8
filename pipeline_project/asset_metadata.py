"""What the UI shows of each table asset: its columns, where it lives, what it is, who owns it.

The column schema comes from the DDL in tables.py, read back by DuckDB (types as DuckDB names
them, NOT NULL as a constraint), so it is on every asset before its first run; each
materialization reports the columns of the table as stored, which Dagster's column-schema-change
checks compare from one materialization to the next.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import cache
from typing import TYPE_CHECKING

import dagster as dg
import duckdb

from pipeline_project.contract import CONTRACT
from pipeline_project.tables import (
    CUSTOMER_EMBEDDINGS,
    CUSTOMER_PURCHASES,
    CUSTOMER_SEGMENTS,
    CUSTOMERS,
    DROPPED_PURCHASES,
    PRODUCT_CATALOG,
    PRODUCT_EMBEDDINGS,
    RAW_CUSTOMERS,
    RAW_CUSTOMERS_COLUMNS,
    RECOMMENDATIONS,
    REJECTED_RECOMMENDATIONS,
    SCHEMA_ERRORS,
    SEGMENT_MODEL,
    VALIDATED_RECOMMENDATIONS,
    WAREHOUSE_DDL,
)

if TYPE_CHECKING:
    from pipeline_project.resources import Warehouse

OWNERS = ["team:data"]
# Assets whose rows hold the contract's personal fields (the raw lines hold them too).
PII_ASSETS = {RAW_CUSTOMERS, CUSTOMERS, SCHEMA_ERRORS}
PII_TAG = {"pii": ",".join(CONTRACT.personal_keys)}

_SHARED = {
    "batch_id": "The batch (partition) the row belongs to: the landing file's name.",
    "line_no": "Line of the batch's landing file, from 1.",
    "customer_id": "The customer's UUID (`id` in the landing line).",
    "product_id": "Product of the catalog.",
    "model": "Embedding model that made the vector.",
    "dimensions": "Width of the vector.",
    "text_hash": "md5 of the embedded text (hex): the key of embedding_cache.",
    "segment_id": "Segment of the customer's profile (nearest centroid).",
    "model_version": "Version of segment_model that assigned the segment.",
    "rank": "1 is the best recommendation of the customer.",
    "confidence": "The weighted mean of segment_affinity, taste, co_purchase and"
    " similarity_score (the weights of the run's recommendations config).",
    "predicted_value": "Expected spend on the product: the confidence x the segment's average"
    " amount paid for it (its price when the segment never bought it).",
    "segment_affinity": "The share of the customer's segments' customers who bought the"
    " product (recency-weighted, segments weighted by the customer's soft membership), over the"
    " largest such share among the products the customer may be offered (0..1).",
    "taste": "The share of the product among customers of the customer's tastes (clusters of"
    " what customers buy, recency-weighted, tastes weighted by the customer's soft membership),"
    " over the largest among the products the customer may be offered (0..1).",
    "co_purchase": "What buyers of the customer's products also buy (co-purchase similarity,"
    " recency-weighted), over the largest among the products the customer may be offered"
    " (0..1).",
    "similarity": "Cosine similarity of the customer's profile vector and the product's.",
    "similarity_score": "The similarity rescaled to 0..1 (min-max) over the products the"
    " customer may be offered.",
    "created_at": "When the row was written.",
}
KIND_WORDS = {"DOUBLE": "number", "VARCHAR": "string"}
_BY_TABLE: dict[str, dict[str, str]] = {
    RAW_CUSTOMERS: {
        "raw": "The line's text as landed (invalid UTF-8 replaced), at most max_line_bytes.",
        "byte_length": "Bytes of the line as landed.",
        "utf8_ok": "False when the line was not valid UTF-8.",
        "read_error": "Why the file could not be read past this line, if it could not.",
        "ingested_at": "When the batch was stored.",
    },
    # the contract's fields: their descriptions (contract.py)
    CUSTOMERS: {
        **{f.column: f.description for f in CONTRACT.stored_customer},
        "purchase_count": f"Entries of `{CONTRACT.items}`.",
        "total_spend": "Sum of the purchases' amounts.",
    },
    CUSTOMER_PURCHASES: {
        **{f.column: f.description for f in CONTRACT.stored_purchase},
        "purchase_idx": f"Position of the entry in `{CONTRACT.items}`, from 0.",
    },
    SCHEMA_ERRORS: {
        "raw": "The rejected line's text.",
        "errors": "Every reason, as `field: message`.",
        "error_count": "Number of reasons.",
        "detected_at": "When validation rejected the line.",
    },
    DROPPED_PURCHASES: {
        **{
            f.column: f"`{f.key}` of the entry as landed, when it was a"
            f" {KIND_WORDS[f.landed_type]}."
            for f in CONTRACT.stored_purchase
        },
        "purchase_idx": f"Position of the entry in `{CONTRACT.items}`, from 0.",
        "reasons": f"Every rule it broke, as `{CONTRACT.items}[i].field: message`.",
    },
    "product_catalog": {
        "name": "Product name.",
        "category": "Product category.",
        "price": "Price.",
        "in_stock": "Whether the product can be sold now.",
    },
    "embedding_cache": {
        "text": "The embedded text.",
        "embedding": "The vector (exactly `dimensions` finite values).",
    },
    CUSTOMER_EMBEDDINGS: {"profile_text": "Text embedded for the customer (no personal data)."},
    "dead_letter": {
        "stage": "Stage that gave up on the record.",
        "record_key": "The record (customer or text) that failed.",
        "reason": "Kind of failure.",
        "error": "The last error, secrets redacted.",
        "attempts": "Tries before giving up.",
        "payload": "What replay needs to try again.",
        "replayed_at": "When a replay embedded it; empty while pending.",
    },
    "segment_model": {
        "centroid": "The segment's centre in embedding space.",
        "weight": "Customers of the training data in the segment (a count).",
        "embedding_model": "Model of the vectors the centroids were trained on.",
        "trained_at": "When this version was trained.",
        "trained_batches": "Batches holding the current profiles it was trained on.",
        "trained_profiles": "Distinct profiles it was trained on.",
        "vocabulary": "md5 of the catalog's category per product when it was trained (empty:"
        " no catalog).",
    },
    "customer_segments": {"distance": "Distance of the profile to its segment's centroid."},
    "product_embeddings": {"product_text": "Text embedded for the product."},
    REJECTED_RECOMMENDATIONS: {
        "rejected_rule": "First business rule the recommendation broke.",
        "failed_rules": "Every business rule it broke.",
    },
}


def column_description(table: str, column: str) -> str | None:
    return _BY_TABLE.get(table, {}).get(column) or _SHARED.get(column)


def stored_column_schema(
    conn: duckdb.DuckDBPyConnection, table: str, database: str | None = None
) -> dg.TableSchema:
    """The columns of `table` as DuckDB holds them: in the current database unless named, or
    in this connection's temporary views (the lakehouse's raw_customers)."""
    rows = conn.execute(
        """SELECT column_name, data_type, is_nullable FROM duckdb_columns()
           WHERE table_name = ? AND schema_name = 'main'
             AND database_name IN (coalesce(?, current_database()), 'temp')
           ORDER BY column_index""",
        [table, database],
    ).fetchall()
    return dg.TableSchema(
        columns=[
            dg.TableColumn(
                name,
                data_type,
                description=column_description(table, name),
                constraints=dg.TableColumnConstraints(nullable=nullable),
            )
            for name, data_type, nullable in rows
        ]
    )


@cache
def _contract() -> Mapping[str, dg.TableSchema]:
    """Every table's schema from its DDL, created in an in-memory DuckDB and read back."""
    with duckdb.connect(":memory:") as conn:
        for ddl in WAREHOUSE_DDL.values():
            conn.execute(ddl)
        columns = ", ".join(f"{name} {kind}" for name, kind in RAW_CUSTOMERS_COLUMNS.items())
        conn.execute(f"CREATE TABLE {RAW_CUSTOMERS} ({columns})")
        tables = [RAW_CUSTOMERS, *WAREHOUSE_DDL]
        return {table: stored_column_schema(conn, table) for table in tables}


def column_schema(table: str) -> dg.TableSchema:
    """The schema the DDL promises for `table`."""
    return _contract()[table]


def table_definition_metadata(table: str, qualified_name: str) -> dict:
    return {"dagster/column_schema": column_schema(table), "dagster/table_name": qualified_name}


def table_figures(conn: duckdb.DuckDBPyConnection, table: str, batch_rows: int | None) -> dict:
    """For a materialization of `table`: the batch's rows (None: the table has no batches),
    the whole table's rows and its columns as stored."""
    figures = {} if batch_rows is None else {"dagster/partition_row_count": batch_rows}
    figures["dagster/row_count"] = conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    figures["dagster/column_schema"] = stored_column_schema(conn, table)
    return figures


def table_metadata(warehouse: Warehouse, rows_by_table: Mapping[str, int | None]) -> dict:
    """`table_figures` of each table, read on one connection after the write."""
    with warehouse.get_connection() as conn:
        return {table: table_figures(conn, table, rows) for table, rows in rows_by_table.items()}


def one_table_metadata(warehouse: Warehouse, table: str, batch_rows: int | None) -> dict:
    """`table_figures` of one table, read on its own connection after the write."""
    with warehouse.get_connection() as conn:
        return table_figures(conn, table, batch_rows)


def with_table_figures(warehouse: Warehouse, table: str, figures: Mapping) -> dict:
    """`figures`, which hold the batch's rows, with the table's figures."""
    rows = figures["dagster/partition_row_count"]
    return {**figures, **one_table_metadata(warehouse, table, rows)}


# Every table asset is named after its table. The other tables belong to a stage without being
# assets of their own: the batch register, the embedding cache, the dead letters, a stage's
# side tables (prior purchases, affinity, shortfalls, publications, catalog versions) and the
# schema version.
TABLE_ASSETS = frozenset(
    {
        RAW_CUSTOMERS,
        CUSTOMERS,
        CUSTOMER_PURCHASES,
        SCHEMA_ERRORS,
        DROPPED_PURCHASES,
        PRODUCT_CATALOG,
        CUSTOMER_EMBEDDINGS,
        SEGMENT_MODEL,
        CUSTOMER_SEGMENTS,
        PRODUCT_EMBEDDINGS,
        RECOMMENDATIONS,
        VALIDATED_RECOMMENDATIONS,
        REJECTED_RECOMMENDATIONS,
    }
)


def described(
    spec: dg.AssetSpec,
    *,
    qualified_name: Callable[[str], str],
    location: Mapping[str, dg.MetadataValue],
    embedder_kind: str,
) -> dg.AssetSpec:
    """`spec` with what the UI shows before a run: columns, table name, location, kinds,
    owners, and the pii tag on the assets that hold e-mail addresses."""
    name = spec.key.to_user_string()
    metadata: dict = {}
    kinds = set()
    if name in TABLE_ASSETS:
        metadata = {**table_definition_metadata(name, qualified_name(name)), **location}
    if name == RAW_CUSTOMERS:
        kinds.add("parquet")
    if name == CUSTOMER_EMBEDDINGS:
        kinds.add(embedder_kind)
    return spec.merge_attributes(
        metadata=metadata,
        owners=OWNERS,
        tags=PII_TAG if name in PII_ASSETS else {},
        kinds=kinds,
    )
