"""The stages' policies in one place: retries, pools, the per-batch automation condition, freshness.

Every stage's decorator takes its retry policy, pool and automation condition from here, so
that a change of policy is one edit. What differs between deployments (the freshness windows)
comes from `Settings` and is applied by `build_definitions`, never read at import time.
"""

from __future__ import annotations

import functools
import inspect
import traceback
from collections.abc import Sequence
from datetime import timedelta

import dagster as dg
import duckdb

from pipeline_project.core.errors import ContractError
from pipeline_project.core.personal_data import mask_personal
from pipeline_project.partitions import batches
from pipeline_project.resources.warehouse import DUCKDB
from pipeline_project.tables import RAW_CUSTOMERS, VALIDATED_RECOMMENDATIONS

# Transient trouble (a lock held past the connect timeout, a file still being replaced, a
# commit conflict, a network error) clears up on its own: the step is retried. Bad data does not
# fail the step, it lands in schema_errors; errors that the same inputs raise again
# (DETERMINISTIC_ERRORS) fail it at once (see fails_at_once_when_deterministic).
STAGE_RETRY_POLICY = dg.RetryPolicy(
    max_retries=2, delay=5.0, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS
)


# Errors the same inputs and code raise again: SQL that does not bind or parse, a value that
# does not convert, a missing key or index, a failed contract. Not retried: a retry only delays
# the failure (two retries of an IndexError once cost a run 15 s and three alerts).
DETERMINISTIC_ERRORS: tuple[type[BaseException], ...] = (
    duckdb.ProgrammingError,  # binder, catalog, parser, syntax, invalid input
    duckdb.DataError,  # conversion, out of range, type mismatch
    duckdb.IntegrityError,
    duckdb.NotSupportedError,
    duckdb.InternalError,
    LookupError,  # IndexError, KeyError
    ValueError,  # a value out of its domain, a JSON or Arrow value that does not parse
    TypeError,
    AttributeError,
    ArithmeticError,
    NotImplementedError,
    ContractError,
)


def fails_at_once_when_deterministic(fn):
    """A stage whose error of DETERMINISTIC_ERRORS fails the step at once (dg.Failure with
    allow_retries=False, naming the error), instead of after its RetryPolicy's retries; other
    errors (IO, lock, network, a commit conflict) are retried as before."""

    def failure(err: BaseException) -> dg.Failure:
        # An error may quote the value it failed on (a customer's e-mail): its text and its
        # traceback reach the event log masked, and the original is not chained (Dagster would
        # record its text as the cause).
        trace = "".join(traceback.format_exception(err)[-6:])
        return dg.Failure(
            description=mask_personal(
                f"{type(err).__name__}: {str(err)[:2000]} (not retried: the same inputs would"
                f" fail the same way)\n{trace[-4000:]}"
            ),
            allow_retries=False,
        )

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def stage(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except DETERMINISTIC_ERRORS as err:
                raise failure(err) from None

        return stage

    @functools.wraps(fn)
    def single(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DETERMINISTIC_ERRORS as err:
            raise failure(err) from None

    return single


# Steps that write the warehouse share this pool; dagster_instance.yaml gives it one slot.
DUCKDB_WRITER_POOL = "duckdb_writer"
# One inference step at a time across all runs: the local model uses every core, and an API's
# rate limit is shared by every request this deployment sends.
MODEL_INFERENCE_POOL = "model_inference"


def warehouse_pool(backend: str, on_ducklake: str | None) -> str | None:
    """The pool of a stage that opens the warehouse but needs the writer pool only on the
    DuckDB file: one process at a time may open it (a reader too, while a writer has it open),
    and a lock wait given up fails the step. DuckLake has no file lock and its writer pool may
    have several slots: there the stage takes `on_ducklake` (None: no pool)."""
    return DUCKDB_WRITER_POOL if backend == DUCKDB else on_ducklake


# The assets whose freshness says "a new batch arrived": the first and the last stage.
FRESHNESS_MONITORED = (RAW_CUSTOMERS, VALIDATED_RECOMMENDATIONS)


def no_dep_blocking_check_failed() -> dg.AutomationCondition:
    """No blocking check of an upstream asset failed on its latest materialization (or its run
    is requested on this tick). Unlike all_deps_blocking_checks_passed, a check that had too
    little data to judge (no result at all, see checks/verdicts.py) holds nothing back; a
    failed one does, and a gate that fails writes nothing new downstream can read."""
    return dg.AutomationCondition.all_deps_match(
        dg.AutomationCondition.all_checks_match(
            ~dg.AutomationCondition.check_failed() | dg.AutomationCondition.will_be_requested(),
            blocking_only=True,
        ).with_label("no_blocking_check_failed")
    ).with_label("no_dep_blocking_check_failed")


def per_batch_automation(
    ignore: Sequence[str] = (),
    may_be_missing: Sequence[str] = (),
    wait_for: Sequence[str] = (),
) -> dg.AutomationCondition:
    """Run a batch's stage once its upstream landed and every blocking check upstream passed.

    `ignore`: upstream assets whose updates never re-run old batches (the catalog).
    `may_be_missing`: upstream assets that do not hold a batch back while they do not exist yet
    (the segment model, which the first batch trains), but whose updates do re-run batches.
    `wait_for`: ignored upstream assets that must exist before the stage runs (the catalog).
    """
    condition = dg.AutomationCondition.eager() & no_dep_blocking_check_failed()
    if may_be_missing:
        condition = condition.replace(
            "any_deps_missing",
            dg.AutomationCondition.any_deps_missing().ignore(
                dg.AssetSelection.assets(*may_be_missing)
            ),
        )
    if ignore:
        condition = condition.ignore(dg.AssetSelection.assets(*ignore))
    if wait_for:
        missing = dg.AutomationCondition.any_deps_missing().allow(
            dg.AssetSelection.assets(*wait_for)
        )
        condition = condition & ~missing
    return condition


def batch_stage(group_name: str, pool: str = DUCKDB_WRITER_POOL) -> dict:
    """The decorator arguments every per-batch stage shares."""
    return {
        "partitions_def": batches,
        "pool": pool,
        "retry_policy": STAGE_RETRY_POLICY,
        "group_name": group_name,
    }


# Dagster refuses freshness windows under a minute; the freshness alert has no such floor.
_SHORTEST_FRESHNESS_WINDOW = timedelta(minutes=1)


def freshness_policy(warn_hours: float, fail_hours: float) -> dg.FreshnessPolicy:
    """A new batch is expected at least every `warn_hours` (WARN) / `fail_hours` (FAIL).

    For the UI only: the freshness_alert_sensor does not trust Dagster's freshness state, which
    judges the latest materialization of any partition, so that a re-materialized old batch (a
    retrain cascade, a replay, a backfill) looks fresh although no new batch arrived (dagster
    discussion #34023). The sensor judges the arrival of the newest new batch instead.
    """
    fail = max(timedelta(hours=fail_hours), _SHORTEST_FRESHNESS_WINDOW)
    warn = max(timedelta(hours=min(warn_hours, fail_hours)), _SHORTEST_FRESHNESS_WINDOW)
    return dg.FreshnessPolicy.time_window(fail_window=fail, warn_window=min(warn, fail))
