from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
import yaml

from pipeline_project.definitions import build_definitions, build_resources
from pipeline_project.instance import INSTANCE_TEMPLATE
from pipeline_project.sample_data import Catalog, write_catalog
from pipeline_project.settings import Settings
from pipeline_project_tests.helpers import settings_in


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return settings_in(tmp_path)


@pytest.fixture
def catalog(settings: Settings) -> Catalog:
    return write_catalog(settings.catalog_path, seed=1)


@pytest.fixture
def defs(settings: Settings) -> dg.Definitions:
    settings.landing_dir.mkdir(parents=True, exist_ok=True)
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


# The longest modules start first, so that the two workers (see pyproject.toml) end together.
LONGEST_FIRST = ["test_ui_e2e.py", "test_crash_safety.py", "test_cli.py"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order inside a module is kept
