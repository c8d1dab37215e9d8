"""A project whose record contract has two more fields, added the way a team adapting the project
to its feed adds them: in contract.py only (here: replacing contract.CONTRACT before anything
else is imported, as an edit of that file would). Runs the real ingestion job on a landing file
that uses the new fields and prints one JSON object: what landed where, the columns the UI
shows and the rules the configuration knows.

    python -m pipeline_project_tests.contract_child ROOT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow
import pyarrow.compute as pc

import pipeline_project.contract as contract
from pipeline_project.contract import Field, Rule, value

TIERS = ("bronze", "silver", "gold")


def _whole_positive(data) -> pyarrow.Array:
    units = value(data)
    return pc.and_(pc.greater(units, 0.0), pc.equal(pc.floor(units), units))


# a tier of the customer (optional) and the units of each purchase (optional; a purchase whose
# units are not whole is dropped, not its customer: the rule's declared policy)
LOYALTY = Field(
    "loyaltyTier", "string", "loyalty_tier", "The customer's loyalty tier.", required=False,
    rules=(Rule("must be bronze, silver or gold", lambda d: pc.is_in(value(d), pyarrow.array(TIERS))),),
)  # fmt: skip
QUANTITY = Field(
    "quantity", "number", "quantity", "Units bought.", required=False,
    rules=(Rule("must be a whole number > 0", _whole_positive, policy="drop"),),
)  # fmt: skip
EXTENDED = contract.CONTRACT.with_fields(customer=(LOYALTY,), purchase=(QUANTITY,))


def main(root: Path) -> None:
    contract.CONTRACT = EXTENDED
    # everything below follows from the contract in force when it is imported
    import dagster as dg

    from pipeline_project.assets.validation import ValidationConfig
    from pipeline_project.definitions import build_definitions
    from pipeline_project_tests.helpers import run_batch, settings_in, table_rows

    settings = settings_in(root)
    lines = (root / "lines.jsonl").read_text().splitlines()
    settings.landing.landing_dir.mkdir(parents=True, exist_ok=True)
    (settings.landing.landing_dir / "b1.jsonl").write_text("\n".join(lines) + "\n")
    defs = build_definitions(settings)
    with dg.DagsterInstance.ephemeral() as instance:
        result = run_batch(defs, instance, "b1")
        checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    spec = defs.get_assets_def(dg.AssetKey("customers")).specs_by_key[dg.AssetKey("customers")]
    schema = spec.metadata["dagster/column_schema"]
    db = settings.warehouse.duckdb_path
    out = {
        "success": result.success,
        "checks": checks,
        "customers": [r[1:] for r in table_rows(db, "customers", "b1")],
        "purchases": table_rows(db, "customer_purchases", "b1"),
        "errors": [(r[1], r[3]) for r in table_rows(db, "schema_errors", "b1")],
        "dropped": table_rows(db, "dropped_purchases", "b1"),
        "columns": {c.name: [c.type, c.description] for c in schema.columns},
        "config": ValidationConfig.model_json_schema()["properties"]["drop_purchases_breaking"][
            "description"
        ],
    }
    print(json.dumps(out, default=str))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
