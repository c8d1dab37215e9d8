"""The warehouse's schema version, and the migrations that bring an older warehouse up to date.

A warehouse records its version in `warehouse_schema` (one row per version applied). Opening a
warehouse:

- an empty one gets every table and view of this version;
- one of an older version (a warehouse written before versions were recorded is version 1) is
  migrated in ONE transaction: the tables it lacks are created, the columns it lacks are added
  (with their declared default), then each version's data steps run in order;
- one of a newer version (written by a newer release of the project) is refused with a message
  that names both versions and what to do: this code does not know its tables.

A column that exists with another type, or that this version does not declare, is never changed
here: the migration stops and says which, rather than guess.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version

import dagster as dg
import duckdb

from pipeline_project.tables import (
    BATCH_PUBLICATIONS,
    BATCHES,
    CUSTOMERS,
    SEGMENT_MODEL,
    WAREHOUSE_SCHEMA,
    WAREHOUSE_TABLES,
    WAREHOUSE_VIEWS,
    lakehouse_ddl,
)

SCHEMA_VERSION = 5


class WarehouseSchemaError(dg.Failure):
    """The warehouse cannot be used by this code as it is: not retried, says what to do."""

    def __init__(self, description: str) -> None:
        super().__init__(description=description, allow_retries=False)


def project_version() -> str:
    try:
        return version("pipeline_project")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


def _tables(conn: duckdb.DuckDBPyConnection) -> dict[str, dict[str, str]]:
    """The current database's tables: name -> {column: type}."""
    rows = conn.execute(
        "SELECT table_name, column_name, data_type FROM duckdb_columns()"
        " WHERE database_name = current_database() AND schema_name = 'main'"
        " AND table_name IN (SELECT table_name FROM duckdb_tables()"
        "                    WHERE database_name = current_database() AND schema_name = 'main')"
        " ORDER BY table_name, column_index"
    ).fetchall()
    tables: dict[str, dict[str, str]] = {}
    for table, column, data_type in rows:
        tables.setdefault(table, {})[column] = data_type
    return tables


def found_version(conn: duckdb.DuckDBPyConnection) -> int | None:
    """The warehouse's schema version; 1 for tables written before versions were recorded,
    None for an empty warehouse."""
    tables = _tables(conn)
    if WAREHOUSE_SCHEMA in tables:
        [(found,)] = conn.execute(f"SELECT max(version) FROM {WAREHOUSE_SCHEMA}").fetchall()
        if found is not None:
            return int(found)
    return 1 if CUSTOMERS in tables else None


def ensure_schema(conn: duckdb.DuckDBPyConnection, *, lakehouse: bool, where: str) -> int:
    """Bring the warehouse (the connection's current database) to SCHEMA_VERSION; returns the
    version it was found at. `where` names the warehouse in messages."""
    found = found_version(conn)
    if found == SCHEMA_VERSION:
        return found
    if found is not None and found > SCHEMA_VERSION:
        raise WarehouseSchemaError(
            f"The warehouse {where} has schema version {found}, written by a newer release of"
            f" pipeline_project; this one ({project_version()}) knows versions up to"
            f" {SCHEMA_VERSION}. Upgrade pipeline_project (pip install -U) on this machine, or"
            " point PIPELINE_DUCKDB_PATH (or the DuckLake settings) at another warehouse."
        )
    conn.begin()
    try:
        _create_and_add_columns(conn, lakehouse, where)
        for step in range((found or SCHEMA_VERSION) + 1, SCHEMA_VERSION + 1):
            MIGRATIONS[step](conn)
        for view in WAREHOUSE_VIEWS.values():
            conn.execute(view)
        conn.execute(
            f"INSERT INTO {WAREHOUSE_SCHEMA} (version, project_version, applied_at)"
            " VALUES (?, ?, now())",
            [SCHEMA_VERSION, project_version()],
        )
    except BaseException:
        conn.rollback()
        raise
    conn.commit()
    return found or SCHEMA_VERSION


def _create_and_add_columns(conn: duckdb.DuckDBPyConnection, lakehouse: bool, where: str) -> None:
    """Create the missing tables; add the missing columns (with their defaults). A column of
    another type, or one not declared, stops the migration."""
    existing = _tables(conn)
    for name, table in WAREHOUSE_TABLES.items():
        if name not in existing:
            ddl = table.ddl(lakehouse)
            conn.execute(lakehouse_ddl(ddl) if lakehouse else ddl)
            continue
        stored = existing[name]
        unknown = set(stored) - set(table.column_names)
        if unknown:
            raise WarehouseSchemaError(
                f"The warehouse {where}: table {name} has columns this version does not know"
                f" ({', '.join(sorted(unknown))}); it was changed by hand or by another"
                " program. Migrate it by hand or use another warehouse."
            )
        for column in table.columns:
            if column.name not in stored:
                conn.execute(f"ALTER TABLE {name} ADD COLUMN {column.ddl(constrained=False)}")
            elif not _same_type(stored[column.name], column.type):
                raise WarehouseSchemaError(
                    f"The warehouse {where}: {name}.{column.name} is {stored[column.name]},"
                    f" this version expects {column.type}. Migrate it by hand or use another"
                    " warehouse."
                )


_ALIASES = {"TIMESTAMPTZ": "TIMESTAMP WITH TIME ZONE"}


def _same_type(stored: str, declared: str) -> bool:
    return stored.upper() == _ALIASES.get(declared.upper(), declared.upper())


# ---- the data steps of each version ----------------------------------------------------------


def _to_v2(conn: duckdb.DuckDBPyConnection) -> None:
    """Version 2: batches are registered in arrival order, publications are recorded, a segment
    model owns its affinity, catalogs have versions. What a version-1 warehouse already holds
    is registered: its batches in the order their rows were written (their first customer's
    line is no clock, so the batch IDs' order breaks ties), accepted when their validation let
    them through (they were embedded), published when they hold validated recommendations. The
    content digest is unknown: the next ingestion of a batch re-derives it."""
    conn.execute(
        f"""INSERT INTO {BATCHES} BY NAME
        SELECT batch_id, row_number() OVER (ORDER BY batch_id) - 1 AS arrival_seq,
               now() AS arrived_at,
               batch_id IN (SELECT batch_id FROM customer_embeddings) AS accepted
        FROM (SELECT DISTINCT batch_id FROM {CUSTOMERS})
        WHERE batch_id NOT IN (SELECT batch_id FROM {BATCHES})"""
    )
    conn.execute(
        f"""INSERT INTO {BATCH_PUBLICATIONS} BY NAME
        SELECT batch_id, now() AS published_at, max(model_version) AS segment_model_version,
               count(DISTINCT customer_id) AS customers, count(*) AS recommendations
        FROM validated_recommendations
        WHERE batch_id NOT IN (SELECT batch_id FROM {BATCH_PUBLICATIONS})
        GROUP BY batch_id"""
    )
    from pipeline_project.core.catalog import record_version
    from pipeline_project.core.segmentation import store_affinity

    [(products,)] = conn.execute("SELECT count(*) FROM product_catalog").fetchall()
    if products:
        record_version(conn)
    # The affinity of the newest segment model of each embedding model, learned from the
    # customers it segmented (the other versions assign no batch any more).
    latest = conn.execute(
        f"SELECT embedding_model, max(model_version) FROM {SEGMENT_MODEL} GROUP BY ALL"
    ).fetchall()
    for _, model_version in latest:
        store_affinity(conn, model_version)


def _to_v3(conn: duckdb.DuckDBPyConnection) -> None:
    """Version 3: a segment model records what it was trained on, a batch the catalog
    vocabulary of its profiles (columns added above). What older models were trained on is
    not recorded (NULL: a configured training minimum retrains them once). The batches
    embedded already are taken as profiled with the catalog of now."""
    from pipeline_project.core.catalog import vocabulary

    conn.execute(
        f"UPDATE {BATCHES} SET profile_vocabulary = ?"
        " WHERE batch_id IN (SELECT batch_id FROM customer_embeddings)",
        [vocabulary(conn)],
    )


def _to_v4(conn: duckdb.DuckDBPyConnection) -> None:
    """Version 4: purchases a configured rule drops from kept records (dropped_purchases: older
    batches dropped none); a segment's recency-weighted share of each product and the products
    bought together (product_neighbours), learned with the model: the newest model of each
    embedding model learns them again from the customers it segmented (the other versions
    assign no batch any more)."""
    from pipeline_project.core.segmentation import VERSIONED_TABLES, store_affinity

    latest = conn.execute(
        f"SELECT embedding_model, max(model_version) FROM {SEGMENT_MODEL} GROUP BY ALL"
    ).fetchall()
    learned = [table for table in VERSIONED_TABLES if table != SEGMENT_MODEL]
    for _, model_version in latest:
        for table in learned:  # what store_affinity learns again; the centroids stay
            conn.execute(f"DELETE FROM {table} WHERE model_version = ?", [model_version])
        store_affinity(conn, model_version)


def _to_v5(conn: duckdb.DuckDBPyConnection) -> None:
    """Version 5: the erasure log (created above); nothing was erased before it existed."""


MIGRATIONS: dict[int, Callable[[duckdb.DuckDBPyConnection], None]] = {
    2: _to_v2, 3: _to_v3, 4: _to_v4, 5: _to_v5,
}  # fmt: skip
