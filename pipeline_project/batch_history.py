"""Reading monitoring history back from the Dagster instance (materialization metadata)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import dagster as dg


def recent_batches(
    instance: dg.DagsterInstance,
    asset_key: str,
    *,
    exclude_partition: str | None,
    batches: int,
    unless_failed: str | Sequence[str] | None = None,
    scan: int = 200,
) -> list[tuple[str, Mapping[str, Any]]]:
    """(partition, metadata) of the latest materialization of up to `batches` other
    partitions, newest first: the baseline a batch is compared with. With `unless_failed` (a
    check's name), batches that failed that check are left out: an anomaly is nobody's
    baseline."""
    records = instance.fetch_materializations(dg.AssetKey(asset_key), limit=scan).records
    seen: set[str] = set()
    found: list[tuple[str, Mapping[str, Any]]] = []
    for record in records:  # newest first
        materialization = record.asset_materialization
        partition = materialization.partition
        if partition is None or partition == exclude_partition or partition in seen:
            continue
        seen.add(partition)
        checks = [unless_failed] if isinstance(unless_failed, str) else unless_failed or []
        flags = (materialization.metadata.get(failed_flag(check)) for check in checks)
        if any(flag is not None and flag.value for flag in flags):
            continue
        found.append((partition, materialization.metadata))
        if len(found) >= batches:
            break
    return found


def recent_batch_metadata(
    instance: dg.DagsterInstance,
    asset_key: str,
    metadata_key: str,
    *,
    exclude_partition: str | None,
    batches: int,
    unless_failed: str | Sequence[str] | None = None,
    scan: int = 200,
) -> list[Any]:
    """`metadata_key` of the recent batches (see `recent_batches`) that have it."""
    values: list[Any] = []
    for _, metadata in recent_batches(
        instance, asset_key, exclude_partition=exclude_partition, batches=scan,
        unless_failed=unless_failed, scan=scan,
    ):  # fmt: skip
        if (entry := metadata.get(metadata_key)) is not None:
            values.append(entry.value)
        if len(values) >= batches:
            break
    return values


def failed_flag(check_name: str) -> str:
    """The materialization metadata key that says the batch failed `check_name`."""
    return f"{check_name}_failed"


def failed_flags(results: list[dg.AssetCheckResult]) -> dict[str, bool]:
    """For a materialization: which of these checks the batch failed (see `unless_failed`)."""
    return {failed_flag(r.check_name): not r.passed for r in results if r.check_name}
