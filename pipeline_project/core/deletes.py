"""Deleting rows as every writer of the warehouse must: counted first, and no DELETE where no row
matches (on DuckLake a DELETE conflicts with every other writer's insert into the table)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import duckdb


def delete_where(
    conn: duckdb.DuckDBPyConnection,
    table: str,
    where: str,
    params: Mapping[str, object] | Sequence[object] = (),
) -> int:
    """Delete the rows of `table` (a name from the code, an alias allowed) that match `where`
    (SQL from the code; values in `params`); how many."""
    params = dict(params) if isinstance(params, Mapping) else list(params)
    [(found,)] = conn.execute(f"SELECT count(*) FROM {table} WHERE {where}", params).fetchall()
    if found:
        conn.execute(f"DELETE FROM {table} WHERE {where}", params)
    return found
