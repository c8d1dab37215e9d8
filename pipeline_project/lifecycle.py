"""The data's lifecycle: erase a customer everywhere, delete a batch that should never have been
loaded. Jobs for the UI (`erase_customers`, `delete_batches`), run by the CLI too
(`pipeline-project erase`, `pipeline-project batch delete`).

Both write under the writer pool, and refuse to start while a run of a batch they touch is in
progress (that run could write back what they remove). What they did is recorded without
personal data: counts, batch IDs, the SHA-256 of an erased customer's ID.
"""

import dagster as dg
from pydantic import Field

from pipeline_project.core import batches as batch_register
from pipeline_project.core import erasure
from pipeline_project.core.deletes import delete_where
from pipeline_project.partitions import batches
from pipeline_project.policies import DUCKDB_WRITER_POOL
from pipeline_project.resources import AlertSink, LandingZone, Warehouse
from pipeline_project.resources.warehouse import check_batch_id
from pipeline_project.sensors.rescore import RESCORE_METADATA
from pipeline_project.tables import BATCH_TABLES_BY_STAGE, BATCHES, DEAD_LETTER, RAW_CUSTOMERS

ERASE_CUSTOMERS_JOB = "erase_customers"
DELETE_BATCHES_JOB = "delete_batches"

_IN_PROGRESS = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


def _refuse_while_running(instance: dg.DagsterInstance, batch_ids: list[str], what: str) -> None:
    """A clear, retryable failure while a run of one of `batch_ids` has not ended."""
    for batch_id in batch_ids:
        records = instance.get_run_records(
            dg.RunsFilter(statuses=_IN_PROGRESS, tags={"dagster/partition": batch_id}), limit=1
        )
        if records:
            raise dg.Failure(
                description=f"{what}: batch {batch_id} has a run in progress"
                f" ({records[0].dagster_run.run_id}); nothing was changed. Run this again once"
                " it has ended.",
            )


# ---- erase customers ------------------------------------------------------------------------


class ErasureConfig(dg.Config):
    customers: list[str] = Field(
        description="The customers to erase: each a customer ID (a UUID) or the SHA-256 of one"
        " (lower-case hex of its lower-case text). `pipeline-project erase` sends the SHA-256,"
        " so that no ID stays in this run's configuration.",
    )


@dg.op(
    pool=DUCKDB_WRITER_POOL,
    description="Remove every row about the customers from every table of every batch (raw"
    " lines become tombstones), their dead letters, alerts and unshared cached vectors; make"
    " the removed rows unrecoverable from storage; record it in erasure_log (IDs hashed).",
)
def erase_customer_rows(
    context: dg.OpExecutionContext,
    config: ErasureConfig,
    warehouse: Warehouse,
    alerts: AlertSink,
) -> dg.Output[None]:
    try:
        hashes = erasure.requested_hashes(config.customers)
    except erasure.NotACustomerId as err:
        raise dg.Failure(description=str(err), allow_retries=False) from err
    plain = sum(1 for entry in config.customers if not erasure.is_hash(entry))
    if plain:
        context.log.warning(
            f"{plain} of the customers were given as IDs, not as their SHA-256: this run's"
            " configuration keeps them in Dagster's run history until retention deletes the"
            " run. Give their SHA-256 next time (pipeline-project erase does)."
        )
    done = erase_customers(context.instance, warehouse, alerts, hashes)
    context.log.info(
        f"erased {done['customers_found']} of {len(hashes)} customers: {done['raw_lines']} raw"
        f" lines in {len(done['batches'])} batches, {done['rows_removed']} rows removed"
    )
    return dg.Output(
        None,
        metadata={
            "customers_requested": len(hashes),
            "customers_found": done["customers_found"],
            "batches": dg.MetadataValue.json(done["batches"]),
            "raw_lines": done["raw_lines"],
            "rows_removed": done["rows_removed"],
            "rows_removed_by_table": dg.MetadataValue.json(done["by_table"]),
            "alerts_removed": done["alerts_removed"],
            "storage": dg.MetadataValue.json(done["storage"]),
            # the senders' files still hold the customers' lines: delete them or ask the sender
            "landing_files_holding_them": dg.MetadataValue.json(done["landing_files"]),
        },
    )


def erase_customers(
    instance: dg.DagsterInstance, warehouse: Warehouse, alerts: AlertSink, hashes: list[str]
) -> dict:
    """Erase the customers whose IDs hash to `hashes` (see the op's description). The rows go
    in one transaction with the erasure log's rows: from that commit on, every ingestion
    tombstones their lines and every write that read before it starts over. What follows (the
    raw files' tombstones, leftovers, alerts, storage rewritten) is done on every run, so that
    running it again after a failure finishes it; a customer the warehouse no longer holds is
    still logged (found: 0)."""
    with warehouse.get_connection() as conn:
        ids = erasure.resolve_ids(conn, hashes)
        found = erasure.find(conn, ids)
        landing_files = _landing_files(conn, found.batches)
    _refuse_while_running(instance, found.batches, "erase_customers")
    removed: dict[str, int] = {}
    for attempt in warehouse.write_attempts():
        with attempt, warehouse.transaction(check_erasures=False) as conn:
            found = erasure.find(conn, ids)
            removed = erasure.delete_rows(conn, ids, found, warehouse.is_lakehouse)
            erasure.log(conn, hashes, found, removed)
    if not warehouse.is_lakehouse:
        for batch_id in found.batches:
            warehouse.tombstone_raw_lines(batch_id, found.lines[batch_id])
    warehouse.clear_leftovers()
    alerts_removed = alerts.delete_naming_customers(hashes)
    storage = warehouse.forget_deleted_rows()
    alerts.compact()
    return {
        "customers_found": len(ids),
        "batches": found.batches,
        "raw_lines": sum(len(lines) for lines in found.lines.values()),
        "rows_removed": sum(n for table, n in removed.items() if table != RAW_CUSTOMERS),
        "by_table": removed,
        "alerts_removed": alerts_removed,
        "storage": storage,
        "landing_files": landing_files,
    }


def _landing_files(conn, batch_ids: list[str]) -> list[str]:
    if not batch_ids:
        return []
    rows = conn.execute(
        f"SELECT DISTINCT landing_file FROM {BATCHES} WHERE list_contains(?, batch_id)"
        " AND coalesce(landing_file, '') <> '' ORDER BY 1",
        [batch_ids],
    ).fetchall()
    return [name for (name,) in rows]


@dg.job(
    name=ERASE_CUSTOMERS_JOB,
    description="Erase customers everywhere (GDPR art. 17, CCPA): give their IDs, or their"
    " SHA-256, as config.",
)
def erase_customers_job() -> None:
    erase_customer_rows()


# ---- delete batches -------------------------------------------------------------------------


class BatchDeletionConfig(dg.Config):
    batch_ids: list[str] = Field(description="The batches to delete, as if they never arrived.")
    forget_deleted_rows: bool = Field(
        default=True,
        description="Then make the deleted rows unrecoverable from storage (DuckDB file"
        " rewritten; DuckLake: files rewritten, older snapshots expired, old files deleted):"
        " a batch loaded by mistake may hold what must not be kept. False: the daily"
        " maintenance removes them from DuckLake's files in time.",
    )


class NoSuchBatch(dg.Failure):
    def __init__(self, batch_id: str) -> None:
        super().__init__(
            description=f"no batch {batch_id!r}: it is no partition, the warehouse holds none of"
            " its rows and no landing file has its name; nothing was deleted",
            allow_retries=False,
        )


@dg.op(
    pool=DUCKDB_WRITER_POOL,
    description="Delete each batch's rows from every table, its raw and landing files and its"
    " partition; the later batches that read its purchases are re-profiled (rescore_sensor).",
)
def delete_batch_rows(
    context: dg.OpExecutionContext,
    config: BatchDeletionConfig,
    warehouse: Warehouse,
    landing: LandingZone,
    alerts: AlertSink,
):
    partitions = context.instance.get_dynamic_partitions(batches.name)
    for batch_id in config.batch_ids:  # every one first: all deleted, or none
        try:
            check_batch_id(batch_id)
        except ValueError as err:
            raise dg.Failure(description=str(err), allow_retries=False) from err
        if not _exists(warehouse, landing, partitions, batch_id):
            raise NoSuchBatch(batch_id)
    results = {}
    try:
        for batch_id in config.batch_ids:
            # recorded before the rows go, so that a deletion that fails halfway still has
            # the later batches that read this one's purchases re-profiled
            with warehouse.get_connection() as conn:
                stale = batch_register.later_batches_sharing_customers(conn, batch_id)
            yield dg.AssetObservation(
                asset_key=RAW_CUSTOMERS,
                metadata={
                    "deleted_batch": batch_id,
                    RESCORE_METADATA: dg.MetadataValue.json(stale),
                },
            )
            done = delete_batch(context.instance, warehouse, landing, alerts, batch_id)
            done["stale"] = stale
            context.log.info(
                f"{batch_id}: deleted {sum(done['rows_removed'].values()):,} rows,"
                f" landing files {done['landing_files'] or 'none'};"
                f" {len(done['stale'])} later batches to re-profile"
            )
            results[batch_id] = done
    finally:  # what was deleted is forgotten, even when a later batch failed
        storage = warehouse.forget_deleted_rows() if results and config.forget_deleted_rows else {}
        if results:
            alerts.compact()
    yield dg.Output(
        None,
        metadata={
            "batches": dg.MetadataValue.json(results),
            "storage": dg.MetadataValue.json(storage),
        },
    )


def _exists(warehouse: Warehouse, landing: LandingZone, partitions: list[str], batch_id: str):
    """Whether anything of the batch is known: a partition, the register, raw lines, a file."""
    with warehouse.get_connection() as conn:
        [(registered,)] = conn.execute(
            f"SELECT count(*) FROM {BATCHES} WHERE batch_id = ?", [batch_id]
        ).fetchall()
    raw_file = None if warehouse.is_lakehouse else warehouse.raw_file(batch_id)
    return bool(
        batch_id in partitions
        or registered
        or landing.batch_file_names(batch_id)
        or (raw_file is not None and raw_file.exists())
    )


def delete_batch(
    instance: dg.DagsterInstance,
    warehouse: Warehouse,
    landing: LandingZone,
    alerts: AlertSink,
    batch_id: str,
) -> dict:
    """Remove the batch as if it never arrived: its rows in every table (the register and raw
    lines included), its raw file, its landing files, its alerts and its partition. Returns
    rows removed per table and the landing files deleted. Safe to run again."""
    if not _exists(warehouse, landing, instance.get_dynamic_partitions(batches.name), batch_id):
        raise NoSuchBatch(batch_id)
    _refuse_while_running(instance, [batch_id], "delete_batches")
    removed: dict[str, int] = {}
    for attempt in warehouse.write_attempts():
        with attempt, warehouse.transaction(check_erasures=False) as conn:
            removed = {}
            tables = [t for stage in BATCH_TABLES_BY_STAGE.values() for t in stage]
            if warehouse.is_lakehouse:
                tables.append(RAW_CUSTOMERS)
            for table in [*tables, DEAD_LETTER, BATCHES]:
                removed[table] = delete_where(conn, table, "batch_id = ?", [batch_id])
            if not warehouse.is_lakehouse:
                removed[RAW_CUSTOMERS] = warehouse.delete_raw_file(batch_id, conn) or 0
    warehouse.clear_leftovers([batch_id])
    deleted_files = landing.delete_batch_files(batch_id)
    alerts_removed = alerts.delete_batch(batch_id)
    if batch_id in instance.get_dynamic_partitions(batches.name):
        instance.delete_dynamic_partition(batches.name, batch_id)
    return {
        "rows_removed": {t: n for t, n in removed.items() if n},
        "landing_files": deleted_files,
        "alerts_removed": alerts_removed,
    }


@dg.job(
    name=DELETE_BATCHES_JOB,
    description="Delete batches that should never have been loaded, as if they never arrived.",
)
def delete_batches_job() -> None:
    delete_batch_rows()
