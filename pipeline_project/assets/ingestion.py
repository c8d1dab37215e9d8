"""Ingestion: a landing file becomes `raw_customers`, every line kept with its number and text."""

import time

import dagster as dg
from pydantic import Field

from pipeline_project.core.landing_files import iter_raw_line_chunks
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
    landing_file = landing.batch_file(batch_id)
    started = time.perf_counter()
    lines = chunks = 0
    read_errors = []
    with warehouse.replace_batch([RAW_CUSTOMERS], batch_id) as conn:
        for chunk in iter_raw_line_chunks(
            landing_file.path, config.chunk_rows, config.max_line_bytes
        ):
            conn.register("raw_chunk", chunk)
            try:
                conn.execute(
                    "INSERT INTO raw_customers SELECT ?, line_no, raw, byte_length, utf8_ok,"
                    " read_error, now() FROM raw_chunk",
                    [batch_id],
                )
            finally:
                conn.unregister("raw_chunk")
            read_errors += [e for e in chunk["read_error"].to_pylist() if e is not None]
            lines += chunk.num_rows
            chunks += 1
            context.log.info(f"{batch_id}: {lines:,} lines stored ({chunks} chunks)")
    seconds = time.perf_counter() - started
    if read_errors:
        context.log.warning(f"{batch_id}: {landing_file.path.name} ends early: {read_errors[0]}")
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": lines,
            "landing_file": landing_file.path.name,
            "landing_fingerprint": landing_file.fingerprint,
            "file_bytes": landing_file.size,
            "chunks": chunks,
            "read_error": read_errors[0] if read_errors else "",
            "seconds": round(seconds, 3),
            "rows_per_second": round(lines / seconds) if seconds else 0,
        }
    )
