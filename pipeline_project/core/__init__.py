"""Plain functions with the pipeline's logic; no Dagster in here, so each is testable alone."""
