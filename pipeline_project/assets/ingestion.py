"""Ingestion: a landing file becomes `raw_customers`, every line kept with its number and text."""

import time

import dagster as dg
from pydantic import Field

from pipeline_project.core.landing_files import StoredLines, iter_raw_line_chunks, store_raw_lines
from pipeline_project.partitions import batches
from pipeline_project.resources import DUCKDB_WRITER_POOL, LandingZone, Warehouse
from pipeline_project.tables import RAW_CUSTOMERS

# Transient trouble (a lock held past the connect timeout, a file still being replaced) clears
# up on its own; bad data does not fail the step, it lands in schema_errors.
STAGE_RETRY_POLICY = dg.RetryPolicy(
    max_retries=2, delay=5.0, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS
)


class IngestionConfig(dg.Config):
    chunk_rows: int = Field(default=100_000, description="Lines read and written per chunk.")
    max_line_bytes: int = Field(
        default=1_048_576,
        description="Longer lines keep only this many bytes and fail validation.",
    )


@dg.asset(
    partitions_def=batches,
    pool=DUCKDB_WRITER_POOL,
    retry_policy=STAGE_RETRY_POLICY,
    group_name="ingestion",
    kinds={"duckdb"},
    metadata={"dagster/table_name": RAW_CUSTOMERS},
)
def raw_customers(
    context: dg.AssetExecutionContext,
    config: IngestionConfig,
    landing: LandingZone,
    warehouse: Warehouse,
) -> dg.MaterializeResult:
    """Every line of the batch's landing file, numbered from 1, as raw text: nothing is lost
    before validation."""
    batch_id = context.partition_key
    try:
        landing_file = landing.batch_file(batch_id)
    except (FileNotFoundError, FileExistsError) as err:
        # Retrying cannot bring a file back: fail at once with the reason.
        raise dg.Failure(description=str(err), allow_retries=False) from err
    started = time.perf_counter()

    def progress(stored: StoredLines) -> None:
        context.log.info(f"{batch_id}: {stored.lines:,} lines stored ({stored.chunks} chunks)")

    chunks = iter_raw_line_chunks(landing_file.path, config.chunk_rows, config.max_line_bytes)
    with warehouse.replace_batch([RAW_CUSTOMERS], batch_id) as conn:
        stored = store_raw_lines(conn, batch_id, chunks, on_chunk=progress)
    seconds = time.perf_counter() - started
    if stored.read_errors:
        context.log.warning(
            f"{batch_id}: {landing_file.path.name} ends early: {stored.read_errors[0]}"
        )
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": stored.lines,
            "landing_file": landing_file.path.name,
            "landing_fingerprint": landing_file.fingerprint,
            "file_bytes": landing_file.size,
            "chunks": stored.chunks,
            "read_error": stored.read_errors[0] if stored.read_errors else "",
            "seconds": round(seconds, 3),
            "rows_per_second": round(stored.lines / seconds) if seconds else 0,
        }
    )
