"""Segments: a model learned from every batch's embeddings, and each batch's customers assigned."""

import dagster as dg
import duckdb
import numpy as np
from pydantic import Field

from pipeline_project.asset_metadata import one_table_metadata, table_figures
from pipeline_project.batch_history import failed_flags, recent_batch_metadata
from pipeline_project.checks.drift_checks import (
    SEGMENT_SHARE_DRIFT,
    drift_check_result,
    drift_check_spec,
)
from pipeline_project.checks.verdicts import judged, not_judged
from pipeline_project.core.monitoring import StepUsage
from pipeline_project.core.publications import live_batches
from pipeline_project.core.segmentation import (
    NEIGHBOURS,
    RECENCY_DAYS,
    TASTES,
    SegmentModel,
    assign_batch,
    latest_segment_model,
    segment_model_figures,
    stale_reason,
    train_and_store,
)
from pipeline_project.policies import (
    DUCKDB_WRITER_POOL,
    STAGE_RETRY_POLICY,
    batch_stage,
    fails_at_once_when_deterministic,
    per_batch_automation,
)
from pipeline_project.resources import Warehouse
from pipeline_project.resources.embeddings import Embedder
from pipeline_project.sensors.rescore import RESCORE_METADATA
from pipeline_project.tables import CUSTOMER_EMBEDDINGS, CUSTOMER_SEGMENTS, SEGMENT_MODEL

SEGMENT_MODEL_KEY = dg.AssetKey(SEGMENT_MODEL)


class SegmentModelConfig(dg.Config):
    n_segments: int = Field(default=8, description="Number of customer segments.")
    psi_threshold: float = Field(
        default=0.25, description="WARN when segment shares shift more (PSI) than this."
    )
    drift_baseline_batches: int = Field(default=5, description="Recent batches in the baseline.")
    drift_min_baseline_batches: int = Field(
        default=3, description="No drift verdict before this many earlier normal batches."
    )
    epochs: int = Field(default=3, description="Passes over the training vectors.")
    chunk_vectors: int = Field(default=10_000, description="Vectors read per training chunk.")
    seed: int = Field(default=0, description="Random seed: same data, same model.")
    recency_days: float = Field(
        default=RECENCY_DAYS,
        description="A segment's purchase this many days before its newest weighs 1/e as much"
        " in the product's share of the segment.",
    )
    neighbours: int = Field(
        default=NEIGHBOURS, description="Co-purchased products kept per product."
    )
    tastes: int = Field(
        default=TASTES,
        description="Clusters of what customers buy (their products' purchase vectors).",
    )
    # Off by default: with it, the intermediate models depend on the order the first batches
    # arrive in (a backfill in another order trains other ones before the same final model).
    min_training_profiles: int = Field(
        default=0,
        description="A model trained on fewer distinct profiles is retrained by the next batch"
        " segmented while there are more (0: off; e.g. 200 so that a first small batch does"
        " not rule until the weekly retrain).",
    )
    min_training_batches: int = Field(
        default=0, description="Likewise for the batches it was trained on (0: off)."
    )
    unchanged_tolerance: float = Field(
        default=0.05,
        ge=0.0,
        description="A retrain whose centroids moved at most this much (relative to their"
        " length) and whose segments' product shares moved at most this much (total variation)"
        " makes no new version: the current one goes on scoring and nothing is re-scored.",
    )
    rescore_newest_batches: int | None = Field(
        default=30,
        ge=1,
        description="A new version re-scores the newest this many batches that hold current"
        " answers (arrival order); older answers keep the version that scored them, and the"
        " materialization counts them (null: re-score every batch holding a current answer).",
    )


def segment_model_metadata(
    conn: duckdb.DuckDBPyConnection,
    version: int,
    trained: SegmentModel,
    model: str,
    rescore_newest: int | None = None,
) -> dict:
    """The trained model's figures and segment sizes, the segment_model table's, and the
    batches it makes stale."""
    sizes = [
        dg.TableRecord({"segment_id": i, "customers": int(w)})
        for i, w in enumerate(trained.weights)
    ]
    return {
        **table_figures(conn, SEGMENT_MODEL, None),
        **segment_model_figures(version, trained, model),
        **_stale_after(conn, version, rescore_newest),
        "segment_sizes": dg.MetadataValue.table(
            records=sizes,
            schema=dg.TableSchema(
                columns=[dg.TableColumn("segment_id", "int"), dg.TableColumn("customers", "int")]
            ),
        ),
    }


@dg.asset(
    deps=[CUSTOMER_EMBEDDINGS],
    pool=DUCKDB_WRITER_POOL,
    retry_policy=STAGE_RETRY_POLICY,
    group_name="segmentation",
    kinds={"duckdb", "scikit-learn"},
)
@fails_at_once_when_deterministic
def segment_model(
    context: dg.AssetExecutionContext,
    config: SegmentModelConfig,
    warehouse: Warehouse,
    embedder: Embedder,
) -> dg.MaterializeResult:
    """Segment centroids learned from the embeddings of all batches (mini-batch k-means,
    streamed, weighted by customers per profile). Retrain on purpose: IDs stay stable; a model
    within `unchanged_tolerance` of the current one makes no new version."""
    model, dimensions = embedder.model_id(), embedder.output_dimensions()
    with warehouse.locked_transaction(SEGMENT_MODEL) as conn:
        outcome = train_and_store(
            conn, model, dimensions, config, keep_within=config.unchanged_tolerance
        )
        metadata = segment_model_metadata(
            conn, outcome.version, outcome.model, model, config.rescore_newest_batches
        )
    shifts = {
        name: value
        for name, value in (
            ("centroid_shift", outcome.centroid_shift),
            ("affinity_shift", outcome.affinity_shift),
        )  # fmt: skip
        if value is not None
    }
    context.log.info(
        f"segment model v{outcome.version}"
        f" ({'new' if outcome.new_version else 'unchanged'}): {outcome.why}"
    )
    return dg.MaterializeResult(
        metadata={
            **metadata,
            **shifts,
            "new_version": outcome.new_version,
            "why": outcome.why,
            "unchanged_tolerance": config.unchanged_tolerance,
        }
    )


def _stale_after(conn: duckdb.DuckDBPyConnection, version: int, newest: int | None) -> dict:
    """The batches holding current answers that another model version scored: the newest
    `newest` of them re-scored (rescore_sensor), the others counted (their answers keep the
    version that scored them)."""
    older = f"segment_model_version <> {int(version)}"
    stale = live_batches(conn, older, newest)
    left = len(live_batches(conn, older)) - len(stale)
    return {
        RESCORE_METADATA: dg.MetadataValue.json(stale),
        "live_batches_left_on_older_versions": left,
    }


# A multi_asset that can be subset: its drift check may be left without a result (not judged,
# see checks/verdicts.py).
@dg.multi_asset(
    specs=[
        dg.AssetSpec(
            CUSTOMER_SEGMENTS,
            deps=[CUSTOMER_EMBEDDINGS, SEGMENT_MODEL],
            description="Each embedded customer's segment (nearest centroid of the newest"
            " model) and distance.",
            kinds={"duckdb"},
            # A missing segment_model does not hold a batch back (its first batch trains one);
            # a retrained model re-assigns the batches that hold current answers
            # (rescore_sensor), not every batch ever seen.
            automation_condition=per_batch_automation(ignore=[SEGMENT_MODEL]),
        )
    ],
    check_specs=[drift_check_spec(SEGMENT_SHARE_DRIFT, CUSTOMER_SEGMENTS, "segment shares")],
    can_subset=True,
    **batch_stage("segmentation"),
)
@fails_at_once_when_deterministic
def customer_segments(
    context: dg.AssetExecutionContext,
    config: SegmentModelConfig,
    warehouse: Warehouse,
    embedder: Embedder,
):
    """Each embedded customer's segment (nearest centroid of the newest model) and distance."""
    batch_id = context.partition_key
    if not context.selected_asset_keys:  # its check alone: judged only with its batch
        return
    usage = StepUsage()
    model, dimensions = embedder.model_id(), embedder.output_dimensions()
    version, centroids, trained_here = _fit_model(context, warehouse, model, dimensions, config)
    for attempt in warehouse.write_attempts():
        with attempt, warehouse.replace_batch([CUSTOMER_SEGMENTS], batch_id) as conn:
            assigned = assign_batch(conn, batch_id, model, dimensions, version, centroids)
    drift = drift_check_result(
        SEGMENT_SHARE_DRIFT,
        CUSTOMER_SEGMENTS,
        assigned.counts,
        _count_baselines(context, config, version),
        threshold=config.psi_threshold,
        min_baselines=config.drift_min_baseline_batches,
    )
    yield dg.MaterializeResult(
        asset_key=CUSTOMER_SEGMENTS,
        metadata={
            **failed_flags(judged([drift])),
            **not_judged([drift], context.log),
            **one_table_metadata(warehouse, CUSTOMER_SEGMENTS, assigned.customers),
            "model_version": version,
            "trained_segment_model": trained_here,
            "distinct_profiles": assigned.distinct_profiles,
            "segment_shares": dg.MetadataValue.json(assigned.shares),
            "segment_counts": dg.MetadataValue.json(
                {"model_version": version, "counts": assigned.counts}
            ),
            **usage.figures(),
            "commit_retries": warehouse.commit_retries(),
        },
    )
    yield from judged([drift])


def _fit_model(
    context: dg.AssetExecutionContext,
    warehouse: Warehouse,
    model: str,
    dimensions: int,
    config: SegmentModelConfig,
) -> tuple[int, np.ndarray, bool]:
    """The segment model to assign with: its version, centroids, and whether this step trained
    it. The first batches to arrive train the first model once between them (lock, look
    again); a model trained on less than the minimum, or on another catalog vocabulary than
    the profiles it would score (all rebuilt), is retrained here first."""
    limits = {
        "min_profiles": config.min_training_profiles,
        "min_batches": config.min_training_batches,
    }
    with warehouse.locked_transaction(SEGMENT_MODEL) as conn:
        current = latest_segment_model(conn, model, dimensions)
        reason = (
            "no segment model yet"
            if current is None
            else stale_reason(conn, model, dimensions, current[0], **limits)
        )
        if reason is not None:
            current = _train_in_step(context, conn, model, dimensions, config, reason)
    return current[0], current[1], reason is not None


def _train_in_step(
    context: dg.AssetExecutionContext,
    conn: duckdb.DuckDBPyConnection,
    model: str,
    dimensions: int,
    config: SegmentModelConfig,
    reason: str,
) -> tuple[int, np.ndarray]:
    """A segment model trained by the batch that needs it (the first one, or one whose model
    is not fit: `reason`), reported as a materialization of segment_model; rescore_sensor
    then re-scores the batches another version scored."""
    outcome = train_and_store(conn, model, dimensions, config)
    version, trained = outcome.version, outcome.model
    context.log.info(f"segment model v{version} trained for {context.partition_key}: {reason}")
    context.log_event(
        dg.AssetMaterialization(
            asset_key=SEGMENT_MODEL_KEY,
            description=f"trained by customer_segments for batch {context.partition_key}: {reason}",
            metadata={
                **segment_model_metadata(
                    conn, version, trained, model, config.rescore_newest_batches
                ),
                "why": reason,
            },
        )
    )
    return version, trained.centroids


def _count_baselines(
    context: dg.AssetExecutionContext, config: SegmentModelConfig, version: int
) -> list[list[int]]:
    """Segment counts of the recent batches assigned by the same model version."""
    return [
        b["counts"]
        for b in recent_batch_metadata(
            context.instance,
            CUSTOMER_SEGMENTS,
            "segment_counts",
            exclude_partition=context.partition_key,
            batches=config.drift_baseline_batches,
            unless_failed=SEGMENT_SHARE_DRIFT,
        )
        if b.get("model_version") == version
    ]
