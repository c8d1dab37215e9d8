"""Checks on the product catalog: unique product IDs, no negative prices."""

import dagster as dg
import duckdb

UNIQUE_PRODUCT_IDS = "unique_product_ids"
PRICES_NON_NEGATIVE = "prices_non_negative"

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
]


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
