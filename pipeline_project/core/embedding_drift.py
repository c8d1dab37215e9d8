"""Embedding drift: a batch's profile vectors, weighted by customers, against recent batches'.

Only distinct profiles are read (a batch of millions of customers has a few thousand), each
with its number of customers. Three figures:

- the spread of the batch's distinct profiles' vectors, 1 - |mean of their unit vectors|: 0
  when every vector is alike (a degenerate model), larger the more the profiles differ; a
  batch of one profile has no spread to judge;
- the cosine distance between the batch's mean and the recent batches' pooled mean, against
  the distance each recent batch has from the others (how much normal batches move);
- the share of the batch's customers whose profile no recent batch had, against the share each
  recent batch had of profiles the others had not (how many new profiles normal batches bring:
  a handful where customers behave alike, nearly all where every household is its own profile,
  as in real grocery data).
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb
import numpy as np

from pipeline_project.core.arrow_results import arrow_table
from pipeline_project.core.embedding_cache import vectors_sql
from pipeline_project.core.vectors import list_column_to_matrix

# The batch's distinct profiles and their customers; their vectors come from the cache.
_PROFILES_SQL = vectors_sql(
    "SELECT text_hash, count(*) AS customers FROM customer_embeddings"
    " WHERE batch_id = $batch_id AND model = $model AND dimensions = $dimensions"
    " GROUP BY text_hash"
)


@dataclass(frozen=True)
class BatchVectors:
    mean: np.ndarray  # customers-weighted mean of the profiles' unit vectors
    customers: np.ndarray  # per profile
    hashes: tuple[str, ...]
    profile_mean: np.ndarray  # the distinct profiles' unit vectors, unweighted

    @property
    def total(self) -> float:
        return float(self.customers.sum())

    @property
    def spread(self) -> float | None:
        """1 - |mean of the distinct profiles' unit vectors|; None for a single profile."""
        if len(self.hashes) < 2:
            return None
        return float(1.0 - np.linalg.norm(self.profile_mean))


def batch_vectors(
    conn: duckdb.DuckDBPyConnection, batch_id: str, model: str, dimensions: int
) -> BatchVectors | None:
    """The batch's profile vectors; None when it has none for this model."""
    table = arrow_table(
        conn, _PROFILES_SQL, {"batch_id": batch_id, "model": model, "dimensions": dimensions}
    )
    if table.num_rows == 0:
        return None
    vectors = list_column_to_matrix(table, "embedding", dimensions).astype(np.float64)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    units = vectors / np.where(norms == 0, 1.0, norms)
    customers = np.asarray(table["customers"].to_numpy(), dtype=np.float64)
    mean = (units * customers[:, None]).sum(axis=0) / customers.sum()
    hashes = tuple(table["text_hash"].to_pylist())
    return BatchVectors(mean, customers, hashes, units.mean(axis=0))


def _pooled(batches: list[BatchVectors]) -> np.ndarray:
    weights = np.array([b.total for b in batches])
    return (np.stack([b.mean for b in batches]) * weights[:, None]).sum(axis=0) / weights.sum()


def cosine_distance(a: np.ndarray, b: np.ndarray) -> float:
    denominator = float(np.linalg.norm(a) * np.linalg.norm(b))
    return 1.0 - float(a @ b) / denominator if denominator else 1.0


@dataclass(frozen=True)
class EmbeddingDrift:
    spread: float | None
    mean_distance: float | None = None
    typical_distance: float | None = None  # median distance of a recent batch from the others
    new_profile_customer_share: float | None = None
    new_profile_share: float | None = None
    # median share of a recent batch's customers with a profile the other recent batches lacked
    typical_new_profile_customer_share: float | None = None


def embedding_drift(current: BatchVectors, baselines: list[BatchVectors]) -> EmbeddingDrift:
    """The batch against `baselines` (recent normal batches); no distances without two."""
    if len(baselines) < 2:
        return EmbeddingDrift(current.spread)
    typical = float(
        np.median(
            [
                cosine_distance(b.mean, _pooled(baselines[:i] + baselines[i + 1 :]))
                for i, b in enumerate(baselines)
            ]
        )
    )
    seen = set().union(*(b.hashes for b in baselines))
    new = np.array([h not in seen for h in current.hashes])
    typical_new = float(
        np.median(
            [
                _new_customer_share(b, set().union(*(o.hashes for o in baselines if o is not b)))
                for b in baselines
            ]
        )
    )
    return EmbeddingDrift(
        spread=current.spread,
        mean_distance=cosine_distance(current.mean, _pooled(baselines)),
        typical_distance=typical,
        new_profile_customer_share=float(current.customers[new].sum() / current.total),
        new_profile_share=float(new.mean()),
        typical_new_profile_customer_share=typical_new,
    )


def _new_customer_share(batch: BatchVectors, seen: set[str]) -> float:
    new = np.array([h not in seen for h in batch.hashes])
    return float(batch.customers[new].sum() / batch.total)
