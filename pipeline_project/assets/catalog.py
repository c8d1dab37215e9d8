"""The product catalog: loaded from the catalog CSV next to the landing folder, and embedded."""

from pathlib import Path

import dagster as dg
import duckdb

from pipeline_project.asset_metadata import one_table_metadata
from pipeline_project.assets.inference import InferenceConfig, cache_writer
from pipeline_project.checks.catalog_checks import (
    CATALOG_CHECK_SPECS,
    catalog_check_results,
    in_stock_share_verdict,
)
from pipeline_project.checks.verdicts import judged, not_judged
from pipeline_project.core.catalog import record_version
from pipeline_project.core.embedding_cache import missing_texts
from pipeline_project.core.inference import CircuitBreakerOpen, embed_into_cache
from pipeline_project.core.publications import live_batches
from pipeline_project.core.recommendations import PRODUCT_TEXTS_SQL, store_product_embeddings
from pipeline_project.core.segmentation import batches_to_reprofile
from pipeline_project.policies import (
    DUCKDB_WRITER_POOL,
    STAGE_RETRY_POLICY,
    fails_at_once_when_deterministic,
)
from pipeline_project.resources import LandingZone, Warehouse
from pipeline_project.resources.embeddings import Embedder
from pipeline_project.sensors.rescore import REPROFILE_METADATA, RESCORE_METADATA
from pipeline_project.tables import PRODUCT_CATALOG, PRODUCT_EMBEDDINGS

_LOAD_SQL = """
INSERT INTO product_catalog BY NAME
SELECT product_id, name, category, price, in_stock
FROM read_csv(?, header = true, auto_detect = false, columns = {
    'product_id': 'VARCHAR', 'name': 'VARCHAR', 'category': 'VARCHAR',
    'price': 'DOUBLE', 'in_stock': 'BOOLEAN'})
"""


class _Refused(Exception):
    """A catalog that failed a blocking check: its transaction rolls back."""

    def __init__(self, checks: list[dg.AssetCheckResult]) -> None:
        super().__init__("catalog refused")
        self.checks = checks


@dg.multi_asset(
    specs=[
        dg.AssetSpec(
            PRODUCT_CATALOG,
            description="Products (ID, name, category, price, in stock) from the catalog file.",
            group_name="catalog",
            kinds={"duckdb"},
        )
    ],
    check_specs=CATALOG_CHECK_SPECS,
    # a check with too little data to judge yields no result (checks/verdicts.py)
    can_subset=True,
    pool=DUCKDB_WRITER_POOL,
    retry_policy=STAGE_RETRY_POLICY,
)
@fails_at_once_when_deterministic
def product_catalog(context: dg.AssetExecutionContext, landing: LandingZone, warehouse: Warehouse):
    """Replaces the whole catalog table from the catalog CSV in one transaction, judged before
    it commits: a catalog that fails a blocking check is rolled back (the old catalog and every
    recommendation stay as they were) and the run fails with the reason."""
    name = Path(landing.catalog_path).name
    fingerprint = landing.catalog_fingerprint()
    if fingerprint is None:
        raise dg.Failure(
            description=f"catalog file {landing.catalog_path} not found", allow_retries=False
        )
    try:
        with landing.local_catalog() as path:
            previous, rows, categories, in_stock, version, new_version, checks = _load(
                warehouse, path
            )
    except duckdb.ConversionException as err:
        raise dg.Failure(
            description=f"catalog file {name} is malformed: {err}", allow_retries=False
        ) from err
    except _Refused as refused:
        yield from refused.checks
        reasons = "; ".join(c.description for c in refused.checks if not c.passed)
        raise dg.Failure(
            description=f"catalog file {name} not loaded ({reasons}): the previous catalog"
            " and every recommendation stay as they were",
            allow_retries=False,
        ) from None
    context.log.info(f"catalog: {rows} products in {categories} categories")
    verdicts = [in_stock_share_verdict(previous, in_stock or 0.0)]
    yield dg.MaterializeResult(
        asset_key=PRODUCT_CATALOG,
        metadata={
            **one_table_metadata(warehouse, PRODUCT_CATALOG, None),
            "categories": categories,
            "catalog_version": version,
            "new_catalog_version": new_version,
            "in_stock_share": round(in_stock or 0.0, 4),
            "catalog_fingerprint": fingerprint,
            **not_judged(verdicts, context.log),
        },
    )
    yield from checks
    yield from judged(verdicts)


def _load(warehouse: Warehouse, path: Path) -> tuple:
    """The catalog file replaces the table in one transaction, judged before it commits."""
    for attempt in warehouse.write_attempts():
        with attempt, warehouse.transaction() as conn:
            previous = _in_stock_share(conn)  # the catalog it replaces (None: none)
            conn.execute(f"DELETE FROM {PRODUCT_CATALOG}")
            conn.execute(_LOAD_SQL, [str(path)])
            [(rows, categories, in_stock)] = conn.execute(
                "SELECT count(*), count(DISTINCT category), avg(in_stock::INT) FROM product_catalog"
            ).fetchall()
            checks = catalog_check_results(conn)
            if any(not check.passed for check in checks):  # every catalog check blocks
                raise _Refused(checks)
            version, new_version = record_version(conn)
    return previous, rows, categories, in_stock, version, new_version, checks


def _in_stock_share(conn) -> float | None:
    [(share,)] = conn.execute(f"SELECT avg(in_stock::INT) FROM {PRODUCT_CATALOG}").fetchall()
    return share


@dg.asset(
    deps=[PRODUCT_CATALOG],
    pool=DUCKDB_WRITER_POOL,
    retry_policy=STAGE_RETRY_POLICY,
    group_name="recommendations",
    kinds={"duckdb"},
    automation_condition=dg.AutomationCondition.eager(),
)
@fails_at_once_when_deterministic
def product_embeddings(
    context: dg.AssetExecutionContext,
    config: InferenceConfig,
    warehouse: Warehouse,
    embedder: Embedder,
) -> dg.MaterializeResult:
    """Each catalog product's text ("Product: <name>. Category: <category>.") and the key of
    its embedding in embedding_cache, from the same model as the customers."""
    model, dimensions = embedder.model_id(), embedder.output_dimensions()
    with warehouse.get_connection() as conn:
        missing = missing_texts(conn, PRODUCT_TEXTS_SQL, model, dimensions)
    try:
        outcome = embed_into_cache(
            missing, embedder, config, cache_writer(warehouse), context.log.info, "products"
        )
    except CircuitBreakerOpen as err:
        raise dg.Failure(description=str(err)) from err
    if outcome.failures:
        example = next(iter(outcome.failures.values()))
        raise dg.Failure(
            description=f"{len(outcome.failures)} product texts could not be embedded "
            f"(e.g. {example.reason}: {example.error})"
        )
    for attempt in warehouse.write_attempts():
        with attempt, warehouse.transaction() as conn:
            store_product_embeddings(conn, model, dimensions)
            # profiles built with another vocabulary (or none): rebuilt from their profiles
            reprofile = batches_to_reprofile(conn, model, dimensions)
            # the batches holding current answers scored with another catalog: re-scored
            stale = live_batches(
                conn,
                "catalog_version IS DISTINCT FROM"
                " (SELECT max(catalog_version) FROM catalog_versions)",
            )
    return dg.MaterializeResult(
        metadata={
            RESCORE_METADATA: dg.MetadataValue.json(stale),
            REPROFILE_METADATA: dg.MetadataValue.json(reprofile),
            **one_table_metadata(warehouse, PRODUCT_EMBEDDINGS, None),
            "texts_embedded": len(outcome.vectors),
            "model_calls": outcome.model_calls,
            "model": model,
        }
    )
