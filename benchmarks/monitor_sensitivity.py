"""Seeded anomalies against the monitors: which monitor catches which anomaly, and how often a
monitor alerts on a normal batch. Figures only, never pass/fail.

    python benchmarks/monitor_sensitivity.py [--data generated|real] [--rows 3000]
        [--households N] [--backend hashing|local] [--small]

One batch a day through the production job (`batch_pipeline_job`, in process, a fresh
warehouse and Dagster instance in a temporary folder). Normal batches: `--rows` customers with
±15% volume noise and fewer on weekends (the landing files' times set a day apart), 2% bad
lines, new customers each day (a seed per batch) from one customer base (the same personas).
Between them, one at a time, each followed by normal batches, the anomalies:

- volume_spike, volume_drop: 2.2x and 0.4x the day's volume;
- category_shift: 70% of the customers buy only garden products;
- error_spike: 15% bad lines;
- random_model: the embedding model replaced by one that returns random unit vectors (its own
  model id, the catalog re-embedded with it);
- constant_model: one that returns the same vector for every text;
- half_out_of_stock: half of the in-stock products out of stock in the catalog;
- customer_blind_scorer: a recommendation scorer that ignores the customer (every profile
  scored as one fixed vector: one list per segment, a few lists for the whole batch);
- truncated_file: the day's file gzipped and cut in half;
- empty_file: a landing file of zero bytes;
- bad_catalog: a catalog with one product ID twice, loaded before the day's batch;
- future_date: a tenth of the records with a purchase dated 9999-12-31.

`--data real`: the normal batches from real purchases ("The Complete Journey", the extra
`real-data`, converted by benchmarks/real_data.py: `--households` of its 2,469, default all,
shuffled and cut into 4 batches): the 4 real batches as converted first, then each normal day a
sample of the real households (the real batches' size ±15%, each household with the day's own id
and email); free items (sales value 0) dropped by the contract's policy
(`drop_purchases_breaking`), as recommendation_quality.py does. The same anomalies, seeded into
a day's sample of real households: the volume 2.2x and 0.4x the day's (households drawn again),
70% of the customers buying only the LAWN AND GARDEN SHOP's products, 15% of the lines broken
the generator's ways, and the same models, scorer, files, catalogs and date. The plan: 7
normal batches (the volume check's robust rule needs 7), then each anomaly and a normal batch.

A monitor alerts when its check fails (what `check_results_alert_sensor` and
`run_failure_alert_sensor` send). For each batch, `published` counts the rows of
`current_recommendations` it holds (for bad_catalog, the rows scored with that catalog; for
future_date, those of the customers whose record holds the date): the goal is 0 for every broken
output, one alert each, and none on a normal batch. Prints each batch's failed checks and hit
rates, then per monitor the anomalies it caught and the normal batches it alerted on; `--json`
prints the same as one JSON object (the suite's small version,
`pipeline_project_tests/test_monitor_sensitivity.py`, reads it).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import io
import json
import logging
import os
import sys
import tempfile
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from unittest import mock

import duckdb
import numpy as np
import scipy.sparse as sp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# real_data beside this file, also when this module is imported (the quality-gate test does)
sys.path.insert(0, str(REPO / "benchmarks"))

import dagster as dg  # noqa: E402
import real_data  # noqa: E402

from pipeline_project.checks.output_checks import RECOMMENDATION_QUALITY as QUALITY  # noqa: E402
from pipeline_project.checks.verdicts import NOT_JUDGED  # noqa: E402
from pipeline_project.core import recommendation_quality, recommendations  # noqa: E402
from pipeline_project.core.embedding_client import EmbeddingResponse  # noqa: E402
from pipeline_project.definitions import build_definitions  # noqa: E402
from pipeline_project.instance import write_instance_yaml  # noqa: E402
from pipeline_project.resources.embeddings import (  # noqa: E402
    Embedder,
    HashingEmbedder,
    LocalE5Embedder,
)
from pipeline_project.sample_data import (  # noqa: E402
    BAD_KINDS,
    CATEGORIES,
    iter_batch_lines,
    write_catalog,
)
from pipeline_project.sample_data import _break as break_record  # noqa: E402
from pipeline_project.sensors.alerting import alert_finished_run  # noqa: E402
from pipeline_project.settings import (  # noqa: E402
    AlertSettings,
    LandingSettings,
    Settings,
    WarehouseSettings,
)

# Each anomaly and the monitors (checks) named for it: one of them must fail on it.
EXPECTED = {
    "volume_spike": ["record_count_within_expected_range"],
    "volume_drop": ["record_count_within_expected_range"],
    "category_shift": ["segment_share_drift_below_threshold", "embedding_drift_below_threshold"],
    "error_spike": ["schema_error_rate_below_threshold"],
    "random_model": [
        "embedding_model_passes_probe_texts",
        "recommendation_hit_rate_beats_popularity",
    ],
    "constant_model": ["embedding_model_passes_probe_texts", "embedding_drift_below_threshold"],
    "half_out_of_stock": ["in_stock_share_within_expected_range"],
    "customer_blind_scorer": [
        "recommendations_differ_between_customers",
        "recommendation_hit_rate_beats_popularity",
    ],
    "truncated_file": ["landing_file_read_to_the_end_with_records"],
    "empty_file": ["landing_file_read_to_the_end_with_records"],
    "bad_catalog": ["unique_product_ids"],
    "future_date": ["schema_error_rate_below_threshold"],
}
# The anomalies whose output is broken: nothing of it may be published.
BROKEN_OUTPUTS = {"random_model", "constant_model", "customer_blind_scorer", "truncated_file",
                  "empty_file", "bad_catalog", "future_date"}  # fmt: skip
# The alert a check's failure raises is named for the check, except where its stage raises it
ALERTED_AS = {"schema_error_rate_below_threshold": "error_rate"}
FULL_PLAN = ["normal"] * 14 + [k for anomaly in EXPECTED for k in (anomaly, "normal", "normal")]
BROKEN_OUTPUTS_ORDER = ["random_model", "customer_blind_scorer", "constant_model",
                        "truncated_file", "empty_file", "bad_catalog", "future_date"]  # fmt: skip
# The suite's: enough normal batches for every baseline (3), then the anomalies the new
# monitors are for, each followed by a normal batch.
SMALL_PLAN = ["normal"] * 4 + [k for anomaly in BROKEN_OUTPUTS_ORDER for k in (anomaly, "normal")]
# Real data: the 4 real batches, 3 samples of their households (7 batches: the volume check's
# robust rule), then each anomaly followed by a normal batch.
REAL_PLAN = ["normal"] * 7 + [k for anomaly in EXPECTED for k in (anomaly, "normal")]

FIRST_DAY = datetime(2026, 11, 2, 6, 0, tzinfo=UTC).timestamp()  # a Monday
DAY = 86_400
GARDEN = CATEGORIES.index("garden")
POPULATION = 1  # every batch's customers come from one customer base (the same personas)


class _Vectors:
    def __init__(self, make) -> None:
        self._make = make

    def embed(self, texts: Sequence[str]) -> EmbeddingResponse:
        return EmbeddingResponse(np.array([self._make(t) for t in texts], dtype=np.float32))


class RandomUnitEmbedder(Embedder):
    """A broken model: a random unit vector for every text (the same one for the same text)."""

    dimensions: int = 384

    @property
    def kind(self) -> str:
        return "random"

    def model_id(self) -> str:
        return f"benchmark/random-unit-vectors/{self.dimensions}"

    def output_dimensions(self) -> int:
        return self.dimensions

    @contextmanager
    def open(self) -> Iterator[_Vectors]:
        def vector(text: str) -> np.ndarray:
            seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest())
            v = np.random.default_rng(seed).normal(size=self.dimensions)
            return v / np.linalg.norm(v)

        yield _Vectors(vector)


class ConstantEmbedder(Embedder):
    """A broken model: the same unit vector for every text."""

    dimensions: int = 384

    @property
    def kind(self) -> str:
        return "constant"

    def model_id(self) -> str:
        return f"benchmark/constant-vector/{self.dimensions}"

    def output_dimensions(self) -> int:
        return self.dimensions

    @contextmanager
    def open(self) -> Iterator[_Vectors]:
        same = np.full(self.dimensions, 1 / np.sqrt(self.dimensions))
        yield _Vectors(lambda _text: same)


def customer_blind(score):
    """`score` (score_customers) blind to the customer: one fixed profile vector for every
    customer and none of their purchases (only to take out what they bought), each in their own
    segment: one list for the whole batch."""

    def scored(customers, inputs, allowed, weights, **kwargs):
        fixed = inputs.product_vectors.mean(axis=0)
        fixed = fixed / (np.linalg.norm(fixed) or 1.0)
        blind = replace(
            customers,
            profile_vectors=fixed[None, :].astype(customers.profile_vectors.dtype),
            profile_of=np.zeros(len(customers), dtype=np.int64),
            recency=sp.csr_matrix(customers.recency.shape, dtype=np.float32),
        )
        result = score(blind, inputs, allowed, weights, **kwargs)
        if kwargs.get("exclude_bought", True) and customers.recency.nnz:
            # what the customer bought is still never offered
            mine = customers.recency.tocsr()
            bought = np.asarray(mine[result["customer"], result["product"]]).ravel() > 0
            result = {k: (v if k == "available" else v[~bought]) for k, v in result.items()}
        return result

    return scored


def volume(day: int, rows: int, rng: np.random.Generator) -> int:
    weekend = datetime.fromtimestamp(FIRST_DAY + day * DAY, tz=UTC).weekday() >= 5
    return round(rows * (0.85 if weekend else 1.0) * rng.uniform(0.85, 1.15))


class GeneratedBatches:
    """The generator's batches: `rows` customers a day with the volume noise, 2% bad lines
    (15% on error_spike), new customers each day from one customer base."""

    def __init__(self, catalog_path: Path, rows: int) -> None:
        self.catalog = write_catalog(catalog_path, seed=1)
        self.rows = rows
        start, size = self.catalog.category_start[GARDEN], self.catalog.category_size[GARDEN]
        self.shift_to = self.catalog.product_ids[start : start + size]  # garden
        self.run_config: dict = {}

    def size(self, day: int, noise: np.random.Generator) -> int:
        return volume(day, self.rows, noise)

    def name(self, day: int, kind: str) -> str:
        return f"d{day + 1:02d}-{kind.replace('_', '-')}"

    def lines(self, day: int, kind: str, n: int, seed: int) -> list[str]:
        bad_rate = 0.15 if kind == "error_spike" else 0.02
        batch = iter_batch_lines(n, bad_rate, seed, self.catalog, population=POPULATION)
        return [line for _kind, line in batch]


class RealBatches:
    """The real batches (benchmarks/real_data.py: households shuffled and cut into 4 batches,
    each household's last basket held out): the first days land them as converted; a later
    day is a sample of the real households (the real batches' size ±15%, uniform), each with
    a day's own id and email (new customers each day from one customer base, as generated).
    Free items (sales value 0) are dropped by the contract's policy, as the quality benchmark
    does."""

    # the anomaly's products: garden, as generated (118 products)
    SHIFT_CATEGORY = "LAWN AND GARDEN SHOP"

    def __init__(self, catalog_path: Path, folder: Path, households: int | None) -> None:
        real_data.convert(folder, households=households)
        self.batches = [
            path.read_text().splitlines() for path in sorted((folder / "landing").glob("b*.jsonl"))
        ]
        self.pool = [line for batch in self.batches for line in batch]
        self.rows = round(len(self.pool) / len(self.batches))
        catalog_path.write_text((folder / "catalog.csv").read_text())
        with open(catalog_path, newline="") as f:
            rows = csv.DictReader(f)
            self.shift_to = [r["product_id"] for r in rows if r["category"] == self.SHIFT_CATEGORY]
        # the contract's rule, by its text (field: rule), as the run config names it
        drop = {"drop_purchases_breaking": ["amount: must be a finite number > 0"]}
        self.run_config = {"ops": {"validated_customers": {"config": drop}}}

    def _as_converted(self, day: int, kind: str) -> bool:
        return kind == "normal" and day < len(self.batches)

    def size(self, day: int, noise: np.random.Generator) -> int:
        if day < len(self.batches):
            return len(self.batches[day])
        return round(self.rows * noise.uniform(0.85, 1.15))

    def name(self, day: int, kind: str) -> str:
        real = f"-b{day + 1}" if self._as_converted(day, kind) else ""
        return f"d{day + 1:02d}-{kind.replace('_', '-')}{real}"

    def lines(self, day: int, kind: str, n: int, seed: int) -> list[str]:
        if self._as_converted(day, kind):
            return self.batches[day]
        rng = np.random.default_rng(seed)
        picked = rng.choice(len(self.pool), size=n, replace=n > len(self.pool))
        lines = [_as_new_customer(self.pool[i], day, copy) for copy, i in enumerate(picked)]
        return _broken(lines, share=0.15, seed=seed) if kind == "error_spike" else lines


def _as_new_customer(line: str, day: int, copy: int) -> str:
    """A real household's record as a new customer of the day: its own id and email."""
    record = json.loads(line)
    record["id"] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{record['id']}/day/{day}/{copy}"))
    local, domain = record["email"].split("@")
    record["email"] = f"{local}.d{day}.{copy}@{domain}"
    return json.dumps(record, separators=(",", ":"))


def _broken(lines: list[str], share: float, seed: int) -> list[str]:
    """A `share` of the lines broken the generator's ways (its kinds of bad line in turn)."""
    rng = np.random.default_rng(seed)
    out, first_id, broken = [], None, 0
    for line in lines:
        if first_id is not None and rng.random() < share:
            kind = BAD_KINDS[broken % len(BAD_KINDS)]
            line, broken = break_record(kind, json.loads(line), rng, first_id), broken + 1
        else:
            first_id = first_id or json.loads(line)["id"]
        out.append(line)
    return out


def write_batch(
    path: Path, kind: str, lines: list[str], seed: int, shift_to: list[str]
) -> list[str]:
    """The day's landing file from its `lines`, with the anomaly seeded; returns the IDs of
    the customers whose record is poisoned (future_date)."""
    poisoned: list[str] = []
    if kind == "empty_file":
        path.write_bytes(b"")
        return poisoned
    if kind == "future_date":
        lines, poisoned = _date_far_ahead(lines, share=0.1, seed=seed)
    if kind == "category_shift":
        lines = _shifted(lines, shift_to, share=0.7, seed=seed)
    text = "\n".join(lines) + "\n"
    if kind == "truncated_file":  # gzipped, then cut in half: the read breaks mid-file
        packed = gzip.compress(text.encode())
        path.write_bytes(packed[: len(packed) // 2])
    else:
        path.write_text(text)
    return poisoned


def _shifted(lines: list[str], shift_to: list[str], share: float, seed: int) -> list[str]:
    """A `share` of the customers buy only `shift_to`'s products (each purchase's product
    mapped to one of them by its number)."""
    rng = np.random.default_rng(seed)
    out = []
    for line in lines:
        try:
            record = json.loads(line)
            history = record["purchaseHistory"]
            if rng.random() < share:
                for p in history:
                    number = int("".join(c for c in p["productId"] if c.isdigit()) or 0)
                    p["productId"] = shift_to[number % len(shift_to)]
            line = json.dumps(record, separators=(",", ":"))
        except (ValueError, KeyError, TypeError):
            pass  # a bad line stays as it is
        out.append(line)
    return out


def _date_far_ahead(lines: list[str], share: float, seed: int) -> tuple[list[str], list[str]]:
    """A `share` of the records get a purchase dated 9999-12-31 (a broken export's default
    date); returns the lines and their customers' IDs (an ID that another line holds too, a
    bad line's duplicate of a valid customer's, is not the poisoned record's alone: left
    out)."""
    rng = np.random.default_rng(seed)
    out, poisoned, held = [], [], Counter()
    for line in lines:
        try:
            record = json.loads(line)
            held[str(record.get("id"))] += 1
            if record["purchaseHistory"] and rng.random() < share:
                record["purchaseHistory"][0]["date"] = "9999-12-31T00:00:00Z"
                poisoned.append(record["id"])
                line = json.dumps(record, separators=(",", ":"))
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            pass  # a bad line stays as it is
        out.append(line)
    return out, [i for i in poisoned if held[str(i)] == 1]


def set_duplicate_product(path: Path, original: str) -> None:
    """The catalog with its first product listed twice (another name)."""
    lines = original.splitlines()
    first = next(csv.reader(lines[1:2]))
    second = io.StringIO()
    csv.writer(second, lineterminator="").writerow([first[0], "A second name", *first[2:]])
    path.write_text("\n".join([*lines, second.getvalue()]) + "\n")


def set_half_out_of_stock(path: Path, original: str) -> None:
    """Every second product in stock out of stock (the catalog's own spelling of false)."""
    reader = list(csv.DictReader(original.splitlines()))
    in_stock = [r for r in reader if r["in_stock"].lower() == "true"]
    for r in in_stock[::2]:
        r["in_stock"] = "False" if r["in_stock"] == "True" else "false"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(reader[0]))
        writer.writeheader()
        writer.writerows(reader)


def run(
    plan: list[str], rows: int, backend: str, root: Path, log=print, data: str = "generated",
    households: int | None = None,
) -> dict:  # fmt: skip
    """`plan`'s batches, one a day, from the generator (`data="generated"`, `rows` customers
    a day) or from the real data (`"real"`, `households` of them: None for all)."""
    settings = Settings(
        warehouse=WarehouseSettings(duckdb_path=root / "warehouse.duckdb"),
        landing=LandingSettings(root / "landing", catalog_path=root / "catalog.csv"),
        alerts=AlertSettings(alerts_duckdb_path=root / "alerts.duckdb"),
    )
    if data == "real":
        source = RealBatches(settings.landing.catalog_path, root / "real", households)
    else:
        source = GeneratedBatches(settings.landing.catalog_path, rows)
    catalog_text = settings.landing.catalog_path.read_text()
    settings.landing.landing_dir.mkdir(parents=True)
    normal = HashingEmbedder() if backend == "hashing" else LocalE5Embedder()
    embedders = {"random_model": RandomUnitEmbedder(), "constant_model": ConstantEmbedder()}
    home = root / "dagster_home"
    home.mkdir()
    write_instance_yaml(home)
    quiet = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}
    batch_config = {**quiet, **source.run_config}
    noise = np.random.default_rng(20261202)
    batches = []
    with dg.DagsterInstance.from_config(str(home)) as instance:
        loaded_with = None
        for day, kind in enumerate(plan):
            embedder = embedders.get(kind, normal)
            defs = build_definitions(settings, embedder=embedder)
            if kind == "half_out_of_stock":
                set_half_out_of_stock(settings.landing.catalog_path, catalog_text)
            if kind == "bad_catalog":
                set_duplicate_product(settings.landing.catalog_path, catalog_text)
            catalog_alerts: list[str] = []
            catalog_failed: list[str] = []
            versions_before = _catalog_versions(settings)
            if (embedder, kind) != loaded_with:
                catalog_run = defs.resolve_job_def("catalog_job").execute_in_process(
                    instance=instance, run_config=quiet, raise_on_error=False
                )
                # a refused catalog (the good one stays) or one that warns: both alert
                alert_finished_run(instance, catalog_run.dagster_run,
                                   defs.resources["alerts"], _QUIET)  # fmt: skip
                catalog_alerts = _alerted_run(settings, catalog_run.run_id)
                catalog_failed = sorted(
                    e.check_name for e in catalog_run.get_asset_check_evaluations()
                    if not e.passed
                )  # fmt: skip
                if kind != "bad_catalog":
                    assert catalog_run.success, f"catalog_job failed before {kind}"
                loaded_with = (embedder, kind)
            n = source.size(day, noise)
            n = {"volume_spike": round(n * 2.2), "volume_drop": round(n * 0.4)}.get(kind, n)
            batch_id = source.name(day, kind)
            suffix = ".jsonl.gz" if kind == "truncated_file" else ".jsonl"
            path = settings.landing.landing_dir / f"{batch_id}{suffix}"
            lines = [] if kind == "empty_file" else source.lines(day, kind, n, seed=100 + day)
            poisoned = write_batch(path, kind, lines, seed=100 + day, shift_to=source.shift_to)
            landed = FIRST_DAY + day * DAY
            os.utime(path, (landed, landed))
            instance.add_dynamic_partitions("batches", [batch_id])
            job = defs.resolve_job_def("batch_pipeline_job")
            started = time.perf_counter()
            with _scorer(kind):
                result = job.execute_in_process(
                    partition_key=batch_id, instance=instance, run_config=batch_config,
                    raise_on_error=False,
                )  # fmt: skip
            alert_finished_run(instance, result.dagster_run, defs.resources["alerts"], _QUIET)
            outcome = _outcome(batch_id, kind, n, result, _alerted(settings, batch_id))
            outcome["published"] = _published(settings, batch_id, kind, poisoned, versions_before)
            outcome["seconds"] = round(time.perf_counter() - started, 1)
            if catalog_failed or catalog_alerts:
                outcome["failed"] = sorted({*outcome["failed"], *catalog_failed})
                outcome["alerted"] = sorted({*outcome["alerted"], *catalog_alerts})
            batches.append(outcome)
            log(_line(batches[-1]))
            if kind in ("half_out_of_stock", "bad_catalog"):
                settings.landing.catalog_path.write_text(catalog_text)
    return summarize(batches)


@contextmanager
def _scorer(kind: str) -> Iterator[None]:
    if kind != "customer_blind_scorer":
        yield
        return
    blind = customer_blind(recommendations.score_customers)
    with (
        mock.patch.object(recommendations, "score_customers", blind),
        mock.patch.object(recommendation_quality, "score_customers", blind),
    ):
        yield


_QUIET = logging.getLogger("monitor_sensitivity")
_QUIET.addHandler(logging.NullHandler())
_QUIET.propagate = False


def _warehouse_rows(settings: Settings, sql: str, params: list) -> list[tuple]:
    with duckdb.connect(str(settings.warehouse.duckdb_path), read_only=True) as conn:
        return conn.execute(sql, params).fetchall()


def _catalog_versions(settings: Settings) -> int:
    if not settings.warehouse.duckdb_path.exists():
        return 0
    return _warehouse_rows(settings, "SELECT count(*) FROM catalog_versions", [])[0][0]


def _published(
    settings: Settings, batch_id: str, kind: str, poisoned: list[str], versions_before: int
) -> int:
    """The rows of current_recommendations the day's broken output put there."""
    if kind == "bad_catalog":  # scored with a catalog version that the day added
        sql = """SELECT count(*) FROM current_recommendations AS r
                 JOIN batch_publications AS p USING (batch_id) WHERE p.catalog_version > ?"""
        return _warehouse_rows(settings, sql, [versions_before])[0][0]
    if kind == "future_date":  # the customers whose record holds the date
        sql = "SELECT count(*) FROM current_recommendations WHERE customer_id::VARCHAR IN ?"
        return _warehouse_rows(settings, sql, [poisoned])[0][0] if poisoned else 0
    sql = "SELECT count(*) FROM current_recommendations WHERE batch_id = ?"
    return _warehouse_rows(settings, sql, [batch_id])[0][0]


def _alerted_run(settings: Settings, run_id: str) -> list[str]:
    """The monitors that fired an alert for a run without a batch (the catalog's)."""
    with duckdb.connect(str(settings.alerts.alerts_duckdb_path), read_only=True) as conn:
        rows = conn.execute(
            "SELECT DISTINCT monitor FROM alerts WHERE run_id = ? AND status = 'firing'", [run_id]
        ).fetchall()
    return sorted(monitor for (monitor,) in rows)


def _alerted(settings: Settings, batch_id: str) -> list[str]:
    """The monitors that fired an alert for the batch (the alerts table, as the sensors and
    the CLI store them)."""
    path = settings.alerts.alerts_duckdb_path
    if not path.exists():
        return []
    with duckdb.connect(str(path), read_only=True) as conn:
        try:
            rows = conn.execute(
                "SELECT DISTINCT monitor FROM alerts WHERE batch_id = ? AND status = 'firing'",
                [batch_id],
            ).fetchall()
        except duckdb.CatalogException:  # no alert yet, no table
            return []
    return sorted(monitor for (monitor,) in rows)


def _outcome(
    batch_id: str, kind: str, rows: int, result: dg.ExecuteInProcessResult, alerted: list[str]
) -> dict:
    evaluations = result.get_asset_check_evaluations()
    quality = [
        {k: v.value for k, v in e.metadata.items()}
        for e in evaluations
        if e.check_name == "recommendation_hit_rate_beats_popularity"
    ]
    not_judged: dict = {}  # the checks that could not judge, and why (checks/verdicts.py)
    for event in result.get_asset_materialization_events():
        metadata = event.step_materialization_data.materialization.metadata
        if NOT_JUDGED in metadata:
            not_judged |= metadata[NOT_JUDGED].value
    return {
        "batch": batch_id,
        "kind": kind,
        "rows": rows,
        "run_succeeded": result.success,
        "failed": sorted(e.check_name for e in evaluations if not e.passed),
        "alerted": alerted,
        "hit_rate": quality[0].get("hit_rate") if quality else None,
        "popularity_hit_rate": quality[0].get("popularity_hit_rate") if quality else None,
        "quality_verdict": quality[0].get("verdict") if quality else None,
        "lead_z": quality[0].get("lead_standard_errors") if quality else None,
        "most_common_list_share": next(
            (
                e.metadata["most_common_list_share"].value
                for e in evaluations
                if e.check_name == "recommendations_differ_between_customers"
            ),
            None,
        ),  # fmt: skip
        "not_judged": not_judged,
    }


def _line(b: dict) -> str:
    rates = f"hit@10 {b['hit_rate']} vs popularity {b['popularity_hit_rate']} (z {b['lead_z']})"
    if b["hit_rate"] is None and QUALITY in b["not_judged"]:
        rates = f"quality not judged ({b['not_judged'][QUALITY]})"
    rates += f", one list to {b['most_common_list_share']} of profiles"
    rates += f", {b.get('published', 0):,} published, {b.get('seconds')} s"
    run = "" if b["run_succeeded"] else " RUN FAILED"
    alerted = "" if b["alerted"] == b["failed"] else f"  alerted: {b['alerted'] or '-'}"
    return (
        f"{b['batch']:<28} {b['rows']:>6} rows  {rates}{run}  failed: {b['failed'] or '-'}{alerted}"
    )


def summarize(batches: list[dict]) -> dict:
    monitors = sorted({name for b in batches for name in b["failed"]} | {
        name for names in EXPECTED.values() for name in names})  # fmt: skip
    per_monitor = {
        m: {
            "caught": sorted(
                {b["kind"] for b in batches if b["kind"] != "normal" and m in b["failed"]}
            ),
            "normal_alerts": [
                b["batch"] for b in batches if b["kind"] == "normal" and m in b["failed"]
            ],
        }
        for m in monitors
    }
    anomalies = {
        b["batch"]: {
            "kind": b["kind"],
            "caught_by_named": sorted(set(b["failed"]) & set(EXPECTED[b["kind"]])),
            "failed": b["failed"],
            "alerted": b["alerted"],
            "published": b["published"],
        }
        for b in batches
        if b["kind"] != "normal"
    }
    normal = [b for b in batches if b["kind"] == "normal"]
    return {
        "batches": batches,
        "monitors": per_monitor,
        "anomalies": anomalies,
        "missed": sorted(k for k, a in anomalies.items() if not a["caught_by_named"]),
        # broken outputs that put rows into current_recommendations (the goal: none)
        "broken_published": {
            k: a["published"]
            for k, a in anomalies.items()
            if a["kind"] in BROKEN_OUTPUTS and a["published"]
        },
        "normal_batches": len(normal),
        "normal_batches_alerted": sorted(
            b["batch"] for b in normal if b["failed"] or b["alerted"] or not b["run_succeeded"]
        ),
        "anomalies_not_alerted": sorted(
            k
            for k, a in anomalies.items()
            if not set(a["alerted"]) & {ALERTED_AS.get(m, m) for m in EXPECTED[a["kind"]]}
        ),
    }


def report(summary: dict) -> str:
    out = ["", f"{'monitor':<50} {'anomalies caught':<60} normal batches alerted"]
    for monitor, m in summary["monitors"].items():
        caught = ", ".join(m["caught"]) or "-"
        out.append(f"{monitor:<50} {caught:<60} {len(m['normal_alerts'])}")
    out.append("")
    for batch, a in summary["anomalies"].items():
        named = ", ".join(a["caught_by_named"]) or "MISSED"
        out.append(
            f"{batch:<28} caught by {named}; alerted {', '.join(a['alerted']) or '-'};"
            f" {a['published']:,} rows published"
        )
    n, alerted = summary["normal_batches"], summary["normal_batches_alerted"]
    out.append(
        f"\nanomalies missed: {len(summary['missed'])} of {len(summary['anomalies'])}"
        f" (not alerted by a named monitor: {len(summary['anomalies_not_alerted'])});"
        f" normal batches with an alert: {len(alerted)} of {n} {alerted or ''}"
    )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=["generated", "real"], default="generated")
    parser.add_argument("--rows", type=int, default=3000, help="generated: customers a day")
    parser.add_argument(
        "--households", type=int, default=None, help="real: a sample of them (default: all)"
    )
    parser.add_argument("--backend", choices=["hashing", "local"], default="hashing")
    parser.add_argument("--small", action="store_true", help="the suite's short sequence")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--keep", type=Path, help="work in this (new) folder and keep it")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=dg.BetaWarning)
    warnings.filterwarnings("ignore", category=dg.PreviewWarning)
    plan = SMALL_PLAN if args.small else REAL_PLAN if args.data == "real" else FULL_PLAN
    log = (lambda _line: None) if args.json else (lambda line: print(line, flush=True))
    with tempfile.TemporaryDirectory(prefix="monitor-sensitivity-") as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        summary = run(plan, args.rows, args.backend, root, log, args.data, args.households)
    print(json.dumps(summary) if args.json else report(summary))


if __name__ == "__main__":
    main()
