"""The warehouse's maintenance: a scheduled job that keeps storage from growing with every
re-run, replay and retrain (see Warehouse.maintain)."""

from datetime import timedelta

import dagster as dg
from pydantic import Field

from pipeline_project.policies import DUCKDB_WRITER_POOL
from pipeline_project.resources import Warehouse
from pipeline_project.resources.warehouse import MaintenancePolicy

_DEFAULT = MaintenancePolicy()


def _hours(delta: timedelta) -> float:
    return delta.total_seconds() / 3600


class MaintenanceConfig(dg.Config):
    keep_snapshots_hours: float = Field(
        default=_hours(_DEFAULT.keep_snapshots),
        description="DuckLake: snapshots kept this long (time travel; readers of an old one).",
    )
    grace_hours: float = Field(
        default=_hours(_DEFAULT.grace),
        description="DuckLake: files no kept snapshot references are deleted this long after.",
    )
    orphan_age_hours: float = Field(
        default=_hours(_DEFAULT.orphan_age),
        description="DuckLake: files of no snapshot at all (a writer's until it commits, or a"
        " dead writer's) are deleted once this old: far longer than any write takes.",
    )
    rewrite_delete_threshold: float = Field(
        default=_DEFAULT.rewrite_delete_threshold,
        description="DuckLake: a file whose rows are deleted beyond this share is rewritten.",
    )

    def policy(self) -> MaintenancePolicy:
        if min(self.keep_snapshots_hours, self.grace_hours) < 0 or self.orphan_age_hours < 1:
            raise dg.Failure(
                description="keep_snapshots_hours and grace_hours must be at least 0 and"
                " orphan_age_hours at least 1 (a writer's files are orphans until it commits)",
                allow_retries=False,
            )
        return MaintenancePolicy(
            keep_snapshots=timedelta(hours=self.keep_snapshots_hours),
            grace=timedelta(hours=self.grace_hours),
            orphan_age=timedelta(hours=self.orphan_age_hours),
            rewrite_delete_threshold=self.rewrite_delete_threshold,
        )


@dg.op(
    pool=DUCKDB_WRITER_POOL,
    description="Expire old snapshots, rewrite and merge files, delete files nothing needs"
    " (DuckLake); checkpoint the DuckDB file. Never beside a write.",
)
def maintain_warehouse(
    context: dg.OpExecutionContext, config: MaintenanceConfig, warehouse: Warehouse
) -> dg.Output[None]:
    policy = config.policy()
    files_before, bytes_before = warehouse.storage()
    done = warehouse.maintain(policy)
    files_after, bytes_after = warehouse.storage()
    context.log.info(
        f"warehouse maintenance: {files_before:,} files ({bytes_before:,} bytes) before,"
        f" {files_after:,} ({bytes_after:,} bytes) after; {done}"
    )
    return dg.Output(
        None,
        metadata={
            "files_before": files_before, "bytes_before": bytes_before,
            "files_after": files_after, "bytes_after": bytes_after, **done,
        },
    )  # fmt: skip


@dg.job(description="Keep the warehouse's storage bounded (see maintain_warehouse).")
def warehouse_maintenance_job() -> None:
    maintain_warehouse()
