"""The scale-out deployment files (deploy/) hold: the instance stores runs and partitions in a
real PostgreSQL, the compose init job prepares the databases and the pools, every setting the
files name is one the project reads, and no secret is written into them.

No Docker daemon is needed: nothing is launched, the Docker run launcher is only configured.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import psycopg2
import pytest
import yaml
from dagster._serdes import serialize_value
from dagster_docker import DockerRunLauncher

from pipeline_project.definitions import build_definitions
from pipeline_project.partitions import batches
from pipeline_project_tests.helpers import customer, run_batch, settings_in, write_lines
from pipeline_project_tests.postgres_server import PostgresServer, postgres_server
from pipeline_project_tests.s3_server import KEY_ID, SECRET, moto_server, s3_client

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
INSTANCE_YAML = DEPLOY / "dagster.yaml"
COMPOSE_YAML = DEPLOY / "compose.yaml"
HELM_VALUES = DEPLOY / "helm" / "values.yaml"
ENV_EXAMPLE = DEPLOY / ".env.example"
# The files whose PIPELINE_* names must be settings the project reads.
FILES_NAMING_SETTINGS = [COMPOSE_YAML, INSTANCE_YAML, HELM_VALUES, ENV_EXAMPLE]
# Every committed file under deploy/: none may hold a secret.
COMMITTED_DEPLOY_FILES = [
    *FILES_NAMING_SETTINGS,
    DEPLOY / "Dockerfile",
    DEPLOY / "workspace.yaml",
    DEPLOY / "README.md",
]
# The settings of the scale-out configuration (issue 14), on top of README.md's tables.
SCALE_OUT_SETTINGS = {
    "PIPELINE_WAREHOUSE_BACKEND",
    "PIPELINE_DUCKLAKE_CATALOG",
    "PIPELINE_DUCKLAKE_PASSWORD",
    "PIPELINE_DUCKLAKE_DATA_PATH",
    "PIPELINE_WRITER_POOL_LIMIT",
    "PIPELINE_INFERENCE_POOL_LIMIT",
    "PIPELINE_DAGSTER_PG_HOST",
    "PIPELINE_DAGSTER_PG_PORT",
    "PIPELINE_DAGSTER_PG_USER",
    "PIPELINE_DAGSTER_PG_PASSWORD",
    "PIPELINE_DAGSTER_PG_DB",
    # read by the instance (dagster.yaml: compute logs on object storage)
    "PIPELINE_COMPUTE_LOGS_BUCKET",
}
SETTING_NAME = re.compile(r"\bPIPELINE_[A-Z0-9_]*[A-Z0-9]\b")
# The secrets, and the services that get each: no other service may (compose.yaml).
SECRETS = {
    "PIPELINE_DAGSTER_PG_PASSWORD": {"init", "code-server", "webserver", "daemon"},
    "PIPELINE_DUCKLAKE_PASSWORD": {"init", "code-server", "daemon"},
    "PIPELINE_S3_ACCESS_KEY_ID": {"code-server", "webserver", "daemon"},
    "PIPELINE_S3_SECRET_ACCESS_KEY": {"code-server", "webserver", "daemon"},
    "AWS_ACCESS_KEY_ID": {"code-server", "webserver", "daemon"},
    "AWS_SECRET_ACCESS_KEY": {"code-server", "webserver", "daemon"},
    "PIPELINE_OPENAI_API_KEY": {"daemon"},
    "PIPELINE_ALERT_WEBHOOK_URL": {"code-server", "daemon"},
}
ENV_REFERENCE = re.compile(r"\$\{[A-Z0-9_]+(:?[-?][^}]*)?\}")


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server


def dagster_pg_env(server: PostgresServer, db: str) -> dict[str, str]:
    return {
        "PIPELINE_DAGSTER_PG_HOST": server.host,
        "PIPELINE_DAGSTER_PG_PORT": str(server.port),
        "PIPELINE_DAGSTER_PG_USER": server.user,
        "PIPELINE_DAGSTER_PG_PASSWORD": server.password,
        "PIPELINE_DAGSTER_PG_DB": db,
    }


def dagster_home(root: Path) -> Path:
    """A Dagster home holding exactly the committed deploy/dagster.yaml."""
    home = root / "dagster_home"
    home.mkdir()
    shutil.copy(INSTANCE_YAML, home / "dagster.yaml")
    return home


def rows(server: PostgresServer, db: str, query: str) -> list[tuple]:
    conn = psycopg2.connect(server.dsn(db), password=server.password)
    try:
        with conn.cursor() as cur:
            cur.execute(query)
            return cur.fetchall()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def stored_batch(
    postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, str]]:
    """A Dagster home on deploy/dagster.yaml against PostgreSQL (and its compute logs on a real
    S3 server), and the id of a real run of the ingestion job for batch b001 stored through it."""
    root = tmp_path_factory.mktemp("deploy_instance")
    db = postgres.create_database("dagster_deploy")
    with pytest.MonkeyPatch.context() as mp, moto_server() as s3:
        s3_client(s3).create_bucket(Bucket="dagster-logs")
        for name, value in dagster_pg_env(postgres, db).items():
            mp.setenv(name, value)
        for name, value in {"PIPELINE_COMPUTE_LOGS_BUCKET": "dagster-logs",
                            "PIPELINE_S3_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": s3,
                            "AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET,
                            }.items():  # fmt: skip
            mp.setenv(name, value)
        home = dagster_home(root)
        mp.setenv("DAGSTER_HOME", str(home))
        settings = settings_in(root / "data")
        write_lines(settings.landing_dir / "b001.jsonl", [customer()])
        with dg.DagsterInstance.from_config(str(home)) as instance:
            result = run_batch(build_definitions(settings), instance, "b001")
            assert result.success
            yield home, result.run_id


def test_deploy_instance_stores_runs_and_dynamic_partitions_in_postgres(
    postgres: PostgresServer, stored_batch: tuple[Path, str]
):
    home, run_id = stored_batch
    # A second instance object (a second process would do the same) reads it all back.
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        assert type(instance.schedule_storage).__name__ == "PostgresScheduleStorage"
        assert instance.get_dynamic_partitions(batches.name) == ["b001"]
        run = instance.get_run_by_id(run_id)
        assert run is not None and run.status == dg.DagsterRunStatus.SUCCESS
        assert run.tags["dagster/partition"] == "b001"
        event = instance.get_latest_materialization_event(dg.AssetKey("raw_customers"))
        assert event is not None and event.asset_materialization.partition == "b001"
        # Pools need global concurrency support from the event log storage.
        assert instance.event_log_storage.supports_global_concurrency_limits
    # And it is PostgreSQL that holds them, not a file under the Dagster home.
    assert rows(postgres, "dagster_deploy", "SELECT run_id FROM runs") == [(run_id,)]
    assert rows(postgres, "dagster_deploy", "SELECT partition FROM dynamic_partitions") == [
        ("b001",)
    ]
    assert not list(home.glob("**/*.db"))


def test_deploy_instance_launches_runs_in_docker_with_monitoring_and_retries(
    stored_batch: tuple[Path, str],
):
    home, _ = stored_batch
    with dg.DagsterInstance.from_config(str(home)) as instance:
        launcher = instance.run_launcher
        assert isinstance(launcher, DockerRunLauncher)
        assert launcher.networks == ["pipeline"]
        assert "volumes" not in (launcher.container_kwargs or {})  # nothing shared but S3, PG
        assert type(instance.compute_log_manager).__name__ == "S3ComputeLogManager"
        assert instance.run_monitoring_enabled
        assert instance.run_monitoring_settings["free_slots_after_run_end_seconds"] > 0
        assert instance.run_monitoring_max_runtime_seconds > 0
        assert instance.run_retries_enabled and instance.run_retries_max_retries == 1
        assert not instance.run_retries_retry_on_asset_or_op_failure
        assert instance.get_concurrency_config().pool_config.default_pool_limit == 1
        assert instance.get_concurrency_config().run_queue_config.max_concurrent_runs > 0


def test_deploy_instance_keeps_the_postgres_password_out_of_runs_and_its_config(
    postgres: PostgresServer, stored_batch: tuple[Path, str]
):
    home, run_id = stored_batch
    with dg.DagsterInstance.from_config(str(home)) as instance:
        texts = {
            "run records": repr(instance.get_run_records()),
            "run": serialize_value(instance.get_run_by_id(run_id)),
            # The launcher passes this to every run container on its command line.
            "instance ref": serialize_value(instance.get_ref()),
            "instance settings": repr(instance.get_settings("run_launcher")),
        }
    texts["runs table"] = repr(rows(postgres, "dagster_deploy", "SELECT * FROM runs"))
    texts["event log"] = repr(rows(postgres, "dagster_deploy", "SELECT event FROM event_logs"))
    assert all(postgres.password not in text for text in texts.values()), [
        where for where, text in texts.items() if postgres.password in text
    ]


def init_command() -> list[str]:
    """compose.yaml's init command as the container's shell receives it (Compose turns $$ into $)."""
    command = yaml.safe_load(COMPOSE_YAML.read_text())["services"]["init"]["command"]
    assert all(not re.search(r"(?<!\$)\$(?!\$)", part) for part in command), "no ${...} for Compose"
    return [part.replace("$$", "$") for part in command]


def test_compose_init_creates_both_databases_and_the_pool_limits_and_may_run_again(
    postgres: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    for name, value in dagster_pg_env(postgres, "init_dagster").items():
        monkeypatch.setenv(name, value)
    home = dagster_home(tmp_path)
    shared = tmp_path / "shared"
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PIPELINE_DUCKLAKE_CATALOG": postgres.dsn("init_lake").replace(
            f"user={postgres.user}", "user=lake_writer"
        ),
        "PIPELINE_DUCKLAKE_PASSWORD": "lake-writer-password",
        "PIPELINE_DUCKLAKE_DATA_PATH": "s3://lake/data",  # object storage: no folder made
        "PIPELINE_LANDING_DIR": str(shared / "landing"),
    }
    for limit in ("4", "2"):  # a second `up` runs it again, with new limits
        done = subprocess.run(
            init_command(),
            env={
                **env,
                "PIPELINE_WRITER_POOL_LIMIT": limit,
                "PIPELINE_INFERENCE_POOL_LIMIT": str(2 * int(limit)),
            },  # fmt: skip
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        with dg.DagsterInstance.from_config(str(home)) as instance:
            storage = instance.event_log_storage
            assert storage.get_concurrency_info("duckdb_writer").slot_count == int(limit)
            assert storage.get_concurrency_info("model_inference").slot_count == 2 * int(limit)
    # The catalog's own user owns the catalog's database and logs in with its own password.
    lake = psycopg2.connect(env["PIPELINE_DUCKLAKE_CATALOG"], password="lake-writer-password")
    lake.close()
    owners = rows(
        postgres,
        "postgres",
        "SELECT datname, pg_get_userbyid(datdba) FROM pg_database"
        " WHERE datname IN ('init_dagster', 'init_lake') ORDER BY datname",
    )
    assert owners == [("init_dagster", postgres.user), ("init_lake", "lake_writer")]
    # the catalog's user is no superuser and can make neither databases nor roles
    assert rows(postgres, "postgres", "SELECT rolsuper, rolcreatedb, rolcreaterole FROM pg_roles"
                " WHERE rolname = 'lake_writer'") == [(False, False, False)]  # fmt: skip
    assert (shared / "landing").is_dir() and not list(tmp_path.glob("s3*"))
    assert postgres.password not in done.stdout + done.stderr


def documented_settings() -> set[str]:
    return set(SETTING_NAME.findall((REPO / "README.md").read_text())) | SCALE_OUT_SETTINGS


def test_every_setting_the_deploy_files_name_is_one_the_project_reads():
    named = {
        path.name: set(SETTING_NAME.findall(path.read_text())) for path in FILES_NAMING_SETTINGS
    }
    unknown = {name: found - documented_settings() for name, found in named.items()}
    assert not any(unknown.values()), unknown
    assert all(named.values())


def environment(service: str) -> dict[str, str]:
    return yaml.safe_load(COMPOSE_YAML.read_text())["services"][service].get("environment", {})


def test_the_runs_get_what_the_daemon_holds_and_the_env_file_fills_every_reference():
    # The Docker run launcher fails a launch when a listed name is unset in the daemon's
    # environment; it hands the daemon's values on, so the daemon holds what runs need.
    launcher = yaml.safe_load(INSTANCE_YAML.read_text())["run_launcher"]["config"]
    assert set(launcher["env_vars"]) == set(environment("daemon"))
    assert set(launcher["env_vars"]) >= SCALE_OUT_SETTINGS
    # every ${NAME} of compose.yaml is a name of the env file, and every name there is used
    env_file = set(re.findall(r"^(PIPELINE_[A-Z0-9_]+)=", ENV_EXAMPLE.read_text(), re.M))
    referenced = set(re.findall(r"\$\{(PIPELINE_[A-Z0-9_]+)", COMPOSE_YAML.read_text()))
    assert referenced == env_file


def test_compose_shares_no_volume_and_gives_each_service_only_its_secrets():
    compose = yaml.safe_load(COMPOSE_YAML.read_text())
    services = compose["services"]
    assert {"postgres", "init", "code-server", "webserver", "daemon"} <= set(services)
    assert "healthcheck" in services["postgres"]
    # PostgreSQL's own data; the daemon reaches Docker to start runs; nothing else is mounted
    mounts = {name: service.get("volumes", []) for name, service in services.items()}
    assert mounts == {
        "postgres": ["pipeline_postgres:/var/lib/postgresql/data"],
        "init": [], "code-server": [], "webserver": [],
        "daemon": ["/var/run/docker.sock:/var/run/docker.sock"],
    }  # fmt: skip
    assert set(compose["volumes"]) == {"pipeline_postgres"}
    launcher = yaml.safe_load(INSTANCE_YAML.read_text())["run_launcher"]["config"]
    assert compose["networks"]["pipeline"]["name"] == launcher["network"]
    assert "--container-image" in services["code-server"]["command"]
    for name in ("init", "code-server", "webserver", "daemon"):
        assert "env_file" not in services[name], name  # never every secret to every service
    for secret, allowed in SECRETS.items():
        holders = {name for name in services if secret in environment(name)}
        assert holders == allowed, secret
    assert services["init"]["restart"] == "no"


def secret_values(node: object, key: str = "") -> Iterator[tuple[str, object]]:
    """(key, value) for every value in a YAML document whose key (or KEY=value) names a secret."""
    secret = re.compile(r"password|passwd|api_?key|token|secret(?!name)", re.I)
    if isinstance(node, dict):
        for k, v in node.items():
            if secret.search(str(k)) and not isinstance(v, dict | list):
                yield str(k), v
            yield from secret_values(v, str(k))
    elif isinstance(node, list):
        for item in node:
            yield from secret_values(item, key)
    elif isinstance(node, str) and "=" in node and secret.search(node.split("=", 1)[0]):
        yield node.split("=", 1)


def test_no_deploy_file_holds_a_password():
    for path in COMMITTED_DEPLOY_FILES:
        assert "pg-Secret" not in path.read_text(), path
    for path in (COMPOSE_YAML, INSTANCE_YAML, HELM_VALUES, DEPLOY / "workspace.yaml"):
        found = list(secret_values(yaml.safe_load(path.read_text())))
        # A switch (generatePostgresqlPasswordSecret: false) or nothing is fine; a value is
        # only allowed as a ${VARIABLE} that Compose fills in from .env.
        literals = [
            (k, v)
            for k, v in found
            if v not in (None, "")
            and not isinstance(v, bool)
            and not ENV_REFERENCE.fullmatch(str(v))
        ]
        assert not literals, (path.name, literals)
    # dagster.yaml reads its password from the environment.
    storage = yaml.safe_load(INSTANCE_YAML.read_text())["storage"]["postgres"]["postgres_db"]
    assert storage["password"] == {"env": "PIPELINE_DAGSTER_PG_PASSWORD"}
    assert storage["scheme"] == "postgresql+psycopg2"
    # The example env file holds placeholders only.
    example = dict(re.findall(r"^(\w+)=(.*)$", ENV_EXAMPLE.read_text(), re.M))
    for name, value in example.items():
        if re.search(r"PASSWORD|API_KEY|TOKEN|SECRET", name):
            assert value == "" or value.startswith("change-me"), name
