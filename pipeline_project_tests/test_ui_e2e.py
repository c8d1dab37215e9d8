"""End to end through the real UI path: `dagster dev` (webserver + daemon) on 127.0.0.1 with a
temporary Dagster home and DuckDB file, driven through the GraphQL API the UI uses."""

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest

from pipeline_project.definitions import build_definitions
from pipeline_project.instance import write_instance_yaml
from pipeline_project.resources import Warehouse
from pipeline_project.resources.alerts import AlertStore
from pipeline_project.sample_data import generate_batch, write_catalog
from pipeline_project.settings import Settings
from pipeline_project_tests.browser import (
    INSTALL_HINT,
    REQUIRE_BROWSER,
    chromium_path,
    drawn,
    graph_labels,
    ui_page,
)
from pipeline_project_tests.dagster_dev import (
    DagsterDev,
    running_ui,
    wait_for,
)

CLI = Path(sys.executable).parent / "pipeline-project"
REPO = Path(__file__).resolve().parents[1]
# What the backfill (customer_segments) and the replay (customer_embeddings) could change.
# Not recommendations: automation re-runs them after the backfill, and a batch's segment
# affinities come from every batch segmented so far, so they may move as b002 lands.
BATCH_TABLES = ["customers", "customer_embeddings", "customer_segments"]


@pytest.fixture(scope="module")
def dagster_dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DagsterDev]:
    """One `dagster dev` for the module: the browser test reads the graph first, then the
    scenario runs the batches."""
    tmp_path = tmp_path_factory.mktemp("ui")
    home = tmp_path / "dagster_home"
    write_instance_yaml(home)
    data = tmp_path / "data"
    pipeline_env = {
        "PIPELINE_LANDING_DIR": str(tmp_path / "landing"),
        "PIPELINE_DUCKDB_PATH": str(data / "warehouse.duckdb"),
        "PIPELINE_ALERTS_DUCKDB_PATH": str(data / "alerts.duckdb"),
        "PIPELINE_CATALOG_PATH": str(data / "catalog.csv"),
        "PIPELINE_DUCKDB_MEMORY_LIMIT": "256MB",
        "PIPELINE_EMBEDDING_BACKEND": "hashing",  # the model's speed is not under test here
        "PIPELINE_ALERT_SENSOR_INTERVAL_SECONDS": "5",
    }
    settings = Settings.from_env(pipeline_env)  # what `dagster dev` reads from them
    # Two good batches and a bad one (error rate above the hard ceiling) are in the landing
    # folder when the user starts the UI: the sensor's first tick finds them.
    catalog = write_catalog(settings.landing.catalog_path, seed=1)
    for number, bad_rate in ((1, 0.03), (2, 0.03), (3, 0.9)):
        batch_file = settings.landing.landing_dir / f"b00{number}.jsonl"
        generate_batch(batch_file, 300, bad_rate, number, catalog)
    env = {"DAGSTER_HOME": str(home), **pipeline_env}
    # From the project's folder, as a user would: `pipeline-project ui` becomes `dg dev`.
    with running_ui(tmp_path, env, settings, folder=REPO) as dev:
        yield dev
    # no lock left on the file
    with duckdb.connect(str(settings.warehouse.duckdb_path)) as conn:
        conn.execute("SELECT 1").fetchall()


def batch_tables(settings: Settings) -> dict[str, list[tuple]]:
    """The good batches' rows (load timestamps left out), read while the daemon may write."""
    warehouse = Warehouse(database=str(settings.warehouse.duckdb_path))
    tables = {}
    with warehouse.get_connection() as conn:
        for table in BATCH_TABLES:
            columns = [
                name for name, kind, *_ in conn.execute(f"DESCRIBE {table}").fetchall()
                if "TIMESTAMP WITH TIME ZONE" not in kind or name in ("created_at",)
            ]  # fmt: skip
            tables[table] = conn.execute(
                f"SELECT {', '.join(columns)} FROM {table}"
                " WHERE batch_id IN ('b001', 'b002') ORDER BY ALL"
            ).fetchall()
    return tables


@pytest.mark.slow
def test_every_asset_of_the_definitions_is_drawn_in_the_graph_of_a_real_browser(dagster_dev):
    executable = chromium_path()
    if executable is None:
        if os.environ.get(REQUIRE_BROWSER):
            pytest.fail(f"{REQUIRE_BROWSER} is set but there is {INSTALL_HINT}")
        pytest.skip(INSTALL_HINT)
    defs = build_definitions(dagster_dev.settings)
    graph = defs.resolve_asset_graph()
    assets = {key.to_user_string() for key in graph.get_all_asset_keys()}
    groups = {graph.get(key).group_name for key in graph.get_all_asset_keys()}
    with ui_page(executable) as page:
        page.goto(f"{dagster_dev.url}/asset-groups")
        page.locator("svg foreignObject").first.wait_for(timeout=60_000)
        page.keyboard.press("Alt+e")  # the graph's "Expand all groups"
        labels: list[str] = []

        def every_asset_drawn() -> bool:
            labels[:] = graph_labels(page)
            for group in groups & set(labels):  # a group's box is labelled with its name
                labels.remove(group)
            return all(drawn(asset, labels) for asset in assets)

        wait_for("every asset drawn in the graph", every_asset_drawn, timeout=60)
    assert not [a for a in assets if not drawn(a, labels)]
    assert len(labels) == len(assets)  # and nothing else: no stub or unknown asset


@pytest.mark.slow
def test_landing_automation_backfill_bad_batch_checks_and_freshness_through_the_ui(dagster_dev):
    dev, settings = dagster_dev, dagster_dev.settings

    # the landing sensor registers the batches and runs them; automation carries the good ones
    # to validated recommendations
    good = ["b001", "b002"]
    wait_for(
        "validated recommendations of b001 and b002, and no run in progress",
        lambda: dev.materialized("validated_recommendations", good) == good and dev.idle(),
        timeout=480,  # three batches through every stage, a process per step, on 2 cores
    )
    ingestion = {
        run["tags"]["dagster/partition"]: run["status"]
        for run in dev.runs()
        if run["jobName"] == "batch_ingestion_job"
    }
    assert ingestion == {"b001": "SUCCESS", "b002": "SUCCESS", "b003": "FAILURE"}
    automated = [r for r in dev.runs() if r["tags"].get("dagster/sensor_name") ==
                 "pipeline_automation_sensor"]  # fmt: skip
    assert automated and all(r["status"] == "SUCCESS" for r in automated)
    assert {r["tags"]["dagster/partition"] for r in automated} == set(good)

    # the bad batch: the blocking check failed, nothing downstream ran, an alert row is stored
    checks = dev.asset_node(
        "customers",
        "assetChecksOrError { ... on AssetChecks { checks { name partitionStatuses {"
        " ... on AssetCheckDefaultPartitionStatuses { succeededPartitions failedPartitions }"
        " } } } }",
    )["assetChecksOrError"]["checks"]
    statuses = {c["name"]: c["partitionStatuses"] for c in checks}
    ceiling = statuses["schema_error_rate_below_hard_ceiling"]
    assert sorted(ceiling["succeededPartitions"]) == good
    assert ceiling["failedPartitions"] == ["b003"]
    assert sorted(statuses["rows_conserved"]["succeededPartitions"]) == ["b001", "b002", "b003"]
    assert dev.materialized("customer_embeddings", ["b003"]) == []
    alerts = wait_for("an alert for b003", lambda: _alerts_for(settings, "b003"), timeout=120)
    assert any("b003" in message for _, message in alerts)

    # freshness, as the UI's asset page shows it
    freshness = wait_for(
        "a freshness state",
        lambda: _freshness(dev, "raw_customers"),
        timeout=120,
    )
    assert freshness == "HEALTHY"

    # a backfill of one stage for both batches, as the UI's backfill dialog launches it
    before = batch_tables(settings)
    launched = dev.graphql(
        "mutation($params: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams:"
        " $params) { __typename ... on LaunchBackfillSuccess { backfillId }"
        " ... on PythonError { message } } }",
        params={"partitionNames": good, "assetSelection": [{"path": ["customer_segments"]}]},
    )["launchPartitionBackfill"]
    assert launched["__typename"] == "LaunchBackfillSuccess", launched
    status = wait_for(
        "the backfill to finish",
        lambda: _backfill_status(dev, launched["backfillId"]),
    )
    assert status == "COMPLETED_SUCCESS"
    backfill_runs = [r for r in dev.runs() if r["tags"].get("dagster/backfill") ==
                     launched["backfillId"]]  # fmt: skip
    assert {r["tags"]["dagster/partition"] for r in backfill_runs} == set(good)
    assert all(r["status"] == "SUCCESS" for r in backfill_runs)
    assert batch_tables(settings) == before

    # the dead-letter replay job, launched for one batch as from the UI's launchpad (its
    # default config selects the replay); b001 has no dead letters, so it changes nothing
    launched = dev.graphql(
        "mutation($params: ExecutionParams!) { launchRun(executionParams: $params) {"
        " __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message }"
        " ... on RunConfigValidationInvalid { errors { message } } } }",
        params={
            "selector": {
                "repositoryLocationName": "pipeline_project.definitions",
                "repositoryName": "__repository__",
                "jobName": "dead_letter_replay_job",
            },
            "executionMetadata": {"tags": [{"key": "dagster/partition", "value": "b001"}]},
        },
    )["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]
    status = wait_for("the replay run", lambda: _finished(dev, run_id), timeout=120)
    assert status == "SUCCESS"
    [replay] = [m for m in _materializations(dev, "customer_embeddings", "b001")
                if m["runId"] == run_id]  # fmt: skip
    assert replay["mode"] == "dead-letter replay" and replay["replay_candidates"] == 0
    assert batch_tables(settings) == before


def _alerts_for(settings: Settings, batch_id: str) -> list[tuple]:
    if not settings.alerts.alerts_duckdb_path.exists():
        return []
    with AlertStore(database=str(settings.alerts.alerts_duckdb_path)).get_connection() as conn:
        return conn.execute(
            "SELECT monitor, message FROM alerts WHERE message LIKE '%' || ? || '%'", [batch_id]
        ).fetchall()


def _freshness(dev: DagsterDev, asset: str) -> str | None:
    info = dev.asset_node(asset, "freshnessStatusInfo { freshnessStatus }")
    state = (info.get("freshnessStatusInfo") or {}).get("freshnessStatus")
    return None if state in (None, "UNKNOWN") else state


def _finished(dev: DagsterDev, run_id: str) -> str | None:
    [run] = [r for r in dev.runs() if r["runId"] == run_id]
    return run["status"] if run["status"] in ("SUCCESS", "FAILURE", "CANCELED") else None


def _materializations(dev: DagsterDev, asset: str, partition: str) -> list[dict]:
    """The partition's materializations: run ID and the metadata values."""
    events = dev.graphql(
        "query($path: [String!]!, $parts: [String!]!) { assetOrError(assetKey: {path: $path})"
        " { ... on Asset { assetMaterializations(partitions: $parts) { runId metadataEntries {"
        " label ... on TextMetadataEntry { text } ... on IntMetadataEntry { intValue } } } } } }",
        path=[asset],
        parts=[partition],
    )["assetOrError"]["assetMaterializations"]
    return [
        {"runId": e["runId"], **{
            m["label"]: m.get("text", m.get("intValue")) for m in e["metadataEntries"]}}
        for e in events
    ]  # fmt: skip


def _backfill_status(dev: DagsterDev, backfill_id: str) -> str | None:
    status = dev.graphql(
        "query($id: String!) { partitionBackfillOrError(backfillId: $id) {"
        " ... on PartitionBackfill { status } } }",
        id=backfill_id,
    )["partitionBackfillOrError"]["status"]
    return None if status in ("REQUESTED",) else status
