"""The README's pictures, taken from the real UI in a headless browser; run it after a change:

    python docs/screenshots.py            # writes docs/images/*.png

In a temporary folder it lands three sample batches (the third with 8% bad lines, above the 5%
error-rate threshold), runs `pipeline-project demo` on them with the default local model,
starts `pipeline-project ui` there on a free port and drives Debian's Chromium (`apt-get
install -y chromium`) with Playwright through the pages a new user opens first.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline_project.sample_data import generate_batch, write_catalog  # noqa: E402
from pipeline_project_tests.browser import INSTALL_HINT, chromium_path, ui_page  # noqa: E402

BIN = Path(sys.executable).parent
BATCHES = {"b001": 0.03, "b002": 0.03, "b003": 0.08}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images")
    parser.add_argument("--rows", type=int, default=2000, help="Customers per batch.")
    args = parser.parse_args()
    executable = chromium_path()
    if executable is None:
        sys.exit(INSTALL_HINT)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pipeline-screenshots-") as folder:
        root = Path(folder)
        env = _environment()
        catalog = write_catalog(root / "data" / "catalog.csv", seed=42)
        for number, (batch_id, bad_rate) in enumerate(BATCHES.items(), start=1):
            path = root / "data" / "landing" / f"{batch_id}.jsonl"
            generate_batch(path, args.rows, bad_rate, 42 + number, catalog)
        demo = subprocess.run([str(BIN / "pipeline-project"), "demo"], cwd=root, env=env)
        if demo.returncode not in (0, 1):  # 1: a batch failed, which the pictures may show
            sys.exit(f"pipeline-project demo exited {demo.returncode}")
        port = _free_port()
        ui = subprocess.Popen(
            [str(BIN / "pipeline-project"), "ui", "--port", str(port)],
            cwd=root, env=env, stdout=(root / "ui.log").open("w"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_for(url)
            _take(executable, url, args.out)
        finally:
            ui.terminate()
            ui.wait(timeout=60)
    for picture in sorted(args.out.glob("*.png")):
        print(f"{picture.relative_to(REPO)}  ({picture.stat().st_size // 1024} KiB)")


def _take(executable: str, url: str, out: Path) -> None:
    with ui_page(executable, width=1600, height=1000) as page:
        # the asset graph, every group expanded
        page.goto(f"{url}/asset-groups")
        page.locator("svg foreignObject").first.wait_for(timeout=60_000)
        page.keyboard.press("Alt+e")
        page.wait_for_timeout(3000)
        page.screenshot(path=out / "asset-graph.png")

        # customers: columns, owners, kinds, storage, tags
        page.goto(f"{url}/assets/customers")
        page.get_by_text("Columns").first.wait_for(timeout=60_000)
        page.wait_for_timeout(3000)
        page.screenshot(path=out / "customers-columns.png")

        # the error rate of every batch, plotted
        page.get_by_role("button", name="Plots").click()
        page.wait_for_timeout(3000)
        page.get_by_text("error_rate").first.scroll_into_view_if_needed()
        page.wait_for_timeout(1000)
        page.screenshot(path=out / "customers-plots.png")

        # one check, one result per batch
        check = "schema_error_rate_below_threshold"
        page.goto(f"{url}/assets/customers?view=checks&checkDetail={check}")
        page.get_by_role("tab", name="Execution history").wait_for(timeout=60_000)
        page.get_by_role("tab", name="Partitions").nth(1).click()  # the check's, not the asset's
        page.wait_for_timeout(3000)
        page.screenshot(path=out / "checks-per-batch.png")

        # the alert of the bad batch, in its run's log
        run_id = _run_of(url, "b003")
        page.goto(f"{url}/runs/{run_id}?logs=ALERT")
        page.get_by_text("ALERT").first.wait_for(timeout=60_000)
        page.wait_for_timeout(3000)
        page.screenshot(path=out / "alert-in-run-log.png")


def _run_of(url: str, batch_id: str) -> str:
    query = """query($filter: RunsFilter) { runsOrError(filter: $filter) {
        ... on Runs { results { runId jobName } } } }"""
    variables = {"filter": {"tags": [{"key": "dagster/partition", "value": batch_id}]}}
    request = urllib.request.Request(
        f"{url}/graphql",
        data=json.dumps({"query": query, "variables": variables}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        runs = json.load(answer)["data"]["runsOrError"]["results"]
    return next(r["runId"] for r in runs if r["jobName"] == "batch_pipeline_job")


def _environment() -> dict[str, str]:
    """The embedded defaults: no PIPELINE_ or DAGSTER_ variable, so the demo and the UI use
    the folder's data/ and its project-local Dagster home."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("PIPELINE_", "DAGSTER_"))}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(url: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/server_info", timeout=5):
                return
        except OSError:
            time.sleep(1)
    sys.exit(f"the UI did not answer at {url} within {timeout:.0f} s")


if __name__ == "__main__":
    main()
