"""Errors that the same inputs raise again fail a step at once; transient ones are retried."""

from __future__ import annotations

import subprocess
import sys
import time

import dagster as dg
import pytest

from pipeline_project import jobs
from pipeline_project.checks.schema_checks import COLUMN_SCHEMA_CHECKS
from pipeline_project.definitions import build_resources
from pipeline_project.policies import DETERMINISTIC_ERRORS, fails_at_once_when_deterministic
from pipeline_project.resources import Warehouse
from pipeline_project.resources.embeddings import HashingEmbedder
from pipeline_project_tests.helpers import customer, run_batch, write_lines


def events(result, kind: str) -> list:
    return [e for e in result.all_events if e.event_type_value == kind]


def test_a_deterministic_error_fails_the_step_once_and_says_why(settings, defs, instance):
    write_lines(settings.landing_dir / "b1.jsonl", [customer()])
    # a chunk of no lines: the same step would fail the same way on every retry
    result = run_batch(
        defs, instance, "b1", {"ops": {"validated_customers": {"config": {"chunk_rows": 0}}}}
    )
    assert not result.success
    [failure] = events(result, "STEP_FAILURE")
    assert failure.step_key == "validated_customers"
    message = failure.step_failure_data.error.message
    assert "ValueError" in message and "not retried" in message
    assert events(result, "STEP_UP_FOR_RETRY") == []


@pytest.mark.slow
def test_a_lock_held_longer_than_the_wait_is_retried_and_then_succeeds(settings, instance):
    write_lines(settings.landing_dir / "b1.jsonl", [customer()])
    resources = build_resources(settings, HashingEmbedder(dimensions=32))
    # a wait of 1 s for the file's lock instead of 120 s (a resource built anew: a copy keeps
    # the configuration Dagster started it with)
    resources["warehouse"] = Warehouse(
        database=str(settings.duckdb_path), connect_timeout_seconds=1.0,
        connection_config={"memory_limit": settings.warehouse.memory_limit},
    )  # fmt: skip
    defs = dg.Definitions(
        assets=jobs.ASSETS, asset_checks=COLUMN_SCHEMA_CHECKS, jobs=jobs.JOBS, resources=resources
    )
    with resources["warehouse"].get_connection():
        pass  # the warehouse exists
    holder = subprocess.Popen(  # another process holds the file for 8 s
        [sys.executable, "-c", "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]);"
         " print('held', flush=True); time.sleep(8)", str(settings.duckdb_path)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    started = time.monotonic()
    result = run_batch(defs, instance, "b1")
    holder.wait(timeout=30)
    assert result.success, [
        e.step_failure_data.error.message for e in events(result, "STEP_FAILURE")
    ]
    retried = events(result, "STEP_UP_FOR_RETRY")
    assert retried and retried[0].step_key == "raw_customers"
    assert time.monotonic() - started > 8


def test_the_wrapper_lets_other_errors_through_for_the_retry_policy():
    @fails_at_once_when_deterministic
    def stage():
        raise OSError("the disk went away for a moment")
        yield  # a generator, as the stages are

    with pytest.raises(OSError):
        list(stage())

    @fails_at_once_when_deterministic
    def broken():
        raise IndexError("index 500 is out of bounds for axis 1 with size 500")

    with pytest.raises(dg.Failure) as failed:
        broken()
    assert failed.value.allow_retries is False and "IndexError" in failed.value.description
    assert issubclass(IndexError, DETERMINISTIC_ERRORS)


def test_a_deterministic_error_quoting_an_e_mail_fails_with_it_masked_and_not_chained():
    @fails_at_once_when_deterministic
    def stage():
        raise ValueError("Could not convert string 'ada.lovelace@example.com' to UUID")
        yield

    with pytest.raises(dg.Failure) as failed:
        list(stage())
    assert "ada.lovelace@example.com" not in failed.value.description
    assert "Could not convert string '<masked>' to UUID" in failed.value.description
    assert "raise ValueError" in failed.value.description  # where it came from, still
    assert failed.value.__cause__ is None and failed.value.__suppress_context__
