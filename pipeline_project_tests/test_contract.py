"""The record's contract is one declaration (contract.py): a field added there is extracted,
judged, stored, described and configurable without another edit."""

from __future__ import annotations

import json
import subprocess
import sys

import duckdb
import pytest

from pipeline_project.contract import CONTRACT, Contract, Field
from pipeline_project.core import validation as v
from pipeline_project.resources import Warehouse
from pipeline_project_tests.contract_child import EXTENDED
from pipeline_project_tests.helpers import customer, store_and_validate, write_lines

P = {"productId": "P00001", "amount": 12.5, "date": "2024-01-02T03:04:05Z"}
ID = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4{}"

# (line, where it ends: kept / rejected with reasons / kept with a purchase dropped)
CASES = [
    (customer(id=ID.format(1), loyaltyTier="gold", purchaseHistory=[{**P, "quantity": 2}]), "kept"),
    (customer(id=ID.format(2)), "kept"),  # both new fields absent: they are optional
    (customer(id=ID.format(3), loyaltyTier="silver", purchaseHistory=[]), "kept"),
    (json.dumps({**json.loads(customer(id=ID.format(4))), "loyaltyTier": None,
                 "purchaseHistory": [{**P, "quantity": None}]}),
     "kept"),  # null is absent for an optional field
    (customer(id=ID.format(5), loyaltyTier="platinum"),
     ["loyaltyTier: must be bronze, silver or gold (got 'platinum')"]),
    (customer(id=ID.format(6), loyaltyTier=7), ["loyaltyTier: must be a string (got number)"]),
    (customer(id=ID.format(7), purchaseHistory=[{**P, "quantity": "two"}]),
     ["purchaseHistory[0].quantity: must be a number (got string)"]),
    (customer(id=ID.format(8), purchaseHistory=[P, {**P, "quantity": 1.5}]), "dropped"),
    (customer(id=ID.format(9), loyaltyTier="bronze", purchaseHistory=[{**P, "quantity": 0}, {}]),
     ["purchaseHistory[1].productId: is required", "purchaseHistory[1].amount: is required",
      "purchaseHistory[1].date: is required",
      "purchaseHistory[0].quantity: must be a whole number > 0 (got '0.0')"]),
]  # fmt: skip
# enough valid lines that the batch stays below the error rate that stops it
PADDING = [
    (customer(id=f"1a1b2c3d-4e5f-4a6b-8c7d-{n:012d}", loyaltyTier="silver"), "kept")
    for n in range(100)
]


def test_a_field_added_to_the_contract_alone_is_validated_stored_described_and_configurable(
    tmp_path,
):
    """A child process replaces the contract with one that has two more fields (a customer's
    loyalty tier; a purchase's quantity, whose rule drops the purchase) and runs the real
    ingestion job: every line ends where the new rules say, the new columns hold the values,
    the UI's column schema describes them and the configuration knows the new rule."""
    cases = CASES + PADDING
    (tmp_path / "lines.jsonl").write_text("\n".join(line for line, _ in cases) + "\n")
    child = subprocess.run(
        [sys.executable, "-m", "pipeline_project_tests.contract_child", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert child.returncode == 0, child.stderr[-3000:]
    out = json.loads(child.stdout.strip().splitlines()[-1])
    assert out["success"] and all(out["checks"].values()), out["checks"]

    kept = {line_no: row for line_no, *row in out["customers"]}
    assert sorted(kept) == [n for n, (_, end) in enumerate(cases, 1) if end in ("kept", "dropped")]
    tier = {n: row[3] for n, row in kept.items()}  # customer_id, email, created_at, loyalty_tier
    assert tier == {1: "gold", 2: None, 3: "silver", 4: None, 8: None} | {
        n: "silver" for n in range(len(CASES) + 1, len(cases) + 1)
    }
    quantity = {(r[2], r[3]): r[-1] for r in out["purchases"]}  # (line_no, idx) -> quantity
    assert quantity[(1, 0)] == 2.0 and quantity[(2, 0)] is None and quantity[(4, 0)] is None
    assert (8, 1) not in quantity and quantity[(8, 0)] is None  # the dropped one is not there
    [dropped] = out["dropped"]
    assert dropped[1:3] == [8, 1] and dropped[-2] == 1.5  # ..., quantity, reasons
    assert dropped[-1] == ["purchaseHistory[1].quantity: must be a whole number > 0 (got '1.5')"]
    rejected = {n: end for n, (_, end) in enumerate(CASES, 1) if isinstance(end, list)}
    assert {n: errors for n, errors in out["errors"]} == rejected

    assert out["columns"]["loyalty_tier"] == ["VARCHAR", "The customer's loyalty tier."]
    assert "quantity: must be a whole number > 0" in out["config"]
    assert "Unset: the rules the record's contract declares dropping (quantity:" in out["config"]


def test_the_typed_parse_equals_the_per_field_path_for_added_fields(tmp_path):
    """The fast path (one typed parse) and the per-field path give the same columns for the
    added fields, optional ones absent, null, of the wrong kind or valid."""
    lines = [line for line, _ in CASES] + [
        customer(loyaltyTier=["gold"]), customer(loyaltyTier={"a": 1}), customer(loyaltyTier=True),
        customer(purchaseHistory=[{**P, "quantity": None}, {**P, "quantity": [1]}, 3]),
    ]  # fmt: skip
    warehouse = Warehouse(database=str(tmp_path / "w.duckdb"))
    store_and_validate(warehouse, write_lines(tmp_path / "b1.jsonl", lines), "b1", 100, 1 << 20)
    with duckdb.connect() as conn:
        v.prepare_batch(conn)
        v.build_chunk_tables(conn, warehouse.raw_file("b1"), 1, 10**6, 1 << 20, EXTENDED)
        typed = [t.to_pylist() for t in v.fetch_chunk(conn, 1 << 20, EXTENDED)]
        [(exact,)] = conn.execute("SELECT count(*) FROM chunk_exact").fetchall()
        conn.execute("INSERT INTO chunk_exact SELECT line_no FROM chunk_lines")
        per_field = [t.to_pylist() for t in v.fetch_chunk(conn, 1 << 20, EXTENDED)]
    assert exact < len(lines) / 2  # optional fields absent do not force the slow path
    assert {"loyaltyTier", "loyaltyTier__type"} <= typed[0][0].keys()
    assert "quantity__type" in typed[1][0]
    assert typed == per_field


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.with_fields(customer=(Field("tags", "list", None),)), "one list"),
        (lambda c: c.with_fields(customer=(Field("email", "string", "email2"),)), "distinct"),
        (lambda c: c.with_fields(purchase=(Field("x", "string", "amount"),)), "one column"),
        (lambda c: Contract(c.customer[1:], c.purchase), "customer_id"),
        (lambda c: Contract(c.customer, c.purchase[:2]), "purchased_at"),
    ],
)
def test_a_contract_the_pipeline_cannot_follow_is_refused_when_declared(change, message):
    with pytest.raises(ValueError, match=message):
        change(CONTRACT)
