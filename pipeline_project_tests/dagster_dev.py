"""`dagster dev` started the way a user starts it (`pipeline-project ui`), driven through the
GraphQL API the UI uses, and stopped by its PID with every child: for the tests of the UI path."""

from __future__ import annotations

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

from pipeline_project.settings import Settings
from pipeline_project_tests.helpers import free_port


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


CLI = Path(sys.executable).parent / "pipeline-project"


@contextmanager
def running_ui(cwd: Path, env: dict[str, str], settings: Settings) -> Iterator[DagsterDev]:
    """`pipeline-project ui` (it becomes `dagster dev`, same PID) with only `env`'s PIPELINE_
    and DAGSTER_ variables, on a free port; stopped by its PID afterwards, every child too."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PIPELINE_", "DAGSTER_"))}
    port = free_port()
    log = (cwd / "dagster_dev.log").open("w")
    # the product's own command, with its default host
    proc = subprocess.Popen(
        [str(CLI), "ui", "--port", str(port)],
        cwd=cwd, env={**base, **env}, stdout=log, stderr=subprocess.STDOUT,
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
