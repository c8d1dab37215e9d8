"""Re-scoring what an upstream change made stale, and nothing else.

A batch's recommendations read more than its own partition: its customers' purchases from
earlier batches (history), the segment model version and the catalog. The steps that change one
of those name, in their materialization's `rescore_batches` metadata, the batches that read it:

- an earlier batch's content or acceptance changed (re-delivered, late, withdrawn, deleted):
  named by raw_customers and customers (a deleted batch: by the delete_batches job's
  observation of raw_customers), re-run from customer_embeddings (the profiles);
- a new segment model version: named by segment_model, re-run from customer_segments;
- a new catalog version: named by product_embeddings, re-run from recommendations; and when
  its vocabulary (the products' categories) differs from the one a batch's profiles were
  built with, or they were built without a catalog, named under `reprofile_batches` and re-run
  from customer_embeddings (profiles rebuilt, then segmented by a model retrained on them).

For a new model or catalog those are the batches that hold some customer's current answer: an
older batch whose every customer came back later is history and keeps the answer it gave. This
sensor reads those lists from Dagster's event log (never the warehouse, so it never waits for a
writer) and launches one run per batch, from the most upstream stage any change asks for, at a
lower priority than new batches: a retrain never holds a new batch back.
"""

from __future__ import annotations

import json

import dagster as dg

from pipeline_project.tables import (
    CUSTOMER_EMBEDDINGS,
    CUSTOMER_SEGMENTS,
    CUSTOMERS,
    PRODUCT_EMBEDDINGS,
    RAW_CUSTOMERS,
    RECOMMENDATIONS,
    REJECTED_RECOMMENDATIONS,
    SEGMENT_MODEL,
    VALIDATED_RECOMMENDATIONS,
)

# Materialization metadata: the batches that this change makes stale (a JSON list of IDs).
RESCORE_METADATA = "rescore_batches"
# ...and the batches whose profiles it makes stale: re-run from customer_embeddings.
REPROFILE_METADATA = "reprofile_batches"
RESCORE_TAG = "pipeline/rescore"
# The cursor's key for the observations of deleted batches.
DELETIONS = "deleted batches"

# The batch stages in order, and where a change of each watched asset makes a batch start over.
BATCH_STAGES = [
    CUSTOMER_EMBEDDINGS,
    CUSTOMER_SEGMENTS,
    RECOMMENDATIONS,
    VALIDATED_RECOMMENDATIONS,
    REJECTED_RECOMMENDATIONS,
]
RESCORE_FROM = {
    RAW_CUSTOMERS: CUSTOMER_EMBEDDINGS,
    CUSTOMERS: CUSTOMER_EMBEDDINGS,
    SEGMENT_MODEL: CUSTOMER_SEGMENTS,
    PRODUCT_EMBEDDINGS: RECOMMENDATIONS,
}
# Below a new batch's runs (priority 0): the queue launches them first.
RESCORE_PRIORITY = "-1"
PAGE = 200


def rescore_requests(
    instance: dg.DagsterInstance, cursor: dict[str, int | None]
) -> tuple[list[dg.RunRequest], dict[str, int | None]]:
    """The runs the materializations after `cursor` (storage IDs per watched asset) ask for:
    one per batch, from the earliest stage asked; and the new cursor."""
    start: dict[str, int] = {}  # batch -> index in BATCH_STAGES
    causes: dict[str, list[str]] = {}
    cursor = dict(cursor)
    watched = [(asset, stage, asset, instance.fetch_materializations)
               for asset, stage in RESCORE_FROM.items()]  # fmt: skip
    # a deleted batch: the delete_batches job observes raw_customers (its partition is gone)
    watched.append((RAW_CUSTOMERS, CUSTOMER_EMBEDDINGS, DELETIONS, instance.fetch_observations))
    for asset, stage, cursor_key, fetch in watched:
        result = fetch(
            dg.AssetRecordsFilter(
                asset_key=dg.AssetKey(asset), after_storage_id=cursor.get(cursor_key)
            ),
            limit=PAGE,
            ascending=True,
        )
        for record in result.records:
            cursor[cursor_key] = record.storage_id
            metadata = record.asset_event.metadata
            for name, from_stage in ((RESCORE_METADATA, stage),
                                     (REPROFILE_METADATA, CUSTOMER_EMBEDDINGS)):  # fmt: skip
                entry = metadata.get(name)
                for batch_id in entry.value if entry is not None else []:
                    at = BATCH_STAGES.index(from_stage)
                    start[batch_id] = min(start.get(batch_id, at), at)
                    causes.setdefault(batch_id, []).append(f"{asset}@{record.storage_id}")
    known = set(instance.get_dynamic_partitions("batches"))
    requests = [
        dg.RunRequest(
            partition_key=batch_id,
            run_key=f"rescore:{batch_id}:{','.join(causes[batch_id])}",
            asset_selection=[dg.AssetKey(a) for a in BATCH_STAGES[at:]],
            tags={
                RESCORE_TAG: ", ".join(causes[batch_id]),
                "dagster/priority": RESCORE_PRIORITY,
            },
        )
        for batch_id, at in sorted(start.items())
        if batch_id in known  # a batch deleted meanwhile has nothing to re-score
    ]
    return requests, cursor


def build_rescore_sensor(
    target: dg.UnresolvedAssetJobDefinition, minimum_interval_seconds: int = 30
) -> dg.SensorDefinition:
    @dg.sensor(
        name="rescore_sensor",
        job=target,
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Re-runs the batches whose inputs changed elsewhere: an earlier batch of"
        " their customers (from their profiles), a new segment model version or a new catalog"
        " (the batches holding current answers), at a lower priority than new batches.",
    )
    def rescore_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        cursor = json.loads(context.cursor) if context.cursor else {}
        requests, cursor = rescore_requests(context.instance, cursor)
        return dg.SensorResult(
            run_requests=requests,
            cursor=json.dumps(cursor),
            skip_reason=None if requests else dg.SkipReason("nothing upstream changed"),
        )

    return rescore_sensor
