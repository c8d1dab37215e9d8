"""Every setting of a deployment, in sections, read from the environment in one place.

Each field names its environment variable and its default; an unset or empty variable means
the default. `Settings.from_env()` is the only reader of the environment (secrets excepted:
the OpenAI API key and the alert webhook URL stay `dg.EnvVar`s, read by Dagster when the
resource starts; of the URL the settings only know whether it is set). Paths read by
`from_env` resolve against the working directory (the repository root under `dagster dev`).
"""

from __future__ import annotations

import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


def _env(name: str, default: Any) -> Any:
    """A setting read from the environment variable `name`; unset or empty: `default`."""
    return field(default=default, metadata={"env": name})


def _is_set(name: str) -> Any:
    """Whether the secret `name` (read by Dagster, see READ_BY_DAGSTER) is set: never its value."""
    return field(default=False, metadata={"env": name, "presence_only": True})


@dataclass(frozen=True)
class WarehouseSettings:
    """`duckdb`: the embedded file. `ducklake`: a catalog in PostgreSQL (its password only from
    PIPELINE_DUCKLAKE_PASSWORD, read by Dagster as a secret) and data under a shared path."""

    backend: str = _env("PIPELINE_WAREHOUSE_BACKEND", "duckdb")
    duckdb_path: Path = _env("PIPELINE_DUCKDB_PATH", Path("data/warehouse.duckdb"))
    memory_limit: str = _env("PIPELINE_DUCKDB_MEMORY_LIMIT", "512MB")
    ducklake_catalog: str = _env("PIPELINE_DUCKLAKE_CATALOG", "")
    # a folder, or s3://bucket/prefix (see ObjectStorageSettings)
    ducklake_data_path: Path | str | None = _env("PIPELINE_DUCKLAKE_DATA_PATH", None)
    commit_attempts: int = _env("PIPELINE_DUCKLAKE_COMMIT_ATTEMPTS", 10)


@dataclass(frozen=True)
class LandingSettings:
    landing_dir: Path = _env("PIPELINE_LANDING_DIR", Path("data/landing"))
    # a file, or s3://bucket/key (see ObjectStorageSettings)
    catalog_path: Path | str = _env("PIPELINE_CATALOG_PATH", Path("data/catalog.csv"))
    # Batch files landing on object storage instead (s3://bucket/prefix)
    s3_prefix: str = _env("PIPELINE_LANDING_S3_PREFIX", "")


@dataclass(frozen=True)
class ObjectStorageSettings:
    """AWS S3 or any S3-compatible server, for every `s3://` setting (landing files, the
    catalog file, the lake's data); its keys are secrets: PIPELINE_S3_ACCESS_KEY_ID and
    PIPELINE_S3_SECRET_ACCESS_KEY, read by Dagster (dg.EnvVar)."""

    endpoint: str = _env("PIPELINE_S3_ENDPOINT", "")
    region: str = _env("PIPELINE_S3_REGION", "us-east-1")


@dataclass(frozen=True)
class EmbeddingSettings:
    """The backend and its options; None means the backend's own default."""

    backend: str = _env("PIPELINE_EMBEDDING_BACKEND", "local")
    model: str | None = _env("PIPELINE_EMBEDDING_MODEL", None)
    dimensions: int | None = _env("PIPELINE_EMBEDDING_DIMENSIONS", None)
    device: str = _env("PIPELINE_EMBEDDING_DEVICE", "cpu")
    openai_base_url: str = _env("PIPELINE_OPENAI_BASE_URL", "https://api.openai.com/v1")
    openai_send_dimensions: bool = _env("PIPELINE_OPENAI_SEND_DIMENSIONS", False)
    openai_timeout_seconds: float = _env("PIPELINE_OPENAI_TIMEOUT_SECONDS", 30.0)
    openai_max_batch_size: int = _env("PIPELINE_OPENAI_MAX_BATCH_SIZE", 256)
    openai_max_concurrency: int = _env("PIPELINE_OPENAI_MAX_CONCURRENCY", 4)
    openai_requests_per_minute: int = _env("PIPELINE_OPENAI_REQUESTS_PER_MINUTE", 0)
    openai_tokens_per_minute: int = _env("PIPELINE_OPENAI_TOKENS_PER_MINUTE", 0)
    # what a million tokens cost the deployment (0: a local model): each batch's estimated cost
    price_per_million_tokens: float = _env("PIPELINE_EMBEDDING_PRICE_PER_MILLION_TOKENS", 0.0)


@dataclass(frozen=True)
class AlertSettings:
    # Alerts live in their own DuckDB file so that a sensor never queues behind a pipeline run
    # that holds the warehouse's single-writer lock for a long write.
    alerts_duckdb_path: Path = _env("PIPELINE_ALERTS_DUCKDB_PATH", Path("data/alerts.duckdb"))
    # The URL is a secret (a Slack URL carries its token): AlertSink reads it as
    # dg.EnvVar("PIPELINE_ALERT_WEBHOOK_URL") when this says it is set.
    webhook_configured: bool = _is_set("PIPELINE_ALERT_WEBHOOK_URL")
    webhook_format: str = _env("PIPELINE_ALERT_WEBHOOK_FORMAT", "json")
    cooldown_seconds: float = _env("PIPELINE_ALERT_COOLDOWN_SECONDS", 3600.0)
    sensor_interval_seconds: int = _env("PIPELINE_ALERT_SENSOR_INTERVAL_SECONDS", 30)
    dlq_growth_batches: int = _env("PIPELINE_DLQ_GROWTH_BATCHES", 3)


@dataclass(frozen=True)
class FreshnessSettings:
    """A new batch is expected at least this often (WARN / FAIL) at the first and last stage."""

    warn_hours: float = _env("PIPELINE_FRESHNESS_WARN_HOURS", 36.0)
    fail_hours: float = _env("PIPELINE_FRESHNESS_FAIL_HOURS", 72.0)


@dataclass(frozen=True)
class SensorSettings:
    """How often the sensors that start work look: new landing files, the catalog file, the
    automation of each batch's stages, the re-scoring of what changed (the alerting sensors
    have their own, PIPELINE_ALERT_SENSOR_INTERVAL_SECONDS)."""

    interval_seconds: int = _env("PIPELINE_SENSOR_INTERVAL_SECONDS", 30)


@dataclass(frozen=True)
class Settings:
    warehouse: WarehouseSettings = field(default_factory=WarehouseSettings)
    landing: LandingSettings = field(default_factory=LandingSettings)
    object_storage: ObjectStorageSettings = field(default_factory=ObjectStorageSettings)
    embedding: EmbeddingSettings = field(default_factory=EmbeddingSettings)
    alerts: AlertSettings = field(default_factory=AlertSettings)
    freshness: FreshnessSettings = field(default_factory=FreshnessSettings)
    sensors: SensorSettings = field(default_factory=SensorSettings)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """The settings from `environ` (default: the process environment)."""
        env = os.environ if environ is None else environ
        sections = typing.get_type_hints(cls)
        return cls(**{f.name: _section_from_env(sections[f.name], env) for f in fields(cls)})

    # Shortcuts to the four paths that tests and scripts use most.
    @property
    def duckdb_path(self) -> Path:
        return self.warehouse.duckdb_path

    @property
    def alerts_duckdb_path(self) -> Path:
        return self.alerts.alerts_duckdb_path

    @property
    def landing_dir(self) -> Path:
        return self.landing.landing_dir

    @property
    def catalog_path(self) -> Path:
        return Path(self.landing.catalog_path)


def _section_from_env(section: type, env: Mapping[str, str]) -> Any:
    types = typing.get_type_hints(section)
    values = {}
    for f in fields(section):
        raw = env.get(f.metadata["env"])
        if f.metadata.get("presence_only"):
            values[f.name] = bool(raw)
            continue
        value = _parse(f.metadata["env"], raw, types[f.name]) if raw else f.default
        values[f.name] = value.resolve() if isinstance(value, Path) else value
    return section(**values)


def _parse(name: str, raw: str, kind: Any) -> Any:
    if Path in typing.get_args(kind) and str in typing.get_args(kind) and "://" in raw:
        return raw  # a location on object storage: a URI, not a local path
    # `int | None` reads as an int
    base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
    if base is bool:
        return raw == "true"
    try:
        return base(raw)
    except ValueError as err:
        raise ValueError(f"{name}={raw!r}: expected {base.__name__}") from err


# Read by Dagster itself, never by the settings: secrets (`dg.EnvVar`, never shown in the UI),
# the scale-out instance file's PostgreSQL connection and compute logs' bucket
# (deploy/dagster.yaml), and the pools' limits, which the deploy's init job gives the instance
# (`dagster instance concurrency`).
READ_BY_DAGSTER = (
    "PIPELINE_WRITER_POOL_LIMIT",
    "PIPELINE_INFERENCE_POOL_LIMIT",
    "PIPELINE_OPENAI_API_KEY",
    "PIPELINE_DUCKLAKE_PASSWORD",
    "PIPELINE_ALERT_WEBHOOK_URL",
    "PIPELINE_S3_ACCESS_KEY_ID",
    "PIPELINE_S3_SECRET_ACCESS_KEY",
    "PIPELINE_DAGSTER_PG_HOST",
    "PIPELINE_DAGSTER_PG_PORT",
    "PIPELINE_DAGSTER_PG_USER",
    "PIPELINE_DAGSTER_PG_PASSWORD",
    "PIPELINE_DAGSTER_PG_DB",
    "PIPELINE_COMPUTE_LOGS_BUCKET",
)

# Every environment variable the settings read, with its default (secrets, of which the
# settings only know whether they are set, are Dagster's: READ_BY_DAGSTER).
ENV_DEFAULTS: dict[str, Any] = {
    f.metadata["env"]: f.default
    for section in typing.get_type_hints(Settings).values()
    for f in fields(section)
    if not f.metadata.get("presence_only")
}
