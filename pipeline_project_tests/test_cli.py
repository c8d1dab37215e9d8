"""The README's main command end to end: `pipeline-project demo` in a fresh folder."""

import os
import re
import subprocess
import sys
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from pipeline_project_tests.helpers import customer, table_rows, write_lines
from pipeline_project_tests.test_alerts import Hook
from pipeline_project_tests.test_demo_output import assert_aligned, number, summary, summary_tables

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
    assert "\x1b" not in first.stdout  # a pipe: no ANSI escapes
    assert "Warning" not in first.stderr, first.stderr  # no preview-API noise for a user
    assert "━" not in first.stderr  # no progress bars where nobody watches
    # but plain progress lines: each long stage of each batch says how far it got
    for batch in ("b001", "b002"):
        assert f"  {batch} validate: 300 of 300 lines" in first.stderr, first.stderr
        assert f"  {batch} recommend: " in first.stderr, first.stderr
    for table in summary_tables(first.stdout):
        assert_aligned(table)
    validation, recommendation = summary(first.stdout)
    assert [(b, row["status"]) for b, row in validation.items()] == [("b001", "ok"), ("b002", "ok")]
    for row in validation.values():
        rows_in, valid, invalid = (number(row[c]) for c in ("rows in", "valid", "invalid"))
        assert rows_in == 300 and valid + invalid == 300 and 0 < invalid < 30
        assert number(row["blank lines"]) == 0
        assert row["err rate"] == f"{invalid / rows_in:.2%}"
    # the second sample batch brings back customers of the first
    assert number(validation["b001"]["returning"]) == 0
    assert 0 < number(validation["b002"]["returning"]) < number(validation["b002"]["valid"])
    for batch_id, row in recommendation.items():
        assert row["recommendations"] == "ok" and number(row["segments"]) > 1
        kept, rejected = number(row["kept"]), number(row["rejected"])
        assert kept > 0 and kept + rejected > 0
        by_rule = [number(row[rule]) for rule in ("out_of_stock", "low_confidence",
                   "already_purchased", "implausible_value")]  # fmt: skip
        assert max(by_rule) <= rejected <= sum(by_rule)  # a rejection names one rule or more
        # what the rules know before scoring never takes a slot
        assert number(row["out_of_stock"]) == number(row["already_purchased"]) == 0
        served, fewer = number(row["served 5"]), number(row["fewer"])
        assert served + fewer == number(validation[batch_id]["valid"]) and served > fewer
    assert "No product catalog" not in first.stdout

    db = tmp_path / "data" / "warehouse.duckdb"
    tables = {t: table_rows(db, t) for t in ("raw_customers", "customers", "schema_errors")}
    assert len(tables["raw_customers"]) == 600
    assert len(tables["customers"]) + len(tables["schema_errors"]) == 600

    inference = ("profiles", "cache hits", "model calls", "dead-lettered")
    first_figures = {b: [number(row[c]) for c in inference] for b, row in validation.items()}
    for profiles, _hits, _calls, dead_lettered in first_figures.values():
        assert 0 < profiles <= 300 and dead_lettered == 0
    assert first_figures["b001"][1] == 0 and first_figures["b001"][2] > 0  # cold cache
    embeddings = table_rows(db, "customer_embeddings")
    assert len(embeddings) == len(tables["customers"])

    # as on a terminal (rich honours FORCE_COLOR): a progress bar per long stage, on stderr
    second = cli("demo", "--rows", "300", cwd=tmp_path, env={"FORCE_COLOR": "1"})
    assert second.returncode == 0, second.stderr
    bars = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", second.stderr)
    for batch_id in ("b001", "b002"):
        assert re.search(rf"{batch_id} ingest +━+ 300 lines", bars), bars[-2000:]
        assert re.search(rf"{batch_id} validate +━+ 300 of 300 lines", bars), bars[-2000:]
    assert "generating sample data" not in second.stdout
    assert {t: table_rows(db, t) for t in tables} == tables
    assert table_rows(db, "customer_embeddings") == embeddings
    rerun, _ = summary(second.stdout)
    assert set(rerun) == {"b001", "b002"}
    for row in rerun.values():  # every profile is cached now: no model call
        profiles, cache_hits, model_calls = (number(row[c]) for c in inference[:3])
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
    validation, _ = summary(done.stdout)
    assert {b: row["status"] for b, row in validation.items()} == {"bad": "FAILED", "good": "ok"}


def test_demo_alerts_an_all_invalid_batch_and_a_skipped_file_once_each(tmp_path):
    """The main command raises what the daemon's sensors would: the batch's error rate (by the
    validation itself), its failed run and the landing file it skips, each stored once and
    posted once; a second demo adds none within the cooldown."""
    landing = tmp_path / "in"
    write_lines(landing / "good.jsonl", [customer()])
    write_lines(landing / "h_all_invalid.jsonl", ["{", "[]", "{oops"])
    write_lines(landing / "bad name.jsonl", [customer()])
    alerts_file = tmp_path / "alerts.duckdb"
    (tmp_path / "home").mkdir()
    hook = Hook()
    with hook.running() as url:
        env = {"PIPELINE_LANDING_DIR": str(landing), "DAGSTER_HOME": str(tmp_path / "home"),
               "PIPELINE_ALERTS_DUCKDB_PATH": str(alerts_file),
               "PIPELINE_ALERT_WEBHOOK_URL": url}  # fmt: skip
        first = cli("demo", cwd=tmp_path, env=env)
        assert first.returncode == 1, first.stderr
        second = cli("demo", cwd=tmp_path, env=env)
        assert second.returncode == 1, second.stderr
    with duckdb.connect(str(alerts_file), read_only=True) as conn:
        stored = conn.execute(
            "SELECT alert_key, status, webhook_status FROM alerts ORDER BY alert_key"
        ).fetchall()
    # each failed check once (the hard ceiling that stopped the run says why: no separate
    # run-failure alert), and the skipped file
    assert stored == [
        ("check:customers:schema_error_rate_below_hard_ceiling:h_all_invalid", "firing",
         "delivered"),
        ("error_rate:customers:h_all_invalid", "firing", "delivered"),
        ("landing_file_name:bad name.jsonl", "firing", "delivered"),
    ]  # fmt: skip
    assert sorted(b["key"] for b in hook.bodies) == [key for key, _, _ in stored]
    assert url not in first.stdout + first.stderr + second.stdout + second.stderr


@pytest.mark.slow
def test_dlq_list_show_and_replay_through_the_cli_against_a_real_openai_server(tmp_path):
    from pipeline_project.sample_data import write_catalog
    from pipeline_project_tests.helpers import FAKE_KEY, buyer
    from pipeline_project_tests.openai_servers import FaultyEmbeddingsServer, Rule

    landing, catalog = tmp_path / "landing", tmp_path / "catalog.csv"
    write_catalog(catalog, seed=1)
    bought = {f"P{i * 50 + 1:05d}" for i in range(8)}  # what buyer() buys: few model requests
    header, *products = catalog.read_text().splitlines()
    kept = [p for p in products if p.split(",")[0] in bought]
    catalog.write_text("\n".join([header, *kept]) + "\n")
    buyers = [buyer(i, c) for i, c in enumerate(["books", "garden", "toys", "grocery"] * 2)]
    write_lines(landing / "b1.jsonl", buyers)
    env = {
        "PIPELINE_LANDING_DIR": str(landing),
        "PIPELINE_CATALOG_PATH": str(catalog),
        "PIPELINE_EMBEDDING_BACKEND": "openai",
        "PIPELINE_OPENAI_API_KEY": FAKE_KEY,
        "PIPELINE_EMBEDDING_MODEL": "test-embed",
        "PIPELINE_EMBEDDING_DIMENSIONS": "16",
        "PIPELINE_OPENAI_MAX_BATCH_SIZE": "1",
    }
    # one of the four customer profiles fails (the breaker trips above 25% of chunks)
    outage = FaultyEmbeddingsServer(rules=[Rule("500", contains="mostly garden")])
    with outage.running() as url:
        env["PIPELINE_OPENAI_BASE_URL"] = url
        demo = cli("demo", cwd=tmp_path, env=env)
        empty_replay = cli("dlq", "replay", "nope", cwd=tmp_path, env=env)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert empty_replay.returncode == 2 and "nope: no such batch" in empty_replay.stderr

    listed = cli("dlq", "list", cwd=tmp_path, env=env)
    [row] = [ln.split() for ln in listed.stdout.splitlines() if ln.startswith("b1 ")]
    assert row[:5] == ["b1", "inference", "inference_failed", "2", "0"]
    shown = cli("dlq", "show", "b1", cwd=tmp_path, env=env).stdout
    assert shown.count("inference_failed  attempts=3  pending") == 2
    assert "InternalServerError" in shown and "garden" in shown and FAKE_KEY not in shown

    healthy = FaultyEmbeddingsServer()
    with healthy.running() as url:
        env["PIPELINE_OPENAI_BASE_URL"] = url
        first = cli("dlq", "replay", "b1", cwd=tmp_path, env=env)
        second = cli("dlq", "replay", "b1", cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "b1: 2 pending, 2 replayed, 0 still dead-lettered (1 model calls)" in first.stdout
    assert "b1: 0 pending, 0 replayed, 0 still dead-lettered (0 model calls)" in second.stdout
    assert len(healthy.requests) == 1 and "garden" in healthy.requests[0].texts[0]
    row = [ln.split() for ln in cli("dlq", "list", cwd=tmp_path, env=env).stdout.splitlines()
           if ln.startswith("b1 ")][0]  # fmt: skip
    assert row[3:5] == ["0", "2"]
    assert "no pending dead letters" in cli("dlq", "show", "b1", cwd=tmp_path, env=env).stdout
    db = tmp_path / "data" / "warehouse.duckdb"
    assert len(table_rows(db, "customer_embeddings", "b1")) == 8


def test_erase_and_batch_delete_through_the_cli(tmp_path):
    env = {"PIPELINE_EMBEDDING_BACKEND": "hashing"}
    demo = cli("demo", "--rows", "40", cwd=tmp_path, env=env)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    db = tmp_path / "data" / "warehouse.duckdb"
    with duckdb.connect(str(db), read_only=True) as conn:
        [(target, email)] = conn.execute(
            "SELECT customer_id::VARCHAR, email FROM customers WHERE batch_id = 'b001'"
            " ORDER BY line_no LIMIT 1"
        ).fetchall()

    refused = cli("erase", "--customer-id", "ada@example.com", cwd=tmp_path, env=env)
    assert refused.returncode == 2 and "not" in refused.stderr and "UUID" in refused.stderr
    assert "ada@example.com" not in refused.stderr  # a mistyped ID may be personal data

    erased = cli("erase", "--customer-id", target.upper(), cwd=tmp_path, env=env)
    assert erased.returncode == 0, erased.stdout + erased.stderr
    assert "erased 1 of 1 customers" in erased.stdout and "b001.jsonl" in erased.stdout
    assert target not in erased.stdout + erased.stderr and email not in erased.stdout
    with duckdb.connect(str(db), read_only=True) as conn:
        assert conn.execute(
            "SELECT count(*) FROM customers WHERE customer_id = ?::UUID", [target]
        ).fetchall() == [(0,)]
        assert conn.execute("SELECT count(*) FROM erasure_log").fetchall() == [(1,)]
    with dg.DagsterInstance.from_config(str(tmp_path / ".dagster_home")) as i:
        [record] = i.get_run_records(dg.RunsFilter(job_name="erase_customers"))
        assert target not in repr(record.dagster_run.run_config)  # only its SHA-256

    deleted = cli("batch", "delete", "b002", cwd=tmp_path, env=env)
    assert deleted.returncode == 0, deleted.stdout + deleted.stderr
    assert "b002: deleted" in deleted.stdout and "b002.jsonl" in deleted.stdout
    assert not (tmp_path / "data" / "landing" / "b002.jsonl").exists()
    missing = cli("batch", "delete", "nope", cwd=tmp_path, env=env)
    assert missing.returncode == 1 and "no batch 'nope'" in missing.stderr
