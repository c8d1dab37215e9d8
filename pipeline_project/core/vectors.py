"""Vectors between numpy and DuckDB: FLOAT[] list columns travel as Arrow list arrays."""

import numpy as np
import pyarrow as pa


def matrix_to_list_array(matrix: np.ndarray) -> pa.ListArray:
    """An (n, d) matrix as an Arrow list<float> array of n rows (DuckDB FLOAT[])."""
    matrix = np.asarray(matrix, dtype=np.float32)
    n, d = matrix.shape
    offsets = pa.array(np.arange(0, n * d + 1, d, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(matrix.ravel()))


def list_column_to_matrix(
    batch: pa.RecordBatch | pa.Table, column: str, dimensions: int
) -> np.ndarray:
    """A list<float> column of `dimensions`-wide vectors as an (n, dimensions) matrix."""
    values = batch.column(column)
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    return np.asarray(values.flatten(), dtype=np.float32).reshape(-1, dimensions)
