"""DuckLake: the warehouse's tables in a lakehouse whose catalog is a PostgreSQL database and whose
data are Parquet files under a path that every worker reaches.

The extensions come from their wheels (`duckdb-extension-ducklake`, `duckdb-extension-postgres`)
and are installed from those local files: nothing is downloaded at run time. The catalog's
password is given to DuckDB as a secret parameter, never written into a connection string, so
that no error message, log line or metadata value can carry it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import duckdb

LAKE_ALIAS = "lake"
EXTENSIONS = ("postgres", "ducklake")
# libpq keys of the catalog's connection string that become the DuckDB secret's fields.
_SECRET_FIELDS = {"host": "HOST", "port": "PORT", "user": "USER", "dbname": "DATABASE"}


def catalog_fields(catalog: str) -> dict[str, str]:
    """The libpq connection string's fields; a password in it is refused (use the environment)."""
    from psycopg2.extensions import parse_dsn

    fields = parse_dsn(catalog)
    if "password" in fields:
        raise ValueError(
            "the DuckLake catalog connection string must not hold a password:"
            " set PIPELINE_DUCKLAKE_PASSWORD instead"
        )
    missing = {"dbname"} - set(fields)
    if missing:
        raise ValueError(f"the DuckLake catalog connection string needs {sorted(missing)}")
    return fields


def _load(conn: duckdb.DuckDBPyConnection, extensions: tuple[str, ...]) -> None:
    from duckdb_extensions import import_extension

    for name in extensions:
        import_extension(name, con=conn)  # INSTALL from the wheel's file; skipped once installed
        conn.execute(f"LOAD {name}")


def _postgres_secret(
    conn: duckdb.DuckDBPyConnection, name: str, catalog: str, password: str
) -> dict[str, str]:
    """A DuckDB secret `name` for the PostgreSQL database of the libpq string `catalog`, its
    password a parameter (never in SQL text); returns the string's fields."""
    fields = catalog_fields(catalog)
    options = [f"{key} '{_quote(fields[libpq])}'" for libpq, key in _SECRET_FIELDS.items()
               if libpq in fields and libpq != "port"]  # fmt: skip
    if "port" in fields:
        options.append(f"PORT {int(fields['port'])}")
    conn.execute(
        f"CREATE OR REPLACE SECRET {name} (TYPE postgres, {', '.join(options)}, PASSWORD ?)",
        [password],
    )
    return fields


def attach_postgres(
    conn: duckdb.DuckDBPyConnection, *, database: str, password: str, alias: str
) -> None:
    """Attach the PostgreSQL database of the libpq string `database` as `alias` (DuckDB's
    postgres extension: DuckDB SQL, run against PostgreSQL's tables and transactions) and make
    it the default catalog."""
    _load(conn, ("postgres",))
    _postgres_secret(conn, f"{alias}_secret", database, password)
    conn.execute(f"ATTACH IF NOT EXISTS '' AS {alias} (TYPE postgres, SECRET {alias}_secret)")
    conn.execute(f"USE {alias}")


def attach_ducklake(
    conn: duckdb.DuckDBPyConnection, *, catalog: str, password: str, data_path: str
) -> None:
    """Load the extensions, then attach the lakehouse as `lake` and make it the default catalog."""
    _load(conn, EXTENSIONS)
    fields = _postgres_secret(conn, "pipeline_catalog", catalog, password)
    conn.execute(
        f"ATTACH IF NOT EXISTS 'ducklake:dbname={_quote(fields['dbname'])}'"
        f" AS {LAKE_ALIAS} (DATA_PATH '{_quote(data_path)}', METADATA_PARAMETERS MAP"
        " {'TYPE': 'postgres', 'SECRET': 'pipeline_catalog'})"
    )
    conn.execute(f"USE {LAKE_ALIAS}")


@contextmanager
def catalog_lock(catalog: str, password: str, name: str, shared: bool = False) -> Iterator[None]:
    """A PostgreSQL advisory lock on the catalog database, held until the body ends.

    DuckLake enforces no UNIQUE key, and two appends of the same row do not conflict: a write
    that must stay unique across workers (a cache entry, the first segment model) takes this
    lock, looks again, and writes only what is still missing. A worker that dies releases it
    with its session. `shared`: any number of holders at once, none beside an exclusive one
    (every writer shares the maintenance lock; the maintenance holds it alone).
    """
    import psycopg2

    session = psycopg2.connect(catalog, password=password)
    try:
        with session.cursor() as cur:
            function = "pg_advisory_lock_shared" if shared else "pg_advisory_lock"
            cur.execute(f"SELECT {function}(hashtext(%s))", [name])
        yield
    finally:
        session.close()


def _quote(text: str) -> str:
    return str(text).replace("'", "''")
