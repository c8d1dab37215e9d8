"""Alerts: one resource, three sinks (the `alerts` table, the Dagster log, an optional webhook).

Each alert has a severity, a key (what it is about), the monitor, the batch, the figures and
a link path to the run. A key that fired is not sent again within the cooldown; when its
condition clears, `resolve` records a "resolved" alert. A sink that fails (the alerts file is
locked, the webhook answers 500 or hangs) is retried, recorded and logged, never raised into
the sensor or run that raised the alert.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import dagster as dg
import duckdb
import requests
from pydantic import Field
from tenacity import Retrying, stop_after_attempt, wait_exponential_jitter

from pipeline_project.resources.warehouse import DuckDBStore
from pipeline_project.settings import AlertSettings
from pipeline_project.tables import ALERTS_DDL

FIRING = "firing"
RESOLVED = "resolved"


class AlertStore(DuckDBStore):
    """The DuckDB file that holds the `alerts` table."""

    connect_timeout_seconds: float = 10.0

    def _table_ddl(self) -> Sequence[str]:
        return tuple(ALERTS_DDL.values())


@dataclass(frozen=True)
class AlertOutcome:
    sent: bool  # False when suppressed by the cooldown or when nothing was firing
    stored: bool
    webhook_status: str


class AlertSink(dg.ConfigurableResource):
    """Records, logs and (optionally) posts alerts."""

    database: str = Field(description="DuckDB file holding the alerts table.")
    connect_timeout_seconds: float = Field(
        default=10.0, description="How long to wait for another writer of the alerts file."
    )
    webhook_url: str = Field(default="", description="POST each alert here; empty: no webhook.")
    webhook_format: str = Field(default="json", description="json, or slack (a `text` body).")
    webhook_timeout_seconds: float = Field(default=5.0, description="Per POST.")
    webhook_attempts: int = Field(default=3, description="POST attempts before giving up.")
    cooldown_seconds: float = Field(
        default=3600.0, description="A key that fired is not sent again within this time."
    )

    @classmethod
    def from_settings(cls, settings: AlertSettings) -> AlertSink:
        return cls(
            database=str(settings.alerts_duckdb_path),
            webhook_url=settings.webhook_url,
            webhook_format=settings.webhook_format,
            cooldown_seconds=settings.cooldown_seconds,
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
    ) -> AlertOutcome:
        """Fire an alert, unless the same key fired within the cooldown."""
        fired_at = self._firing_since(key, log)
        if fired_at is not None:
            age = datetime.now(UTC) - fired_at
            if age < timedelta(seconds=self.cooldown_seconds):
                log.info(f"alert {key} suppressed: fired {age.total_seconds():.0f} s ago")
                return AlertOutcome(False, False, "suppressed")
        log_fn = log.error if severity == "error" else log.warning
        log_fn(f"ALERT [{severity}] {monitor} {key}: {message}")
        return self._record(severity, monitor, key, message, FIRING, log, batch_id, figures, run_id)

    def resolve(
        self,
        *,
        monitor: str,
        key: str,
        message: str,
        log: logging.Logger | Any,
        batch_id: str | None = None,
        figures: dict[str, Any] | None = None,
        run_id: str | None = None,
    ) -> AlertOutcome:
        """Record that a firing key's condition cleared (nothing happens if it is not firing)."""
        if self._firing_since(key, log) is None:
            return AlertOutcome(False, False, "not firing")
        log.info(f"RESOLVED {monitor} {key}: {message}")
        return self._record("info", monitor, key, message, RESOLVED, log, batch_id, figures, run_id)

    def is_firing(self, key: str, log: logging.Logger | Any) -> bool:
        return self._firing_since(key, log) is not None

    def _firing_since(self, key: str, log) -> datetime | None:
        """When the key last fired, if its latest alert is a firing one (else None)."""
        try:
            with self._store().get_connection() as conn:
                rows = conn.execute(
                    "SELECT status, created_at FROM alerts WHERE alert_key = ?"
                    " ORDER BY created_at DESC LIMIT 1",
                    [key],
                ).fetchall()
        except (duckdb.Error, OSError) as err:
            log.warning(f"alert history unavailable ({type(err).__name__}: {err})")
            return None
        if not rows or rows[0][0] != FIRING:
            return None
        return rows[0][1]

    def _record(
        self, severity, monitor, key, message, status, log, batch_id, figures, run_id
    ) -> AlertOutcome:
        link = f"/runs/{run_id}" if run_id else None
        alert = {
            "severity": severity, "monitor": monitor, "key": key, "status": status,
            "batch_id": batch_id, "message": message, "figures": figures or {},
            "run_id": run_id, "link": link,
        }  # fmt: skip
        webhook_status = self._post(alert, log)
        try:
            with self._store().transaction() as conn:
                conn.execute(
                    "INSERT INTO alerts (severity, monitor, alert_key, batch_id, status, message,"
                    " figures, run_id, link, webhook_status) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [severity, monitor, key, batch_id, status, message,
                     json.dumps(figures or {}, default=str), run_id, link, webhook_status],
                )  # fmt: skip
        except (duckdb.Error, OSError) as err:
            log.warning(f"alert {key} could not be stored ({type(err).__name__}: {err})")
            return AlertOutcome(True, False, webhook_status)
        return AlertOutcome(True, True, webhook_status)

    def _post(self, alert: dict, log) -> str:
        if not self.webhook_url:
            return "not configured"
        if self.webhook_format == "slack":
            icon = {"error": ":red_circle:", "warning": ":warning:"}.get(
                alert["severity"], ":white_check_mark:"
            )
            head = f"{icon} [{alert['status']}] {alert['monitor']} {alert['key']}"
            body: dict = {"text": f"{head}: {alert['message']}"}
        else:
            body = alert
        try:
            for attempt in Retrying(
                stop=stop_after_attempt(max(1, self.webhook_attempts)),
                wait=wait_exponential_jitter(multiplier=0.2, max=2.0),
                reraise=True,
            ):
                with attempt:
                    response = requests.post(
                        self.webhook_url,
                        data=json.dumps(body, default=str),
                        headers={"content-type": "application/json"},
                        timeout=self.webhook_timeout_seconds,
                    )
                    response.raise_for_status()
        except requests.RequestException as err:
            status = f"failed after {self.webhook_attempts} attempts: {type(err).__name__}"
            log.warning(f"alert webhook {status}")
            return status
        return "delivered"
