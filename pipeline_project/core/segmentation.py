"""Customer segments: streaming mini-batch k-means over profile vectors weighted by customers.

Customers who behave alike share a profile and so a vector; the model learns from each distinct
vector once, weighted by how many customers have it, in chunks: memory is bounded by the chunk,
not by the number of customers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import MiniBatchKMeans
from sklearn.metrics import silhouette_score

Chunks = Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]  # (vectors, weights) per chunk


@dataclass(frozen=True)
class SegmentModel:
    centroids: np.ndarray  # (n_segments, dimensions)
    weights: np.ndarray  # customers per segment in the training data
    inertia: float
    silhouette: float | None


def train_segments(
    chunks: Chunks, n_segments: int, *, epochs: int = 3, seed: int = 0, sample_size: int = 5000
) -> SegmentModel:
    """Fit centroids with MiniBatchKMeans.partial_fit over `epochs` passes of the chunks.

    `chunks` is called once per pass and yields (vectors, weights); at least `n_segments`
    vectors must be seen in the first chunk (smaller data: fewer segments).
    """
    first_vectors, _ = next(iter(chunks()), (np.empty((0, 0)), None))
    if len(first_vectors) == 0:
        raise ValueError("no embeddings to learn segments from")
    k = min(n_segments, len(first_vectors))
    kmeans = MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=3, batch_size=4096)
    for _ in range(max(1, epochs)):
        for vectors, weights in chunks():
            if len(vectors) >= k or hasattr(kmeans, "cluster_centers_"):
                kmeans.partial_fit(vectors, sample_weight=weights)
    centroids = kmeans.cluster_centers_.astype(np.float32)

    sizes = np.zeros(k)
    inertia = 0.0
    sample_x: list[np.ndarray] = []
    sample_w: list[np.ndarray] = []
    for vectors, weights in chunks():
        segment, distance = assign_segments(vectors, centroids)
        sizes += np.bincount(segment, weights=weights, minlength=k)
        inertia += float(np.sum(weights * distance**2))
        if sum(len(x) for x in sample_x) < sample_size:
            sample_x.append(vectors)
            sample_w.append(weights)
    return SegmentModel(
        centroids, sizes, inertia, _silhouette(sample_x, centroids, sample_size, seed)
    )


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
    cost = np.linalg.norm(previous[:, None, :] - new[None, :, :], axis=2)
    old_ids, new_ids = linear_sum_assignment(cost)
    order = list(new_ids[np.argsort(old_ids)])
    taken = set(order)
    order += [i for i in range(len(new)) if i not in taken]
    return np.asarray(order)


def _silhouette(
    sample: Iterable[np.ndarray], centroids: np.ndarray, sample_size: int, seed: int
) -> float | None:
    x = np.concatenate(list(sample))[:sample_size] if sample else np.empty((0, 0))
    if len(x) < 3:
        return None
    labels, _ = assign_segments(x, centroids)
    if len(np.unique(labels)) < 2 or len(np.unique(labels)) >= len(x):
        return None
    return float(silhouette_score(x, labels, random_state=seed))
