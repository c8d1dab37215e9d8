"""The conservation rule shared by the stage checks: every input record ends in exactly one
place (e.g. a raw line in customers or schema_errors or among the blank lines, a customer
embedded or dead-lettered)."""

from collections.abc import Sequence

import duckdb


def count_not_placed_exactly_once(
    conn: duckdb.DuckDBPyConnection,
    *,
    source: str,
    key: str,
    destinations: Sequence[str],
    params: dict,
) -> int:
    """Records of `source` found in none, or in more than one, of the `destinations`.

    `source` and each destination are SELECTs (from the code, never from data) that return
    the column `key`; `params` fills their $-parameters.
    """
    placed = "\n UNION ALL \n".join(destinations)
    sql = f"""
    SELECT count(*) FROM (
        SELECT s.{key}
        FROM ({source}) AS s
        LEFT JOIN ({placed}) AS placed USING ({key})
        GROUP BY s.{key}
        HAVING count(placed.{key}) <> 1
    )"""
    [(misplaced,)] = conn.execute(sql, params).fetchall()
    return misplaced
