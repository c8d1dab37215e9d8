"""The code location loads cleanly, and the project's Dagster instance settings apply."""

import subprocess
import sys
from pathlib import Path

import dagster as dg

from pipeline_project.settings import ENV_DEFAULTS, Settings

REPO = Path(__file__).resolve().parents[1]
LOAD = (
    "import dagster as dg, pipeline_project.definitions as d; "
    "dg.Definitions.validate_loadable(d.defs); print('loaded', len(list(d.defs.assets)))"
)


def test_definitions_load_with_no_deprecated_superseded_or_beta_api(tmp_path):
    env = {"PATH": "", "PIPELINE_DUCKDB_PATH": str(tmp_path / "w.duckdb"), "HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-W", "always", "-c", LOAD],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "loaded" in done.stdout
    warning_lines = [ln for ln in done.stderr.splitlines() if "Warning:" in ln]
    for banned in ("DeprecationWarning", "SupersessionWarning", "BetaWarning", "FutureWarning"):
        assert not [ln for ln in warning_lines if banned in ln], done.stderr
    # The one preview API in use, on purpose: partitioned asset check specs (see input_checks.py).
    assert all("partitions_def on an AssetCheckSpec" in ln for ln in warning_lines), warning_lines


def test_dg_check_defs_accepts_the_project_layout():
    dg_cli = Path(sys.executable).parent / "dg"
    done = subprocess.run(
        [str(dg_cli), "check", "defs"], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "All definitions loaded successfully" in done.stdout + done.stderr


def test_definitions_wire_every_stage_job_sensor_and_resource(defs):
    keys = {key.to_user_string() for key in defs.resolve_all_asset_keys()}
    assert keys == {
        "raw_customers", "customers", "customer_purchases", "schema_errors",
        "product_catalog", "customer_embeddings", "product_embeddings", "segment_model",
        "customer_segments", "recommendations", "validated_recommendations",
        "rejected_recommendations", "pipeline_health",
    }  # fmt: skip
    jobs = ("batch_ingestion_job", "batch_pipeline_job", "catalog_job", "segment_model_job",
            "pipeline_health_job")  # fmt: skip
    for job in jobs:
        assert defs.resolve_job_def(job) is not None
    sensors = ("landing_batches_sensor", "catalog_file_sensor", "pipeline_automation_sensor",
               "run_failure_alert_sensor", "check_results_alert_sensor", "freshness_alert_sensor",
               "dead_letter_growth_sensor", "error_rate_alert_sensor")  # fmt: skip
    for sensor in sensors:
        assert defs.resolve_sensor_def(sensor).default_status == dg.DefaultSensorStatus.RUNNING
    assert set(defs.resources) == {"warehouse", "landing", "alerts", "embedder"}


def test_settings_come_from_the_environment_with_defaults(tmp_path):
    defaults = Settings.from_env({})
    assert defaults.landing_dir == Path(ENV_DEFAULTS["PIPELINE_LANDING_DIR"]).resolve()
    assert defaults.duckdb_path.name == "warehouse.duckdb"
    custom = Settings.from_env(
        {
            "PIPELINE_LANDING_DIR": str(tmp_path / "in"),
            "PIPELINE_DUCKDB_PATH": str(tmp_path / "x.db"),
        }
    )
    assert custom.landing_dir == tmp_path / "in"
    assert custom.duckdb_path == tmp_path / "x.db"


def test_project_instance_has_retries_a_bounded_run_queue_and_a_single_writer_pool(instance):
    assert instance.run_retries_enabled and instance.run_retries_max_retries == 1
    assert instance.run_retries_retry_on_asset_or_op_failure is False
    config = instance.get_concurrency_config()
    assert config.pool_config.default_pool_limit == 1
    assert config.run_queue_config.max_concurrent_runs == 4


def test_repo_dagster_home_points_at_the_packaged_settings():
    linked = REPO / ".dagster_home" / "dagster.yaml"
    assert linked.read_text() == (REPO / "pipeline_project" / "dagster_instance.yaml").read_text()
    assert "telemetry:\n  enabled: false" in linked.read_text()


def test_dagster_is_the_pinned_version():
    assert dg.__version__ == "1.13.27"
