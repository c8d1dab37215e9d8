"""pipeline_project: a partitioned, validated, monitored AI data pipeline on Dagster and DuckDB."""

import os
import warnings

# The one preview API in use on purpose: a partitions_def on asset check specs, the only way to
# keep one check result per batch (see checks/input_checks.py). Its warning, raised when the
# check modules are imported, says nothing a user of the CLI or the UI can act on, so it is kept
# out of their terminals. The test suite sets PIPELINE_SHOW_PREVIEW_WARNINGS=1 (conftest.py)
# and asserts that Dagster still raises it, so the day the API is stable the filter goes.
PREVIEW_WARNING_ON_PURPOSE = "Specifying a partitions_def on an AssetCheckSpec is currently in"
if os.environ.get("PIPELINE_SHOW_PREVIEW_WARNINGS", "") not in ("1", "true"):
    warnings.filterwarnings("ignore", message=PREVIEW_WARNING_ON_PURPOSE)
