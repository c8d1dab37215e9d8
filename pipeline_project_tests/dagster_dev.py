"""`dagster dev` started the way a user starts it (`pipeline-project ui`), driven through the
GraphQL API the UI uses, and stopped by its PID with every child: for the tests of the UI path.
Also the webserver and the daemon as two processes (the daemon can then be killed and started
again on its own), and the processes of a run (its worker, its step processes) for fault tests."""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import sqlalchemy.exc

from pipeline_project.settings import Settings
from pipeline_project_tests.helpers import free_port

# What `pipeline-project ui` names the code location when the folder has no workspace.yaml.
LOCATION = "pipeline_project.definitions"


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
    """A running `dagster dev`: its URL, its process and the settings it was started with."""

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

    def switch_sensor(self, name: str, on: bool) -> None:
        """Turn a sensor on or off, as its switch in the UI does."""
        selector = {
            "repositoryLocationName": LOCATION,
            "repositoryName": "__repository__",
            "sensorName": name,
        }
        if on:
            state = self.graphql(
                "mutation($selector: SensorSelector!) { startSensor(sensorSelector: $selector)"
                " { __typename ... on Sensor { sensorState { status } } } }",
                selector=selector,
            )["startSensor"]["sensorState"]
        else:
            sensor = self.graphql(
                "query($selector: SensorSelector!) { sensorOrError(sensorSelector: $selector) {"
                " __typename ... on Sensor { id } } }",
                selector=selector,
            )["sensorOrError"]
            assert sensor["__typename"] == "Sensor", sensor
            state = self.graphql(
                "mutation($id: String!) { stopSensor(id: $id) { __typename"
                " ... on StopSensorMutationResult { instigationState { status } } } }",
                id=sensor["id"],
            )["stopSensor"]["instigationState"]
        assert state["status"] == ("RUNNING" if on else "STOPPED"), state

    def add_partition(self, batch_id: str) -> None:
        """Register a batch, as the launchpad's "Add partition" does."""
        added = self.graphql(
            "mutation($repo: RepositorySelector!, $key: String!) { addDynamicPartition("
            'repositorySelector: $repo, partitionsDefName: "batches", partitionKey: $key)'
            " { __typename ... on PythonError { message } } }",
            repo={"repositoryLocationName": LOCATION, "repositoryName": "__repository__"},
            key=batch_id,
        )["addDynamicPartition"]
        assert added["__typename"] == "AddDynamicPartitionSuccess", added

    def launch_run(self, job: str, tags: dict[str, str]) -> str:
        """Launch `job` with `tags` (dagster/partition for a batch), as the UI's launchpad does:
        through the run queue. Returns the run ID."""
        launched = self.graphql(
            "mutation($params: ExecutionParams!) { launchRun(executionParams: $params) {"
            " __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message }"
            " ... on RunConfigValidationInvalid { errors { message } } } }",
            params={
                "selector": {
                    "repositoryLocationName": LOCATION,
                    "repositoryName": "__repository__",
                    "jobName": job,
                },
                "executionMetadata": {"tags": [{"key": k, "value": v} for k, v in tags.items()]},
            },
        )["launchRun"]
        assert launched["__typename"] == "LaunchRunSuccess", launched
        return launched["run"]["runId"]

    def materialized(self, asset: str, partitions: list[str]) -> list[str]:
        node = self.graphql(
            "query($path: [String!]!, $parts: [String!]!) { assetNodeOrError(assetKey:"
            " {path: $path}) { ... on AssetNode { latestMaterializationByPartition("
            "partitions: $parts) { partition } } } }",
            path=[asset],
            parts=partitions,
        )["assetNodeOrError"]
        return sorted(m["partition"] for m in node["latestMaterializationByPartition"] if m)


def wait_for(
    what: str, condition: Callable[[], object], timeout: float = 300, interval: float = 2
) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)


def storage_read(read: Callable) -> Callable:
    """A read of the instance's SQLite storage, retried for a while: under dagster dev's writers
    SQLite may answer "database is locked" or "locking protocol"."""

    @functools.wraps(read)
    def retried(*args, **kwargs):
        deadline = time.monotonic() + 30
        while True:
            try:
                return read(*args, **kwargs)
            except sqlalchemy.exc.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    return retried


# ---- the processes of a run (DefaultRunLauncher: a worker below the code server, one process
# per step below the worker), found through the pids the run's events carry ----


@storage_read
def run_worker_pid(instance: dg.DagsterInstance, run_id: str) -> int | None:
    """The run worker's pid (the process that logged RUN_START), once the run started."""
    events = instance.all_logs(run_id, of_type=dg.DagsterEventType.RUN_START)
    return events[0].dagster_event.pid if events else None


@storage_read
def step_pid(instance: dg.DagsterInstance, run_id: str, step_key: str) -> int | None:
    """The pid of the process running `step_key`, once the step started."""
    events = instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_START)
    return next((e.dagster_event.pid for e in events if e.step_key == step_key), None)


@storage_read
def step_succeeded(instance: dg.DagsterInstance, run_id: str, step_key: str) -> bool:
    events = instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_SUCCESS)
    return any(e.step_key == step_key for e in events)


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


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/server_info", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


BIN = Path(sys.executable).parent
CLI = BIN / "pipeline-project"


def _environment(env: dict[str, str]) -> dict[str, str]:
    """This environment without any PIPELINE_ or DAGSTER_ variable, the sensors looking every
    5 s (not 30: the waits are configuration, not sleeps), then `env`."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PIPELINE_", "DAGSTER_"))}
    return {**base, "PIPELINE_SENSOR_INTERVAL_SECONDS": "5", **env}


@contextmanager
def running_ui(
    cwd: Path, env: dict[str, str], settings: Settings, folder: Path | None = None
) -> Iterator[DagsterDev]:
    """`pipeline-project ui` (it becomes `dagster dev`, or `dg dev` in the project's `folder`,
    same PID) with only `env`'s PIPELINE_ and DAGSTER_ variables, on a free port; stopped by its
    PID afterwards, every child too. Its log is `cwd`/dagster_dev.log."""
    port = free_port()
    log = (cwd / "dagster_dev.log").open("w")
    # the product's own command, with its default host
    proc = subprocess.Popen(
        [str(CLI), "ui", "--port", str(port)],
        cwd=folder or cwd, env=_environment(env), stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    dev = DagsterDev(f"http://127.0.0.1:{port}", proc, settings)
    try:
        wait_for("the webserver", lambda: answers(dev.url), timeout=120)
        assert listening_addresses(port) == {"127.0.0.1"}  # loopback only, by default
        yield dev
    finally:
        children = stop(proc)
        log.close()
        assert proc.returncode != -signal.SIGKILL, "dagster dev did not stop on SIGTERM"
        assert not any(alive(pid) for pid in children), "a child of dagster dev is still running"
        assert listening_addresses(port) == set()  # nothing listens on the port any more


class SplitDagster(DagsterDev):
    """`dagster-webserver` and `dagster-daemon run` as two processes on one Dagster home (the
    deploy's layout on one machine): the daemon can be killed and started again on its own.
    Each loads the code location itself (`-m pipeline_project.definitions`), so the runs the
    daemon launches are children of the daemon's own code server."""

    def __init__(self, url: str, proc: subprocess.Popen, settings: Settings, cwd: Path, env):
        super().__init__(url, proc, settings)
        self.cwd, self.env = cwd, env
        self.daemons: list[subprocess.Popen] = []
        self.left_behind: set[int] = set()  # the children of daemons killed by a test

    @property
    def daemon(self) -> subprocess.Popen:
        return self.daemons[-1]

    def start_daemon(self) -> subprocess.Popen:
        number = len(self.daemons) + 1
        self.daemons.append(
            _background(
                [str(BIN / "dagster-daemon"), "run", "-m", LOCATION],
                self.cwd,
                self.env,
                self.cwd / f"dagster_daemon_{number}.log",
            )
        )
        return self.daemon

    def kill_daemon(self) -> set[int]:
        """SIGKILL the daemon process alone, as a crash would; its children live on (they are
        stopped at the end). Returns their pids."""
        children = descendants(self.daemon.pid)
        self.daemon.send_signal(signal.SIGKILL)
        self.daemon.wait(timeout=30)
        self.left_behind |= children
        return children


def _background(args: list[str], cwd: Path, env: dict[str, str], log_path: Path):
    log = log_path.open("w")

    def default_sigint() -> None:
        # A test runner started in the background has SIGINT ignored, and Dagster maps SIGTERM
        # onto its SIGINT handler: without the default it could not be stopped by its PID.
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    proc = subprocess.Popen(
        args, cwd=cwd, env=_environment(env), stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True, preexec_fn=default_sigint,
    )  # fmt: skip
    log.close()  # the child has its own copy
    return proc


@contextmanager
def running_webserver_and_daemon(
    cwd: Path, env: dict[str, str], settings: Settings
) -> Iterator[SplitDagster]:
    """The webserver on 127.0.0.1 and one daemon, on `env`'s Dagster home; every process (daemons
    started later and the children of killed ones included) stopped by its PID afterwards."""
    port = free_port()
    webserver = _background(
        [str(BIN / "dagster-webserver"), "-m", LOCATION, "-h", "127.0.0.1", "-p", str(port)],
        cwd, env, cwd / "dagster_webserver.log",
    )  # fmt: skip
    dev = SplitDagster(f"http://127.0.0.1:{port}", webserver, settings, cwd, env)
    try:
        # The daemon starts once the webserver has created the instance's tables: started
        # together on a fresh home, both create them and one fails ("table jobs already exists").
        wait_for("the webserver", lambda: answers(dev.url), timeout=120)
        dev.start_daemon()
        yield dev
    finally:
        stopped = set()
        for proc in [*dev.daemons, webserver]:
            stopped |= stop(proc) | {proc.pid}
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in {pid for pid in dev.left_behind if alive(pid)}:
                os.kill(pid, sig)
            deadline = time.monotonic() + 15
            while any(alive(pid) for pid in dev.left_behind) and time.monotonic() < deadline:
                time.sleep(0.2)
        assert not any(alive(pid) for pid in stopped | dev.left_behind), "a process is left"
        assert listening_addresses(port) == set()
