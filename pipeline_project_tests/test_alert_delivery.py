"""Webhook delivery: a budget per tick or step, deferred (pending) alerts delivered later exactly
once, and the webhook URL kept secret everywhere Dagster or the project shows something."""

import json
import logging
import time
import warnings
from dataclasses import replace

import dagster as dg
import duckdb
import pytest
from dagster._core.remote_representation.external_data import (
    RepositorySnap,
    ResourceConfigEnvVarSnap,
)
from dagster._serdes import serialize_value

from pipeline_project.definitions import build_definitions
from pipeline_project.partitions import batches
from pipeline_project.resources import AlertSink
from pipeline_project.sensors.alerting import (
    alert_delivery_sensor,
    alert_finished_run,
    error_rate_alert_sensor,
)
from pipeline_project_tests.helpers import free_port, run_batch, write_lines
from pipeline_project_tests.test_alerts import Hook

WEBHOOK_VARIABLE = "PIPELINE_ALERT_WEBHOOK_URL"
# A Slack-like incoming-webhook path: the path is the credential.
SECRET_PATH = "/services/T000SECRET/B000SECRET/XXXXSECRETTOKEN"
SECRET_PARTS = ("T000SECRET", "B000SECRET", "XXXXSECRETTOKEN")


def statuses(sink: AlertSink) -> list[tuple[str, str]]:
    with duckdb.connect(sink.database, read_only=True) as conn:
        return conn.execute(
            "SELECT alert_key, webhook_status FROM alerts ORDER BY created_at, alert_key"
        ).fetchall()


def bad_batches(instance, n: int) -> list[str]:
    """n batches whose embeddings report a 50% error rate: n alerts in one sensor tick."""
    keys = [f"b{i}" for i in range(n)]
    for batch_id in keys:
        instance.report_runless_asset_event(
            dg.AssetMaterialization(
                "customer_embeddings",
                partition=batch_id,
                metadata={"error_rate": 0.5, "error_rate_threshold": 0.05},
            )
        )
    return [f"error_rate:customer_embeddings:{b}" for b in keys]


def tick(sensor, instance, sink, cursor=None):
    """One sensor tick as the daemon runs it (the resource is set up anew for each tick)."""
    started = time.monotonic()
    with dg.build_sensor_context(
        instance=instance, resources={"alerts": sink}, cursor=cursor
    ) as context:
        result = sensor(context)
    return result, time.monotonic() - started


# ---- a budget per tick: a stalled webhook defers the rest, a later tick delivers them ----


def test_a_burst_against_a_stalled_webhook_stays_well_inside_the_sensor_timeout(instance, tmp_path):
    """Ten alerts in one tick, the webhook accepts and never answers: the first delivery times
    out (3 attempts of 1 s) and waits as pending, the nine others are stored as pending at once. Once the webhook
    answers again, the delivery sensor posts each pending alert exactly once."""
    hook = Hook().stalled()
    with hook.running() as url:
        sink = AlertSink(database=str(tmp_path / "alerts.duckdb"), webhook_url=url,
                         webhook_timeout_seconds=1.0, webhook_attempts=3)  # fmt: skip
        keys = bad_batches(instance, 10)
        _, elapsed = tick(error_rate_alert_sensor, instance, sink)
        print(f"tick with ten alerts against a stalled webhook: {elapsed:.1f} s")
        assert elapsed < 10  # was 10 x (3 x 1 s + back-off) = 35 s and more; 60 s fails a tick
        stored = dict(statuses(sink))
        assert sorted(stored) == sorted(keys)  # every alert is stored
        pending = [k for k, s in stored.items() if s == "pending"]
        assert len(pending) == 10  # the one that failed waits with the nine deferred
        assert len({b["key"] for b in hook.bodies}) == 1 and len(hook.bodies) == 3
        assert hook.answered == []

        tick(alert_delivery_sensor, instance, sink)  # still stalled: one attempt, nothing lost
        assert sorted(k for k, s in statuses(sink) if s == "pending") == sorted(pending)

        hook.recover()
        result, _ = tick(alert_delivery_sensor, instance, sink)
        assert "10 delivered" in result.skip_message
        tick(alert_delivery_sensor, instance, sink)  # nothing left to deliver
        tick(error_rate_alert_sensor, instance, sink)
    assert sorted(b["key"] for b in hook.answered) == sorted(pending)  # each exactly once
    assert dict(statuses(sink)) == {k: "delivered" for k in pending}


def test_once_the_budget_is_spent_the_rest_waits_for_a_later_tick(instance, tmp_path):
    """A slow webhook that does answer (0.5 s each), 1 s timeout, 2 s budget: a delivery
    starts only while a whole attempt fits in what is left, so at most three are delivered in
    the tick and the rest waits for the delivery sensor's later ticks, each delivered once."""
    hook = Hook(hang=0.5)
    with hook.running() as url:
        sink = AlertSink(database=str(tmp_path / "alerts.duckdb"), webhook_url=url,
                         webhook_timeout_seconds=1.0, delivery_budget_seconds=2.0)  # fmt: skip
        keys = bad_batches(instance, 6)
        _, elapsed = tick(error_rate_alert_sensor, instance, sink)
        assert elapsed < 4.5  # the budget, one last attempt's timeout, and the tick's own work
        first_tick = [s for _, s in statuses(sink)]
        assert 1 <= first_tick.count("delivered") <= 3
        assert first_tick.count("pending") == 6 - first_tick.count("delivered")
        while any(s == "pending" for _, s in statuses(sink)):
            tick(alert_delivery_sensor, instance, sink)
    assert sorted(b["key"] for b in hook.answered) == sorted(keys)


def test_an_alert_inside_a_run_cannot_hold_its_step_past_the_budget(instance, tmp_path):
    """The run path: a step that raises alerts while the webhook is stalled finishes within its
    delivery budget (2 s) although one POST may wait 5 s (the default timeout) three times."""
    hook = Hook().stalled()

    @dg.asset(partitions_def=batches)
    def customers(context: dg.AssetExecutionContext, alerts: AlertSink) -> None:
        for asset in ("customers", "customer_purchases", "schema_errors"):
            alerts.alert_error_rate(asset=asset, batch_id=context.partition_key, rate=1.0,
                                    threshold=0.05, log=context.log,
                                    run_id=context.run.run_id)  # fmt: skip

    with hook.running() as url:
        sink = AlertSink(database=str(tmp_path / "alerts.duckdb"), webhook_url=url,
                         delivery_budget_seconds=2.0)  # fmt: skip
        instance.add_dynamic_partitions("batches", ["b1"])
        started = time.monotonic()
        result = dg.materialize(
            [customers], partition_key="b1", instance=instance, resources={"alerts": sink}
        )
        elapsed = time.monotonic() - started
    assert result.success
    print(f"step with three alerts against a stalled webhook: {elapsed:.1f} s")
    assert elapsed < 8
    assert sorted(s for _, s in statuses(sink)) == ["pending"] * 3


# ---- the webhook URL is a secret ----


def assert_secret_absent(text: str, where: str) -> None:
    for part in SECRET_PARTS:
        assert part not in text, f"{part} shows in {where}"


@pytest.mark.parametrize("answer", [200, 500, "refused"])
def test_the_webhook_url_shows_nowhere(instance, settings, monkeypatch, caplog, answer):
    """Configured the deployed way (PIPELINE_ALERT_WEBHOOK_URL), used by a run, the CLI's call
    and a sensor, answered 200 or 500 or not at all: no part of the secret path shows in the
    resource config Dagster serves the UI, the runs' event logs, the alerts table, the captured
    logs (urllib3's debug lines included) or the outcomes."""
    hook = Hook(status=answer if answer != "refused" else 200, path=SECRET_PATH)
    with hook.running() as served:
        url = served if answer != "refused" else f"http://127.0.0.1:{free_port()}{SECRET_PATH}"
        monkeypatch.setenv(WEBHOOK_VARIABLE, url)
        settings = replace(settings, alerts=replace(settings.alerts, webhook_configured=True))
        assert_secret_absent(repr(settings), "the settings' repr")
        settings.landing.landing_dir.mkdir(parents=True, exist_ok=True)
        defs = build_definitions(settings)
        sink = defs.resources["alerts"]
        assert sink.webhook_url == dg.EnvVar(WEBHOOK_VARIABLE)  # the name, never the value

        with warnings.catch_warnings():  # the snapshot reads a property Dagster deprecated
            warnings.simplefilter("ignore", DeprecationWarning)
            snapshot = RepositorySnap.from_def(defs.get_repository_def())
        [resource] = [r for r in snapshot.resources if r.name == "alerts"]
        assert resource.configured_values["webhook_url"] == ResourceConfigEnvVarSnap(
            name=WEBHOOK_VARIABLE
        )
        assert_secret_absent(serialize_value(resource), "the resource config the UI shows")

        caplog.set_level(logging.DEBUG)
        write_lines(settings.landing_dir / "bad.jsonl", ["{", "[]", "{oops"])
        failed = run_batch(defs, instance, "bad")
        alert_finished_run(instance, failed.dagster_run, sink)  # the CLI's call

        @dg.asset(partitions_def=batches, name="customer_embeddings")
        def stage(context: dg.AssetExecutionContext, alerts: AlertSink) -> dg.MaterializeResult:
            outcome = alerts.alert_error_rate(
                asset="customer_embeddings", batch_id=context.partition_key, rate=0.9,
                threshold=0.05, log=context.log, run_id=context.run.run_id,
            )  # fmt: skip
            assert_secret_absent(repr(alerts), "the resource's repr")
            return dg.MaterializeResult(
                metadata={"error_rate": 0.9, "error_rate_threshold": 0.05, "outcome": str(outcome)}
            )

        instance.add_dynamic_partitions("batches", ["b1"])
        alerted = dg.materialize([stage], partition_key="b1", instance=instance,
                                 resources={"alerts": sink})  # fmt: skip
        assert alerted.success
        bad_batches(instance, 2)  # and alerts raised by a sensor
        tick(error_rate_alert_sensor, instance, sink)

    if answer != "refused":  # the secret URL was used
        assert hook.paths and set(hook.paths) == {SECRET_PATH}
    for run in (failed, alerted):
        for record in instance.all_logs(run.run_id):
            assert_secret_absent(serialize_value(record), f"the event log of {run.run_id}")
    with duckdb.connect(str(settings.alerts_duckdb_path), read_only=True) as conn:
        rows = conn.execute("SELECT * FROM alerts").fetchall()
    assert len(rows) >= 3
    assert_secret_absent(str(rows), "the alerts table")
    if answer != 200:
        assert all("failed after" in str(r) or "pending" in str(r) for r in rows)
    if answer != "refused":  # urllib3 logged each POST, with the path hidden
        assert '"POST *** HTTP/1.1"' in caplog.text
    assert_secret_absent(caplog.text, "the captured logs")
    assert_secret_absent(
        json.dumps([(r.getMessage(), r.exc_text) for r in caplog.records], default=str), "logs"
    )
