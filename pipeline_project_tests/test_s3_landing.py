"""Batch files landing on object storage: a real S3-compatible server (moto's, on 127.0.0.1)
holds them; the landing zone lists them and the ingestion streams them, with the same rows as
from a local folder, and the keys never shown."""

from __future__ import annotations

import dataclasses

import dagster as dg
import pytest

from pipeline_project.definitions import build_definitions
from pipeline_project.resources.embeddings import HashingEmbedder
from pipeline_project.sample_data import generate_batch, write_catalog
from pipeline_project_tests.helpers import run_batch, settings_in, table_rows
from pipeline_project_tests.s3_server import KEY_ID, SECRET, moto_server, s3_client


@pytest.fixture(scope="module")
def s3_server():
    with moto_server() as url:
        yield url


def _bucket(url: str):
    client = s3_client(url)
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
    client.upload_file(str(local.catalog_path), "landing", "products/catalog.csv")
    on_s3 = settings_in(tmp_path / "s3")
    on_s3 = dataclasses.replace(
        on_s3,
        landing=dataclasses.replace(
            on_s3.landing, s3_prefix="s3://landing/in/",
            catalog_path="s3://landing/products/catalog.csv",
        ),
        object_storage=dataclasses.replace(on_s3.object_storage, endpoint=s3_server),
    )  # fmt: skip
    outcomes = {}
    for name, settings in (("local", local), ("s3", on_s3)):
        defs = build_definitions(settings, embedder=HashingEmbedder(dimensions=32))
        with dg.build_resources({"landing": defs.resources["landing"]}) as resources:
            scan = resources.landing.scan()
            assert resources.landing.catalog_fingerprint() is not None, name
        assert sorted(scan.files) == ["b1", "b2"], name
        with dg.DagsterInstance.ephemeral() as instance:
            catalog = defs.resolve_job_def("catalog_job").execute_in_process(instance=instance)
            assert catalog.success, name
            results = [run_batch(defs, instance, batch) for batch in ("b1", "b2")]
            assert all(r.success for r in results), name
            logs = "".join(str(e) for r in [catalog, *results] for e in instance.all_logs(r.run_id))
        outcomes[name] = {
            table: table_rows(settings.duckdb_path, table)
            for table in ("raw_customers", "customers", "customer_purchases", "schema_errors",
                          "product_catalog")
        }  # fmt: skip
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
    assert len(outcomes["s3"]["product_catalog"]) > 0
