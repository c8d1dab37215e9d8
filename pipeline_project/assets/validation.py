"""Validation: raw lines become `customers` + `customer_purchases`, or `schema_errors`."""

import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import dagster as dg
import pyarrow.parquet
from pydantic import Field

from pipeline_project.asset_metadata import table_metadata
from pipeline_project.checks.input_checks import (
    INPUT_CHECK_SPECS,
    input_check_results,
    is_cut,
)
from pipeline_project.checks.verdicts import Verdict, not_judged
from pipeline_project.checks.verdicts import judged as judged_results
from pipeline_project.contract import CONTRACT
from pipeline_project.core import batches as batch_register
from pipeline_project.core.monitoring import StepUsage
from pipeline_project.core.validation import (
    FailureCount,
    Limits,
    ValidationSummary,
    failure_report,
    resolve_duplicate_ids,
    stage_duplicate_ids,
    validate_batch,
)
from pipeline_project.policies import batch_stage, fails_at_once_when_deterministic
from pipeline_project.progress import report
from pipeline_project.resources import AlertSink, Warehouse
from pipeline_project.resources.warehouse import withdraw
from pipeline_project.sensors.rescore import RESCORE_METADATA
from pipeline_project.tables import (
    CUSTOMER_PURCHASES,
    CUSTOMERS,
    DROPPED_PURCHASES,
    RAW_CUSTOMERS,
    SCHEMA_ERRORS,
)


class ValidationConfig(dg.Config):
    chunk_rows: int = Field(default=100_000, description="Lines validated per chunk.")
    max_line_bytes: int = Field(
        default=1_048_576, description="Lines longer than this are rejected (as in ingestion)."
    )
    error_rate_threshold: float = Field(
        default=0.05, description="Schema error rate above which the WARN check fails (alert)."
    )
    # 20%: four times the alert threshold. Normal feeds measured here reject about 2% of
    # their records (the generator; a converted real feed less): a file with a fifth of its
    # records broken is a broken export (a format change, a cut), and the customers it left
    # are not the batch. See README, "Thresholds".
    hard_error_rate_ceiling: float = Field(
        default=0.2, description="Schema error rate above which the batch stops here (blocking)."
    )
    max_purchase_amount: float = Field(
        default=100_000.0, description="A purchase amount above this is rejected as absurd."
    )
    purchase_date_tolerance_hours: float = Field(
        default=24.0,
        description="A purchase dated later than the batch's arrival plus this is rejected.",
    )
    drop_purchases_breaking: list[str] | None = Field(
        default=None,
        description="Purchase rules, as 'field: rule' (e.g. 'amount: must be a finite number"
        " > 0'), for which a purchase that breaks only such rules is dropped from the history"
        " (into dropped_purchases, with its reasons) and its record kept; every other rule"
        " rejects the whole record. Unset: the rules the record's contract declares dropping"
        f" ({'; '.join(sorted(CONTRACT.dropping_rules)) or 'none'}). Known rules: "
        + "; ".join(CONTRACT.purchase_rules)
        + ".",
    )

    def drop_rules(self) -> frozenset[str]:
        if self.drop_purchases_breaking is None:
            return CONTRACT.dropping_rules
        unknown = sorted(set(self.drop_purchases_breaking) - set(CONTRACT.purchase_rules))
        if unknown:
            raise dg.Failure(
                description=f"drop_purchases_breaking names rules that do not exist: {unknown};"
                f" the purchase rules are: {list(CONTRACT.purchase_rules)}",
                allow_retries=False,
            )
        return frozenset(self.drop_purchases_breaking)


ERROR = dg.AssetCheckSeverity.ERROR
_SPEC_KWARGS = {"deps": [RAW_CUSTOMERS], "kinds": {"duckdb"}}
VALIDATED_TABLES = [CUSTOMERS, CUSTOMER_PURCHASES, SCHEMA_ERRORS, DROPPED_PURCHASES]


@dg.multi_asset(
    specs=[
        dg.AssetSpec(
            CUSTOMERS,
            description="Valid customers of each batch, one row per accepted landing line.",
            **_SPEC_KWARGS,
        ),
        dg.AssetSpec(
            CUSTOMER_PURCHASES,
            description="Purchases of the valid customers, one row per purchaseHistory entry.",
            **_SPEC_KWARGS,
        ),
        dg.AssetSpec(
            SCHEMA_ERRORS,
            description="Rejected landing lines with the raw text and every `field: message`.",
            **_SPEC_KWARGS,
        ),
        dg.AssetSpec(
            DROPPED_PURCHASES,
            description="Purchases dropped from kept records by a rule configured to drop"
            " (drop_purchases_breaking), with every reason.",
            **_SPEC_KWARGS,
        ),
    ],
    check_specs=INPUT_CHECK_SPECS,
    can_subset=True,  # a check may be left without a result: not judged (checks/verdicts.py)
    **batch_stage("validation"),
)
@fails_at_once_when_deterministic
def validated_customers(
    context: dg.AssetExecutionContext,
    config: ValidationConfig,
    warehouse: Warehouse,
    alerts: AlertSink,
):
    """Validates each raw line against the pandera models, in chunks, in one transaction."""
    batch_id = context.partition_key
    if not context.selected_asset_keys:  # its checks alone: judged only with its batch
        return
    started, usage, drop_rules = time.perf_counter(), StepUsage(), config.drop_rules()

    judged = _Judged(batch_id, config)
    with _raw_lines(warehouse, batch_id) as raw_file:
        lines = pyarrow.parquet.ParquetFile(raw_file).metadata.num_rows

        def progress(summary: ValidationSummary) -> None:
            context.log.info(
                f"{batch_id}: chunk {summary.chunks} done, {summary.rows_in:,} of {lines:,}"
                f" lines, {summary.invalid:,} invalid, {summary.blank_lines:,} blank"
            )
            report(batch_id, "validate", summary.rows_in, lines, "lines")

        with warehouse.staged_batch(VALIDATED_TABLES, batch_id, before_commit=judged) as (
            conn,
            staging,
        ):
            summary = validate_batch(
                conn, batch_id, raw_file, staging, chunk_rows=config.chunk_rows,
                max_line_bytes=config.max_line_bytes, limits=_limits(config),
                on_chunk=progress, drop_rules=drop_rules,
            )  # fmt: skip
            judged.superseded_file = stage_duplicate_ids(conn, staging[CUSTOMERS])
    summary.supersede(*judged.superseded)
    seconds, checks = time.perf_counter() - started, judged.checks
    with warehouse.get_connection() as conn:
        failures = failure_report(conn, batch_id)
    threshold = _alert_error_rate(context, alerts, config, summary, checks)
    selected = {key.to_user_string() for key in context.selected_asset_keys}
    for result in _materializations(
        summary, seconds, usage, warehouse.commit_retries(), warehouse, failures, judged.stale,
        {**not_judged(checks, context.log), **threshold},
    ):  # fmt: skip
        if result.asset_key.to_user_string() in selected:
            yield result
    yield from judged_results(checks)


def _alert_error_rate(context, alerts: AlertSink, config: ValidationConfig,
                      summary: ValidationSummary, checks: list[Verdict]) -> dict:  # fmt: skip
    """Alerted here, whatever launched the run; the sensor finds it stored for this run. One
    threshold, the check's: the alert fires exactly when the check fails; never on a file cut
    short (its file check fails and alerts, its error rate is not judged, and no threshold is
    recorded for the error-rate sensor). Returns the threshold for the metadata."""
    if is_cut(checks):
        return {}
    alerts.alert_error_rate(asset=CUSTOMERS, batch_id=context.partition_key,
                            rate=summary.error_rate, threshold=config.error_rate_threshold,
                            log=context.log, run_id=context.run.run_id)  # fmt: skip
    return {"error_rate_threshold": config.error_rate_threshold}


def _limits(config: ValidationConfig) -> Limits:
    return Limits(config.max_purchase_amount, timedelta(hours=config.purchase_date_tolerance_hours))


@dataclass
class _Judged:
    """Run inside the swap transaction: the batch is accepted when its blocking checks pass;
    a batch that is not has nothing downstream (no old answer of it stays current)."""

    batch_id: str
    config: ValidationConfig
    checks: list[Verdict] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)  # later batches that read this one
    superseded: tuple[int, int] = (0, 0)  # valid lines a later one's id repeats, purchases
    superseded_file: Path | None = None  # those lines, found before the swap

    def __call__(self, conn) -> None:
        batch_id, config = self.batch_id, self.config
        self.superseded = resolve_duplicate_ids(conn, batch_id, self.superseded_file)
        self.checks = input_check_results(
            conn, batch_id, config.error_rate_threshold, config.hard_error_rate_ceiling
        )
        accepted = all(c.passed for c in judged_results(self.checks) if c.severity == ERROR)
        before = batch_register.was_accepted(conn, batch_id)
        batch_register.record_validation(conn, batch_id, accepted)
        if not accepted:
            withdraw(conn, batch_id, "inference")
        if accepted != before:  # what later batches read of this one changed
            self.stale = batch_register.later_batches_sharing_customers(conn, batch_id)


@contextmanager
def _raw_lines(warehouse: Warehouse, batch_id: str) -> Iterator[Path]:
    """The batch's raw lines as a local Parquet file; a clear failure when there are none."""
    with ExitStack() as stack:
        try:
            raw_file = stack.enter_context(warehouse.raw_lines_file(batch_id))
        except FileNotFoundError as err:
            raise dg.Failure(
                description=f"{batch_id}: its raw lines are not stored ({err}): never ingested,"
                " or deleted by retention (retention_job's raw_lines_days). Land the batch's"
                " file again if needed and materialize raw_customers for this batch first",
                allow_retries=False,
            ) from err
        yield raw_file


def _materializations(
    summary: ValidationSummary,
    seconds: float,
    usage: StepUsage,
    commit_retries: int,
    warehouse: Warehouse,
    report: list[FailureCount],
    stale: list[str],
    unjudged: dict,
) -> list[dg.MaterializeResult]:
    """The three tables' metadata: counts (lines in = valid + invalid + blank lines), the error
    rate (invalid / records: blank lines are no records), throughput, the step's usage."""
    figures = {
        "rows_in": summary.rows_in,
        "rows_valid": summary.valid,
        "rows_invalid": summary.invalid,
        "blank_lines": summary.blank_lines,
        "dropped_purchases": summary.dropped_purchases,
        "error_rate": round(summary.error_rate, 6),
        "chunks": summary.chunks,
        "seconds": round(seconds, 3),
        "rows_per_second": round(summary.rows_in / seconds) if seconds else 0,
        "commit_retries": commit_retries,
        "validation_report": _report_table(report, summary.records),
        # later batches whose history holds this batch's customers: re-profiled (rescore_sensor)
        RESCORE_METADATA: dg.MetadataValue.json(stale),
        **unjudged,
    }
    tables = table_metadata(
        warehouse,
        {CUSTOMERS: summary.valid, CUSTOMER_PURCHASES: summary.purchases,
         SCHEMA_ERRORS: summary.invalid, DROPPED_PURCHASES: summary.dropped_purchases},
    )  # fmt: skip
    return [
        dg.MaterializeResult(
            asset_key=CUSTOMERS, metadata={**tables[CUSTOMERS], **figures, **usage.figures()}
        ),
        dg.MaterializeResult(
            asset_key=CUSTOMER_PURCHASES,
            metadata={**tables[CUSTOMER_PURCHASES], "dropped_purchases": summary.dropped_purchases},
        ),
        dg.MaterializeResult(
            asset_key=DROPPED_PURCHASES,
            metadata={
                **tables[DROPPED_PURCHASES],
                "dropped_by_rule": dg.MetadataValue.json(dict(summary.dropped_by_rule)),
            },
        ),
        dg.MaterializeResult(
            asset_key=SCHEMA_ERRORS,
            metadata={
                **tables[SCHEMA_ERRORS],
                "error_rate": round(summary.error_rate, 6),
                "invalid_lines_by_field": dg.MetadataValue.json(dict(summary.errors_by_field)),
            },
        ),
    ]


_REPORT_SCHEMA = dg.TableSchema(
    columns=[
        dg.TableColumn("field", "string", description="Field of the landing line."),
        dg.TableColumn("rule", "string", description="The rule it broke."),
        dg.TableColumn("failed_lines", "int", description="Lines of the batch that broke it."),
        dg.TableColumn("share", "float", description="Those lines over the batch's records."),
        dg.TableColumn("example_line", "int", description="The first line that broke it."),
        dg.TableColumn("example", "string", description="That line's reason."),
    ]
)


def _report_table(report: list[FailureCount], records: int) -> dg.TableMetadataValue:
    """One row per field and rule, most frequent first: why the batch's lines were rejected."""
    return dg.MetadataValue.table(
        records=[
            dg.TableRecord(
                {
                    "field": failure.field,
                    "rule": failure.rule,
                    "failed_lines": failure.lines,
                    "share": round(failure.lines / records, 6),
                    "example_line": failure.example_line,
                    "example": failure.example,
                }
            )
            for failure in report
        ],
        schema=_REPORT_SCHEMA,
    )
