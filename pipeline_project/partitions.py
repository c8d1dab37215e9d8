"""The batch partitions and the rules for batch IDs and landing file names."""

from __future__ import annotations

import re

import dagster as dg

batches = dg.DynamicPartitionsDefinition(name="batches")

# Safe as a file name, a CLI argument (no ',' and no '...') and a SQL parameter.
BATCH_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
BATCH_FILE_SUFFIXES = (".jsonl.gz", ".jsonl")


def is_valid_batch_id(batch_id: str) -> bool:
    return BATCH_ID_PATTERN.fullmatch(batch_id) is not None


def batch_id_for_file_name(name: str) -> str | None:
    """The batch ID a landing file name stands for, or None when the name breaks the rules."""
    for suffix in BATCH_FILE_SUFFIXES:
        if name.endswith(suffix):
            stem = name[: -len(suffix)]
            return stem if is_valid_batch_id(stem) else None
    return None
