"""A run worker of its own for a test: every stage of one batch, with the settings of the
environment (PIPELINE_*) and the Dagster instance of DAGSTER_HOME, as a deployed worker runs it.

    python -m pipeline_project_tests.batch_child BATCH_ID

Prints one JSON line: whether the run succeeded.
"""

from __future__ import annotations

import json
import sys

import dagster as dg

from pipeline_project.definitions import build_definitions
from pipeline_project.resources.embeddings import HashingEmbedder


def main(batch_id: str) -> None:
    defs = build_definitions(embedder=HashingEmbedder(dimensions=32))
    with dg.DagsterInstance.get() as instance:
        result = defs.resolve_job_def("batch_pipeline_job").execute_in_process(
            partition_key=batch_id, instance=instance, raise_on_error=False
        )
    print(json.dumps({"success": result.success}))


if __name__ == "__main__":
    main(sys.argv[1])
