"""Staged Parquet parts: how a step hands a big batch to the one transaction that swaps it in."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def write_staged(folder: Path, part: int, table: pa.Table) -> None:
    """One Parquet part of a staged table (see Warehouse.staged_batch); empty parts are skipped."""
    if table.num_rows:
        path = folder / f"part-{part:06d}.parquet"
        try:
            pq.write_table(table, path, compression="none")
        except OSError as err:
            if err.filename is not None or err.errno is None:
                raise
            # pyarrow's errors name no file: the warehouse's message names this one
            raise OSError(err.errno, os.strerror(err.errno), str(path)) from err
