"""pipeline_project: a partitioned, validated, monitored AI data pipeline on Dagster and DuckDB."""
