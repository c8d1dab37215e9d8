"""Dagster's column-schema-change checks on every table asset.

Each compares the columns of the table's latest two materializations (every materialization
reports the columns as stored, see asset_metadata.py). They run with the hourly
`pipeline_health_job`, not in each batch's run: under the multiprocess executor they would be one
more step process, seconds of start-up, in every run.
"""

import warnings

import dagster as dg

from pipeline_project.asset_metadata import TABLE_ASSETS

with warnings.catch_warnings():
    # Beta, and the only way to Dagster's own check; its warning says nothing a user can act on.
    warnings.simplefilter("ignore", dg.BetaWarning)
    COLUMN_SCHEMA_CHECKS = dg.build_column_schema_change_checks(assets=sorted(TABLE_ASSETS))
