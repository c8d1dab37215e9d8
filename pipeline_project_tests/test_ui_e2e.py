"""End to end through the real UI path: `dagster dev` (webserver + daemon) on 127.0.0.1 with a
temporary Dagster home and DuckDB file, driven through the GraphQL API the UI uses."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import duckdb
import pytest

from pipeline_project.instance import write_instance_yaml
from pipeline_project.resources import Warehouse
from pipeline_project.resources.alerts import AlertStore
from pipeline_project.sample_data import generate_batch, write_catalog
from pipeline_project.settings import Settings
from pipeline_project_tests.helpers import free_port

CLI = Path(sys.executable).parent / "pipeline-project"
# What the backfill (customer_segments) and the replay (customer_embeddings) could change.
# Not recommendations: automation re-runs them after the backfill, and a batch's segment
# affinities come from every batch segmented so far, so they may move as b002 lands.
BATCH_TABLES = ["customers", "customer_embeddings", "customer_segments"]


def descendants(pid: int) -> set[int]:
    """Every process below `pid`, from /proc (children of children included)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(text.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


class DagsterDev:
    def __init__(self, url: str, proc: subprocess.Popen, settings: Settings):
        self.url, self.proc, self.settings = url, proc, settings

    def graphql(self, query: str, **variables) -> dict:
        request = urllib.request.Request(
            f"{self.url}/graphql",
            data=json.dumps({"query": query, "variables": variables}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            body = json.load(response)
        assert "errors" not in body, body["errors"]
        return body["data"]

    def runs(self) -> list[dict]:
        data = self.graphql(
            "{ runsOrError { ... on Runs { results { runId status jobName"
            " tags { key value } } } } }"
        )
        runs = data["runsOrError"]["results"]
        for run in runs:
            run["tags"] = {t["key"]: t["value"] for t in run.pop("tags")}
        return runs

    def idle(self) -> bool:
        active = {"QUEUED", "NOT_STARTED", "STARTING", "STARTED", "CANCELING"}
        return not any(run["status"] in active for run in self.runs())

    def asset_node(self, asset: str, fields: str) -> dict:
        query = (
            "query($path: [String!]!) { assetNodeOrError(assetKey: {path: $path})"
            f" {{ ... on AssetNode {{ {fields} }} }} }}"
        )
        return self.graphql(query, path=[asset])["assetNodeOrError"]

    def materialized(self, asset: str, partitions: list[str]) -> list[str]:
        node = self.graphql(
            "query($path: [String!]!, $parts: [String!]!) { assetNodeOrError(assetKey:"
            " {path: $path}) { ... on AssetNode { latestMaterializationByPartition("
            "partitions: $parts) { partition } } } }",
            path=[asset],
            parts=partitions,
        )["assetNodeOrError"]
        return sorted(m["partition"] for m in node["latestMaterializationByPartition"] if m)


def wait_for(what: str, condition: Callable[[], object], timeout: float = 300) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(2)


def stop(proc: subprocess.Popen) -> set[int]:
    """Stop dagster dev by its PID (SIGTERM), then any child still alive by its own PID."""
    children = descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()  # it ignored SIGTERM: the fixture fails on the return code
        proc.wait(timeout=10)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = {pid for pid in children if alive(pid)}
        for pid in left:
            os.kill(pid, sig)
        deadline = time.monotonic() + 15
        while any(alive(pid) for pid in left) and time.monotonic() < deadline:
            time.sleep(0.2)
    return children


@pytest.fixture
def dagster_dev(tmp_path: Path) -> Iterator[DagsterDev]:
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
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PIPELINE_", "DAGSTER_"))}
    env = {**base, "DAGSTER_HOME": str(home), **pipeline_env}
    port = free_port()
    log = (tmp_path / "dagster_dev.log").open("w")
    # the product's own command, with its default host: it becomes `dagster dev` (same PID)
    proc = subprocess.Popen(
        [str(CLI), "ui", "--port", str(port)],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    dev = DagsterDev(f"http://127.0.0.1:{port}", proc, settings)
    try:
        wait_for("the webserver", lambda: _answers(dev.url), timeout=120)
        assert listening_addresses(port) == {"127.0.0.1"}  # loopback only, by default
        yield dev
    finally:
        children = stop(proc)
        log.close()
        assert proc.returncode != -signal.SIGKILL, "dagster dev did not stop on SIGTERM"
        assert not any(alive(pid) for pid in children), "a child of dagster dev is still running"
        assert listening_addresses(port) == set()  # nothing listens on the port any more
        # no lock left on the file
        with duckdb.connect(str(settings.warehouse.duckdb_path)) as conn:
            conn.execute("SELECT 1").fetchall()


def listening_addresses(port: int) -> set[str]:
    """The local addresses with a listening TCP socket on `port` (from /proc/net)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                if len(address) == 8:
                    found.add(socket.inet_ntop(socket.AF_INET, bytes.fromhex(address)[::-1]))
                else:
                    words = [bytes.fromhex(address[i : i + 8])[::-1] for i in range(0, 32, 8)]
                    found.add(socket.inet_ntop(socket.AF_INET6, b"".join(words)))
    return found


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/server_info", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


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
def test_landing_automation_backfill_bad_batch_checks_and_freshness_through_the_ui(dagster_dev):
    dev, settings = dagster_dev, dagster_dev.settings

    # the landing sensor registers the batches and runs them; automation carries the good ones
    # to validated recommendations
    good = ["b001", "b002"]
    wait_for(
        "validated recommendations of b001 and b002, and no run in progress",
        lambda: dev.materialized("validated_recommendations", good) == good and dev.idle(),
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
