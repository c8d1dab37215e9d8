"""Checks on the product catalog: unique product IDs, no negative prices (both block the load),
and the share of products in stock against the previous catalog's (warns)."""

import dagster as dg
import duckdb

from pipeline_project.checks.verdicts import NotJudged, Verdict

UNIQUE_PRODUCT_IDS = "unique_product_ids"
PRICES_NON_NEGATIVE = "prices_non_negative"
IN_STOCK_SHARE = "in_stock_share_within_expected_range"
# A new catalog whose share of products in stock is below the previous one's by more than this
# part of it warns: the recommendations stay right (only products in stock are ranked), but a
# feed that marks half the shop out of stock is more often a broken export than a sale.
MAX_IN_STOCK_DROP = 0.25

CATALOG_CHECK_SPECS = [
    dg.AssetCheckSpec(
        UNIQUE_PRODUCT_IDS,
        asset="product_catalog",
        blocking=True,
        description="Each product_id appears once.",
    ),
    dg.AssetCheckSpec(
        PRICES_NON_NEGATIVE,
        asset="product_catalog",
        blocking=True,
        description="No product has a negative price.",
    ),
    dg.AssetCheckSpec(
        IN_STOCK_SHARE,
        asset="product_catalog",
        blocking=False,
        description=f"The share of products in stock fell by at most {MAX_IN_STOCK_DROP:.0%} of"
        " the previous catalog's (a warning: the catalog loads).",
    ),
]


def in_stock_share_verdict(previous: float | None, share: float) -> Verdict:
    """The new catalog's share of products in stock against the previous catalog's (None: no
    previous catalog, nothing to judge against)."""
    if previous is None:
        return NotJudged(IN_STOCK_SHARE, "no previous catalog to compare with")
    floor = previous * (1 - MAX_IN_STOCK_DROP)
    return dg.AssetCheckResult(
        asset_key="product_catalog",
        check_name=IN_STOCK_SHARE,
        passed=share >= floor,
        severity=dg.AssetCheckSeverity.WARN,
        description=f"{share:.1%} of the products are in stock (the previous catalog:"
        f" {previous:.1%}; at least {floor:.1%} expected)",
        metadata={"in_stock_share": round(share, 4), "previous_in_stock_share": round(previous, 4)},
    )


def catalog_check_results(conn: duckdb.DuckDBPyConnection) -> list[dg.AssetCheckResult]:
    """Judged on the loaded rows inside the transaction that would replace the catalog."""
    [(duplicates, example, negative)] = conn.execute(
        "SELECT (SELECT count(*) FROM (SELECT product_id FROM product_catalog GROUP BY 1"
        " HAVING count(*) > 1)), (SELECT min(product_id) FROM (SELECT product_id FROM"
        " product_catalog GROUP BY 1 HAVING count(*) > 1)),"
        " (SELECT count(*) FROM product_catalog WHERE price < 0)"
    ).fetchall()
    return [
        dg.AssetCheckResult(
            asset_key="product_catalog",
            check_name=UNIQUE_PRODUCT_IDS,
            passed=duplicates == 0,
            description=f"{duplicates} product IDs appear more than once"
            + (f" (e.g. {example})" if example else ""),
            metadata={"duplicated_product_ids": duplicates},
        ),
        dg.AssetCheckResult(
            asset_key="product_catalog",
            check_name=PRICES_NON_NEGATIVE,
            passed=negative == 0,
            description=f"{negative} products have a negative price",
            metadata={"negative_prices": negative},
        ),
    ]
