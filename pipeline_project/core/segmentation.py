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
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.metrics import silhouette_score

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
    sample, sample_weights = _random_sample(chunks(), sample_size, seed)
    if len(sample) == 0:
        raise ValueError("no embeddings to learn segments from")
    k = min(n_segments, len(np.unique(sample, axis=0)))
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
    return float(silhouette_score(sample, labels, random_state=seed))
