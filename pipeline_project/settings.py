"""Where the pipeline keeps its files: environment variables with embedded defaults.

Relative paths resolve against the working directory (the repository root under `dagster dev`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

ENV_DEFAULTS: dict[str, str] = {
    "PIPELINE_LANDING_DIR": "data/landing",
    "PIPELINE_DUCKDB_PATH": "data/warehouse.duckdb",
    "PIPELINE_ALERTS_DUCKDB_PATH": "data/alerts.duckdb",
    "PIPELINE_CATALOG_PATH": "data/catalog.csv",
    "PIPELINE_DUCKDB_MEMORY_LIMIT": "512MB",
    "PIPELINE_FRESHNESS_WARN_HOURS": "12",
    "PIPELINE_FRESHNESS_FAIL_HOURS": "24",
}


@dataclass(frozen=True)
class Settings:
    landing_dir: Path
    duckdb_path: Path
    # Alerts live in their own DuckDB file so that a sensor never queues behind a pipeline run
    # that holds the warehouse's single-writer lock for a long write.
    alerts_duckdb_path: Path
    catalog_path: Path
    duckdb_memory_limit: str
    # A new batch is expected at least this often (WARN / FAIL) at the first and last stage.
    freshness_warn_hours: float = 12.0
    freshness_fail_hours: float = 24.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ

        def get(name: str) -> str:
            return env.get(name) or ENV_DEFAULTS[name]

        return cls(
            landing_dir=Path(get("PIPELINE_LANDING_DIR")).resolve(),
            duckdb_path=Path(get("PIPELINE_DUCKDB_PATH")).resolve(),
            alerts_duckdb_path=Path(get("PIPELINE_ALERTS_DUCKDB_PATH")).resolve(),
            catalog_path=Path(get("PIPELINE_CATALOG_PATH")).resolve(),
            duckdb_memory_limit=get("PIPELINE_DUCKDB_MEMORY_LIMIT"),
            freshness_warn_hours=float(get("PIPELINE_FRESHNESS_WARN_HOURS")),
            freshness_fail_hours=float(get("PIPELINE_FRESHNESS_FAIL_HOURS")),
        )
