"""Validation: raw lines become `customers` + `customer_purchases`, or `schema_errors`."""

import time
from pathlib import Path

import dagster as dg
from pydantic import Field

from pipeline_project.checks.input_checks import INPUT_CHECK_SPECS, input_check_results
from pipeline_project.core.monitoring import StepUsage
from pipeline_project.core.validation import ValidationSummary, validate_batch
from pipeline_project.policies import batch_stage
from pipeline_project.resources import AlertSink, Warehouse
from pipeline_project.tables import CUSTOMER_PURCHASES, CUSTOMERS, RAW_CUSTOMERS, SCHEMA_ERRORS


class ValidationConfig(dg.Config):
    chunk_rows: int = Field(default=100_000, description="Lines validated per chunk.")
    max_line_bytes: int = Field(
        default=1_048_576, description="Lines longer than this are rejected (as in ingestion)."
    )
    error_rate_threshold: float = Field(
        default=0.05, description="Schema error rate above which the WARN check fails (alert)."
    )
    hard_error_rate_ceiling: float = Field(
        default=0.5, description="Schema error rate above which the batch stops here (blocking)."
    )


_SPEC_KWARGS = {"deps": [RAW_CUSTOMERS], "kinds": {"duckdb"}}
VALIDATED_TABLES = [CUSTOMERS, CUSTOMER_PURCHASES, SCHEMA_ERRORS]


@dg.multi_asset(
    specs=[
        dg.AssetSpec(
            CUSTOMERS,
            description="Valid customers of each batch, one row per accepted landing line.",
            metadata={"dagster/table_name": CUSTOMERS},
            **_SPEC_KWARGS,
        ),
        dg.AssetSpec(
            CUSTOMER_PURCHASES,
            description="Purchases of the valid customers, one row per purchaseHistory entry.",
            metadata={"dagster/table_name": CUSTOMER_PURCHASES},
            **_SPEC_KWARGS,
        ),
        dg.AssetSpec(
            SCHEMA_ERRORS,
            description="Rejected landing lines with the raw text and every `field: message`.",
            metadata={"dagster/table_name": SCHEMA_ERRORS},
            **_SPEC_KWARGS,
        ),
    ],
    check_specs=INPUT_CHECK_SPECS,
    **batch_stage("validation"),
)
def validated_customers(
    context: dg.AssetExecutionContext,
    config: ValidationConfig,
    warehouse: Warehouse,
    alerts: AlertSink,
):
    """Validates each raw line against the pandera models, in chunks, in one transaction."""
    batch_id = context.partition_key
    started = time.perf_counter()
    usage = StepUsage()

    def progress(summary: ValidationSummary) -> None:
        context.log.info(
            f"{batch_id}: chunk {summary.chunks} done, {summary.rows_in:,} lines,"
            f" {summary.invalid:,} invalid, {summary.blank_lines:,} blank"
        )

    raw_file = _raw_file(warehouse, batch_id)
    with warehouse.staged_batch(VALIDATED_TABLES, batch_id) as (conn, staging):
        summary = validate_batch(
            conn,
            batch_id,
            raw_file,
            staging,
            chunk_rows=config.chunk_rows,
            max_line_bytes=config.max_line_bytes,
            on_chunk=progress,
        )
    seconds = time.perf_counter() - started
    with warehouse.get_connection() as conn:
        checks = input_check_results(
            conn, batch_id, config.error_rate_threshold, config.hard_error_rate_ceiling
        )
    # Alerted here, whatever launched the run; the sensor finds it stored for this run.
    alerts.alert_error_rate(asset=CUSTOMERS, batch_id=batch_id, rate=summary.error_rate,
                            log=context.log, run_id=context.run.run_id)  # fmt: skip
    yield from _materializations(summary, seconds, usage, warehouse.commit_retries())
    yield from checks


def _raw_file(warehouse: Warehouse, batch_id: str) -> Path:
    raw_file = warehouse.raw_file(batch_id)
    if not raw_file.exists():
        raise dg.Failure(
            description=f"{batch_id}: no raw_customers file ({raw_file}); materialize"
            " raw_customers for this batch first",
            allow_retries=False,
        )
    return raw_file


def _materializations(
    summary: ValidationSummary, seconds: float, usage: StepUsage, commit_retries: int
) -> list[dg.MaterializeResult]:
    """The three tables' metadata: counts (lines in = valid + invalid + blank lines), the error
    rate (invalid / records: blank lines are no records), throughput, the step's usage."""
    figures = {
        "rows_in": summary.rows_in,
        "rows_valid": summary.valid,
        "rows_invalid": summary.invalid,
        "blank_lines": summary.blank_lines,
        "error_rate": round(summary.error_rate, 6),
        "chunks": summary.chunks,
        "seconds": round(seconds, 3),
        "rows_per_second": round(summary.rows_in / seconds) if seconds else 0,
        "commit_retries": commit_retries,
    }
    return [
        dg.MaterializeResult(
            asset_key=CUSTOMERS,
            metadata={"dagster/row_count": summary.valid, **figures, **usage.figures()},
        ),
        dg.MaterializeResult(
            asset_key=CUSTOMER_PURCHASES, metadata={"dagster/row_count": summary.purchases}
        ),
        dg.MaterializeResult(
            asset_key=SCHEMA_ERRORS,
            metadata={
                "dagster/row_count": summary.invalid,
                "error_rate": round(summary.error_rate, 6),
                "invalid_lines_by_field": dg.MetadataValue.json(dict(summary.errors_by_field)),
            },
        ),
    ]
