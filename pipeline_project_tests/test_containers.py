"""The scale-out deployment in real containers: the project's image built with podman,
PostgreSQL, the S3 server, the code server, the daemon and the webserver each in its own
container, and every run launched by the daemon's DockerRunLauncher as a container of its own.
No container shares a volume with another: the lake's data, the landing files, the catalog file
and the compute logs are on S3, everything else in PostgreSQL.

Needs root, podman (Debian's: see .ci/run) and the scale-out environment:
    .venv-lake/bin/pytest -m containers
The automation sensor is stopped: the runs are the ones the landing sensor starts (ingestion
and validation) and the catalog sensor's; the stages after them run the same code on the same
lake (test_ducklake.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import dagster as dg
import pytest
import yaml

from pipeline_project_tests import containers as ctr

pytestmark = pytest.mark.containers

PARALLEL_BATCHES = ["b001", "b002", "b003", "b004"]
KILLED_BATCH = "b005"
# killed inside the step that reads the raw lines and writes three tables in one transaction
KILLED_STEP = "validated_customers"
ROWS, KILLED_ROWS = 1000, 20000
BUDGET_SECONDS = 15 * 60
TIMINGS: dict[str, float] = {}
START = time.monotonic()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    assert os.geteuid() == 0, "the container test runs rootful podman (a bridge network)"
    assert shutil.which("podman") and shutil.which("mmdebstrap"), "see .ci/run: apt-get install"
    root = tmp_path_factory.mktemp("containers")
    with pytest.MonkeyPatch.context() as mp:
        # runc (crun refuses this host's hybrid cgroups) and limits the sandbox allows: the
        # project's settings for podman, never the machine's /etc/containers.
        conf = root / "containers.conf"
        conf.write_text(ctr.CONTAINERS_CONF)
        mp.setenv("CONTAINERS_CONF", str(conf))
        with ctr.timed("base image", TIMINGS):
            ctr.base_image()
        with ctr.timed("project image", TIMINGS):
            ctr.project_image(root / "build.log")
        with ctr.podman_service(root) as socket, ctr.deployment(socket, TIMINGS) as dep:
            # What runs from the host look at: Dagster's instance (the test's dagster.yaml
            # without its compute log manager: the webserver serves those) on the containers'
            # PostgreSQL, reached at its address on the bridge.
            home = root / "dagster_home"
            home.mkdir()
            config = yaml.safe_load(dep.instance_yaml)
            del config["compute_logs"]
            (home / "dagster.yaml").write_text(yaml.safe_dump(config))
            for name in ("USER", "PASSWORD", "DB", "PORT"):
                mp.setenv(f"PIPELINE_DAGSTER_PG_{name}", dep.env[f"PIPELINE_DAGSTER_PG_{name}"])
            mp.setenv("PIPELINE_DAGSTER_PG_HOST", dep.ip("postgres"))
            dep.instance = dg.DagsterInstance.from_config(str(home))
            dep.root = root
            ctr.stop_sensor(dep.web, "pipeline_automation_sensor")
            from pipeline_project.sample_data import write_catalog

            write_catalog(root / "catalog.csv", seed=3)  # the reference's catalog, on S3
            dep.s3_client.upload_file(str(root / "catalog.csv"), "landing", "catalog.csv")
            try:
                yield dep
            finally:
                dep.instance.dispose()
                (root / "daemon.log").write_text(dep.logs("daemon"))
    TIMINGS["total"] = round(time.monotonic() - START, 1)
    print(f"\ncontainer test timings (s): {json.dumps(TIMINGS)}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same batch files run one after another, in this process, on the file backend."""
    from pipeline_project.definitions import build_definitions
    from pipeline_project.resources.embeddings import HashingEmbedder
    from pipeline_project.sample_data import write_catalog
    from pipeline_project_tests.helpers import settings_in

    settings = settings_in(tmp_path_factory.mktemp("reference"))
    write_catalog(settings.catalog_path, seed=3)
    defs = build_definitions(settings, embedder=HashingEmbedder(dimensions=32))
    return settings, defs, dg.DagsterInstance.ephemeral()


def land(dep, reference, batch_id: str, rows: int) -> None:
    """A batch file on the landing bucket, and the same file in the reference's folder."""
    from pipeline_project.sample_data import generate_batch, write_catalog

    settings = reference[0]
    path = settings.landing_dir / f"{batch_id}.jsonl"
    generate_batch(path, rows, 0.05, 100 + int(batch_id[1:]), write_catalog(
        settings.catalog_path, seed=3))  # fmt: skip
    dep.s3_client.upload_file(str(path), "landing", f"in/{path.name}")


def reference_tables(reference, batch_ids: list[str]) -> dict:
    from pipeline_project.tables import BATCH_TABLES_BY_STAGE
    from pipeline_project_tests.helpers import run_batch, warehouse_contents, warehouse_of

    settings, defs, instance = reference
    done = set(instance.get_dynamic_partitions("batches"))
    for batch_id in [b for b in batch_ids if b not in done]:
        assert run_batch(defs, instance, batch_id).success, batch_id
    found = warehouse_contents(
        warehouse_of(settings), ["raw_customers", *BATCH_TABLES_BY_STAGE["validation"]]
    )
    # As the lake's come out of the container: through JSON.
    return json.loads(json.dumps(found, default=str, sort_keys=True))


def ingestion_runs(dep, batch_id: str | None = None) -> list[dg.DagsterRun]:
    tags = {"dagster/partition": batch_id} if batch_id else {}
    return list(dep.instance.get_runs(dg.RunsFilter(job_name="batch_ingestion_job", tags=tags)))


def test_four_batches_landing_on_s3_run_as_overlapping_containers_and_equal_a_sequential_run(
    deployment, reference
):
    dep = deployment
    start = time.monotonic()
    for batch_id in PARALLEL_BATCHES:
        land(dep, reference, batch_id, ROWS)
    finished = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE,
                dg.DagsterRunStatus.CANCELED}  # fmt: skip
    runs = ctr.wait_for(
        "four ingestion runs to end",
        lambda: (runs := ingestion_runs(dep)) and len(runs) == 4
        and all(r.status in finished for r in runs) and runs,
        timeout=480, interval=2,
    )  # fmt: skip
    TIMINGS["4 batches landed to 4 runs ended"] = round(time.monotonic() - start, 1)
    assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs), [
        (r.tags["dagster/partition"], r.status) for r in runs]  # fmt: skip
    assert sorted(r.tags["dagster/partition"] for r in runs) == PARALLEL_BATCHES
    # every run in a container of its own, started by the daemon's launcher
    container_ids = {r.tags["docker/container_id"] for r in runs}
    assert len(container_ids) == 4
    for run in runs:
        [container] = dep.client.containers.list(all=True, filters={
            "label": f"dagster/run_id={run.run_id}"})  # fmt: skip
        assert container.id in container_ids and container.attrs["State"]["ExitCode"] == 0
    # at the same time, not one after another
    records = {r.dagster_run.run_id: r for r in dep.instance.get_run_records(
        dg.RunsFilter(run_ids=[r.run_id for r in runs]))}  # fmt: skip
    spans = sorted((r.start_time, r.end_time) for r in records.values())
    overlapping = sum(1 for i, a in enumerate(spans) for b in spans[i + 1:]
                      if a[0] < b[1] and b[0] < a[1])  # fmt: skip
    assert overlapping >= 3, spans
    # no container shares a volume: the only mount anywhere is the podman socket in the daemon
    for container in dep.client.containers.list(all=True, filters={"label": ctr.LABEL}):
        mounts = [(m["Type"], m["Destination"]) for m in container.attrs["Mounts"]]
        expected = [("bind", "/var/run/docker.sock")] if container.name.endswith("-daemon") else []
        assert mounts == expected, (container.name, mounts)
    # the webserver shows a run container's step output: compute logs on S3
    run = runs[0]
    [captured, *_] = [e for e in dep.instance.all_logs(run.run_id)
                      if e.dagster_event_type == dg.DagsterEventType.LOGS_CAPTURED]  # fmt: skip
    log_key = [run.run_id, "compute_logs", captured.dagster_event.event_specific_data.file_key]
    logs = ctr.graphql(dep.web, "query ($k: [String!]!) { capturedLogs(logKey: $k) { stderr } }",
                       {"k": log_key})["capturedLogs"]["stderr"]  # fmt: skip
    assert "STEP_START" in logs, logs[:2000]
    # the catalog sensor saw the catalog on S3 and its run loaded it in a container
    catalog_runs = ctr.wait_for("the catalog run to end", lambda: [
        r for r in dep.instance.get_runs(dg.RunsFilter(job_name="catalog_job"))
        if r.is_finished], timeout=180, interval=2)  # fmt: skip
    assert [r.status for r in catalog_runs] == [dg.DagsterRunStatus.SUCCESS]
    # the catalog's user is not a superuser; the webserver never got the warehouse's secrets
    import psycopg2

    conn = psycopg2.connect(host=dep.ip("postgres"), user=ctr.PG_USER, password=ctr.PG_PASSWORD,
                            dbname="postgres")  # fmt: skip
    with conn, conn.cursor() as cur:
        cur.execute("SELECT rolsuper FROM pg_roles WHERE rolname = %s", [ctr.LAKE_USER])
        assert cur.fetchall() == [(False,)]
    conn.close()
    web_env = dep.containers["webserver"].attrs["Config"]["Env"]
    assert not [v for v in web_env if ctr.LAKE_PASSWORD in v or v.startswith("PIPELINE_OPENAI_API")]
    # no secret in any run's events
    for run in [*runs, *catalog_runs]:
        events = "".join(str(e) for e in dep.instance.all_logs(run.run_id))
        assert ctr.S3_SECRET not in events and ctr.PG_PASSWORD not in events
        assert ctr.LAKE_PASSWORD not in events
    # the tables: as a sequential run of the same files on the file backend
    with ctr.timed("tables compared (4 batches)", TIMINGS):
        assert ctr.lake_tables(dep) == reference_tables(reference, PARALLEL_BATCHES)


def test_a_run_container_killed_mid_step_is_failed_retried_and_the_lake_equals_a_clean_run(
    deployment, reference
):
    dep = deployment
    # One writer at a time: the retry can only start if the dead run's slot is given back.
    dep.instance.event_log_storage.set_concurrency_slots("duckdb_writer", 1)
    land(dep, reference, KILLED_BATCH, KILLED_ROWS)
    start = time.monotonic()

    def step_started():
        for run in ingestion_runs(dep, KILLED_BATCH):
            for event in dep.instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_START):
                if event.step_key == KILLED_STEP:
                    return run

    first = ctr.wait_for(f"{KILLED_STEP} of {KILLED_BATCH} to start", step_started,
                         timeout=300, interval=0.2)  # fmt: skip
    time.sleep(0.5)
    subprocess.run(["podman", "kill", first.tags["docker/container_id"]], check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip
    killed = time.monotonic()
    TIMINGS["landed to kill"] = round(killed - start, 1)
    failed = ctr.wait_for("run monitoring to fail the killed run", lambda: (
        run := dep.instance.get_run_by_id(first.run_id)).status == dg.DagsterRunStatus.FAILURE
        and run, timeout=120)  # fmt: skip
    TIMINGS["kill to FAILURE"] = round(time.monotonic() - killed, 1)
    messages = [e.dagster_event.message or "" for e in dep.instance.all_logs(failed.run_id)
                if e.dagster_event]  # fmt: skip
    # podman says "exited" or, while it cleans up, "stopped"; the exit code is SIGKILL's
    assert any("Detected run worker status FAILED" in m and '"ExitCode": 137' in m
               for m in messages), messages  # fmt: skip
    storage = dep.instance.event_log_storage
    ctr.wait_for("the dead run's pool slot to be free", lambda: not [
        s for s in storage.get_concurrency_info("duckdb_writer").claimed_slots
        if s.run_id == first.run_id], timeout=60)  # fmt: skip
    TIMINGS["kill to slot free"] = round(time.monotonic() - killed, 1)
    retry = ctr.wait_for("the retry run to end", lambda: [
        r for r in ingestion_runs(dep, KILLED_BATCH) if r.tags.get("dagster/parent_run_id")
        == first.run_id and r.is_finished], timeout=300, interval=2)[0]  # fmt: skip
    TIMINGS["kill to retry ended"] = round(time.monotonic() - killed, 1)
    assert retry.status == dg.DagsterRunStatus.SUCCESS
    assert retry.tags["docker/container_id"] != first.tags["docker/container_id"]
    assert len(ingestion_runs(dep, KILLED_BATCH)) == 2  # retried once, by the daemon
    with ctr.timed("tables compared (5 batches)", TIMINGS):
        assert ctr.lake_tables(dep) == reference_tables(reference, [*PARALLEL_BATCHES,
                                                                    KILLED_BATCH])  # fmt: skip
    dep.instance.event_log_storage.set_concurrency_slots("duckdb_writer", 4)
    assert time.monotonic() - START < BUDGET_SECONDS, TIMINGS
