"""Batch files landing on object storage: a real S3-compatible server (moto's, on 127.0.0.1)
holds them; the landing zone lists them and the ingestion streams them, with the same rows as
from a local folder, and the keys never shown."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
import urllib.request

import dagster as dg
import pytest

from pipeline_project.definitions import build_definitions
from pipeline_project.resources.embeddings import HashingEmbedder
from pipeline_project.sample_data import generate_batch, write_catalog
from pipeline_project_tests.helpers import free_port, run_batch, settings_in, table_rows

KEY_ID, SECRET = "AKIAPIPELINETEST", "s3-Secret-41d9-never-logged"


@pytest.fixture(scope="module")
def s3_server():
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            break
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, "moto did not start"
            time.sleep(0.2)
    try:
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def _bucket(url: str):
    import boto3

    client = boto3.client("s3", endpoint_url=url, aws_access_key_id=KEY_ID,
                          aws_secret_access_key=SECRET, region_name="us-east-1")  # fmt: skip
    client.create_bucket(Bucket="landing")
    return client


def test_batches_landing_on_s3_are_listed_and_streamed_into_the_same_rows(
    tmp_path, s3_server, monkeypatch
):
    monkeypatch.setenv("PIPELINE_S3_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("PIPELINE_S3_SECRET_ACCESS_KEY", SECRET)
    client = _bucket(s3_server)
    local = settings_in(tmp_path / "local")
    catalog = write_catalog(local.catalog_path, seed=3)
    generate_batch(local.landing_dir / "b1.jsonl", 400, 0.05, 7, catalog)
    generate_batch(local.landing_dir / "b2.jsonl.gz", 300, 0.05, 8, catalog)
    for path in local.landing_dir.iterdir():
        client.upload_file(str(path), "landing", f"in/{path.name}")
    client.put_object(Bucket="landing", Key="in/.b3.jsonl.partial", Body=b"{}")  # uploading
    client.put_object(Bucket="landing", Key="in/notes.txt", Body=b"x")
    on_s3 = settings_in(tmp_path / "s3")
    on_s3 = dataclasses.replace(
        on_s3,
        landing=dataclasses.replace(
            on_s3.landing, s3_prefix="s3://landing/in/", s3_endpoint=s3_server
        ),  # fmt: skip
    )
    write_catalog(on_s3.catalog_path, seed=3)
    outcomes = {}
    for name, settings in (("local", local), ("s3", on_s3)):
        defs = build_definitions(settings, embedder=HashingEmbedder(dimensions=32))
        with dg.build_resources({"landing": defs.resources["landing"]}) as resources:
            scan = resources.landing.scan()
        assert sorted(scan.files) == ["b1", "b2"], name
        with dg.DagsterInstance.ephemeral() as instance:
            results = [run_batch(defs, instance, batch) for batch in ("b1", "b2")]
            assert all(r.success for r in results), name
            logs = "".join(str(e) for r in results for e in instance.all_logs(r.run_id))
        outcomes[name] = {
            table: table_rows(settings.duckdb_path, table)
            for table in ("raw_customers", "customers", "customer_purchases", "schema_errors")
        }
        if name == "s3":
            assert [r.name for r in scan.rejected] == ["notes.txt"]
            assert SECRET not in logs and KEY_ID not in logs
            metadata = [m for r in results for m in r.asset_materializations_for_node(
                "raw_customers")]  # fmt: skip
            assert {m.metadata["landing_file"].value for m in metadata} == {
                "b1.jsonl",
                "b2.jsonl.gz",
            }
    assert outcomes["s3"] == outcomes["local"]
    assert len(outcomes["s3"]["raw_customers"]) == 700
