"""Settings: every environment variable with its documented name and default, read in one place."""

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from pipeline_project.definitions import build_resources
from pipeline_project.settings import ENV_DEFAULTS, READ_BY_DAGSTER, Settings

REPO = Path(__file__).resolve().parents[1]

# variable: (section, field, default as documented in README.md, an override, its value)
VARIABLES = {
    "PIPELINE_DUCKDB_PATH": ("warehouse", "duckdb_path", Path("data/warehouse.duckdb").resolve(), "/x/w.db", Path("/x/w.db")),
    "PIPELINE_DUCKDB_MEMORY_LIMIT": ("warehouse", "memory_limit", "512MB", "2GB", "2GB"),
    "PIPELINE_WAREHOUSE_BACKEND": ("warehouse", "backend", "duckdb", "ducklake", "ducklake"),
    "PIPELINE_DUCKLAKE_CATALOG": ("warehouse", "ducklake_catalog", "", "host=db dbname=lake", "host=db dbname=lake"),
    "PIPELINE_DUCKLAKE_DATA_PATH": ("warehouse", "ducklake_data_path", None, "/x/lake", Path("/x/lake")),
    "PIPELINE_DUCKLAKE_COMMIT_ATTEMPTS": ("warehouse", "commit_attempts", 10, "8", 8),
    "PIPELINE_LANDING_DIR": ("landing", "landing_dir", Path("data/landing").resolve(), "in", Path("in").resolve()),
    "PIPELINE_CATALOG_PATH": ("landing", "catalog_path", Path("data/catalog.csv").resolve(), "/x/c.csv", Path("/x/c.csv")),
    "PIPELINE_LANDING_S3_PREFIX": ("landing", "s3_prefix", "", "s3://b/in", "s3://b/in"),
    "PIPELINE_S3_ENDPOINT": ("object_storage", "endpoint", "", "http://127.0.0.1:9", "http://127.0.0.1:9"),
    "PIPELINE_S3_REGION": ("object_storage", "region", "us-east-1", "eu-west-1", "eu-west-1"),
    "PIPELINE_EMBEDDING_BACKEND": ("embedding", "backend", "local", "openai", "openai"),
    "PIPELINE_EMBEDDING_MODEL": ("embedding", "model", None, "e5", "e5"),
    "PIPELINE_EMBEDDING_DIMENSIONS": ("embedding", "dimensions", None, "8", 8),
    "PIPELINE_EMBEDDING_DEVICE": ("embedding", "device", "cpu", "cuda", "cuda"),
    "PIPELINE_OPENAI_BASE_URL": ("embedding", "openai_base_url", "https://api.openai.com/v1", "http://127.0.0.1:8080/v1", "http://127.0.0.1:8080/v1"),
    "PIPELINE_OPENAI_SEND_DIMENSIONS": ("embedding", "openai_send_dimensions", False, "true", True),
    "PIPELINE_OPENAI_TIMEOUT_SECONDS": ("embedding", "openai_timeout_seconds", 30.0, "2.5", 2.5),
    "PIPELINE_OPENAI_MAX_BATCH_SIZE": ("embedding", "openai_max_batch_size", 256, "16", 16),
    "PIPELINE_OPENAI_MAX_CONCURRENCY": ("embedding", "openai_max_concurrency", 4, "1", 1),
    "PIPELINE_OPENAI_REQUESTS_PER_MINUTE": ("embedding", "openai_requests_per_minute", 0, "60", 60),
    "PIPELINE_OPENAI_TOKENS_PER_MINUTE": ("embedding", "openai_tokens_per_minute", 0, "6000", 6000),
    "PIPELINE_EMBEDDING_PRICE_PER_MILLION_TOKENS": ("embedding", "price_per_million_tokens", 0.0, "0.02", 0.02),
    "PIPELINE_ALERTS_DUCKDB_PATH": ("alerts", "alerts_duckdb_path", Path("data/alerts.duckdb").resolve(), "/x/a.db", Path("/x/a.db")),
    "PIPELINE_ALERT_WEBHOOK_FORMAT": ("alerts", "webhook_format", "json", "slack", "slack"),
    "PIPELINE_ALERT_COOLDOWN_SECONDS": ("alerts", "cooldown_seconds", 3600.0, "60", 60.0),
    "PIPELINE_ALERT_SENSOR_INTERVAL_SECONDS": ("alerts", "sensor_interval_seconds", 30, "5", 5),
    "PIPELINE_DLQ_GROWTH_BATCHES": ("alerts", "dlq_growth_batches", 3, "5", 5),
    "PIPELINE_FRESHNESS_WARN_HOURS": ("freshness", "warn_hours", 36.0, "1.5", 1.5),
    "PIPELINE_FRESHNESS_FAIL_HOURS": ("freshness", "fail_hours", 72.0, "48", 48.0),
    "PIPELINE_SENSOR_INTERVAL_SECONDS": ("sensors", "interval_seconds", 30, "5", 5),
}  # fmt: skip


def value(settings: Settings, variable: str):
    section, name, *_ = VARIABLES[variable]
    return getattr(getattr(settings, section), name)


def test_the_settings_read_exactly_the_variables_listed_here():
    assert set(ENV_DEFAULTS) == set(VARIABLES)


@pytest.mark.parametrize("variable", sorted(VARIABLES))
def test_an_unset_or_empty_variable_gives_its_default(variable):
    default = VARIABLES[variable][2]
    assert value(Settings.from_env({}), variable) == default
    assert value(Settings.from_env({variable: ""}), variable) == default


@pytest.mark.parametrize("variable", sorted(VARIABLES))
def test_a_set_variable_overrides_its_setting_and_only_that(variable):
    *_, raw, expected = VARIABLES[variable]
    settings = Settings.from_env({variable: raw})
    assert value(settings, variable) == expected
    others = [v for v in VARIABLES if v != variable]
    assert [value(settings, v) for v in others] == [VARIABLES[v][2] for v in others]


def test_readme_documents_every_variable_the_settings_read():
    documented = set(re.findall(r"PIPELINE_[A-Z0-9_]*[A-Z0-9]", (REPO / "README.md").read_text()))
    # secrets and the instance file's connection are read by Dagster, never the settings; the
    # one switch read at import (pipeline_project/__init__.py) filters a warning, no setting
    assert documented - set(READ_BY_DAGSTER) - {"PIPELINE_SHOW_PREVIEW_WARNINGS"} == set(VARIABLES)
    assert set(READ_BY_DAGSTER) <= documented


def test_a_value_that_does_not_parse_names_its_variable():
    with pytest.raises(ValueError, match="PIPELINE_ALERT_SENSOR_INTERVAL_SECONDS='abc'"):
        Settings.from_env({"PIPELINE_ALERT_SENSOR_INTERVAL_SECONDS": "abc"})


def test_the_webhook_url_is_a_secret_the_settings_only_know_is_set():
    """Dagster reads the URL (a Slack URL carries its token); the settings hold only whether
    it is set, so that the resource asks for it as an EnvVar (which fails when it is unset)."""
    url = "https://hooks.test/services/T0/B0/SECRETTOKEN"
    assert "PIPELINE_ALERT_WEBHOOK_URL" in READ_BY_DAGSTER
    assert "PIPELINE_ALERT_WEBHOOK_URL" not in ENV_DEFAULTS
    configured = Settings.from_env({"PIPELINE_ALERT_WEBHOOK_URL": url})
    assert configured.alerts.webhook_configured is True
    assert "SECRETTOKEN" not in repr(configured)
    assert "SECRETTOKEN" not in repr(dataclasses.asdict(configured))
    assert build_resources(configured)["alerts"].webhook_url == dg.EnvVar(
        "PIPELINE_ALERT_WEBHOOK_URL"
    )
    for unset in ({}, {"PIPELINE_ALERT_WEBHOOK_URL": ""}):
        settings = Settings.from_env(unset)
        assert settings.alerts.webhook_configured is False
        assert build_resources(settings)["alerts"].webhook_url == ""


def test_s3_locations_stay_uris_and_their_keys_are_secrets_the_resources_ask_dagster_for():
    settings = Settings.from_env({
        "PIPELINE_WAREHOUSE_BACKEND": "ducklake",
        "PIPELINE_DUCKLAKE_CATALOG": "host=db dbname=lake",
        "PIPELINE_DUCKLAKE_DATA_PATH": "s3://bucket/lake",
        "PIPELINE_CATALOG_PATH": "s3://bucket/in/catalog.csv",
        "PIPELINE_S3_ENDPOINT": "http://127.0.0.1:9",
    })  # fmt: skip
    assert settings.warehouse.ducklake_data_path == "s3://bucket/lake"  # not folded to s3:/
    assert settings.landing.catalog_path == "s3://bucket/in/catalog.csv"
    resources = build_resources(settings)
    for name in ("warehouse", "landing"):
        assert resources[name].s3_access_key_id == dg.EnvVar("PIPELINE_S3_ACCESS_KEY_ID")
        assert resources[name].s3_secret_access_key == dg.EnvVar("PIPELINE_S3_SECRET_ACCESS_KEY")
        assert resources[name].s3_endpoint == "http://127.0.0.1:9"
    local = build_resources(Settings.from_env({}))
    assert local["warehouse"].s3_access_key_id == "" and local["landing"].s3_access_key_id == ""


IMPORT_EVERY_MODULE_BUT_DEFINITIONS = """
import importlib, pkgutil, pipeline_project
names = [m.name for m in pkgutil.walk_packages(pipeline_project.__path__, "pipeline_project.")]
imported = 0
for name in names:
    if name == "pipeline_project.definitions":
        continue
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as err:  # an optional extra that is not installed
        if err.name.startswith("pipeline_project"):
            raise
        continue
    imported += 1
print("imported", imported)
"""


def test_no_module_reads_the_environment_at_import(tmp_path):
    """Only building the definitions reads the environment: with values that cannot parse,
    every module imports (`defs` is built when Dagster loads it), and building it names the
    bad one."""
    numbers = [v for v, row in VARIABLES.items() if type(row[2]) in (int, float)]
    env = {"PATH": "", "HOME": str(tmp_path), **dict.fromkeys(numbers, "abc")}
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_EVERY_MODULE_BUT_DEFINITIONS],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "imported" in done.stdout
    imported = subprocess.run(
        [sys.executable, "-c", "import pipeline_project.definitions"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert imported.returncode == 0, imported.stderr
    definitions = subprocess.run(
        [sys.executable, "-c", "import pipeline_project.definitions as d; d.defs()"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert definitions.returncode != 0
    assert re.search(
        r"ValueError: PIPELINE_[A-Z_]+='abc': expected (int|float)", definitions.stderr
    )
