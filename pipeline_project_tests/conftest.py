from __future__ import annotations

import os

# Before the project is imported: the suite sees the preview warning that users do not (see
# pipeline_project/__init__.py); pyproject.toml's filterwarnings names it as expected.
os.environ["PIPELINE_SHOW_PREVIEW_WARNINGS"] = "1"

import dataclasses
import importlib.util
import uuid
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
import yaml

from pipeline_project.definitions import build_definitions, build_resources
from pipeline_project.instance import INSTANCE_TEMPLATE
from pipeline_project.sample_data import Catalog, write_catalog
from pipeline_project.settings import Settings
from pipeline_project_tests.helpers import FAKE_KEY, buyer, settings_in, write_lines


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return settings_in(tmp_path)


@pytest.fixture
def catalog(settings: Settings) -> Catalog:
    return write_catalog(settings.landing.catalog_path, seed=1)


@pytest.fixture
def defs(settings: Settings) -> dg.Definitions:
    settings.landing.landing_dir.mkdir(parents=True, exist_ok=True)
    return build_definitions(settings)


@pytest.fixture
def resources(settings: Settings) -> dict:
    return build_resources(settings)


@pytest.fixture
def instance(tmp_path: Path) -> Iterator[dg.DagsterInstance]:
    """A persistent test instance configured like the project's own dagster.yaml."""
    overrides = yaml.safe_load(INSTANCE_TEMPLATE.read_text())
    home = tmp_path / "dagster_home"
    home.mkdir()
    with dg.instance_for_test(temp_dir=str(home), overrides=overrides) as inst:
        yield inst


@pytest.fixture(name="api_key")
def api_key_fixture(monkeypatch):
    monkeypatch.setenv("PIPELINE_OPENAI_API_KEY", FAKE_KEY)
    return FAKE_KEY


@pytest.fixture(scope="session")
def postgres():
    """One real PostgreSQL server (127.0.0.1) for the whole run, started when a test needs it."""
    from pipeline_project_tests.postgres_server import postgres_server

    with postgres_server() as server:
        yield server


@pytest.fixture(params=["duckdb", pytest.param("ducklake", marks=pytest.mark.ducklake)])
def backend_settings(request, tmp_path: Path, monkeypatch) -> Settings:
    """The project's settings in `tmp_path`, on each warehouse backend: the DuckDB file, and
    DuckLake with its catalog in a database of its own on the real PostgreSQL server (run in
    the scale-out environment)."""
    return backend_settings_in(request, tmp_path, monkeypatch, request.param)


def backend_settings_in(request, root: Path, monkeypatch, backend: str) -> Settings:
    settings = settings_in(root)
    if backend == "duckdb":
        return settings
    server = request.getfixturevalue("postgres")
    monkeypatch.setenv("PIPELINE_DUCKLAKE_PASSWORD", server.password)
    database = server.create_database(f"lake_{uuid.uuid4().hex[:12]}")
    return dataclasses.replace(
        settings,
        warehouse=dataclasses.replace(
            settings.warehouse,
            backend="ducklake",
            ducklake_catalog=server.dsn(database),
            ducklake_data_path=root / "lake",
        ),
    )


@pytest.fixture(name="four_profiles")
def four_profiles_fixture(settings, catalog):
    """Eight customers, four distinct profiles (two customers each)."""
    lines = [
        buyer(i, cat)
        for i, cat in enumerate(["books", "books", "garden", "garden", "toys", "toys"])
    ]
    lines += [
        buyer(6, "grocery", purchases=12, amount=90.0),
        buyer(7, "grocery", purchases=12, amount=90.0),
    ]
    write_lines(settings.landing_dir / "b1.jsonl", lines)


# The longest modules start first, so that the two workers (see pyproject.toml) end together.
LONGEST_FIRST = [
    "test_process_faults.py",
    "test_ui_e2e.py",
    "test_ducklake.py",
    "test_crash_safety.py",
    "test_cli.py",
]
# The DuckLake tests need the scale-out environment (DuckDB 1.5.5 and the extension wheels);
# the README's test command runs them there: `.venv-lake/bin/pytest -m ducklake`.
LAKEHOUSE_ENVIRONMENT = importlib.util.find_spec("duckdb_extension_ducklake") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order inside a module is kept
    # The container test needs root, podman and minutes: only when a marker expression names it
    # (`.venv-lake/bin/pytest -m containers`, part of the README's test command).
    if "containers" not in config.getoption("markexpr"):
        containers = [item for item in items if item.get_closest_marker("containers")]
        if containers:
            items[:] = [item for item in items if not item.get_closest_marker("containers")]
            config.hook.pytest_deselected(items=containers)
    if LAKEHOUSE_ENVIRONMENT or config.getoption("markexpr"):
        return  # asked for by a marker expression: run (and fail if they cannot run)
    lake = [item for item in items if item.get_closest_marker("ducklake")]
    if lake:
        items[:] = [item for item in items if not item.get_closest_marker("ducklake")]
        config.hook.pytest_deselected(items=lake)


def pytest_report_header(config: pytest.Config) -> str | None:
    if LAKEHOUSE_ENVIRONMENT or config.getoption("markexpr"):
        return None
    return (
        "DuckLake tests (marker ducklake) are deselected in this environment: they run in the"
        " scale-out one (.venv-lake/bin/pytest -m ducklake, part of the README's test command)"
    )


@pytest.fixture(autouse=True)
def same_api_port():
    """One loopback port per test for the OpenAI-compatible test servers: the endpoint is part
    of the embedding cache's key, and a server started again is the same API."""
    from pipeline_project_tests import openai_servers
    from pipeline_project_tests.helpers import free_port

    openai_servers.API_PORT[0] = free_port()
    yield
    openai_servers.API_PORT[0] = 0
