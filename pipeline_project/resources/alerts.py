"""Alerts: stored in the `alerts` table and written to the Dagster log."""

from __future__ import annotations

import json
import logging
from typing import Any

import dagster as dg
import duckdb
from pydantic import Field

from pipeline_project.resources.warehouse import AlertStore


class AlertSink(dg.ConfigurableResource):
    """Records alerts. A failing sink is logged, never raised into a sensor or a run."""

    database: str = Field(description="DuckDB file holding the alerts table.")
    connect_timeout_seconds: float = Field(
        default=10.0, description="How long to wait for another writer of the alerts file."
    )

    def _store(self) -> AlertStore:
        # Built here rather than nested as a resource field: a nested resource makes Dagster
        # call a deprecated API (InitResourceContext.dagster_run) while initializing it.
        return AlertStore(
            database=self.database, connect_timeout_seconds=self.connect_timeout_seconds
        )

    def emit(
        self,
        *,
        severity: str,
        monitor: str,
        key: str,
        message: str,
        log: logging.Logger | Any,
        batch_id: str | None = None,
        figures: dict[str, Any] | None = None,
        run_id: str | None = None,
        status: str = "firing",
    ) -> bool:
        """Log and store one alert; returns whether the alert was stored."""
        log_fn = log.error if severity == "error" else log.warning
        log_fn(f"ALERT [{severity}] {monitor} {key}: {message}")
        try:
            with self._store().transaction() as conn:
                conn.execute(
                    "INSERT INTO alerts (severity, monitor, alert_key, batch_id, status, message,"
                    " figures, run_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        severity,
                        monitor,
                        key,
                        batch_id,
                        status,
                        message,
                        json.dumps(figures or {}, default=str),
                        run_id,
                    ],
                )
        except (duckdb.Error, OSError) as err:
            log.warning(f"alert {key} could not be stored ({type(err).__name__}: {err})")
            return False
        return True
