"""DuckDB stores: short-lived connections, and one transaction per batch write.

The warehouse has two backends behind one interface: `duckdb`, the embedded file (one writing
process at a time), and `ducklake`, a lakehouse whose catalog is a PostgreSQL database and whose
data are Parquet files under a data path every worker reaches (several writers at once). The
assets never know which one they write to.
"""

from __future__ import annotations

import errno
import hashlib
import os
import pwd
import re
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import ClassVar

import dagster as dg
import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from dagster_duckdb import DuckDBResource
from pydantic import Field, PrivateAttr
from tenacity import (
    Retrying,
    retry,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
    wait_random_exponential,
)

from pipeline_project.core import dead_letters
from pipeline_project.core.erasure import ErasedMeanwhile
from pipeline_project.core.object_storage import S3Access, is_uri, join
from pipeline_project.partitions import is_valid_batch_id
from pipeline_project.settings import ObjectStorageSettings, WarehouseSettings
from pipeline_project.tables import (
    BATCH_TABLES_BY_STAGE,
    BATCHES,
    ERASURE_LOG,
    RAW_CUSTOMERS,
    RAW_CUSTOMERS_COLUMNS,
    WAREHOUSE_TABLES,
)


def is_lock_conflict(err: BaseException) -> bool:
    """Another process holds the file: worth waiting for. Other IO errors are not (nor "failed
    to read block", a damaged file)."""
    return isinstance(err, duckdb.IOException) and "could not set lock" in str(err).lower()


def _is_commit_conflict(err: BaseException) -> bool:
    """Another writer committed a conflicting change first: the whole write may be retried."""
    return isinstance(err, duckdb.TransactionException) and "conflict" in str(err).lower()


class StoreFileError(dg.Failure, OSError):
    """A store's file cannot be opened or written: the message names it and says what to do.

    A Failure that is not retried (waiting frees no disk and fixes no path), and an OSError, so
    that what carries on without its store (the alert sink) catches it as before."""

    def __init__(self, description: str) -> None:
        super().__init__(description=description, allow_retries=False)


class OutOfMemoryFailure(dg.Failure):
    """DuckDB hit its memory limit: not retried (the same query needs the same memory); the
    message names the setting to raise."""

    def __init__(self, description: str) -> None:
        super().__init__(description=description, allow_retries=False)


# Why a write failed, by errno, and as DuckDB's messages spell the errno (strerror).
_NO_ROOM = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EFBIG: "the file reached the file-size limit",
}
_NO_ACCESS = {
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "the file system is read-only",
}
_STRERROR = {os.strerror(code): code for code in (*_NO_ROOM, *_NO_ACCESS)}
NO_ROOM_ADVICE = (
    "Free space on that disk, or raise the disk quota or the process's file-size limit"
    " (ulimit -f), then run it again."
)
_DUCKDB_FILE = re.compile(r'file "([^"]+)"')  # DuckDB's IO errors name the file so
DUCKDB_MAGIC = b"DUCK"  # bytes 8-11 of every DuckDB database file


def _reason(err: BaseException, reasons: dict[int, str]) -> str | None:
    if isinstance(err, StoreFileError):
        return None
    if isinstance(err, OSError):
        return reasons.get(err.errno)
    if isinstance(err, duckdb.Error):
        text = str(err)
        return next((reasons[c] for s, c in _STRERROR.items() if s in text and c in reasons), None)
    return None


def no_room(err: BaseException) -> str | None:
    """Why `err`, a failed write, found no room (a full disk or quota, the file-size limit)."""
    return _reason(err, _NO_ROOM)


def no_access(err: BaseException) -> str | None:
    """Why `err` could not open or write a file the user may not write, if so."""
    return _reason(err, _NO_ACCESS)


@contextmanager
def said_clearly(
    kinds: type[BaseException] | tuple[type[BaseException], ...],
    clearly: Callable[[BaseException], dg.Failure | None],
) -> Iterator[None]:
    """Re-raise an error of `kinds` as what `clearly` makes of it (a message naming the file and
    what to do), or as it is when `clearly` has nothing to say."""
    try:
        yield
    except kinds as err:
        if (error := clearly(err)) is None:
            raise
        raise error from err


def _user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"


class DuckDBStore(DuckDBResource):
    """A DuckDB file whose connections are retried while another process holds the write lock.

    A file there that is not a DuckDB database is never handed to DuckDB (which would try to
    open a SQLite file through its sqlite extension and write into it); a write that finds no
    room or no access fails with a StoreFileError that says which file and what to do."""

    connect_timeout_seconds: float = Field(
        default=120.0,
        description="How long to keep retrying while another process holds the file lock.",
    )
    # For messages: the settings that name the file and the memory limit.
    path_setting: ClassVar[str] = "the setting that names it"
    memory_setting: ClassVar[str] = "its memory_limit"

    @property
    def database_file(self) -> Path | None:
        """The database file, or None when the store is not one (in memory, MotherDuck)."""
        if self.database in ("", ":memory:") or self.database.startswith((":memory:", "md:")):
            return None
        return Path(self.database)

    def check_database_file(self) -> None:
        """Raise a StoreFileError if the store's file is not a DuckDB database. A missing file
        DuckDB creates; one shorter than the magic number may be a database that another
        process is creating this instant, so DuckDB judges it (see store_file_error)."""
        path = self.database_file
        if path is None:
            return
        if path.is_dir():
            raise self._not_a_database("it is a folder")
        try:
            with open(path, "rb") as f:
                head = f.read(16)
        except FileNotFoundError:
            return
        except OSError as err:
            if reason := no_access(err):
                raise StoreFileError(self._unwritable(str(path), reason, err)) from err
            raise
        if len(head) >= 12 and head[8:12] != DUCKDB_MAGIC:
            raise self._not_a_database(f"it begins {head!r}")

    def _not_a_database(self, why: str) -> StoreFileError:
        return StoreFileError(
            f'"{self.database}" is not a DuckDB database ({why}); it was left as it is. Point'
            f" {self.path_setting} at a DuckDB database file, or at a path where a new one can"
            " be created."
        )

    def _unwritable(
        self, path: str, reason: str, err: BaseException, of_duckdb: bool = True
    ) -> str:
        wal = f' (DuckDB writes "{self.database}.wal" beside it)' if of_duckdb else ""
        return (
            f'"{path}" cannot be written: {reason} ({err}). Give the user that runs the'
            f" pipeline ({_user()}) write access to it and to its folder{wal}, or point"
            f" {self.path_setting} at a writable path."
        )

    def store_file_error(self, err: BaseException) -> dg.Failure | None:
        """`err`, a DuckDB error, said clearly if a file had no room or no access, or DuckDB
        had no memory left; else None."""
        text = str(err)
        found = _DUCKDB_FILE.search(text)
        path = found.group(1) if found else self.database
        if reason := no_room(err):
            return StoreFileError(
                f'No room to write "{path}": {reason} ({text}). The write was rolled back:'
                f" the database keeps what was committed before. {NO_ROOM_ADVICE}"
            )
        if "max_temp_directory_size" in text:  # spilling found the disk (nearly) full
            temp = self.connection_config.get("temp_directory") or (
                f"{self.database}.tmp" if self.database_file else ".tmp"
            )
            return StoreFileError(
                f'No room to spill to "{temp}", DuckDB\'s folder for what does not fit in'
                f" memory ({text.splitlines()[0]}). Free space on that disk, or raise"
                f" {self.memory_setting}, then run it again."
            )
        if isinstance(err, duckdb.OutOfMemoryException):
            return OutOfMemoryFailure(
                f"DuckDB ran out of memory at its limit of"
                f" {self.connection_config.get('memory_limit', 'its default')}"
                f" ({text.splitlines()[0]}). Raise {self.memory_setting} (the memory each"
                " process's DuckDB may use), then run it again; retrying unchanged would fail"
                " the same way."
            )
        if (reason := no_access(err)) and path.startswith(self.database):
            return StoreFileError(self._unwritable(path, reason, err))
        if "not a valid DuckDB database file" in text:  # too short to be judged before
            return self._not_a_database(f"DuckDB: {text}")
        return None

    def compact(self) -> tuple[int, int]:
        """Rewrite the database file with only what it holds now: deleted rows stay in a DuckDB
        file's free blocks (a CHECKPOINT or VACUUM does not clear them) until the file is
        written anew. One connection holds the file's lock from the checkpoint to the rename, so
        no other process writes meanwhile (it waits, as for any writer): the database is copied
        into a new file beside it (COPY FROM DATABASE: tables, views, constraints), which then
        replaces it. Returns the file's bytes before and after (0, 0 for a store that is not a
        file)."""
        path = self.database_file
        if path is None or not path.exists():
            return 0, 0
        fresh = path.with_name(f".{path.name}.{uuid.uuid4().hex}.compact")
        conn = self._connect()
        try:
            with said_clearly(duckdb.Error, self.store_file_error):
                conn.execute("CHECKPOINT")  # the WAL into the file: nothing left to write
                before = path.stat().st_size
                [(name,)] = conn.execute("SELECT current_database()").fetchall()
                conn.execute(f"ATTACH '{_quote(str(fresh))}' AS compact_to")
                conn.execute(f'COPY FROM DATABASE "{name}" TO compact_to')
                conn.execute("DETACH compact_to")
            with open(fresh, "rb") as f:
                os.fsync(f.fileno())
            os.replace(fresh, path)
        finally:
            conn.close()
            fresh.unlink(missing_ok=True)
            Path(f"{fresh}.wal").unlink(missing_ok=True)
        return before, path.stat().st_size

    def _table_ddl(self) -> Sequence[str]:
        return ()

    def _prepare(self, conn: duckdb.DuckDBPyConnection) -> None:
        for ddl in self._table_ddl():
            conn.execute(ddl)

    @contextmanager
    def get_connection(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection that is always closed, also when the body raises (the lock is released)."""
        conn = self._connect()
        try:
            with said_clearly(duckdb.Error, self.store_file_error):
                self._prepare(conn)
                yield conn
        finally:
            conn.close()

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """BEGIN ... COMMIT on a fresh connection; any exception rolls the whole write back."""
        with self.get_connection() as conn:
            conn.begin()
            try:
                yield conn
            except BaseException:
                conn.rollback()
                raise
            conn.commit()

    def _connect(self, read_only: bool = False) -> duckdb.DuckDBPyConnection:
        """Opened read-write, or `read_only`; either waits out another process's conflicting
        lock (a writer excludes every other process, a reader excludes writers) for up to
        connect_timeout_seconds."""
        self.check_database_file()
        connect = retry(
            retry=retry_if_exception(is_lock_conflict),
            wait=wait_exponential_jitter(multiplier=0.05, max=5.0),
            stop=stop_after_delay(self.connect_timeout_seconds),
            reraise=True,
        )(duckdb.connect)
        with said_clearly(duckdb.Error, self.store_file_error):
            return connect(
                database=self.database, read_only=read_only, config=dict(self.connection_config)
            )


RAW_FILE_NAME = "lines.parquet"


DUCKDB, DUCKLAKE = "duckdb", "ducklake"
# Held shared by every write to a lakehouse, alone by its maintenance.
MAINTENANCE_LOCK = "lake maintenance"


@dataclass(frozen=True)
class MaintenancePolicy:
    """What the lake's maintenance keeps: snapshots for `keep_snapshots` (time travel, and
    readers of an old snapshot), files no snapshot references for `grace` more, and files of
    no snapshot at all (a writer's until it commits) for `orphan_age`: far longer than any
    write takes. Files whose rows are deleted beyond `rewrite_delete_threshold` are
    rewritten."""

    keep_snapshots: timedelta = timedelta(days=7)
    grace: timedelta = timedelta(hours=1)
    orphan_age: timedelta = timedelta(days=3)
    rewrite_delete_threshold: float = 0.3


# One attached lakehouse per process and configuration: attaching costs about a second (the
# extensions load, the catalog is read), so each connection is a cursor of this one.
_LAKES: dict[tuple, duckdb.DuckDBPyConnection] = {}
_LAKES_LOCK = threading.Lock()
# This process's scratch folders in use: never taken for a killed run's leftovers.
_SCRATCH_IN_USE: set[Path] = set()


class Warehouse(DuckDBStore):
    """The pipeline's warehouse: every stage's tables, each keyed by batch_id.

    `raw_customers` is the exception: one Parquet file per batch under `files_dir`
    (`raw_customers/batch_id=<id>/lines.parquet`), queried through a view of the same name.
    Writing raw text into a DuckDB table cost 5.5-7 s per 2M lines; a Parquet file takes under
    1 s, and a file rename replaces a batch atomically. On the file backend `files_dir` is next
    to the DuckDB file; on DuckLake it is under the data path, so every worker sees it.
    """

    backend: str = Field(default=DUCKDB, description="duckdb (the embedded file) or ducklake.")
    ducklake_catalog: str = Field(
        default="",
        description="DuckLake: libpq connection string of the catalog database, no password.",
    )
    ducklake_password: str = Field(
        default="", description="DuckLake: the catalog's password (from the environment)."
    )
    ducklake_data_path: str = Field(
        default="",
        description="DuckLake: where the tables' Parquet files live, a folder every worker"
        " reaches or s3://bucket/prefix.",
    )
    s3_endpoint: str = Field(default="", description="S3-compatible server (empty: AWS).")
    s3_region: str = Field(default="us-east-1", description="The object storage's region.")
    s3_access_key_id: str = Field(default="", repr=False, description="A secret (dg.EnvVar).")
    s3_secret_access_key: str = Field(default="", repr=False, description="A secret.")
    commit_attempts: int = Field(
        default=10, description="Attempts of a write whose commit conflicts with another writer."
    )
    # Writes retried after a commit conflict, in this resource's lifetime (one step).
    _commit_retries: list[str] = PrivateAttr(default_factory=list)
    # The customers erased (erasure_log) when this resource first read the warehouse: a write
    # after another erasure may hold rows read before it (see transaction).
    _erasures_seen: int | None = PrivateAttr(default=None)
    path_setting: ClassVar[str] = "PIPELINE_DUCKDB_PATH"
    memory_setting: ClassVar[str] = "PIPELINE_DUCKDB_MEMORY_LIMIT"

    @classmethod
    def from_settings(
        cls, settings: WarehouseSettings, storage: ObjectStorageSettings | None = None
    ) -> Warehouse:
        if settings.backend not in (DUCKDB, DUCKLAKE):
            raise ValueError(
                f"PIPELINE_WAREHOUSE_BACKEND={settings.backend!r}: use {DUCKDB} or {DUCKLAKE}"
            )
        lake = settings.backend == DUCKLAKE
        if lake and not (settings.ducklake_catalog and settings.ducklake_data_path):
            raise ValueError(
                "PIPELINE_WAREHOUSE_BACKEND=ducklake needs PIPELINE_DUCKLAKE_CATALOG (a libpq"
                " connection string without password) and PIPELINE_DUCKLAKE_DATA_PATH"
            )
        storage = storage or ObjectStorageSettings()
        s3 = lake and is_uri(settings.ducklake_data_path)
        return cls(
            backend=settings.backend,
            database=str(settings.duckdb_path),
            connection_config={"memory_limit": settings.memory_limit},
            ducklake_catalog=settings.ducklake_catalog,
            # A secret: Dagster reads it when the resource starts; never shown in the UI.
            ducklake_password=dg.EnvVar("PIPELINE_DUCKLAKE_PASSWORD") if lake else "",
            ducklake_data_path=str(settings.ducklake_data_path or ""),
            commit_attempts=settings.commit_attempts,
            s3_endpoint=storage.endpoint,
            s3_region=storage.region,
            # Secrets, like the catalog's password.
            s3_access_key_id=dg.EnvVar("PIPELINE_S3_ACCESS_KEY_ID") if s3 else "",
            s3_secret_access_key=dg.EnvVar("PIPELINE_S3_SECRET_ACCESS_KEY") if s3 else "",
        )

    @property
    def is_lakehouse(self) -> bool:
        return self.backend == DUCKLAKE

    @property
    def database_file(self) -> Path | None:
        return None if self.is_lakehouse else super().database_file

    @property
    def files_dir(self) -> Path:
        """The warehouse's own files: beside the DuckDB file (the raw lines, step-private
        staging parts); on DuckLake, where the raw lines are a table of the lake, a folder of
        the worker's temporary directory for staging parts that never leave their step."""
        if self.is_lakehouse:  # one folder per lakehouse: a run's cleanup never meets another's
            lake = hashlib.sha256(f"{self.ducklake_catalog} {self.ducklake_data_path}".encode())
            return Path(tempfile.gettempdir()) / f"pipeline_project-{lake.hexdigest()[:16]}"
        database = Path(self.database)
        return database.with_name(f"{database.name}.files")

    @property
    def location(self) -> str:
        """Where the tables are, for messages: never the catalog's password."""
        if self.is_lakehouse:
            return f"DuckLake {self.ducklake_catalog!r} with data in {self.ducklake_data_path}"
        return self.database

    def qualified_name(self, table: str) -> str:
        """`database.schema.table`, as DuckDB names it (a file's stem, or the lakehouse's alias)."""
        from pipeline_project.resources.lakehouse import LAKE_ALIAS

        database = LAKE_ALIAS if self.is_lakehouse else Path(self.database).stem
        return f"{database}.main.{table}"

    @property
    def location_metadata(self) -> dict[str, dg.MetadataValue]:
        """Where the tables live, for the UI: the file or the lakehouse's data path (never the
        catalog's password: only its connection string, which holds none)."""
        if self.is_lakehouse:
            return {
                "warehouse_data_path": dg.MetadataValue.text(self.ducklake_data_path),
                "warehouse_catalog": dg.MetadataValue.text(self.ducklake_catalog),
            }
        return {"warehouse_path": dg.MetadataValue.path(str(Path(self.database).resolve()))}

    @property
    def raw_dir(self) -> Path:
        return self.files_dir / RAW_CUSTOMERS

    def raw_file(self, batch_id: str) -> Path:
        """The batch's raw lines file (the file backend; DuckLake keeps them in a table)."""
        check_batch_id(batch_id)
        if self.is_lakehouse:
            raise ValueError("on DuckLake the raw lines are the table raw_customers")
        return self.raw_dir / f"batch_id={batch_id}" / RAW_FILE_NAME

    def raw_metadata(self, batch_id: str) -> dict[str, dg.MetadataValue]:
        """Where the batch's raw lines are, for the UI."""
        if self.is_lakehouse:
            return {"raw_table": dg.MetadataValue.text(self.qualified_name(RAW_CUSTOMERS))}
        return {"raw_file": dg.MetadataValue.path(str(self.raw_file(batch_id)))}

    @contextmanager
    def raw_lines_file(self, batch_id: str) -> Iterator[Path]:
        """A local Parquet file of the batch's raw lines, for validation to read in ranges:
        the batch's file itself, or on DuckLake the batch's rows of raw_customers copied into
        a private scratch file (removed afterwards). FileNotFoundError when the batch has no
        raw lines stored."""
        if not self.is_lakehouse:
            path = self.raw_file(batch_id)
            if not path.exists():
                raise FileNotFoundError(f"no raw_customers file ({path})")
            yield path
            return
        with self.scratch_folder(batch_id) as folder, self.get_connection() as conn:
            # registered with its lines, and they are still there (retention deletes them;
            # an empty file has none to keep)
            if not conn.execute(
                f"SELECT 1 FROM {BATCHES} WHERE batch_id = $b AND content_digest IS NOT NULL"
                f" AND (coalesce(lines, 0) = 0"
                f"      OR EXISTS (SELECT 1 FROM {RAW_CUSTOMERS} WHERE batch_id = $b))",
                {"b": batch_id},
            ).fetchall():
                raise FileNotFoundError(f"no raw lines of batch {batch_id} in {RAW_CUSTOMERS}")
            path = folder / RAW_FILE_NAME
            columns = ", ".join(RAW_FILE_SCHEMA.names)
            conn.execute(
                f"COPY (SELECT {columns} FROM {RAW_CUSTOMERS} WHERE batch_id = ?)"
                f" TO '{_quote(str(path))}' (FORMAT parquet, COMPRESSION uncompressed)",
                [batch_id],
            )
            yield path

    def _prepare(self, conn: duckdb.DuckDBPyConnection, read_only: bool = False) -> bool:
        """Every connection in UTC, on the current schema, with the raw view; whether it could
        be prepared (a `read_only` one cannot migrate the file: False when it must be)."""
        # UTC: a timestamp without an offset is the same instant on any host (DuckDB takes the
        # host's time zone otherwise).
        conn.execute("SET TimeZone = 'UTC'")
        if not self.is_lakehouse:  # the lakehouse's schema is checked once per process
            from pipeline_project.schema import SCHEMA_VERSION, ensure_schema, found_version

            if not read_only:
                ensure_schema(conn, lakehouse=False, where=self.location)
            elif found_version(conn) != SCHEMA_VERSION:  # older: migrated; newer: refused
                return False
            self._ensure_raw_view(conn, read_only=read_only)
        if self._erasures_seen is None:
            self._erasures_seen = self._erasures(conn)
        return True

    @contextmanager
    def read_connection(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection for reads only, always closed. On the DuckDB file it is opened
        read-only: readers in several processes share the file (a writer still excludes them,
        and they a writer), and it waits out a conflicting lock as long as get_connection does
        (a lock conflict after connect_timeout_seconds: see is_lock_conflict). A warehouse that
        does not exist yet or whose schema must be migrated first is opened by get_connection
        instead (that write is the migration's). DuckLake has no file lock (a reader reads a
        snapshot and blocks no writer): get_connection's connection."""
        conn = self._reader()
        if conn is None:
            with self.get_connection() as conn:
                yield conn
            return
        try:
            with said_clearly(duckdb.Error, self.store_file_error):
                yield conn
        finally:
            conn.close()

    def _reader(self) -> duckdb.DuckDBPyConnection | None:
        """A read-only connection to the file, prepared as _prepare does without writing;
        None when only a writer can open the warehouse (not a file, missing, to be migrated) or
        this process has it open read-write already (DuckDB refuses a second configuration of
        one file in a process)."""
        path = self.database_file
        if path is None or not path.exists():
            return None
        try:
            conn = self._connect(read_only=True)
        except duckdb.ConnectionException as err:
            if "different configuration" in str(err):
                return None
            raise
        try:
            with said_clearly(duckdb.Error, self.store_file_error):
                prepared = self._prepare(conn, read_only=True)
        except BaseException:
            conn.close()
            raise
        if not prepared:
            conn.close()
            return None
        return conn

    def _connect(self, read_only: bool = False) -> duckdb.DuckDBPyConnection:
        if not self.is_lakehouse:
            return super()._connect(read_only)
        from pipeline_project.resources.lakehouse import LAKE_ALIAS

        conn = self._lake().cursor()
        conn.execute(f"USE {LAKE_ALIAS}")
        return conn

    def _lake_data_path(self) -> str:
        """Where DuckLake keeps the tables' files."""
        return join(self.ducklake_data_path, "tables") + "/"

    @property
    def s3_access(self) -> S3Access:
        return S3Access(
            self.s3_endpoint, self.s3_region, self.s3_access_key_id, self.s3_secret_access_key
        )

    def _lake(self) -> duckdb.DuckDBPyConnection:
        from pipeline_project.resources.lakehouse import attach_ducklake

        key = (
            self.ducklake_catalog,
            self.ducklake_data_path,
            tuple(self.connection_config.items()),
        )
        with _LAKES_LOCK:
            if key not in _LAKES:
                base = duckdb.connect(config={**self.connection_config,
                                              "autoinstall_known_extensions": False})  # fmt: skip
                if is_uri(self.ducklake_data_path):
                    self.s3_access.duckdb_secret(base)
                # Under the lock: two workers creating or migrating a lakehouse's catalog at
                # once collide.
                with self.lock("attach"):
                    attach_ducklake(
                        base,
                        catalog=self.ducklake_catalog,
                        password=self.ducklake_password,
                        data_path=self._lake_data_path(),
                    )
                    from pipeline_project.schema import ensure_schema

                    ensure_schema(base, lakehouse=True, where=self.location)
                    # The raw lines: a table of the lake, so that a batch's lines become
                    # visible at its commit (a file on object storage has no atomic rename).
                    columns = ", ".join(f"{n} {t}" for n, t in RAW_CUSTOMERS_COLUMNS.items())
                    base.execute(f"CREATE TABLE IF NOT EXISTS {RAW_CUSTOMERS} ({columns})")
                _LAKES[key] = base
            return _LAKES[key]

    def lock(self, name: str) -> AbstractContextManager:
        """Held by a write that must stay unique across concurrent writers (a cache entry, the
        first segment model). The file backend has one writer at a time and needs none."""
        if not self.is_lakehouse:
            return nullcontext()
        from pipeline_project.resources.lakehouse import catalog_lock

        return catalog_lock(self.ducklake_catalog, self.ducklake_password, name)

    @contextmanager
    def locked_transaction(self, name: str) -> Iterator[duckdb.DuckDBPyConnection]:
        """A transaction under `lock(name)`: for appends that must stay unique (see lock)."""
        with self.lock(name), self.transaction() as conn:
            yield conn

    @contextmanager
    def transaction(self, check_erasures: bool = True) -> Iterator[duckdb.DuckDBPyConnection]:
        """BEGIN ... COMMIT; on DuckLake under the maintenance lock, shared with every other
        writer: the lake's maintenance never runs beside a write (see maintain).

        A customer erased since this resource first read the warehouse fails the write before
        its commit (ErasedMeanwhile, retried): it may hold their rows, read before. The retry
        reads again. Not for the erasure's own writes (`check_erasures`)."""
        with self._writing(), super().transaction() as conn:
            yield conn
            if check_erasures:
                self._check_erasures(conn)

    def _erasures(self, conn: duckdb.DuckDBPyConnection) -> int:
        [(erased,)] = conn.execute(f"SELECT count(*) FROM {ERASURE_LOG}").fetchall()
        return erased

    def _check_erasures(self, conn: duckdb.DuckDBPyConnection) -> None:
        erased = self._erasures(conn)
        if self._erasures_seen is not None and erased != self._erasures_seen:
            self._erasures_seen = erased  # the retry reads what the erasure left
            raise ErasedMeanwhile(
                "a customer was erased while this step held rows it had read before: nothing"
                " was written, the step is run again"
            )

    def _writing(self) -> AbstractContextManager:
        if not self.is_lakehouse:
            return nullcontext()
        from pipeline_project.resources.lakehouse import catalog_lock

        return catalog_lock(
            self.ducklake_catalog, self.ducklake_password, MAINTENANCE_LOCK, shared=True
        )

    def storage(self) -> tuple[int, int]:
        """Files and bytes the tables take: the DuckDB file (and its WAL), or every file under
        the lake's data folder (referenced or not)."""
        if not self.is_lakehouse:
            paths = [Path(self.database), Path(f"{self.database}.wal")]
            sizes = [p.stat().st_size for p in paths if p.exists()]
            return len(sizes), sum(sizes)
        with self.get_connection() as conn:
            [(files, size)] = conn.execute(
                "SELECT count(*), coalesce(sum(size), 0) FROM read_blob(?)",
                [self._lake_data_path() + "**"],
            ).fetchall()
        return int(files), int(size)

    def maintain(self, policy: MaintenancePolicy) -> dict[str, int]:
        """Keep storage from growing with every re-run, replay and retrain (DuckLake never
        deletes a file on its own): expire the snapshots older than the policy keeps, rewrite
        the files mostly deleted, merge small adjacent files, delete the files no snapshot
        references any more (once `policy.grace` has passed, for readers still on them), and
        files of no snapshot at all left by writers that died (only after `policy.orphan_age`:
        a writer's files are orphans until it commits). Under the maintenance lock alone: no
        write runs meanwhile, none starts until it ends. The DuckDB file: a checkpoint (its
        WAL into the file; the file reuses its free blocks). Returns what each step did."""
        if not self.is_lakehouse:
            with self.get_connection() as conn:
                conn.execute("CHECKPOINT")
            return {}
        from pipeline_project.resources.lakehouse import LAKE_ALIAS, catalog_lock

        lake = f"'{LAKE_ALIAS}'"
        # each step's ages from the moment it runs: a file the step before scheduled for
        # deletion is as old as the grace allows only then
        steps = {
            "inlined_rows_flushed": (f"ducklake_flush_inlined_data({lake})", {}),
            "snapshots_expired": (
                f"ducklake_expire_snapshots({lake}, older_than => $age)",
                policy.keep_snapshots,
            ),
            "files_rewritten": (
                f"ducklake_rewrite_data_files({lake}, delete_threshold => $threshold)",
                {"threshold": policy.rewrite_delete_threshold},
            ),
            "files_merged": (f"ducklake_merge_adjacent_files({lake})", {}),
            "old_files_deleted": (
                f"ducklake_cleanup_old_files({lake}, older_than => $age)",
                policy.grace,
            ),
            "orphan_files_deleted": (
                f"ducklake_delete_orphaned_files({lake}, older_than => $age)",
                policy.orphan_age,
            ),
        }
        done = {}
        alone = catalog_lock(self.ducklake_catalog, self.ducklake_password, MAINTENANCE_LOCK)
        with alone, self.get_connection() as conn:
            for name, (call, params) in steps.items():
                if isinstance(params, timedelta):
                    params = {"age": datetime.now(UTC) - params}
                done[name] = len(conn.execute(f"CALL {call}", params).fetchall())
        return done

    def tombstone_raw_lines(self, batch_id: str, line_nos: Sequence[int]) -> int:
        """The file backend: the batch's raw lines `line_nos` become tombstones (an empty line,
        see core/erasure.py) in a new file that replaces the batch's by a rename; streamed a row
        group at a time. Returns the lines replaced (0 when the batch has no raw file)."""
        from pipeline_project.core.erasure import tombstoned

        path = self.raw_file(batch_id)
        if not path.exists() or not line_nos:
            return 0
        wanted = pa.array(sorted(set(line_nos)), pa.int64())
        tmp = path.with_name(f".{RAW_FILE_NAME}.{uuid.uuid4().hex}.tmp")
        replaced = 0
        try:
            source = pq.ParquetFile(path)
            with pq.ParquetWriter(
                tmp, source.schema_arrow, compression="none", use_dictionary=False
            ) as writer:
                for group in range(source.num_row_groups):
                    lines = source.read_row_group(group)
                    erased = pc.is_in(lines["line_no"], value_set=wanted)
                    replaced += pc.sum(erased).as_py() or 0
                    writer.write_table(tombstoned(lines, erased))
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return replaced

    def delete_raw_file(self, batch_id: str, conn: duckdb.DuckDBPyConnection) -> int | None:
        """The file backend: delete the batch's raw file and its folder (a killed run's
        temporary files with it) and rebuild the raw_customers view over the files left, in the
        caller's transaction `conn`; the lines it held, or None when it had no folder."""
        folder = self.raw_file(batch_id).parent
        if not folder.is_dir():
            return None
        path = folder / RAW_FILE_NAME
        lines = pq.ParquetFile(path).metadata.num_rows if path.is_file() else 0
        shutil.rmtree(folder)
        self._ensure_raw_view(conn)  # over the files left; empty when there is none
        return lines

    def clear_leftovers(self, batch_ids: Sequence[str] | None = None) -> None:
        """Remove what killed runs left of these batches (None: of every batch): staging
        folders, and on the file backend raw files half written. Never a folder of this
        process's steps in use; the caller holds the writer pool."""
        staging_root = self.files_dir / "staging"
        patterns = [f"{b}.*" for b in batch_ids] if batch_ids is not None else ["*"]
        for batch_id in batch_ids or []:
            check_batch_id(batch_id)
        for pattern in patterns:
            for stale in staging_root.glob(pattern):
                if stale not in _SCRATCH_IN_USE:
                    shutil.rmtree(stale, ignore_errors=True)
        if not self.is_lakehouse:
            folders = ([self.raw_file(b).parent for b in batch_ids] if batch_ids is not None
                       else self.raw_dir.glob("batch_id=*"))  # fmt: skip
            for folder in folders:
                for stale in Path(folder).glob(f".{RAW_FILE_NAME}.*.tmp"):
                    stale.unlink(missing_ok=True)

    def rewrite_files_with_deletes(self, tables: Sequence[str]) -> int:
        """DuckLake: rewrite the files of `tables` that hold deleted rows, so that the rows
        leave storage once the snapshots before expire (the daily maintenance); files
        rewritten. The DuckDB file: nothing (its free blocks are reused, or compact)."""
        if not self.is_lakehouse:
            return 0
        from pipeline_project.resources.lakehouse import LAKE_ALIAS

        check_tables([t for t in tables if t != RAW_CUSTOMERS])  # a lake table, too
        rewritten = 0
        with self.get_connection() as conn:
            for table in tables:
                rewritten += len(conn.execute(
                    f"CALL ducklake_rewrite_data_files('{LAKE_ALIAS}', '{table}',"
                    " delete_threshold => 0)"
                ).fetchall())  # fmt: skip
        return rewritten

    def forget_deleted_rows(self) -> dict[str, int]:
        """Make rows deleted so far unrecoverable from storage. DuckLake: under the maintenance
        lock alone, flush the rows inlined in the catalog, rewrite every file that holds deleted
        rows, expire every snapshot but the newest (no time travel back to them), delete the
        files no snapshot references (no grace: nothing may read them any more). The DuckDB
        file: written anew (compact). Returns what each step did."""
        if not self.is_lakehouse:
            before, after = self.compact()
            return {"bytes_before": before, "bytes_after": after}
        from pipeline_project.resources.lakehouse import LAKE_ALIAS, catalog_lock

        lake = f"'{LAKE_ALIAS}'"
        steps = {
            "inlined_rows_flushed": f"ducklake_flush_inlined_data({lake})",
            "files_rewritten": f"ducklake_rewrite_data_files({lake}, delete_threshold => 0)",
            "snapshots_expired": f"ducklake_expire_snapshots({lake}, older_than => now())",
            "old_files_deleted": f"ducklake_cleanup_old_files({lake}, older_than => now())",
        }
        done = {}
        alone = catalog_lock(self.ducklake_catalog, self.ducklake_password, MAINTENANCE_LOCK)
        with alone, self.get_connection() as conn:
            for name, call in steps.items():
                done[name] = len(conn.execute(f"CALL {call}").fetchall())
        return done

    def write_attempts(self) -> Retrying:
        """Attempts of one whole write transaction: a commit that conflicts with another
        writer's (DuckLake, two batches replaced in one table at once) is retried from the
        start, with random exponential waits. Use as
        `for attempt in warehouse.write_attempts(): with attempt, warehouse.transaction() ...`;
        `attempt.retry_state.attempt_number` afterwards is what it took."""
        return Retrying(
            retry=retry_if_exception(_is_commit_conflict),
            stop=stop_after_attempt(self.commit_attempts),
            wait=wait_random_exponential(multiplier=0.2, max=5.0),
            before_sleep=lambda state: self._commit_retries.append(str(state.outcome.exception())),
            reraise=True,
        )

    def commit_retries(self) -> int:
        """How many writes of this step were retried after a commit conflict (for metadata)."""
        return len(self._commit_retries)

    def _ensure_raw_view(self, conn: duckdb.DuckDBPyConnection, read_only: bool = False) -> None:
        """The raw_customers view reads every batch's file, or is empty while there is none.
        Replaced only when that changes, so connections do not rewrite the catalog each time;
        a `read_only` connection, which cannot, gets a view of its own (TEMP) instead."""
        has_files = any(self.raw_dir.glob(f"*/{RAW_FILE_NAME}"))
        columns = ", ".join(RAW_CUSTOMERS_COLUMNS)
        if has_files:
            glob = str(self.raw_dir / "*" / RAW_FILE_NAME).replace("'", "''")
            source = (
                f"read_parquet('{glob}', hive_partitioning = true,"
                " hive_types = {'batch_id': VARCHAR})"
            )
        else:
            source = (
                "(SELECT "
                + ", ".join(
                    f"NULL::{sql_type} AS {name}"
                    for name, sql_type in RAW_CUSTOMERS_COLUMNS.items()
                )
                + " WHERE false)"
            )
        if self.is_lakehouse:  # a view of this connection only: no catalog write per connection
            conn.execute(
                f"CREATE OR REPLACE TEMP VIEW {RAW_CUSTOMERS} AS SELECT {columns} FROM {source}"
            )
            return
        sql = f"CREATE OR REPLACE VIEW {RAW_CUSTOMERS} AS SELECT {columns} FROM {source}"
        current = conn.execute(
            "SELECT sql FROM duckdb_views() WHERE view_name = ? AND NOT internal", [RAW_CUSTOMERS]
        ).fetchall()
        if not current or current[0][0].rstrip(";") != sql.replace("CREATE OR REPLACE", "CREATE"):
            conn.execute(
                sql.replace("OR REPLACE VIEW", "OR REPLACE TEMP VIEW") if read_only else sql
            )

    @contextmanager
    def replacing_raw_file(
        self,
        batch_id: str,
        before_swap: Callable[[duckdb.DuckDBPyConnection], None] | None = None,
    ) -> Iterator[pq.ParquetWriter]:
        """A Parquet writer for the batch's raw lines; the file replaces the batch's old one
        (an atomic rename) only when the body finishes, so a crash keeps the previous lines.
        `before_swap` (the batch register) runs in a transaction of its own just before the
        rename (a crash in between keeps the old lines beside the new register).

        On DuckLake the lines go to a private scratch file first, then replace the batch's rows
        of raw_customers in ONE transaction with `before_swap`: visible at its commit."""
        if self.is_lakehouse:
            with self.scratch_folder(batch_id) as folder:
                path = folder / RAW_FILE_NAME
                with pq.ParquetWriter(path, RAW_FILE_SCHEMA, compression="none") as writer:
                    yield writer
                columns = ", ".join(RAW_FILE_SCHEMA.names)
                for attempt in self.write_attempts():
                    with attempt, self.transaction() as conn:
                        _replace_rows(conn, RAW_CUSTOMERS, batch_id)
                        conn.execute(
                            f"INSERT INTO {RAW_CUSTOMERS} (batch_id, {columns})"
                            f" SELECT ?, {columns} FROM read_parquet(?)",
                            [batch_id, str(path)],
                        )
                        if before_swap is not None:
                            before_swap(conn)
            return
        final = self.raw_file(batch_id)
        self.check_database_file()  # no files beside a file that is not the warehouse
        tmp = final.with_name(f".{RAW_FILE_NAME}.{uuid.uuid4().hex}.tmp")
        what = f"the raw_customers file of batch {batch_id}"
        kept = "The batch's previous raw file is kept."
        try:
            with said_clearly(OSError, lambda err: self._file_error(err, tmp, what, kept)):
                final.parent.mkdir(parents=True, exist_ok=True)
                for stale in final.parent.glob(f".{RAW_FILE_NAME}.*.tmp"):  # a killed run's
                    stale.unlink(missing_ok=True)
                with pq.ParquetWriter(
                    tmp, RAW_FILE_SCHEMA, compression="none", use_dictionary=False
                ) as writer:
                    yield writer
                if before_swap is not None:
                    for attempt in self.write_attempts():
                        with attempt, self.transaction() as conn:
                            before_swap(conn)
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)

    def _file_error(self, err: OSError, path: Path, what: str, kept: str) -> StoreFileError | None:
        """`err`, writing one of the warehouse's files, said clearly if it found no room or no
        access; else None (an error of the caller's own files, say the landing file's)."""
        path = Path(err.filename) if err.filename else path  # pyarrow's errors name no file
        if reason := no_room(err):
            detail = err.strerror if err.filename else str(err)
            return StoreFileError(
                f'No room to write "{path}" ({what}): {reason} ({detail}). {kept} {NO_ROOM_ADVICE}'
            )
        if (reason := no_access(err)) and path.is_relative_to(self.files_dir):
            return StoreFileError(self._unwritable(str(path), reason, err, of_duckdb=False))
        return None

    @contextmanager
    def replace_batch(
        self, tables: Sequence[str], batch_id: str, dead_letter_stage: str | None = None
    ) -> Iterator[duckdb.DuckDBPyConnection]:
        """Delete the batch from `tables` (and the stage's dead letters) and let the caller
        insert it again, in ONE transaction.

        A crash anywhere inside leaves the previous committed state of the batch. On DuckLake
        a table that holds no row of the batch yet (a first-time batch) is not deleted from:
        its insert is then an append, which never conflicts with another writer's commit (a
        DELETE conflicts with any concurrent insert into the table).
        """
        check_tables(tables)
        with self.transaction() as conn:
            for table in tables:
                if self.is_lakehouse:
                    _replace_rows(conn, table, batch_id)
                else:
                    conn.execute(f"DELETE FROM {table} WHERE batch_id = ?", [batch_id])
            if dead_letter_stage is not None:
                dead_letters.delete_batch(conn, batch_id, dead_letter_stage)
            yield conn

    @contextmanager
    def staged_batch(
        self,
        tables: Sequence[str],
        batch_id: str,
        before_commit: Callable[[duckdb.DuckDBPyConnection], None] | None = None,
    ) -> Iterator[tuple[duckdb.DuckDBPyConnection, dict[str, Path]]]:
        """For big batches: the caller writes each table's new rows as Parquet files (columns
        in table order) into its staging folder, then the batch replaces the old one in ONE
        transaction that bulk-loads those files.

        Still all-or-nothing for the batch (a crash before the swap leaves the previous state;
        the staging folder is removed), and no transaction holds chunk after chunk in memory.
        Yields a connection for the caller's reads and each table's staging folder. The staged
        files' columns are matched to the table's by name. `before_commit` runs inside the
        swap transaction once the rows are in: it may judge them, and raise to keep the
        previous state.
        """
        check_tables(tables)
        with self.scratch_folder(batch_id) as root:
            staging = {table: root / table for table in tables}
            for folder in staging.values():
                folder.mkdir()
            with self.get_connection() as conn:
                yield conn, staging
            for attempt in self.write_attempts():
                with attempt, self.replace_batch(tables, batch_id) as conn:
                    for table, folder in staging.items():
                        if not folder.is_dir():  # never an empty batch for lost parts
                            raise FileNotFoundError(
                                f"the staged parts of {table} for batch {batch_id} are gone"
                                f" ({folder}): nothing of the batch was committed"
                            )
                        if any(folder.glob("*.parquet")):
                            conn.execute(
                                f"INSERT INTO {table} BY NAME SELECT * FROM read_parquet(?)",
                                [str(folder / "*.parquet")],
                            )
                    if before_commit is not None:
                        before_commit(conn)

    @contextmanager
    def scratch_folder(self, batch_id: str) -> Iterator[Path]:
        """A private folder for a step's intermediate Parquet files, removed afterwards."""
        check_batch_id(batch_id)
        staging_root = self.files_dir / "staging"
        what = f"the staged files of batch {batch_id}"
        kept = "Nothing of the batch was committed: its previous rows are kept."
        with said_clearly(OSError, lambda err: self._file_error(err, staging_root, what, kept)):
            staging_root.mkdir(parents=True, exist_ok=True)
            # Left by a killed run of this batch ('.' never occurs in a batch ID, so the
            # pattern matches this batch only; one run of a batch at a time), not this step's.
            for stale in staging_root.glob(f"{batch_id}.*"):
                if stale not in _SCRATCH_IN_USE:
                    shutil.rmtree(stale, ignore_errors=True)
            root = Path(tempfile.mkdtemp(prefix=f"{batch_id}.", dir=staging_root))
        _SCRATCH_IN_USE.add(root)
        try:
            with said_clearly(OSError, lambda err: self._file_error(err, root, what, kept)):
                yield root
        finally:
            _SCRATCH_IN_USE.discard(root)
            shutil.rmtree(root, ignore_errors=True)


# The raw_customers file's columns (batch_id comes from the folder name).
RAW_FILE_SCHEMA = pa.schema(
    [
        ("line_no", pa.int64()),
        ("raw", pa.string()),
        ("byte_length", pa.int64()),
        ("utf8_ok", pa.bool_()),
        ("read_error", pa.string()),
        ("ingested_at", pa.timestamp("us", tz="UTC")),
    ]
)


def _replace_rows(conn: duckdb.DuckDBPyConnection, table: str, batch_id: str) -> None:
    """DuckLake: delete the batch's rows of `table` only if it has any. A first-time batch's
    insert is then an append, which never conflicts with another writer's commit (a DELETE
    conflicts with any concurrent insert into the table)."""
    if conn.execute(f"SELECT 1 FROM {table} WHERE batch_id = ? LIMIT 1", [batch_id]).fetchall():
        conn.execute(f"DELETE FROM {table} WHERE batch_id = ?", [batch_id])


def _quote(text: str) -> str:
    return text.replace("'", "''")


def check_batch_id(batch_id: str) -> None:
    """Batch IDs go into file names: only safe ones are accepted."""
    if not is_valid_batch_id(batch_id):
        raise ValueError(f"{batch_id!r} is not a valid batch ID")


def check_tables(tables: Sequence[str]) -> None:
    """Table names go into SQL text: only the warehouse's own tables are accepted."""
    for table in tables:
        if table not in WAREHOUSE_TABLES:
            raise ValueError(f"{table!r} is not a warehouse table")


def withdraw(conn: duckdb.DuckDBPyConnection, batch_id: str, from_stage: str) -> None:
    """Delete what the batch's content gave from `from_stage` on (see BATCH_TABLES_BY_STAGE),
    in the caller's transaction: its dead letters too, and its publication, so that none of
    its old answers stays current."""
    stages = list(BATCH_TABLES_BY_STAGE)
    for stage in stages[stages.index(from_stage) :]:
        for table in BATCH_TABLES_BY_STAGE[stage]:
            conn.execute(f"DELETE FROM {table} WHERE batch_id = ?", [batch_id])
    if stages.index(from_stage) <= stages.index("inference"):
        dead_letters.delete_batch(conn, batch_id, None)
