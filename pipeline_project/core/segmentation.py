"""Customer segments: streaming mini-batch k-means over profile vectors weighted by customers.

Customers who behave alike share a profile and so a vector; the model learns from each distinct
vector once, weighted by how many customers have it, in chunks: memory is bounded by the chunk,
not by the number of customers.

Below the model: training and storing it (segment_model), and assigning a batch's customers
(customer_segments).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import duckdb
import numpy as np
import pyarrow as pa

from pipeline_project.core.arrow_results import arrow_table
from pipeline_project.core.embedding_cache import vectors_sql, with_vectors
from pipeline_project.core.vectors import list_column_to_matrix, matrix_to_list_array

SILHOUETTE_SAMPLE = 1_000
Chunks = Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]  # (vectors, weights) per chunk


@dataclass(frozen=True)
class SegmentModel:
    centroids: np.ndarray  # (n_segments, dimensions)
    weights: np.ndarray  # customers per segment in the training data
    inertia: float
    silhouette: float | None


def train_segments(
    chunks: Chunks,
    n_segments: int,
    *,
    epochs: int = 3,
    seed: int = 0,
    sample_size: int = 5000,
) -> SegmentModel:
    """Fit centroids: k-means++ on a bounded random sample of all chunks for the start, then
    MiniBatchKMeans.partial_fit over `epochs` passes of the chunks.

    `chunks` is called once per pass and yields (vectors, weights). With fewer distinct
    vectors than `n_segments`, there are fewer segments.
    """
    # Imported here: scikit-learn takes 0.6 s to import, and only the steps that train need it
    # (every step process loads the whole code location).
    from sklearn.cluster import KMeans, MiniBatchKMeans

    sample, sample_weights = _random_sample(chunks(), sample_size, seed)
    if len(sample) == 0:
        raise ValueError("no embeddings to learn segments from")
    k = min(n_segments, len({row.tobytes() for row in sample}))  # distinct rows, no sort
    start = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(
        sample, sample_weight=sample_weights
    )
    # No reassignment: chunks from a database scan need not be random, and a chunk that holds
    # one kind of customer must not pull the other segments' centroids into it.
    kmeans = MiniBatchKMeans(
        n_clusters=k,
        init=start.cluster_centers_,
        n_init=1,
        random_state=seed,
        batch_size=4096,
        reassignment_ratio=0.0,
    )
    for _ in range(max(1, epochs)):
        for vectors, weights in chunks():
            kmeans.partial_fit(vectors, sample_weight=weights)
    centroids = kmeans.cluster_centers_.astype(np.float32)

    sizes = np.zeros(k)
    inertia = 0.0
    for vectors, weights in chunks():
        segment, distance = assign_segments(vectors, centroids)
        sizes += np.bincount(segment, weights=weights, minlength=k)
        inertia += float(np.sum(weights * distance**2))
    return SegmentModel(centroids, sizes, inertia, _silhouette(sample, centroids, seed))


def _random_sample(
    chunks: Iterable[tuple[np.ndarray, np.ndarray]], size: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """A uniform random sample of at most `size` rows over all chunks, in bounded memory."""
    rng = np.random.default_rng(seed)
    keep_x: np.ndarray | None = None
    keep_w = keep_key = np.empty(0)
    for vectors, weights in chunks:
        keys = rng.random(len(vectors))
        x = vectors if keep_x is None else np.concatenate([keep_x, vectors])
        w, key = np.concatenate([keep_w, weights]), np.concatenate([keep_key, keys])
        if len(key) > size:
            chosen = np.argpartition(key, size)[:size]
            x, w, key = x[chosen], w[chosen], key[chosen]
        keep_x, keep_w, keep_key = x, w, key
    if keep_x is None:
        return np.empty((0, 0), dtype=np.float32), keep_w
    return keep_x, keep_w


def assign_segments(vectors: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid (euclidean) and the distance to it, for each vector."""
    d2 = (
        np.sum(vectors**2, axis=1)[:, None]
        - 2.0 * vectors @ centroids.T
        + np.sum(centroids**2, axis=1)[None, :]
    )
    segment = np.argmin(d2, axis=1)
    distance = np.sqrt(np.maximum(d2[np.arange(len(vectors)), segment], 0.0))
    return segment.astype(np.int32), distance


def stable_order(previous: np.ndarray | None, new: np.ndarray) -> np.ndarray:
    """Order for the new centroids so each takes the ID of the closest previous centroid.

    A retrain then moves segments rather than renaming them; new segments (more than before)
    get the IDs after the old ones. Returns indices into `new`.
    """
    if previous is None or len(previous) == 0 or previous.shape[1] != new.shape[1]:
        return np.arange(len(new))
    from scipy.optimize import linear_sum_assignment  # a retrain's only (see train_segments)

    cost = np.linalg.norm(previous[:, None, :] - new[None, :, :], axis=2)
    old_ids, new_ids = linear_sum_assignment(cost)
    order = list(new_ids[np.argsort(old_ids)])
    taken = set(order)
    order += [i for i in range(len(new)) if i not in taken]
    return np.asarray(order)


def _silhouette(sample: np.ndarray, centroids: np.ndarray, seed: int) -> float | None:
    """Silhouette score of the segments on the bounded training sample (None if undefined)."""
    if len(sample) < 3:
        return None
    labels, _ = assign_segments(sample, centroids)
    if not 2 <= len(np.unique(labels)) < len(sample):
        return None
    # On at most 1,000 of the sample: pairwise distances grow with its square (3,089 profiles
    # took longer than assigning 2M customers).
    size = min(len(sample), SILHOUETTE_SAMPLE)
    from sklearn.metrics import silhouette_score  # a training's only (see train_segments)

    return float(silhouette_score(sample, labels, sample_size=size, random_state=seed))


# ---- the segment model in the warehouse --------------------------------------------------

# Each customer's current profile: the one of their newest accepted batch (arrival order)
# embedded by the model. A customer who came back is one customer, not one per batch.
_CURRENT_PROFILES_SQL = """
SELECT e.customer_id, arg_max(e.batch_id, b.arrival_seq) AS batch_id,
       arg_max(e.text_hash, b.arrival_seq) AS text_hash
FROM customer_embeddings AS e JOIN batches AS b USING (batch_id)
WHERE b.accepted AND e.model = $model AND e.dimensions = $dimensions
GROUP BY e.customer_id
"""

# The distinct current profiles, each weighted by how many customers have it.
_TRAINING_PROFILES_SQL = f"""
SELECT text_hash, count(*)::DOUBLE AS customers FROM ({_CURRENT_PROFILES_SQL}) GROUP BY text_hash
"""

# The customers a model learns what its segments buy from: a seeded sample of at most
# TRAINING_SAMPLE of the customers with a current profile (each once, in the batch of it).
TRAINING_SAMPLE = 200_000
TRAINING_CUSTOMERS_SQL = f"""
SELECT batch_id, customer_id, text_hash FROM ({_CURRENT_PROFILES_SQL})
ORDER BY hash(customer_id), customer_id LIMIT {TRAINING_SAMPLE}
"""

# What each segment's customers bought, from the segment of their current profile
# ($training_segments: text_hash -> segment_id) and their known purchases as of that batch:
# purchases and average amount per product, and its share: the segment's purchases of it, each
# weighted by how recently (exp(-days / $recency_days) before the newest purchase of the
# sample), over the segment's customers. Grouped by segment and product only: memory holds the
# segments x products, never a row per customer.
_AFFINITY_SQL = f"""
WITH seg AS (
    SELECT cur.batch_id, cur.customer_id, t.segment_id
    FROM ({TRAINING_CUSTOMERS_SQL}) AS cur JOIN training_segments AS t USING (text_hash)
), sizes AS (
    SELECT segment_id, count(*)::DOUBLE AS customers FROM seg GROUP BY segment_id
), bought AS (
    SELECT s.segment_id, p.product_id, p.amount, 1 AS quantity, p.purchased_at
    FROM customer_purchases AS p JOIN seg AS s USING (batch_id, customer_id)
    UNION ALL
    SELECT s.segment_id, q.product_id, q.amount, q.quantity, q.purchased_at
    FROM prior_purchases AS q JOIN seg AS s USING (batch_id, customer_id)
), newest AS (
    SELECT max(purchased_at) AS t_end FROM bought
)
SELECT $version AS model_version, segment_id, product_id, sum(quantity)::DOUBLE AS purchases,
       sum(amount * quantity) / sum(quantity) AS avg_amount,
       sum(quantity * exp(-date_diff('second', purchased_at, t_end) / 86400.0 / $recency_days))
           / any_value(z.customers) AS share,
       any_value(z.customers) AS customers
FROM bought JOIN sizes AS z USING (segment_id) CROSS JOIN newest
GROUP BY segment_id, product_id
"""

_LATEST_MODEL_SQL = """
SELECT model_version, segment_id, centroid FROM segment_model
WHERE embedding_model = $model AND dimensions = $dimensions
  AND model_version = (SELECT max(model_version) FROM segment_model
                       WHERE embedding_model = $model AND dimensions = $dimensions)
ORDER BY segment_id
"""


class TrainingSettings(Protocol):
    """How a segment model is trained (the fields of SegmentModelConfig)."""

    n_segments: int
    epochs: int
    chunk_vectors: int
    seed: int
    recency_days: float
    neighbours: int
    tastes: int


def latest_segment_model(
    conn: duckdb.DuckDBPyConnection, model: str, dimensions: int
) -> tuple[int, np.ndarray] | None:
    """The newest segment model's version and centroids for the embedding model, if any."""
    table = arrow_table(conn, _LATEST_MODEL_SQL, {"model": model, "dimensions": dimensions})
    if table.num_rows == 0:
        return None
    return int(table["model_version"][0].as_py()), list_column_to_matrix(
        table, "centroid", dimensions
    )


RECENCY_DAYS = 30.0  # a purchase this many days older weighs 1/e as much
NEIGHBOURS = 100  # co-purchased products kept per product
TASTES = 16  # clusters of what customers buy


def store_affinity(
    conn: duckdb.DuckDBPyConnection,
    version: int,
    *,
    recency_days: float = RECENCY_DAYS,
    neighbours: int = NEIGHBOURS,
    tastes: int = TASTES,
) -> None:
    """The affinity of segment model `version`: what its segments' customers bought, each
    customer in the segment of their current profile; and the products bought together
    (core/co_purchase), from the same customers. The profiles' segments come from the temp
    table `training_segments` (text_hash, segment_id) when it exists (a model being trained),
    else from the customers the version has segmented."""
    from pipeline_project.core.co_purchase import learn_neighbours

    [(model, dimensions)] = conn.execute(
        "SELECT any_value(embedding_model), any_value(dimensions) FROM segment_model"
        " WHERE model_version = ?",
        [version],
    ).fetchall()
    conn.execute(
        "CREATE TEMP TABLE IF NOT EXISTS training_segments AS SELECT text_hash,"
        " any_value(segment_id) AS segment_id FROM customer_segments WHERE model_version = ?"
        " GROUP BY text_hash",
        [version],
    )
    params = {"model": model, "dimensions": dimensions}
    try:
        conn.execute(
            f"INSERT INTO segment_affinity BY NAME {_AFFINITY_SQL}",
            {**params, "version": version, "recency_days": recency_days},
        )
    finally:
        conn.execute("DROP TABLE IF EXISTS training_segments")
    learn_neighbours(conn, version, TRAINING_CUSTOMERS_SQL, params, neighbours=neighbours,
                     recency_days=recency_days, tastes=tastes)  # fmt: skip


@dataclass(frozen=True)
class TrainingBasis:
    """What a model is (or would be) trained on: the batches holding customers' current
    profiles, the distinct profiles, the catalog vocabulary; and whether every one of those
    batches' profiles was built with that vocabulary."""

    batches: int
    profiles: int
    vocabulary: str | None
    profiles_rebuilt: bool


_BASIS_SQL = f"""
WITH cur AS ({_CURRENT_PROFILES_SQL})
SELECT count(DISTINCT cur.batch_id), count(DISTINCT cur.text_hash),
       coalesce(bool_and(b.profile_vocabulary IS NOT DISTINCT FROM $vocabulary), true)
FROM cur JOIN batches AS b USING (batch_id)
"""


def training_basis(conn: duckdb.DuckDBPyConnection, model: str, dimensions: int) -> TrainingBasis:
    from pipeline_project.core.catalog import vocabulary

    words = vocabulary(conn)
    [(batches, profiles, rebuilt)] = conn.execute(
        _BASIS_SQL, {"model": model, "dimensions": dimensions, "vocabulary": words}
    ).fetchall()
    return TrainingBasis(batches, profiles, words, bool(rebuilt))


_REPROFILE_SQL = f"""
WITH cur AS ({_CURRENT_PROFILES_SQL})
SELECT DISTINCT cur.batch_id FROM cur JOIN batches AS b USING (batch_id)
WHERE b.profile_vocabulary IS DISTINCT FROM $vocabulary
ORDER BY 1
"""


def batches_to_reprofile(conn: duckdb.DuckDBPyConnection, model: str, dimensions: int) -> list[str]:
    """The batches holding customers' current profiles that were built with another catalog
    vocabulary (or none): rebuilt, not scored, once the catalog is there."""
    from pipeline_project.core.catalog import vocabulary

    params = {"model": model, "dimensions": dimensions, "vocabulary": vocabulary(conn)}
    return [batch for (batch,) in conn.execute(_REPROFILE_SQL, params).fetchall()]


def stale_reason(
    conn: duckdb.DuckDBPyConnection,
    model: str,
    dimensions: int,
    version: int,
    *,
    min_profiles: int,
    min_batches: int,
) -> str | None:
    """Why segment model `version` should be retrained before it scores (None: it is fit):
    the catalog's vocabulary changed since it was trained and every profile it would train on
    has been rebuilt with the new one; or it was trained on fewer profiles or batches than
    the minimum, and there are more now."""
    [(batches, profiles, trained_with)] = conn.execute(
        "SELECT any_value(trained_batches), any_value(trained_profiles), any_value(vocabulary)"
        " FROM segment_model WHERE model_version = ?",
        [version],
    ).fetchall()
    now = training_basis(conn, model, dimensions)
    if trained_with != now.vocabulary and now.profiles_rebuilt:
        return "the catalog's vocabulary changed since it was trained"
    immature = (batches or 0) < min_batches or (profiles or 0) < min_profiles
    if immature and (now.batches > (batches or 0) or now.profiles > (profiles or 0)):
        return (
            f"it was trained on {batches or 0} batches and {profiles or 0} profiles (minimum"
            f" {min_batches} and {min_profiles}); there are {now.batches} and {now.profiles} now"
        )
    return None


def train_and_store(
    conn: duckdb.DuckDBPyConnection,
    model: str,
    dimensions: int,
    settings: TrainingSettings,
    keep_within: float | None = None,
) -> Retrained:
    """Train on the current profile vectors of every customer (one per customer, weighted by
    how many share it) and store the model as a new version, with its segments' affinity.

    With `keep_within`, a model that did not move from the previous version is not stored:
    a centroid moved at most that much (relative, centroid_shift) and each segment's product
    shares at most that much (total variation, _AFFINITY_SHIFT_SQL), with the same segments and
    catalog vocabulary. Nothing is written then (the comparison reads a temporary affinity), and
    the previous version goes on scoring: a retrain on the same data, or on data that changes
    nothing the segments say, makes no version and so re-scores nothing."""

    # The distinct profiles with their vectors, found once (a pass of every batch's
    # customer_embeddings): the training reads them five times.
    conn.execute(
        f"CREATE OR REPLACE TEMP TABLE training_profiles AS {vectors_sql(_TRAINING_PROFILES_SQL)}",
        {"model": model, "dimensions": dimensions},
    )

    def chunks(with_hashes: bool = False) -> Iterator[tuple]:
        reader = conn.sql("SELECT * FROM training_profiles ORDER BY text_hash").to_arrow_reader(
            settings.chunk_vectors
        )
        for batch in reader:
            if batch.num_rows:
                vectors = list_column_to_matrix(batch, "embedding", dimensions)
                weights = batch.column("customers").to_numpy()
                if with_hashes:
                    yield vectors, weights, batch.column("text_hash")
                else:
                    yield vectors, weights

    previous = latest_segment_model(conn, model, dimensions)
    try:
        trained = train_segments(
            chunks, settings.n_segments, epochs=settings.epochs, seed=settings.seed
        )
        order = stable_order(previous[1] if previous else None, trained.centroids)
        trained = SegmentModel(
            trained.centroids[order], trained.weights[order], trained.inertia, trained.silhouette
        )
        _stage_training_segments(conn, chunks, trained.centroids)
    finally:
        conn.execute("DROP TABLE IF EXISTS training_profiles")
    basis = training_basis(conn, model, dimensions)
    change = (
        _change(
            conn, model, dimensions, previous, trained, basis.vocabulary, settings, keep_within
        )  # fmt: skip
        if keep_within is not None and previous is not None
        else Retrained(0, trained, True, None, None, "no earlier model to compare with")
    )
    if not change.new_version:
        conn.execute("DROP TABLE IF EXISTS training_segments")
        return change
    # versions count across embedding models: a version names one segment model, so the
    # batches segmented with it (affinity, popularity) never mix two models' segments
    [(newest,)] = conn.execute("SELECT max(model_version) FROM segment_model").fetchall()
    version = (newest or 0) + 1
    rows = pa.table(
        {
            "segment_id": pa.array(np.arange(len(trained.centroids), dtype=np.int32)),
            "centroid": matrix_to_list_array(trained.centroids),
            "weight": pa.array(trained.weights),
        }
    )
    conn.register("new_segments", rows)
    conn.execute(
        "INSERT INTO segment_model BY NAME SELECT $version AS model_version, segment_id,"
        " centroid, weight, $model AS embedding_model, $dimensions AS dimensions,"
        " now() AS trained_at, $batches AS trained_batches, $profiles AS trained_profiles,"
        " $vocabulary AS vocabulary FROM new_segments",
        {"version": version, "model": model, "dimensions": dimensions,
         "batches": basis.batches, "profiles": basis.profiles,
         "vocabulary": basis.vocabulary},
    )  # fmt: skip
    conn.unregister("new_segments")
    store_affinity(
        conn, version, recency_days=settings.recency_days, neighbours=settings.neighbours,
        tastes=settings.tastes,
    )  # fmt: skip
    return dataclasses.replace(change, version=version)


# The tables holding one segment model version's rows (the model, what its segments buy, the
# products bought together, the tastes): what a migration relearns (schema._to_v4).
VERSIONED_TABLES = (
    "segment_model", "segment_affinity", "product_neighbours", "product_factors", "tastes",
    "taste_shares",
)  # fmt: skip

# Per segment, how far the products' shares of the segment's purchases (each segment's shares
# summing to 1) moved between the previous version and the model being trained (the temp
# table candidate_affinity): the total variation distance, the largest segment's.
_AFFINITY_SHIFT_SQL = """
WITH a AS (
    SELECT segment_id, product_id, share / sum(share) OVER (PARTITION BY segment_id) AS p
    FROM segment_affinity WHERE model_version = $old
), b AS (
    SELECT segment_id, product_id, share / sum(share) OVER (PARTITION BY segment_id) AS p
    FROM candidate_affinity
)
SELECT coalesce(max(tv), 0.0) FROM (
    SELECT segment_id, 0.5 * sum(abs(coalesce(a.p, 0) - coalesce(b.p, 0))) AS tv
    FROM a FULL JOIN b USING (segment_id, product_id) GROUP BY segment_id)
"""


@dataclass(frozen=True)
class Retrained:
    """A training's outcome: the version that scores from now on (a new one, or the previous
    one when the new model is within the tolerance of it), the model trained, and how far it
    moved from the previous version (None: nothing to compare with, or not comparable)."""

    version: int
    model: SegmentModel
    new_version: bool
    centroid_shift: float | None
    affinity_shift: float | None
    why: str


def centroid_shift(old: np.ndarray, new: np.ndarray) -> float:
    """How far the furthest centroid moved (segment IDs matched, see stable_order), relative
    to the old centroids' root-mean-square length."""
    scale = float(np.sqrt(np.mean(np.sum(old.astype(np.float64) ** 2, axis=1)))) or 1.0
    return float(np.max(np.linalg.norm(new.astype(np.float64) - old, axis=1)) / scale)


def _change(
    conn: duckdb.DuckDBPyConnection,
    model: str,
    dimensions: int,
    previous: tuple[int, np.ndarray],
    trained: SegmentModel,
    vocabulary: str | None,
    settings: TrainingSettings,
    tolerance: float,
) -> Retrained:
    """How far the model being trained (its profiles' segments in the temp table
    training_segments) is from the previous version, and whether that makes a new version."""
    old_version, old_centroids = previous
    [(old_vocabulary,)] = conn.execute(
        "SELECT any_value(vocabulary) FROM segment_model WHERE model_version = ?", [old_version]
    ).fetchall()
    if old_centroids.shape != trained.centroids.shape or old_vocabulary != vocabulary:
        return Retrained(
            0, trained, True, None, None, "the segments or the catalog vocabulary changed"
        )
    moved = centroid_shift(old_centroids, trained.centroids)
    if moved > tolerance:
        return Retrained(
            0, trained, True, moved, None, f"centroids moved {moved:.4f} (tolerance {tolerance})"
        )
    params = {"model": model, "dimensions": dimensions, "version": 0,
              "recency_days": settings.recency_days}  # fmt: skip
    conn.execute(f"CREATE OR REPLACE TEMP TABLE candidate_affinity AS {_AFFINITY_SQL}", params)
    try:
        [(shares,)] = conn.execute(_AFFINITY_SHIFT_SQL, {"old": old_version}).fetchall()
    finally:
        conn.execute("DROP TABLE IF EXISTS candidate_affinity")
    shift = f"centroids moved {moved:.4f}, product shares {shares:.4f}"
    if shares > tolerance:
        return Retrained(0, trained, True, moved, shares, f"{shift} (tolerance {tolerance})")
    return Retrained(
        old_version, trained, False, moved, shares,
        f"{shift}, within the tolerance {tolerance}: v{old_version} kept",
    )  # fmt: skip


def _stage_training_segments(
    conn: duckdb.DuckDBPyConnection, chunks: Chunks, centroids: np.ndarray
) -> None:
    """The temp table training_segments: each training profile's segment under `centroids`."""
    # a hash and a segment per distinct profile: small beside the vectors read in chunks
    parts = [
        pa.table({"text_hash": hashes, "segment_id": assign_segments(vectors, centroids)[0]})
        for vectors, _, hashes in chunks(with_hashes=True)
    ]
    conn.register("new_training_segments", pa.concat_tables(parts))
    conn.execute(
        "CREATE OR REPLACE TEMP TABLE training_segments AS SELECT * FROM new_training_segments"
    )
    conn.unregister("new_training_segments")


def segment_model_figures(version: int, trained: SegmentModel, model: str) -> dict:
    """The figures of a trained model, for its materialization (segment sizes apart); no
    silhouette where it does not exist (a single segment), rather than a sentinel value."""
    figures = {
        "model_version": version,
        "n_segments": len(trained.centroids),
        "inertia": round(trained.inertia, 4),
        "customers": int(trained.weights.sum()),
        "embedding_model": model,
    }
    if trained.silhouette is not None:
        figures["silhouette"] = round(trained.silhouette, 4)
    return figures


# The batch's distinct profiles, to assign each one segment.
_BATCH_PROFILES_SQL = """
SELECT DISTINCT text_hash FROM customer_embeddings
WHERE batch_id = $batch_id AND model = $model AND dimensions = $dimensions
"""


@dataclass(frozen=True)
class BatchSegments:
    customers: int
    distinct_profiles: int
    shares: dict[str, float]  # segment ID -> share of the batch's customers
    counts: list[int]  # customers per segment ID, every segment of the model


def assign_batch(
    conn: duckdb.DuckDBPyConnection,
    batch_id: str,
    model: str,
    dimensions: int,
    version: int,
    centroids: np.ndarray,
) -> BatchSegments:
    """Each embedded customer of the batch into customer_segments: its profile's nearest
    centroid of model `version` and the distance to it."""
    params = {"batch_id": batch_id, "model": model, "dimensions": dimensions}
    profiles = with_vectors(conn, _BATCH_PROFILES_SQL, model, dimensions, {"batch_id": batch_id})
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
        "INSERT INTO customer_segments BY NAME SELECT e.batch_id, e.line_no, e.customer_id,"
        " e.text_hash, s.segment_id, s.distance, $version AS model_version"
        " FROM customer_embeddings AS e JOIN profile_segments AS s USING (text_hash)"
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
    return BatchSegments(
        customers=total,
        distinct_profiles=profiles.num_rows,
        shares={str(s): round(n / total, 4) for s, n in shares} if total else {},
        counts=counts,
    )
