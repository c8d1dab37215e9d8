"""Reading monitoring history back from the Dagster instance (materialization metadata)."""

from __future__ import annotations

from typing import Any

import dagster as dg


def recent_batch_metadata(
    instance: dg.DagsterInstance,
    asset_key: str,
    metadata_key: str,
    *,
    exclude_partition: str | None,
    batches: int,
    scan: int = 200,
) -> list[Any]:
    """`metadata_key` of the latest materialization of up to `batches` other partitions,
    newest first: the baseline a batch is compared with."""
    records = instance.fetch_materializations(dg.AssetKey(asset_key), limit=scan).records
    seen: set[str] = set()
    values: list[Any] = []
    for record in records:  # newest first
        materialization = record.asset_materialization
        partition = materialization.partition
        if partition is None or partition == exclude_partition or partition in seen:
            continue
        seen.add(partition)
        entry = materialization.metadata.get(metadata_key)
        if entry is not None:
            values.append(entry.value)
        if len(values) >= batches:
            break
    return values
