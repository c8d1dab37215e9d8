"""A real PostgreSQL server on 127.0.0.1 for the scale-out tests, with password authentication.

The binaries come from the `pgserver` wheel (a dev dependency), so the suite needs no system
package. The server runs in a temporary folder, listens on loopback only, accepts only
scram-sha-256 passwords, and is stopped (and its folder removed) at the end.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from pipeline_project_tests.helpers import free_port

USER = "pipeline"
# Recognisable, so a test can search every log, message and metadata value for it.
PASSWORD = "pg-Secret-7f3a9c-never-logged"


@dataclass(frozen=True)
class PostgresServer:
    host: str
    port: int
    user: str
    password: str
    root: Path

    def dsn(self, dbname: str) -> str:
        """A libpq connection string without the password (it comes from the environment)."""
        return f"host={self.host} port={self.port} user={self.user} dbname={dbname}"

    def create_database(self, name: str) -> str:
        import psycopg2

        conn = psycopg2.connect(self.dsn("postgres"), password=self.password)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return name


def _system_user() -> str | None:
    """PostgreSQL refuses to run as root: as root, run it as the `pgserver` user."""
    if os.geteuid() != 0:
        return None
    from pgserver.postgres_server import (
        POSTGRES_BIN_PATH,
        ensure_folder_permissions,
        ensure_user_exists,
    )

    ensure_user_exists("pgserver")
    readable = stat.S_IRGRP | stat.S_IROTH
    ensure_folder_permissions(POSTGRES_BIN_PATH, readable | stat.S_IXGRP | stat.S_IXOTH)
    ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", readable)
    return "pgserver"


@contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    import pgserver
    from pgserver.postgres_server import ensure_prefix_permissions

    root = Path(tempfile.mkdtemp(prefix="pipeline_pg_"))
    user = _system_user()
    data, password_file = root / "data", root / "password"
    data.mkdir()
    password_file.write_text(PASSWORD)
    if user:
        ensure_prefix_permissions(root)
        for path in (root, data, password_file):
            shutil.chown(path, user, user)
    port = free_port()
    try:
        pgserver.initdb(
            ["--auth=scram-sha-256", f"--pwfile={password_file}", "-U", USER, "-E", "UTF8"],
            pgdata=data,
            user=user,
        )
        password_file.unlink()
        options = f"-h 127.0.0.1 -p {port} -k {root} -c max_connections=200"
        pgserver.pg_ctl(
            ["-w", "-o", options, "-l", str(root / "server.log"), "start"],
            pgdata=data,
            user=user,
            timeout=60,
        )
        yield PostgresServer("127.0.0.1", port, USER, PASSWORD, root)
    finally:
        with suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
            pgserver.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=data, user=user, timeout=60)
        shutil.rmtree(root, ignore_errors=True)
