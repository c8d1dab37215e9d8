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
    range_size: int | None = None,
) -> int:
    """Records of `source` found in none, or in more than one, of the `destinations`.

    `source` and each destination are SELECTs (from the code, never from data) that return
    the column `key`; `params` fills their $-parameters. With `range_size` (an integer key,
    a batch's line numbers), the records are judged `range_size` keys at a time: the join and
    its count hold one range, never the whole batch (inside a swap transaction at 10M lines
    the whole join ran out of memory).
    """
    placed = "\n UNION ALL \n".join(
        f"SELECT {key} FROM ({d}) WHERE {key} BETWEEN $first AND $last" for d in destinations
    )
    sql = f"""
    SELECT count(*) FROM (
        SELECT s.{key}
        FROM (SELECT {key} FROM ({source}) WHERE {key} BETWEEN $first AND $last) AS s
        LEFT JOIN ({placed}) AS placed USING ({key})
        GROUP BY s.{key}
        HAVING count(placed.{key}) <> 1
    )"""
    if range_size is None:
        unbounded = sql.replace(f"WHERE {key} BETWEEN $first AND $last", "")
        [(misplaced,)] = conn.execute(unbounded, params).fetchall()
        return misplaced
    [(first, last)] = conn.execute(
        f"SELECT min({key}), max({key}) FROM ({source})", params
    ).fetchall()
    misplaced = 0
    for start in range(first or 0, (last or -1) + 1, range_size):
        ranged = {**params, "first": start, "last": start + range_size - 1}
        [(count,)] = conn.execute(sql, ranged).fetchall()
        misplaced += count
    return misplaced
