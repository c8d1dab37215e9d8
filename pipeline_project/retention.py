"""Retention: a scheduled job that deletes what is kept no longer than its retention allows.

Personal data stays only as long as it is needed: a batch's raw lines, the invalid lines kept in
schema_errors, the dead letters already replayed, the alerts, and Dagster's run history and
event log. Each retention is a config field in days (unset: kept for ever); the warehouse's
deletes are in core/retention.py. What it did is reported as counts only.
"""

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import dagster as dg
from pydantic import Field

from pipeline_project.core import retention
from pipeline_project.policies import DUCKDB_WRITER_POOL
from pipeline_project.resources import AlertSink, Warehouse
from pipeline_project.tables import DEAD_LETTER, RAW_CUSTOMERS, SCHEMA_ERRORS

# What each retention applies to, by its config field (for messages and metadata).
KINDS = {
    "raw_lines_days": "raw lines",
    "schema_errors_days": "schema errors",
    "replayed_dead_letters_days": "replayed dead letters",
    "alerts_days": "alerts",
    "run_history_days": "run history",
}
_FOR_EVER = "Unset (null): kept for ever."


class RetentionConfig(dg.Config):
    raw_lines_days: float | None = Field(
        default=30.0,
        description="A batch's raw lines (raw_customers: each landing line as it came, personal"
        " data) are deleted this many days after the batch was ingested (batches.ingested_at);"
        " re-validating the batch needs its landing file ingested again. " + _FOR_EVER,
    )
    schema_errors_days: float | None = Field(
        default=30.0,
        description="Rows of schema_errors (invalid lines as they came, with why) are deleted"
        " this many days after they were found (detected_at). " + _FOR_EVER,
    )
    replayed_dead_letters_days: float | None = Field(
        default=30.0,
        description="Dead letters are deleted this many days after a replay placed them"
        " (replayed_at); pending ones are never deleted. " + _FOR_EVER,
    )
    alerts_days: float | None = Field(
        default=90.0,
        description="Alerts are deleted this many days after they were raised (created_at). "
        + _FOR_EVER,
    )
    run_history_days: float | None = Field(
        default=90.0,
        description="Dagster runs that ended this many days ago are deleted with their event"
        " log and compute logs, except a run that holds the latest materialization, attempt or"
        " check execution of an asset partition (without it Dagster would think the partition"
        " never materialized, and automation would run it again). " + _FOR_EVER,
    )
    run_page_size: int = Field(
        default=200, description="Runs read from Dagster's run storage per query."
    )
    max_runs_deleted: int = Field(
        default=1000,
        description="The most runs deleted per execution: a long history is deleted over"
        " several days rather than in one long run.",
    )

    def cutoffs(self, now: datetime) -> dict[str, datetime | None]:
        """Each retention's cutoff (what is older goes), or None where it is unset. A retention
        of 0 days or less, or one no date can express, is refused."""
        found: dict[str, datetime | None] = {}
        for name in KINDS:
            days = getattr(self, name)
            if days is None:
                found[name] = None
                continue
            if not (math.isfinite(days) and days > 0):
                raise _refused(
                    f"{name}={days}: a retention is a number of days above 0 (everything of"
                    " that kind would go at once). Leave it unset (null) to keep it for ever."
                )
            try:
                found[name] = now - timedelta(days=days)
            except OverflowError:
                raise _refused(
                    f"{name}={days}: more days than a date can go back. Leave it unset (null)"
                    " to keep it for ever."
                ) from None
        for name in ("run_page_size", "max_runs_deleted"):
            if getattr(self, name) < 1:
                raise _refused(f"{name}={getattr(self, name)}: it must be at least 1.")
        return found


def _refused(reason: str) -> dg.Failure:
    return dg.Failure(
        description=f"Retention refused, nothing was deleted: {reason}", allow_retries=False
    )


# ---- Dagster's run history ------------------------------------------------------------------

_ENDED = [dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED]
_ASSET_EVENTS = (
    dg.DagsterEventType.ASSET_MATERIALIZATION,
    dg.DagsterEventType.ASSET_MATERIALIZATION_PLANNED,  # the latest attempt, failed or not
)
_CHECK_EVENTS = (
    dg.DagsterEventType.ASSET_CHECK_EVALUATION,
    dg.DagsterEventType.ASSET_CHECK_EVALUATION_PLANNED,
)


@dataclass
class RunPurge:
    deleted: int = 0
    kept_latest: int = 0  # ended before the cutoff, kept: they hold a latest result
    left_for_next_time: bool = False  # max_runs_deleted was reached


@dataclass
class LatestResults:
    """Which runs hold the latest result of an asset partition: its latest materialization or
    materialization attempt (planned; a failed attempt's run says why the partition failed),
    or its checks' latest execution. Looked up per asset or check key, once."""

    instance: dg.DagsterInstance
    _latest_ids: dict[tuple, dict[str | None, int]] = field(default_factory=dict)
    _check_runs: dict[dg.AssetCheckKey, set[str]] = field(default_factory=dict)

    def held_by(self, run_id: str) -> bool:
        # storage ids of the index, where the latest ones are looked up too (a run's own
        # records may be numbered in a storage of that run's, as SQLite's are)
        storage = self.instance.event_log_storage
        for event_type in _ASSET_EVENTS:
            for event in storage.get_asset_event_summary_records(event_type, run_id=run_id):
                if event.storage_id == self._latest_id(
                    event_type, event.asset_key, event.partition
                ):
                    return True
        return any(run_id in self._latest_check_runs(key) for key in self._check_keys(run_id))

    def _check_keys(self, run_id: str) -> set[dg.AssetCheckKey]:
        """The checks the run executed (or planned to)."""
        keys, cursor = set(), None
        while True:
            page = self.instance.get_records_for_run(
                run_id, cursor=cursor, of_type=set(_CHECK_EVENTS)
            )
            for record in page.records:
                keys.add(record.event_log_entry.dagster_event.event_specific_data.asset_check_key)
            if not page.has_more:
                return keys
            cursor = page.cursor

    def _latest_id(
        self, event_type: dg.DagsterEventType, key: dg.AssetKey, partition: str | None
    ) -> int | None:
        """The storage id of the asset partition's latest event of the type."""
        if (event_type, key) not in self._latest_ids:
            latest: dict[str | None, int] = dict(
                self.instance.get_latest_storage_id_by_partition(key, event_type)
            )
            newest = self.instance.event_log_storage.get_asset_event_summary_records(
                event_type, asset_key=key, limit=1
            )
            if newest and newest[0].partition is None:  # an unpartitioned asset's latest
                latest[None] = newest[0].storage_id
            self._latest_ids[(event_type, key)] = latest
        return self._latest_ids[(event_type, key)].get(partition)

    def _latest_check_runs(self, key: dg.AssetCheckKey) -> set[str]:
        """The runs of the check's latest execution, one per partition (or the one)."""
        if key not in self._check_runs:
            infos = self.instance.event_log_storage.get_asset_check_partition_info([key])
            self._check_runs[key] = {info.latest_planned_run_id for info in infos}
        return self._check_runs[key]


def purge_run_history(
    instance: dg.DagsterInstance, cutoff: datetime, page_size: int, max_deleted: int
) -> RunPurge:
    """Delete the runs that ended before `cutoff` (ended, and last updated before it: a run's
    last update is its end), oldest first, with their event logs and compute logs. Runs not
    ended (queued, started) are never candidates; a run that holds a latest result
    (LatestResults) is kept. At most `max_deleted` runs go, read `page_size` at a time."""
    latest, done, cursor = LatestResults(instance), RunPurge(), None
    while True:
        records = instance.get_run_records(
            filters=dg.RunsFilter(statuses=_ENDED, updated_before=cutoff),
            limit=page_size,
            ascending=True,
            cursor=cursor,
        )
        for record in records:  # ended, and not updated since the cutoff
            run_id = record.dagster_run.run_id
            if latest.held_by(run_id):
                done.kept_latest += 1
                cursor = run_id  # the next page starts after a run that is still there
                continue
            if done.deleted >= max_deleted:
                done.left_for_next_time = True
                return done
            # What its steps printed first (personal data may be among it): if that fails,
            # the run is still there to be deleted next time.
            instance.compute_log_manager.delete_logs(prefix=[run_id])
            instance.delete_run(run_id)
            done.deleted += 1
        if len(records) < page_size:
            return done


# ---- the job --------------------------------------------------------------------------------


@dg.op(
    pool=DUCKDB_WRITER_POOL,
    description="Delete what is older than its retention: raw lines, schema errors, replayed"
    " dead letters, alerts, Dagster runs (never one that holds a latest result). Counts only.",
)
def purge_expired_data(
    context: dg.OpExecutionContext,
    config: RetentionConfig,
    warehouse: Warehouse,
    alerts: AlertSink,
) -> dg.Output[None]:
    cutoffs = config.cutoffs(datetime.now(UTC))
    counts: dict[str, int | bool] = {}
    if (cutoff := cutoffs["raw_lines_days"]) is not None:
        raw = retention.purge_raw_lines(warehouse, cutoff)
        counts |= {"raw_batches_deleted": raw.batches, "raw_lines_deleted": raw.lines}
    if (cutoff := cutoffs["schema_errors_days"]) is not None:
        counts["schema_errors_deleted"] = retention.purge_schema_errors(warehouse, cutoff)
    if (cutoff := cutoffs["replayed_dead_letters_days"]) is not None:
        counts["dead_letters_deleted"] = retention.purge_dead_letters(warehouse, cutoff)
    if (cutoff := cutoffs["alerts_days"]) is not None:
        counts["alerts_deleted"] = alerts.delete_older_than(cutoff)
    if (cutoff := cutoffs["run_history_days"]) is not None:
        runs = purge_run_history(
            context.instance, cutoff, config.run_page_size, config.max_runs_deleted
        )
        counts |= {"runs_deleted": runs.deleted, "runs_kept_holding_latest": runs.kept_latest,
                   "runs_left_for_next_time": runs.left_for_next_time}  # fmt: skip
    # DuckLake: the files that held purged rows are rewritten without them; the old files go
    # when the daily maintenance expires the snapshots before (keep_snapshots_hours)
    purged = {RAW_CUSTOMERS: counts.get("raw_lines_deleted"),
              SCHEMA_ERRORS: counts.get("schema_errors_deleted"),
              DEAD_LETTER: counts.get("dead_letters_deleted")}  # fmt: skip
    if warehouse.is_lakehouse:
        counts["files_rewritten"] = warehouse.rewrite_files_with_deletes(
            [table for table, deleted in purged.items() if deleted]
        )
    kept_for_ever = [KINDS[name] for name, cutoff in cutoffs.items() if cutoff is None]
    context.log.info(
        "retention: "
        + ", ".join(f"{name} {value}" for name, value in counts.items())
        + (f"; kept for ever: {', '.join(kept_for_ever)}" if kept_for_ever else "")
    )
    cutoff_metadata = {
        f"{name.removesuffix('_days')}_cutoff": cutoff.isoformat(timespec="seconds")
        if cutoff is not None else "kept for ever"
        for name, cutoff in cutoffs.items()
    }  # fmt: skip
    return dg.Output(None, metadata={**counts, **cutoff_metadata})


@dg.job(description="Delete what is older than its retention (see purge_expired_data).")
def retention_job() -> None:
    purge_expired_data()


daily_retention = dg.ScheduleDefinition(
    name="daily_retention",
    job=retention_job,
    cron_schedule="30 3 * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="03:30 UTC, after the warehouse's maintenance: delete what is older than its"
    " retention (raw lines, schema errors, replayed dead letters, alerts, run history).",
)
