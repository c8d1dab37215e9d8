"""Alerts: one resource, three sinks (the `alerts` table, the Dagster log, an optional webhook).

Each alert has a severity, a key (what it is about), the monitor, the batch, the figures and
a link path to the run. A key that fired is not sent again within the cooldown, nor ever again
for the same run: a stage that alerted inside its run and the sensor that later reads the same
run's events raise one alert between them. When its condition clears, `resolve` records a
"resolved" alert.

An alert is stored before it is posted, so that whoever raises the same alert meanwhile finds
it. Posting has a budget per resource lifetime (one sensor tick, one step): after a delivery
failed (that one included), or once `delivery_budget_seconds` are spent, alerts are stored
with webhook_status 'pending' and `deliver_pending` (the alert_delivery_sensor) posts them on a
later tick. A sink that fails (the alerts file is locked, the webhook answers 500 or hangs) is
retried, recorded and logged, never raised into the sensor or run that raised the alert.

The webhook URL is a secret (a Slack URL carries its token): configure it as
dg.EnvVar("PIPELINE_ALERT_WEBHOOK_URL"). It is never logged, stored or shown; a failed delivery
is recorded by its error's type only, since a requests error's text names the URL.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext, suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import dagster as dg
import duckdb
import requests
from pydantic import Field, PrivateAttr
from tenacity import Retrying, stop_after_attempt, stop_before_delay, wait_exponential_jitter

from pipeline_project.core.deletes import delete_where
from pipeline_project.core.personal_data import mask_personal
from pipeline_project.resources.warehouse import DUCKLAKE, DuckDBStore
from pipeline_project.settings import AlertSettings, FreshnessSettings, WarehouseSettings
from pipeline_project.tables import ALERTS_DDL, ALERTS_POSTGRES_DDL

FIRING = "firing"
RESOLVED = "resolved"

# webhook_status of a stored alert (a failed delivery is logged with its error type and stays
# pending)
DELIVERED = "delivered"
PENDING = "pending"  # deferred: the alert_delivery_sensor posts it on a later tick
SENDING = "sending"  # the process that raised it is posting it right now
NOT_CONFIGURED = "not configured"

WEBHOOK_URL_VARIABLE = "PIPELINE_ALERT_WEBHOOK_URL"
# A delivery never takes longer than its budget, so an alert still 'sending' after this long
# belongs to a process that died while posting it: it is delivered as a pending one.
SENDING_ABANDONED_AFTER = timedelta(minutes=10)

_ALERT_COLUMNS = "severity, monitor, alert_key, status, batch_id, message, figures, run_id, link"


def error_rate_key(asset: str, batch_id: str | None) -> str:
    """The key of a batch's error-rate alert (the stage's and error_rate_alert_sensor's)."""
    return f"error_rate:{asset}:{batch_id}"


class AlertStore(DuckDBStore):
    """Where the `alerts` table is: a DuckDB file (the embedded default), or, with `postgres`
    (a libpq string without password), a PostgreSQL database that every worker of a deployment
    writes (DuckLake's catalog database): DuckDB's postgres extension runs the same SQL there,
    and PostgreSQL takes any number of writers."""

    connect_timeout_seconds: float = 10.0
    postgres: str = ""
    postgres_password: str = Field(default="", repr=False)

    @property
    def database_file(self):
        return None if self.postgres else super().database_file

    def _table_ddl(self) -> Sequence[str]:
        return tuple((ALERTS_POSTGRES_DDL if self.postgres else ALERTS_DDL).values())

    def _connect(self) -> duckdb.DuckDBPyConnection:
        if not self.postgres:
            return super()._connect()
        return _postgres_base(self.postgres, self.postgres_password).cursor()

    def _prepare(self, conn: duckdb.DuckDBPyConnection) -> None:
        if not self.postgres:
            super()._prepare(conn)
            return
        conn.execute(f"USE {_POSTGRES_ALIAS}")
        with _POSTGRES_LOCK:  # the table once per process (and per database)
            if self.postgres not in _POSTGRES_READY:
                with self.lock("alerts table"):
                    super()._prepare(conn)
                _POSTGRES_READY.add(self.postgres)

    def lock(self, name: str) -> AbstractContextManager:
        """Across processes, on PostgreSQL: a check-then-insert (is this key firing?) is one
        at a time per key, as the DuckDB file's single writer makes it."""
        if not self.postgres:
            return nullcontext()
        from pipeline_project.resources.lakehouse import catalog_lock

        return catalog_lock(self.postgres, self.postgres_password, f"alerts:{name}")


_POSTGRES_ALIAS = "alerts_db"
# One attached PostgreSQL database per process: each connection is a cursor of it.
_POSTGRES: dict[str, duckdb.DuckDBPyConnection] = {}
_POSTGRES_READY: set[str] = set()
_POSTGRES_LOCK = threading.Lock()


def _postgres_base(database: str, password: str) -> duckdb.DuckDBPyConnection:
    from pipeline_project.resources.lakehouse import attach_postgres

    with _POSTGRES_LOCK:
        if database not in _POSTGRES:
            base = duckdb.connect(config={"autoinstall_known_extensions": False})
            attach_postgres(base, database=database, password=password, alias=_POSTGRES_ALIAS)
            _POSTGRES[database] = base
        return _POSTGRES[database]


@dataclass(frozen=True)
class AlertOutcome:
    sent: bool  # False when suppressed by the cooldown or when nothing was firing
    stored: bool
    webhook_status: str


@dataclass
class _DeliveryWindow:
    """The webhook time of one resource lifetime (a sensor tick, a step, one CLI call)."""

    budget_seconds: float
    deadline: float | None = None
    deferring: bool = False  # a delivery failed: the rest of this window waits

    def may_start(self, attempt_seconds: float) -> bool:
        """Whether a delivery may start: none failed yet and one attempt fits in the budget
        (the first delivery of a window always starts, capped by the budget)."""
        if self.deferring:
            return False
        if self.deadline is None:
            self.deadline = time.monotonic() + self.budget_seconds
            return True
        return self.remaining() >= min(attempt_seconds, self.budget_seconds)

    def remaining(self) -> float:
        return 0.0 if self.deadline is None else self.deadline - time.monotonic()


class _HideSecrets(logging.Filter):
    """Keeps the webhook URL (its path is the credential) out of urllib3's debug lines."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if any(secret in text for secret in self.secrets):
            for secret in sorted(self.secrets, key=len, reverse=True):
                text = text.replace(secret, "***")
            record.msg, record.args = text, None
        return True


_HIDE_SECRETS = _HideSecrets()


def _hide_in_http_logs(url: str) -> None:
    parts = urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    _HIDE_SECRETS.secrets.update(s for s in (url, path) if len(s) > 1)
    for name in ("urllib3.connectionpool", "urllib3.util.retry"):
        logging.getLogger(name).addFilter(_HIDE_SECRETS)  # once: a logger keeps no duplicates


class AlertSink(dg.ConfigurableResource):
    """Records, logs and (optionally) posts alerts."""

    database: str = Field(description="DuckDB file holding the alerts table.")
    postgres: str = Field(
        default="",
        description="PostgreSQL database (libpq string, no password) holding the alerts table"
        " instead of the file: with the DuckLake backend, its catalog database.",
    )
    postgres_password: str = Field(
        default="", repr=False, description="Its password (from the environment)."
    )
    connect_timeout_seconds: float = Field(
        default=10.0, description="How long to wait for another writer of the alerts file."
    )
    webhook_url: str = Field(
        default="",
        repr=False,
        description="POST each alert here; empty: no webhook. A secret (a Slack URL carries "
        f"its token): configure as dg.EnvVar('{WEBHOOK_URL_VARIABLE}'), never a literal.",
    )
    webhook_format: str = Field(default="json", description="json, or slack (a `text` body).")
    webhook_timeout_seconds: float = Field(default=5.0, description="Per POST.")
    webhook_attempts: int = Field(default=3, description="POST attempts before giving up.")
    delivery_budget_seconds: float = Field(
        default=20.0,
        description="Webhook time per sensor tick or step. Once spent, or after a failed "
        "delivery, alerts are stored as pending and the alert_delivery_sensor posts them "
        "later: a tick stays well inside Dagster's 60 s sensor timeout.",
    )
    cooldown_seconds: float = Field(
        default=3600.0, description="A key that fired is not sent again within this time."
    )
    freshness_warn_hours: float = Field(
        default=36.0,
        description="No new batch for this long: freshness WARN (until the sensor has learned"
        " the batches' cadence).",
    )
    freshness_fail_hours: float = Field(
        default=72.0,
        description="No new batch for this long: freshness FAIL (until the cadence is learned).",
    )
    _window: _DeliveryWindow | None = PrivateAttr(default=None)

    @classmethod
    def from_settings(
        cls,
        settings: AlertSettings,
        freshness: FreshnessSettings | None = None,
        warehouse: WarehouseSettings | None = None,
    ) -> AlertSink:
        """With the DuckLake backend, alerts live in its catalog's PostgreSQL database: every
        worker writes them, and no file is shared."""
        freshness = freshness or FreshnessSettings()
        lake = warehouse is not None and warehouse.backend == DUCKLAKE
        return cls(
            database=str(settings.alerts_duckdb_path),
            postgres=warehouse.ducklake_catalog if lake else "",
            # A secret: Dagster reads it when the resource starts; never shown in the UI.
            postgres_password=dg.EnvVar("PIPELINE_DUCKLAKE_PASSWORD") if lake else "",
            # A secret: Dagster reads it when the resource starts; never shown in the UI.
            webhook_url=dg.EnvVar(WEBHOOK_URL_VARIABLE) if settings.webhook_configured else "",
            webhook_format=settings.webhook_format,
            cooldown_seconds=settings.cooldown_seconds,
            freshness_warn_hours=freshness.warn_hours,
            freshness_fail_hours=freshness.fail_hours,
        )

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self._window = None  # each tick and each step has a delivery budget of its own

    def _store(self) -> AlertStore:
        # Built here rather than nested as a resource field: a nested resource makes Dagster
        # call a deprecated API (InitResourceContext.dagster_run) while initializing it.
        return AlertStore(
            database=self.database,
            connect_timeout_seconds=self.connect_timeout_seconds,
            postgres=self.postgres,
            postgres_password=self.postgres_password,
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
        """Fire an alert, unless the same key fired within the cooldown or for this run. Its
        message and text figures are stored, logged and sent with personal data masked."""
        message = mask_personal(message)
        figures = {
            k: mask_personal(v) if isinstance(v, str) else v for k, v in (figures or {}).items()
        }
        alert = _alert(severity, monitor, key, FIRING, message, batch_id, figures, run_id)
        initial = self._initial_webhook_status()
        alert_id = None
        store = self._store()
        try:
            with store.lock(key), store.transaction() as conn:
                reason = self._suppressed(conn, key, run_id)
                if reason is None:
                    alert_id = _insert(conn, alert, initial)
        except (duckdb.Error, OSError) as err:
            log.warning(f"alert {key} could not be stored ({type(err).__name__}: {err})")
            reason = None
        if reason is not None:
            log.info(f"alert {key} suppressed: {reason}")
            return AlertOutcome(False, False, "suppressed")
        log_fn = log.error if severity == "error" else log.warning
        log_fn(f"ALERT [{severity}] {monitor} {key}: {message}")
        return self._send(alert, alert_id, initial, log)

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
        alert = _alert("info", monitor, key, RESOLVED, message, batch_id, figures, run_id)
        initial = self._initial_webhook_status()
        store = self._store()
        try:
            with store.lock(key), store.transaction() as conn:
                latest = _latest(conn, key)
                firing = latest is not None and latest[0] == FIRING
                alert_id = _insert(conn, alert, initial) if firing else None
        except (duckdb.Error, OSError) as err:
            log.warning(f"alert history unavailable ({type(err).__name__}: {err})")
            return AlertOutcome(False, False, "not firing")
        if not firing:
            return AlertOutcome(False, False, "not firing")
        log.info(f"RESOLVED {monitor} {key}: {message}")
        return self._send(alert, alert_id, initial, log)

    def alert_error_rate(
        self,
        *,
        asset: str,
        batch_id: str,
        rate: float,
        log: logging.Logger | Any,
        threshold: float,
        run_id: str | None = None,
    ) -> AlertOutcome:
        """A batch's error rate of `asset`: fires above `threshold` (the stage's check's, the one
        place it is read), resolves at or below it. A stage calls it inside its run; the
        error_rate_alert_sensor calls it for the same materialization later (with the threshold
        the stage recorded) and, finding the alert stored for that run, raises nothing new."""
        key = error_rate_key(asset, batch_id)
        if rate > threshold:
            return self.emit(
                severity="warning",
                monitor="error_rate",
                key=key,
                message=f"{asset} error rate {rate:.2%} for batch {batch_id} is above "
                f"{threshold:.0%}",
                log=log,
                batch_id=batch_id,
                figures={"error_rate": rate, "threshold": threshold},
                run_id=run_id,
            )
        return self.resolve(
            monitor="error_rate", key=key, message="error rate back below threshold",
            log=log, batch_id=batch_id, run_id=run_id,
        )  # fmt: skip

    def is_firing(self, key: str, log: logging.Logger | Any) -> bool:
        try:
            with self._store().get_connection() as conn:
                latest = _latest(conn, key)
        except (duckdb.Error, OSError) as err:
            log.warning(f"alert history unavailable ({type(err).__name__}: {err})")
            return False
        return latest is not None and latest[0] == FIRING

    def deliver_pending(self, log: logging.Logger | Any, limit: int = 100) -> tuple[int, int]:
        """Post alerts whose delivery was deferred, oldest first, within this lifetime's
        budget: returns (delivered, still pending). One that fails stays pending and ends the
        round. Run by one sensor only, so that no two rounds post the same alert."""
        if not self.webhook_url:
            return 0, 0
        abandoned = datetime.now(UTC) - SENDING_ABANDONED_AFTER
        try:
            with self._store().get_connection() as conn:
                rows = conn.execute(
                    f"SELECT alert_id, {_ALERT_COLUMNS} FROM alerts"
                    " WHERE webhook_status = ? OR (webhook_status = ? AND created_at < ?)"
                    " ORDER BY created_at LIMIT ?",
                    [PENDING, SENDING, abandoned, limit],
                ).fetchall()
        except (duckdb.Error, OSError) as err:
            log.warning(f"pending alerts unavailable ({type(err).__name__}: {err})")
            return 0, 0
        delivered = 0
        for alert_id, *columns in rows:
            alert = _alert_from_row(*columns)
            status = self._deliver(alert, log)
            if status != DELIVERED:
                break  # the webhook is down or the budget is spent: the rest stays pending
            self._set_webhook_status(alert_id, alert["key"], DELIVERED, log)
            delivered += 1
        return delivered, len(rows) - delivered

    def delete_older_than(self, cutoff: datetime) -> int:
        """Delete the alerts raised before `cutoff` (the retention); how many. Unlike raising
        an alert, a store that fails raises: a purge that did not happen must not look done.
        A key whose firing alert is deleted counts as not firing: it fires again if its
        condition still holds."""
        with self._store().transaction() as conn:
            return delete_where(conn, "alerts", "created_at < ?", [cutoff])

    def delete_mentioning(self, texts: Sequence[str]) -> int:
        """Delete the alerts whose message, alert_key or figures contain any of `texts`, case
        insensitively (to erase a customer: their ID); how many. The figures are compared as
        their values read (a JSON text escapes characters beyond ASCII). An empty text, which
        every alert contains, is refused. A store that fails raises."""
        if isinstance(texts, str):  # its characters would each be a text to look for
            raise TypeError("delete_mentioning takes a sequence of texts, not one string")
        needles = [text.casefold() for text in texts]
        if any(not needle.strip() for needle in needles):
            raise ValueError("an empty text would match every alert: none was deleted")
        if not needles:
            return 0
        with self._store().transaction() as conn:
            rows = conn.execute("SELECT alert_id, message, alert_key, figures FROM alerts")
            found = [
                alert_id for alert_id, *fields in rows.fetchall() if _mentions(fields, needles)
            ]
            for alert_id in found:
                conn.execute("DELETE FROM alerts WHERE alert_id = ?", [alert_id])
        return len(found)

    def delete_naming_customers(self, hashes: Sequence[str]) -> int:
        """Delete the alerts whose message, key or figures name a customer ID whose SHA-256 is
        among `hashes` (an erasure: the IDs themselves are not needed); how many. Matched in
        SQL, an alert at a time never held in Python. A store that fails raises."""
        from pipeline_project.core.erasure import UUID_PATTERN

        if not hashes:
            return 0
        text = "concat_ws(' ', message, alert_key, figures::VARCHAR)"
        with self._store().transaction() as conn:
            found = [
                alert_id
                for (alert_id,) in conn.execute(
                    "SELECT alert_id FROM alerts WHERE list_has_any(list_transform("
                    f"regexp_extract_all({text}, $pattern), lambda x: sha256(lower(x))), $hashes)",
                    {"pattern": UUID_PATTERN, "hashes": list(hashes)},
                ).fetchall()
            ]
            if found:
                conn.execute(
                    "DELETE FROM alerts WHERE list_contains($ids, alert_id::VARCHAR)",
                    {"ids": [str(a) for a in found]},
                )
        return len(found)

    def delete_batch(self, batch_id: str) -> int:
        """Delete the alerts about batch `batch_id` (a batch deleted as if it never arrived);
        how many. A store that fails raises."""
        with self._store().transaction() as conn:
            return delete_where(conn, "alerts", "batch_id = ?", [batch_id])

    def compact(self) -> None:
        """The alerts file rewritten without the deleted rows' bytes (see DuckDBStore.compact);
        nothing for alerts in PostgreSQL."""
        self._store().compact()

    def _suppressed(self, conn: duckdb.DuckDBPyConnection, key: str, run_id: str | None):
        """Why the key must not fire now, or None."""
        latest = _latest(conn, key)
        if latest is None or latest[0] != FIRING:
            return None
        if run_id is not None:
            [(same_run,)] = conn.execute(
                "SELECT count(*) FROM alerts WHERE alert_key = ? AND run_id = ? AND status = ?",
                [key, run_id, FIRING],
            ).fetchall()
            if same_run:
                return f"already raised for run {run_id}"
        age = datetime.now(UTC) - latest[1]
        if age < timedelta(seconds=self.cooldown_seconds):
            return f"fired {age.total_seconds():.0f} s ago"
        return None

    def _delivery_window(self) -> _DeliveryWindow:
        if self._window is None:
            self._window = _DeliveryWindow(self.delivery_budget_seconds)
        return self._window

    def _initial_webhook_status(self) -> str:
        if not self.webhook_url:
            return NOT_CONFIGURED
        window = self._delivery_window()
        return SENDING if window.may_start(self.webhook_timeout_seconds) else PENDING

    def _send(self, alert: dict, alert_id: Any, initial: str, log) -> AlertOutcome:
        stored = alert_id is not None
        if initial != SENDING:
            if initial == PENDING and not stored:
                log.warning(f"alert {alert['key']} was neither stored nor posted (budget spent)")
            return AlertOutcome(True, stored, initial)
        status = self._deliver(alert, log, started=True)
        if stored:
            # A failed delivery waits with the rest: the receiver gets every alert in the end
            # (at least once: a POST that timed out may have arrived).
            kept = status if status in (DELIVERED, PENDING) else PENDING
            self._set_webhook_status(alert_id, alert["key"], kept, log)
        return AlertOutcome(True, stored, status)

    def _set_webhook_status(self, alert_id: Any, key: str, status: str, log) -> None:
        try:
            with self._store().transaction() as conn:
                conn.execute(
                    "UPDATE alerts SET webhook_status = ? WHERE alert_id = ?", [status, alert_id]
                )
        except (duckdb.Error, OSError) as err:
            log.warning(f"alert {key}: webhook status {status!r} not recorded"
                        f" ({type(err).__name__}: {err})")  # fmt: skip

    def _deliver(self, alert: dict, log, started: bool = False) -> str:
        """POST one alert within the window's budget: its webhook_status. `started`: the
        window already let this delivery start (when the alert was stored as sending)."""
        if not self.webhook_url:
            return NOT_CONFIGURED
        if isinstance(self.webhook_url, dg.EnvVar):
            log.warning(
                f"alert {alert['key']} left pending: the webhook URL is read when Dagster starts"
                " the resource (use it inside a run or sensor, or through dg.build_resources)"
            )
            return PENDING
        window = self._delivery_window()
        if not (started or window.may_start(self.webhook_timeout_seconds)):
            return PENDING
        remaining = window.remaining()
        deadline = time.monotonic() + remaining
        _hide_in_http_logs(self.webhook_url)
        data = json.dumps(self._body(alert), default=str)
        attempts = 0
        try:
            for attempt in Retrying(
                stop=stop_after_attempt(max(1, self.webhook_attempts))
                | stop_before_delay(remaining),
                wait=wait_exponential_jitter(multiplier=0.2, max=2.0),
                reraise=True,
            ):
                with attempt:
                    attempts = attempt.retry_state.attempt_number
                    left = deadline - time.monotonic()
                    response = requests.post(
                        self.webhook_url,
                        data=data,
                        headers={"content-type": "application/json"},
                        timeout=max(0.05, min(self.webhook_timeout_seconds, left)),
                    )
                    response.raise_for_status()
        except Exception as err:  # noqa: BLE001 - never raised into the caller
            window.deferring = True
            # Only the type: the text of a requests error names the URL, a secret.
            status = f"failed after {attempts} attempt{'' if attempts == 1 else 's'}: "
            status += type(err).__name__
            log.warning(f"alert {alert['key']} webhook {status}; alerts raised after it in"
                        " this tick or step wait for the alert_delivery_sensor")  # fmt: skip
            return status
        return DELIVERED

    def _body(self, alert: dict) -> dict:
        if self.webhook_format != "slack":
            return alert
        icon = {"error": ":red_circle:", "warning": ":warning:"}.get(
            alert["severity"], ":white_check_mark:"
        )
        # Slack reads <...> as links and mentions (<!channel>): what a user typed (a file
        # name, a batch ID) is escaped the way Slack asks, & < > as entities.
        text = f"[{alert['status']}] {alert['monitor']} {alert['key']}: {alert['message']}"
        return {"text": f"{icon} {_slack_escape(mask_personal(text))}"}


def _slack_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _alert(severity, monitor, key, status, message, batch_id, figures, run_id) -> dict:
    return {
        "severity": severity, "monitor": monitor, "key": key, "status": status,
        "batch_id": batch_id, "message": message, "figures": figures or {},
        "run_id": run_id, "link": f"/runs/{run_id}" if run_id else None,
    }  # fmt: skip


def _alert_from_row(severity, monitor, key, status, batch_id, message, figures, run_id, link):
    alert = _alert(severity, monitor, key, status, message, batch_id, None, run_id)
    return {**alert, "figures": json.loads(figures) if figures else {}, "link": link}


def _mentions(fields: Sequence[Any], needles: Sequence[str]) -> bool:
    """Whether an alert's message, key or figures (a JSON text) contain one of `needles`
    (case-folded): the figures as stored, and each of their keys and values as read."""
    message, key, figures = (field or "" for field in fields)
    texts = [str(message), str(key), str(figures)]
    decoded = figures
    if isinstance(figures, str):
        with suppress(ValueError):  # not JSON: compared as stored
            decoded = json.loads(figures)
    texts.extend(_json_texts(decoded))
    return any(needle in text.casefold() for text in texts for needle in needles)


def _json_texts(value: Any) -> Iterator[str]:
    """Every key and scalar value of a decoded JSON value, as text."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield str(key)
            yield from _json_texts(item)
    elif isinstance(value, list):
        for item in value:
            yield from _json_texts(item)
    elif value is not None:
        yield str(value)


def _latest(conn: duckdb.DuckDBPyConnection, key: str) -> tuple | None:
    """(status, created_at) of the key's latest alert."""
    return conn.execute(
        "SELECT status, created_at FROM alerts WHERE alert_key = ? ORDER BY created_at DESC"
        " LIMIT 1",
        [key],
    ).fetchone()


def _insert(conn: duckdb.DuckDBPyConnection, alert: dict, webhook_status: str) -> Any:
    # the id made here: PostgreSQL's tables take no RETURNING through DuckDB
    alert_id = uuid.uuid4()
    conn.execute(
        f"INSERT INTO alerts (alert_id, {_ALERT_COLUMNS}, webhook_status)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [alert_id, alert["severity"], alert["monitor"], alert["key"], alert["status"],
         alert["batch_id"], alert["message"], json.dumps(alert["figures"], default=str),
         alert["run_id"], alert["link"], webhook_status],
    )  # fmt: skip
    return alert_id
