"""Staged Parquet parts: how a step hands a big batch to the one transaction that swaps it in."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def write_staged(folder: Path, part: int, table: pa.Table) -> None:
    """One Parquet part of a staged table (see Warehouse.staged_batch); empty parts are skipped."""
    if table.num_rows:
        pq.write_table(table, folder / f"part-{part:06d}.parquet", compression="none")
