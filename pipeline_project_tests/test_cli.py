"""The README's main command end to end: `pipeline-project demo` in a fresh folder."""

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from pipeline_project_tests.conftest import customer, table_rows, write_lines

CLI = Path(sys.executable).parent / "pipeline-project"


def cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PIPELINE_", "DAGSTER_"))}
    return subprocess.run(
        [str(CLI), *args], cwd=cwd, env={**base, **(env or {})},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_generate_writes_deterministic_batches_and_a_catalog(tmp_path):
    args = ["generate", "--batches", "2", "--rows", "40", "--bad-rate", "0.2", "--seed", "3"]
    first = cli(*args, "--landing-dir", "a", "--catalog", "a.csv", cwd=tmp_path)
    second = cli(*args, "--landing-dir", "b", "--catalog", "b.csv", "--gzip", cwd=tmp_path)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b001.jsonl", "b002.jsonl"]
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["b001.jsonl.gz", "b002.jsonl.gz"]
    assert (tmp_path / "a.csv").read_text().startswith("product_id,name,category,price,in_stock")
    import gzip

    assert (
        gzip.decompress((tmp_path / "b" / "b001.jsonl.gz").read_bytes())
        == (tmp_path / "a" / "b001.jsonl").read_bytes()
    )


@pytest.mark.slow
def test_demo_runs_two_batches_end_to_end_in_a_project_local_home_and_is_idempotent(tmp_path):
    first = cli("demo", "--rows", "300", cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "generating sample data" in first.stdout
    summary = [
        ln.split() for ln in first.stdout.splitlines() if ln.startswith("b00") and " ok " in ln
    ]
    assert [row[:2] for row in summary] == [["b001", "ok"], ["b002", "ok"]]
    for row in summary:
        rows_in, valid, invalid = (int(x.replace(",", "")) for x in row[2:5])
        assert rows_in == 300 and valid + invalid == 300 and 0 < invalid < 30
        assert row[5] == f"{invalid / rows_in:.2%}"

    db = tmp_path / "data" / "warehouse.duckdb"
    tables = {t: table_rows(db, t) for t in ("raw_customers", "customers", "schema_errors")}
    assert len(tables["raw_customers"]) == 600
    assert len(tables["customers"]) + len(tables["schema_errors"]) == 600

    first_figures = {row[0]: [int(x.replace(",", "")) for x in row[6:]] for row in summary}
    for profiles, _hits, _calls, dead_lettered in first_figures.values():
        assert 0 < profiles <= 300 and dead_lettered == 0
    assert first_figures["b001"][1] == 0 and first_figures["b001"][2] > 0  # cold cache
    embeddings = table_rows(db, "customer_embeddings")
    assert len(embeddings) == len(tables["customers"])

    second = cli("demo", "--rows", "300", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "generating sample data" not in second.stdout
    assert {t: table_rows(db, t) for t in tables} == tables
    assert table_rows(db, "customer_embeddings") == embeddings
    rerun = [
        ln.split() for ln in second.stdout.splitlines() if ln.startswith("b00") and " ok " in ln
    ]
    for row in rerun:  # every profile is cached now: no model call
        profiles, cache_hits, model_calls = (int(x.replace(",", "")) for x in row[6:9])
        assert cache_hits == profiles and model_calls == 0

    home = tmp_path / ".dagster_home"
    assert (home / "dagster.yaml").exists()
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert sorted(instance.get_dynamic_partitions("batches")) == ["b001", "b002"]
        runs = instance.get_runs()
        assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
        batch_runs = [r for r in runs if r.job_name == "batch_pipeline_job"]
        assert len(batch_runs) == 4
        assert {r.tags["dagster/partition"] for r in batch_runs} == {"b001", "b002"}
        assert len([r for r in runs if r.job_name == "catalog_job"]) == 2


@pytest.mark.slow
def test_demo_exits_non_zero_and_says_which_batch_stopped(tmp_path):
    landing = tmp_path / "in"
    write_lines(landing / "good.jsonl", [customer()])
    write_lines(landing / "bad.jsonl", ["{", "[]", customer()])
    env = {"PIPELINE_LANDING_DIR": str(landing), "DAGSTER_HOME": str(tmp_path / "home")}
    (tmp_path / "home").mkdir()
    done = cli("demo", cwd=tmp_path, env=env)
    assert done.returncode == 1
    assert "runs failed for: bad" in done.stderr
    rows = {
        ln.split()[0]: ln.split()[1]
        for ln in done.stdout.splitlines()
        if ln.startswith(("bad", "good")) and ln.split()[1] in ("ok", "FAILED")
    }
    assert rows == {"bad": "FAILED", "good": "ok"}
