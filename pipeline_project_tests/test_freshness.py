"""Freshness alerts judge "no new batch for X hours", not Dagster's per-asset freshness state.

Dagster judges freshness per asset, not per partition (dagster discussion #34023): a
re-materialized old batch (a retrain cascade, a replay, a backfill) makes an asset look fresh
although no new data arrived. The sensor therefore tracks when each monitored asset last got a
batch it never had before (the first materialization of a partition).

Without the freshness daemon (as in these tests) the stored freshness state stays UNKNOWN, so
a sensor reading it never fires at all; to show that trusting it would also resolve wrongly,
the test records the PASS the daemon would store after the re-materialization of the old batch.
"""

import json
import time
from dataclasses import replace

import dagster as dg
import duckdb
from dagster._core.definitions.freshness import FreshnessState, FreshnessStateChange

from pipeline_project.definitions import build_resources
from pipeline_project.sensors.alerting import (
    CADENCE_ARRIVALS,
    freshness_alert_sensor,
    freshness_limits,
)
from pipeline_project.settings import FreshnessSettings

FINAL = "validated_recommendations"
# In hours: WARN after 1.1 s, FAIL after 2.5 s without a new batch.
WARN_HOURS, FAIL_HOURS = 1.1 / 3600, 2.5 / 3600


def alerts(settings) -> list[tuple[str, str]]:
    if not settings.alerts_duckdb_path.exists():
        return []
    with duckdb.connect(str(settings.alerts_duckdb_path), read_only=True) as conn:
        return conn.execute("SELECT alert_key, status FROM alerts ORDER BY created_at").fetchall()


def materialized(instance, batch_id: str, asset: str = FINAL) -> None:
    instance.report_runless_asset_event(dg.AssetMaterialization(asset, partition=batch_id))


def dagster_says(instance, state: FreshnessState) -> None:
    """What the freshness daemon records: Dagster's per-asset verdict."""
    instance._report_runless_asset_event(  # noqa: SLF001
        asset_event=FreshnessStateChange(
            key=dg.AssetKey(FINAL), new_state=state, previous_state=FreshnessState.UNKNOWN,
            state_change_timestamp=time.time(),
        )
    )  # fmt: skip


class Sensor:
    """Ticks the freshness sensor the way the daemon does: each tick gets the last cursor."""

    def __init__(self, instance, settings) -> None:
        settings = replace(settings, freshness=FreshnessSettings(WARN_HOURS, FAIL_HOURS))
        self.instance, self.alerts, self.cursor = (
            instance,
            build_resources(settings)["alerts"],
            None,
        )

    def tick(self) -> str:
        with dg.build_sensor_context(
            instance=self.instance, resources={"alerts": self.alerts}, cursor=self.cursor
        ) as context:
            result = freshness_alert_sensor(context)
        if isinstance(result, dg.SkipReason):  # a sensor that keeps no cursor
            return result.skip_message
        self.cursor = result.cursor
        return result.skip_reason.skip_message


def test_a_re_materialized_old_batch_does_not_make_the_final_asset_fresh(instance, settings):
    sensor = Sensor(instance, settings)
    instance.add_dynamic_partitions("batches", ["b1", "b2"])
    assert "UNKNOWN" in sensor.tick()  # nothing arrived yet: no verdict, no alert
    materialized(instance, "b1")
    sensor.tick()
    assert alerts(settings) == []  # b1 just arrived
    time.sleep(1.3)
    sensor.tick()
    assert alerts(settings) == [(f"freshness:{FINAL}:warn", "firing")]
    time.sleep(1.4)
    sensor.tick()  # WARN turned FAIL: an alert of its own
    assert alerts(settings)[-1] == (f"freshness:{FINAL}:fail", "firing")

    materialized(instance, "b1")  # the backfill of an old batch, and Dagster's verdict on it
    dagster_says(instance, FreshnessState.PASS)
    sensor.tick()
    assert alerts(settings) == [(f"freshness:{FINAL}:warn", "firing"),
                                (f"freshness:{FINAL}:fail", "firing")]  # fmt: skip

    materialized(instance, "b2")  # a new batch
    sensor.tick()
    assert sorted(alerts(settings)[2:]) == [
        (f"freshness:{FINAL}:fail", "resolved"),
        (f"freshness:{FINAL}:warn", "resolved"),
    ]


def test_the_cursor_holds_three_bounded_figures_per_monitored_asset(instance, settings):
    sensor = Sensor(instance, settings)
    instance.add_dynamic_partitions("batches", [f"b{i}" for i in range(30)])
    for i in range(30):
        materialized(instance, f"b{i}")
        materialized(instance, f"b{i % 3}")  # and replays of old ones
    sensor.tick()
    cursor = json.loads(sensor.cursor)
    assert set(cursor[FINAL]) == {"storage_id", "newest_new_batch_at", "arrivals"}
    assert len(cursor[FINAL]["arrivals"]) == CADENCE_ARRIVALS  # the last few new batches only
    assert set(cursor) <= {"raw_customers", FINAL}
    assert len(sensor.cursor) < 600


HOUR = 3600.0


def test_freshness_follows_the_observed_cadence_once_learned():
    daily = [i * 24 * HOUR for i in range(8)]
    # a daily feed is not late at 13 h (the configured 12 h would page every day)
    assert freshness_limits(daily, 12.0, 24.0)[:2] == (36.0, 72.0)
    hourly = [i * HOUR for i in range(8)]
    assert freshness_limits(hourly, 12.0, 24.0)[:2] == (1.5, 3.0)
    # one late batch moves the median little
    assert freshness_limits([*daily[:-1], daily[-1] + 30 * HOUR], 12.0, 24.0)[:2] == (36.0, 72.0)
    # too few gaps: the configured hours, and it says so
    warn, fail, chosen = freshness_limits(daily[:3], 12.0, 24.0)
    assert (warn, fail) == (12.0, 24.0) and "not learned" in chosen


def test_the_sensor_judges_a_learned_cadence_not_the_configured_hours(instance, settings):
    """Batches 0.4 s apart: late after 0.6 s (1.5 x), although the configured WARN is 1.1 s."""
    sensor = Sensor(instance, settings)
    instance.add_dynamic_partitions("batches", [f"b{i}" for i in range(4)])
    for i in range(4):
        materialized(instance, f"b{i}")
        time.sleep(0.4)
    time.sleep(0.4)  # 0.8 s since the last batch: under the configured 1.1 s
    said = sensor.tick()
    assert '"WARN"' in said, said
    assert alerts(settings) == [(f"freshness:{FINAL}:warn", "firing")]
