"""The Dagster instance the in-process benchmarks run on: the project's instance settings (pools,
run queue, retries) in a temporary Dagster home under the benchmark's folder."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import yaml


@contextmanager
def project_instance(root: Path) -> Iterator[dg.DagsterInstance]:
    """An instance in `root`/dagster_home with dagster_instance.yaml's settings."""
    from pipeline_project.instance import INSTANCE_TEMPLATE

    home = root / "dagster_home"
    home.mkdir()
    overrides = yaml.safe_load(INSTANCE_TEMPLATE.read_text())
    with dg.instance_for_test(temp_dir=str(home), overrides=overrides) as instance:
        yield instance
