"""The product catalog: loaded from the catalog CSV next to the landing folder."""

from pathlib import Path

import dagster as dg
import duckdb

from pipeline_project.checks.catalog_checks import CATALOG_CHECK_SPECS, catalog_check_results
from pipeline_project.policies import DUCKDB_WRITER_POOL, STAGE_RETRY_POLICY
from pipeline_project.resources import LandingZone, Warehouse
from pipeline_project.tables import PRODUCT_CATALOG

_LOAD_SQL = """
INSERT INTO product_catalog
SELECT product_id, name, category, price, in_stock
FROM read_csv(?, header = true, auto_detect = false, columns = {
    'product_id': 'VARCHAR', 'name': 'VARCHAR', 'category': 'VARCHAR',
    'price': 'DOUBLE', 'in_stock': 'BOOLEAN'})
"""


@dg.multi_asset(
    specs=[
        dg.AssetSpec(
            PRODUCT_CATALOG,
            description="Products (ID, name, category, price, in stock) from the catalog file.",
            group_name="catalog",
            kinds={"duckdb"},
            metadata={"dagster/table_name": PRODUCT_CATALOG},
        )
    ],
    check_specs=CATALOG_CHECK_SPECS,
    pool=DUCKDB_WRITER_POOL,
    retry_policy=STAGE_RETRY_POLICY,
)
def product_catalog(context: dg.AssetExecutionContext, landing: LandingZone, warehouse: Warehouse):
    """Replaces the whole catalog table from the catalog CSV in one transaction."""
    path = Path(landing.catalog_path)
    fingerprint = landing.catalog_fingerprint()
    if fingerprint is None:
        raise dg.Failure(description=f"catalog file {path} not found", allow_retries=False)
    try:
        with warehouse.transaction() as conn:
            conn.execute(f"DELETE FROM {PRODUCT_CATALOG}")
            conn.execute(_LOAD_SQL, [str(path)])
            [(rows, categories, in_stock)] = conn.execute(
                "SELECT count(*), count(DISTINCT category), avg(in_stock::INT) FROM product_catalog"
            ).fetchall()
            checks = catalog_check_results(conn)
    except duckdb.ConversionException as err:
        raise dg.Failure(description=f"catalog file {path} is malformed: {err}") from err
    context.log.info(f"catalog: {rows} products in {categories} categories")
    yield dg.MaterializeResult(
        asset_key=PRODUCT_CATALOG,
        metadata={
            "dagster/row_count": rows,
            "categories": categories,
            "in_stock_share": round(in_stock or 0.0, 4),
            "catalog_fingerprint": fingerprint,
        },
    )
    yield from checks
