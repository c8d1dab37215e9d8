"""The project-local Dagster home (`.dagster_home/`), shared by `dagster dev`, the CLI and tests."""

from __future__ import annotations

import os
import shutil
from importlib.resources import files
from pathlib import Path

INSTANCE_TEMPLATE = files("pipeline_project") / "dagster_instance.yaml"


def write_instance_yaml(home: Path) -> Path:
    """Put the project's dagster.yaml into `home` (created if missing); returns its path."""
    home.mkdir(parents=True, exist_ok=True)
    target = home / "dagster.yaml"
    if not target.exists():
        with INSTANCE_TEMPLATE.open("rb") as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return target


def ensure_dagster_home(cwd: Path | None = None) -> Path:
    """Use $DAGSTER_HOME when set, else `./.dagster_home` (made with the project's settings)."""
    # DAGSTER_HOME is Dagster's own variable, not a pipeline setting: Dagster reads it to find
    # its instance, so it is read and set here, in the environment, rather than in Settings.
    if os.environ.get("DAGSTER_HOME"):
        return Path(os.environ["DAGSTER_HOME"])
    home = ((cwd or Path.cwd()) / ".dagster_home").resolve()
    write_instance_yaml(home)
    os.environ["DAGSTER_HOME"] = str(home)
    return home
