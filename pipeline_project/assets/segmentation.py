"""Segments: a model learned from every batch's embeddings, and each batch's customers assigned."""

from collections.abc import Iterator

import dagster as dg
import duckdb
import numpy as np
import pyarrow as pa
from pydantic import Field

from pipeline_project.batch_history import recent_batch_metadata
from pipeline_project.checks.drift_checks import (
    SEGMENT_SHARE_DRIFT,
    drift_check_result,
    drift_check_spec,
)
from pipeline_project.core.monitoring import StepUsage
from pipeline_project.core.segmentation import (
    SegmentModel,
    assign_segments,
    stable_order,
    train_segments,
)
from pipeline_project.core.vectors import list_column_to_matrix, matrix_to_list_array
from pipeline_project.partitions import batches
from pipeline_project.policies import DUCKDB_WRITER_POOL, STAGE_RETRY_POLICY
from pipeline_project.resources import Warehouse
from pipeline_project.resources.embeddings import Embedder
from pipeline_project.tables import CUSTOMER_SEGMENTS, SEGMENT_MODEL

SEGMENT_MODEL_KEY = dg.AssetKey(SEGMENT_MODEL)

# Distinct profile vectors of all batches, each weighted by how many customers have it.
_TRAINING_SQL = """
SELECT c.embedding, w.customers
FROM (
    SELECT text_hash, count(*)::DOUBLE AS customers
    FROM customer_embeddings WHERE model = $model AND dimensions = $dimensions
    GROUP BY text_hash
) AS w
JOIN embedding_cache AS c
    ON c.model = $model AND c.dimensions = $dimensions AND c.text_hash = w.text_hash
ORDER BY c.text_hash
"""

_LATEST_MODEL_SQL = """
SELECT model_version, segment_id, centroid FROM segment_model
WHERE embedding_model = $model AND dimensions = $dimensions
  AND model_version = (SELECT max(model_version) FROM segment_model
                       WHERE embedding_model = $model AND dimensions = $dimensions)
ORDER BY segment_id
"""

_BATCH_PROFILES_SQL = """
SELECT DISTINCT e.text_hash, c.embedding
FROM customer_embeddings AS e
JOIN embedding_cache AS c USING (model, dimensions, text_hash)
WHERE e.batch_id = $batch_id AND e.model = $model AND e.dimensions = $dimensions
ORDER BY e.text_hash
"""


class SegmentModelConfig(dg.Config):
    n_segments: int = Field(default=8, description="Number of customer segments.")
    psi_threshold: float = Field(
        default=0.25, description="WARN when segment shares shift more (PSI) than this."
    )
    drift_baseline_batches: int = Field(default=5, description="Recent batches in the baseline.")
    epochs: int = Field(default=3, description="Passes over the training vectors.")
    chunk_vectors: int = Field(default=10_000, description="Vectors read per training chunk.")
    seed: int = Field(default=0, description="Random seed: same data, same model.")


def latest_segment_model(
    conn: duckdb.DuckDBPyConnection, model: str, dimensions: int
) -> tuple[int, np.ndarray] | None:
    table = conn.sql(
        _LATEST_MODEL_SQL, params={"model": model, "dimensions": dimensions}
    ).to_arrow_table()
    if table.num_rows == 0:
        return None
    return int(table["model_version"][0].as_py()), list_column_to_matrix(
        table, "centroid", dimensions
    )


def train_and_store(
    conn: duckdb.DuckDBPyConnection, model: str, dimensions: int, config: SegmentModelConfig
) -> tuple[int, SegmentModel]:
    """Train on every batch's profile vectors and store the model as a new version."""
    params = {"model": model, "dimensions": dimensions}

    def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        reader = conn.sql(_TRAINING_SQL, params=params).to_arrow_reader(config.chunk_vectors)
        for batch in reader:
            if batch.num_rows:
                yield (
                    list_column_to_matrix(batch, "embedding", dimensions),
                    batch.column("customers").to_numpy(),
                )

    trained = train_segments(chunks, config.n_segments, epochs=config.epochs, seed=config.seed)
    previous = latest_segment_model(conn, model, dimensions)
    order = stable_order(previous[1] if previous else None, trained.centroids)
    trained = SegmentModel(
        trained.centroids[order], trained.weights[order], trained.inertia, trained.silhouette
    )
    version = (previous[0] if previous else 0) + 1
    rows = pa.table(
        {
            "segment_id": pa.array(np.arange(len(trained.centroids), dtype=np.int32)),
            "centroid": matrix_to_list_array(trained.centroids),
            "weight": pa.array(trained.weights),
        }
    )
    conn.register("new_segments", rows)
    conn.execute(
        "INSERT INTO segment_model SELECT $version, segment_id, centroid, weight, $model,"
        " $dimensions, now() FROM new_segments",
        {"version": version, **params},
    )
    conn.unregister("new_segments")
    return version, trained


def segment_model_metadata(version: int, trained: SegmentModel, model: str) -> dict:
    sizes = [
        dg.TableRecord({"segment_id": i, "customers": int(w)})
        for i, w in enumerate(trained.weights)
    ]
    return {
        "model_version": version,
        "n_segments": len(trained.centroids),
        "inertia": round(trained.inertia, 4),
        "silhouette": round(trained.silhouette, 4) if trained.silhouette is not None else -1.0,
        "customers": int(trained.weights.sum()),
        "embedding_model": model,
        "segment_sizes": dg.MetadataValue.table(
            records=sizes,
            schema=dg.TableSchema(
                columns=[dg.TableColumn("segment_id", "int"), dg.TableColumn("customers", "int")]
            ),
        ),
    }


@dg.asset(
    deps=["customer_embeddings"],
    pool=DUCKDB_WRITER_POOL,
    retry_policy=STAGE_RETRY_POLICY,
    group_name="segmentation",
    kinds={"duckdb", "scikit-learn"},
    metadata={"dagster/table_name": SEGMENT_MODEL},
)
def segment_model(
    context: dg.AssetExecutionContext,
    config: SegmentModelConfig,
    warehouse: Warehouse,
    embedder: Embedder,
) -> dg.MaterializeResult:
    """Segment centroids learned from the embeddings of all batches (mini-batch k-means,
    streamed, weighted by customers per profile). Retrain on purpose: IDs stay stable."""
    model, dimensions = embedder.model_id(), embedder.output_dimensions()
    with warehouse.transaction() as conn:
        version, trained = train_and_store(conn, model, dimensions, config)
    context.log.info(f"segment model v{version}: {len(trained.centroids)} segments")
    return dg.MaterializeResult(metadata=segment_model_metadata(version, trained, model))


@dg.asset(
    partitions_def=batches,
    deps=["customer_embeddings", "segment_model"],
    pool=DUCKDB_WRITER_POOL,
    retry_policy=STAGE_RETRY_POLICY,
    group_name="segmentation",
    kinds={"duckdb"},
    metadata={"dagster/table_name": CUSTOMER_SEGMENTS},
    check_specs=[drift_check_spec(SEGMENT_SHARE_DRIFT, CUSTOMER_SEGMENTS, "segment shares")],
    # A missing segment_model does not hold a batch back (its first batch trains one), but a
    # retrained model re-assigns every batch.
    automation_condition=(
        dg.AutomationCondition.eager() & dg.AutomationCondition.all_deps_blocking_checks_passed()
    ).replace(
        "any_deps_missing",
        dg.AutomationCondition.any_deps_missing().ignore(dg.AssetSelection.assets(SEGMENT_MODEL)),
    ),
)
def customer_segments(
    context: dg.AssetExecutionContext,
    config: SegmentModelConfig,
    warehouse: Warehouse,
    embedder: Embedder,
):
    """Each embedded customer's segment (nearest centroid of the newest model) and distance."""
    batch_id = context.partition_key
    usage = StepUsage()
    model, dimensions = embedder.model_id(), embedder.output_dimensions()
    params = {"batch_id": batch_id, "model": model, "dimensions": dimensions}
    with warehouse.replace_batch([CUSTOMER_SEGMENTS], batch_id) as conn:
        current = latest_segment_model(conn, model, dimensions)
        bootstrapped = current is None
        if current is None:
            version, trained = train_and_store(conn, model, dimensions, config)
            current = (version, trained.centroids)
            context.log_event(
                dg.AssetMaterialization(
                    asset_key=SEGMENT_MODEL_KEY,
                    description=f"bootstrapped by customer_segments for batch {batch_id}",
                    metadata=segment_model_metadata(version, trained, model),
                )
            )
        version, centroids = current
        profiles = conn.sql(_BATCH_PROFILES_SQL, params=params).to_arrow_table()
        segment, distance = assign_segments(
            list_column_to_matrix(profiles, "embedding", dimensions), centroids
        )
        conn.register(
            "profile_segments",
            pa.table(
                {
                    "text_hash": profiles["text_hash"],
                    "segment_id": pa.array(segment),
                    "distance": pa.array(distance),
                }
            ),
        )
        conn.execute(
            "INSERT INTO customer_segments SELECT e.batch_id, e.line_no, e.customer_id,"
            " e.text_hash, s.segment_id, s.distance, $version FROM customer_embeddings AS e"
            " JOIN profile_segments AS s USING (text_hash)"
            " WHERE e.batch_id = $batch_id AND e.model = $model AND e.dimensions = $dimensions",
            {**params, "version": version},
        )
        conn.unregister("profile_segments")
        shares = conn.execute(
            "SELECT segment_id, count(*) FROM customer_segments WHERE batch_id = ?"
            " GROUP BY 1 ORDER BY 1",
            [batch_id],
        ).fetchall()
    total = sum(n for _, n in shares)
    counts = [0] * len(centroids)
    for segment_id, n in shares:
        counts[segment_id] = n
    yield dg.MaterializeResult(
        metadata={
            "dagster/row_count": total,
            "model_version": version,
            "bootstrapped_segment_model": bootstrapped,
            "distinct_profiles": profiles.num_rows,
            "segment_shares": dg.MetadataValue.json(
                {str(s): round(n / total, 4) for s, n in shares} if total else {}
            ),
            "segment_counts": dg.MetadataValue.json({"model_version": version, "counts": counts}),
            **usage.figures(),
        }
    )
    baselines = [
        b["counts"]
        for b in recent_batch_metadata(
            context.instance,
            CUSTOMER_SEGMENTS,
            "segment_counts",
            exclude_partition=batch_id,
            batches=config.drift_baseline_batches,
        )
        if b.get("model_version") == version
    ]
    yield drift_check_result(
        SEGMENT_SHARE_DRIFT, CUSTOMER_SEGMENTS, counts, baselines, threshold=config.psi_threshold
    )
