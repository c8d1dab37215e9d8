"""A rate limit shared by every worker of a deployment: the requests (or tokens) sent to a model
API in the last minute, counted in PostgreSQL (the scale-out deployment's catalog database), so
that N workers together stay within the API's limit instead of N times it.

Each use takes a transaction-scoped advisory lock on the limit's name, forgets what is older
than the window, and either records its weight (within the limit) or learns how long until the
oldest use leaves the window, and waits outside the lock. PostgreSQL's clock is the one clock:
workers on other machines agree on it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

WINDOW_SECONDS = 60.0
_TABLE = "pipeline_rate_uses"
_DDL = f"""CREATE TABLE IF NOT EXISTS {_TABLE} (
    name TEXT NOT NULL, used_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    weight INTEGER NOT NULL)"""
_INDEX = f"CREATE INDEX IF NOT EXISTS {_TABLE}_by_name ON {_TABLE} (name, used_at)"


@dataclass
class SharedRateLimit:
    """At most `per_minute` weight (requests, or tokens) per minute under `name`, across every
    process using `database` (a libpq string without password; the password apart)."""

    database: str
    password: str = field(repr=False)
    name: str
    per_minute: int
    window_seconds: float = WINDOW_SECONDS  # a minute; shorter in tests
    _conn: object = field(default=None, repr=False)

    def _connection(self):
        import psycopg2

        if self._conn is None or self._conn.closed:
            self._conn = psycopg2.connect(self.database, password=self.password)
            with self._conn, self._conn.cursor() as cur:
                cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [_TABLE])
                cur.execute(_DDL)
                cur.execute(_INDEX)
        return self._conn

    def acquire(self, weight: int = 1) -> float:
        """Wait until `weight` more fits in the last minute's uses, record it; returns the
        seconds waited. A weight above the whole limit counts as the limit."""
        weight = max(1, min(int(weight), self.per_minute))
        waited = 0.0
        while True:
            conn = self._connection()
            with conn, conn.cursor() as cur:
                cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [self.name])
                cur.execute(
                    f"DELETE FROM {_TABLE} WHERE name = %s"
                    " AND used_at <= clock_timestamp() - make_interval(secs => %s)",
                    [self.name, self.window_seconds],
                )
                cur.execute(
                    f"SELECT coalesce(sum(weight), 0) FROM {_TABLE} WHERE name = %s", [self.name]
                )
                [(used,)] = cur.fetchall()
                if used + weight <= self.per_minute:
                    cur.execute(
                        f"INSERT INTO {_TABLE} (name, weight) VALUES (%s, %s)",
                        [self.name, weight],
                    )
                    return waited
                # until enough of the oldest uses leave the window
                cur.execute(
                    f"""SELECT extract(epoch FROM used_at + make_interval(secs => %s)
                                             - clock_timestamp())
                        FROM (SELECT used_at, sum(weight) OVER (ORDER BY used_at) AS freed
                              FROM {_TABLE} WHERE name = %s) AS uses
                        WHERE freed >= %s ORDER BY used_at LIMIT 1""",
                    [self.window_seconds, self.name, used + weight - self.per_minute],
                )
                row = cur.fetchone()
            pause = min(max(float(row[0]) if row else 0.05, 0.05), self.window_seconds)
            time.sleep(pause)
            waited += pause

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
