"""Ingestion: a landing file becomes `raw_customers`, every line kept with its number and text."""

import time
from datetime import UTC, datetime

import dagster as dg
from pydantic import Field

from pipeline_project.asset_metadata import one_table_metadata
from pipeline_project.batch_history import failed_flag, failed_flags, recent_batch_metadata
from pipeline_project.checks.input_checks import FILE_COMPLETE
from pipeline_project.checks.verdicts import NotJudged, Verdict, judged, not_judged
from pipeline_project.core import batches as batch_register
from pipeline_project.core.erasure import erased_hashes
from pipeline_project.core.landing_files import (
    StoredLines,
    content_digest,
    iter_raw_line_chunks,
    store_raw_lines,
)
from pipeline_project.core.monitoring import BatchVolume, StepUsage, VolumeVerdict, volume_anomaly
from pipeline_project.partitions import batches
from pipeline_project.policies import batch_stage, fails_at_once_when_deterministic
from pipeline_project.progress import report
from pipeline_project.resources import LandingZone, Warehouse
from pipeline_project.resources.warehouse import withdraw
from pipeline_project.sensors.rescore import RESCORE_METADATA
from pipeline_project.tables import RAW_CUSTOMERS


class IngestionConfig(dg.Config):
    chunk_rows: int = Field(default=100_000, description="Lines read and written per chunk.")
    max_line_bytes: int = Field(
        default=1_048_576,
        description="Longer lines keep only this many bytes and fail validation.",
    )
    count_anomaly_tolerance: float = Field(
        default=0.3,
        description="Cold start: alert when lines differ from the recent mean by more (±30%).",
    )
    count_baseline_batches: int = Field(
        default=28, description="Training window: the recent normal batches judged against."
    )
    count_min_baseline_batches: int = Field(
        default=3, description="No count alert before this many earlier batches."
    )
    count_robust_min_batches: int = Field(
        default=7, description="From this many earlier batches on, a robust z-score judges."
    )
    count_z_threshold: float = Field(
        default=3.5, description="Alert beyond this robust z-score (median and MAD)..."
    )
    count_relative_floor: float = Field(
        default=0.25, description="...and beyond this share of the expected count."
    )
    count_seasonal_days: float = Field(
        default=14.0, description="Once the window spans this many days: by weekday."
    )


RECORD_COUNT_CHECK = "record_count_within_expected_range"


# A multi_asset that can be subset: its volume check may be left without a result (not
# judged: no baseline yet), see checks/verdicts.py.
@dg.multi_asset(
    specs=[
        dg.AssetSpec(
            RAW_CUSTOMERS,
            description="Every line of the batch's landing file, numbered from 1, as raw text.",
            kinds={"duckdb"},
        )
    ],
    can_subset=True,
    **batch_stage("ingestion"),
    check_specs=[
        # partitions_def on a check spec is a preview API; the only way to keep one result
        # per batch rather than "latest run wins".
        dg.AssetCheckSpec(
            RECORD_COUNT_CHECK,
            asset=RAW_CUSTOMERS,
            partitions_def=batches,
            description="The batch's line count is what the recent normal batches predict:"
            " within ±30% of their mean while there are fewer than 7, then a robust z-score"
            " (median, MAD) within 3.5 or within 25%, by weekday once they span two weeks.",
        )
    ],
)
@fails_at_once_when_deterministic
def raw_customers(
    context: dg.AssetExecutionContext,
    config: IngestionConfig,
    landing: LandingZone,
    warehouse: Warehouse,
):
    """Every line of the batch's landing file, numbered from 1, as raw text: nothing is lost
    before validation (a leading byte-order mark is no text; blank lines are counted)."""
    if not context.selected_asset_keys:  # the volume check alone: judged only with its batch
        return
    usage = StepUsage()
    result = _ingest(context, config, landing, warehouse)
    volume = result["volume"].value
    history = [
        BatchVolume(**entry)
        for entry in recent_batch_metadata(
            context.instance,
            RAW_CUSTOMERS,
            "volume",
            exclude_partition=context.partition_key,
            batches=config.count_baseline_batches,
            # an anomaly, half a file or an empty one is nobody's baseline
            unless_failed=(RECORD_COUNT_CHECK, FILE_COMPLETE),
        )
    ]
    verdict = volume_anomaly(
        volume["rows"], volume["weekday"], history,
        tolerance=config.count_anomaly_tolerance, min_batches=config.count_min_baseline_batches,
        robust_min_batches=config.count_robust_min_batches, z_threshold=config.count_z_threshold,
        relative_floor=config.count_relative_floor, seasonal_days=config.count_seasonal_days,
    )  # fmt: skip
    # half a file or an empty one: validation stops it (FILE_COMPLETE), no baseline counts it,
    # and its volume is that check's to judge (one failure, one alert)
    complete = not result["read_error"] and result["records"] > 0
    check = (
        _volume_verdict(verdict, volume["rows"], len(history), config)
        if complete
        else NotJudged(RECORD_COUNT_CHECK, f"judged by {FILE_COMPLETE}: the file is incomplete")
    )
    flags = {**failed_flags(judged([check])), failed_flag(FILE_COMPLETE): not complete}
    yield dg.MaterializeResult(
        asset_key=RAW_CUSTOMERS,
        metadata={**result, **flags, **not_judged([check], context.log), **usage.figures()},
    )
    yield from judged([check])


def _volume_verdict(
    verdict: VolumeVerdict, rows: int, baselines: int, config: IngestionConfig
) -> Verdict:
    if verdict.expected is None:  # no baseline yet: no expected count to judge against
        return NotJudged(
            RECORD_COUNT_CHECK,
            f"{baselines} earlier normal batches, fewer than {config.count_min_baseline_batches}",
        )
    return dg.AssetCheckResult(
        asset_key=RAW_CUSTOMERS,
        check_name=RECORD_COUNT_CHECK,
        passed=not verdict.anomalous,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"rows": rows, "baseline_batches": baselines, **verdict.figures()},
    )


def _ingest(
    context: dg.AssetExecutionContext,
    config: IngestionConfig,
    landing: LandingZone,
    warehouse: Warehouse,
) -> dict:
    batch_id = context.partition_key
    try:
        landing_file = landing.batch_file(batch_id)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        # Missing, ambiguous or not a regular file: a retry cannot fix it; fail with the reason.
        raise dg.Failure(description=str(err), allow_retries=False) from err
    started = time.perf_counter()

    def progress(stored: StoredLines) -> None:
        context.log.info(f"{batch_id}: {stored.lines:,} lines stored ({stored.chunks} chunks)")
        report(batch_id, "ingest", stored.lines, None, "lines")

    digest = content_digest()
    chunks = iter_raw_line_chunks(
        landing_file.path,
        config.chunk_rows,
        config.max_line_bytes,
        digest=digest,
        filesystem=landing.filesystem(),
    )
    with warehouse.get_connection() as conn:
        erased = erased_hashes(conn)
    # a customer erased after this read fails the swap's transaction (Warehouse.transaction)
    registration = _Registration(context, landing_file.name, digest)
    with warehouse.replacing_raw_file(batch_id, before_swap=registration) as writer:
        stored = store_raw_lines(writer, chunks, on_chunk=progress, erased=erased)
        registration.lines = stored.lines
    registered, stale = registration.registered, registration.stale
    registration.log(context)
    seconds = time.perf_counter() - started
    if stored.read_errors:
        context.log.warning(f"{batch_id}: {landing_file.name} ends early: {stored.read_errors[0]}")
    return {
        **one_table_metadata(warehouse, RAW_CUSTOMERS, stored.lines),
        **warehouse.raw_metadata(batch_id),
        # the landing file's time: its weekday is the batch's, for the volume's seasonality
        "volume": dg.MetadataValue.json(_volume(stored.lines, landing_file.mtime_ns)),
        "blank_lines": stored.blank_lines,
        # lines of customers erased before (tombstones, among the blank lines)
        "erased_lines": stored.erased_lines,
        "records": stored.lines - stored.blank_lines - len(stored.read_errors),
        "landing_file": landing_file.name,
        "landing_fingerprint": landing_file.fingerprint,
        "content_digest": digest.hexdigest(),
        "content_changed": registered.changed,
        "arrival_seq": registered.arrival_seq,
        # later batches whose history held this batch's old content: re-profiled (rescore_sensor)
        RESCORE_METADATA: dg.MetadataValue.json(stale),
        "file_bytes": landing_file.size,
        "chunks": stored.chunks,
        "commit_retries": warehouse.commit_retries(),
        "read_error": stored.read_errors[0] if stored.read_errors else "",
        "seconds": round(seconds, 3),
        "rows_per_second": round(stored.lines / seconds) if seconds else 0,
    }


class _Registration:
    """The batch's content in the register, written in the transaction that swaps the raw lines
    in (see Warehouse.replacing_raw_file); when the content changed, everything its old content
    gave is withdrawn (no old answer stays live) and the later batches that read it are
    named."""

    def __init__(self, context: dg.AssetExecutionContext, landing_file: str, digest) -> None:
        self.batch_id = context.partition_key
        self.order = context.instance.get_dynamic_partitions(batches.name)
        self.landing_file, self.digest, self.lines = landing_file, digest, 0
        self.registered: batch_register.Registered | None = None
        self.stale: list[str] = []

    def __call__(self, conn) -> None:
        self.registered = batch_register.register(
            conn, self.batch_id, registered_order=self.order, landing_file=self.landing_file,
            content_digest=self.digest.hexdigest(), lines=self.lines,
        )  # fmt: skip
        self.stale = []
        if self.registered.changed and not self.registered.new:
            self.stale = batch_register.later_batches_sharing_customers(conn, self.batch_id)
            withdraw(conn, self.batch_id, "validation")

    def log(self, context: dg.AssetExecutionContext) -> None:
        if self.registered.changed and not self.registered.new:
            stale = self.stale
            context.log.info(
                f"{self.batch_id}: new content; what the old content gave is withdrawn"
                + (f", {len(stale)} later batches to re-profile" if stale else "")
            )


def _volume(rows: int, mtime_ns: int) -> dict:
    landed_at = mtime_ns / 1e9
    weekday = datetime.fromtimestamp(landed_at, tz=UTC).weekday()
    return {"rows": rows, "weekday": weekday, "landed_at": landed_at}
