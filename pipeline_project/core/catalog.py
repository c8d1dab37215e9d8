"""The catalog's versions: a catalog whose content differs from the one before is a new version.

Recommendations record the catalog version they were scored with (batch_publications), so that a
new catalog re-scores the batches holding current answers (rescore_sensor) and nothing else.
"""

from __future__ import annotations

import duckdb

from pipeline_project.tables import CATALOG_VERSIONS, PRODUCT_CATALOG

# One row per product ID, whatever the table holds (a warehouse whose catalog was committed
# before it was judged may hold a duplicate): what every reader of the catalog reads.
PRODUCTS = f"""(SELECT DISTINCT ON (product_id) * FROM {PRODUCT_CATALOG}
    ORDER BY product_id, name, category, price, in_stock)"""

# What profiles read of the catalog: each product's category (NULL: no catalog).
_VOCABULARY_SQL = f"""
SELECT CASE WHEN count(*) > 0 THEN md5(string_agg(product_id || '|' || coalesce(category, ''),
                                                  chr(10) ORDER BY product_id)) END
FROM {PRODUCTS} AS cat
"""


def vocabulary(conn: duckdb.DuckDBPyConnection) -> str | None:
    """A digest of the catalog's categories per product: what a profile text reads of it. A
    catalog that changes only prices or stock keeps its vocabulary."""
    [(digest,)] = conn.execute(_VOCABULARY_SQL).fetchall()
    return digest


# The content of the catalog table, whatever the order of the file's lines.
CATALOG_DIGEST_SQL = f"""
SELECT md5(coalesce(string_agg(product_id || '|' || name || '|' || category || '|' || price
                               || '|' || in_stock, chr(10) ORDER BY product_id, name), ''))
       AS content_digest, count(*) AS products
FROM {PRODUCT_CATALOG}
"""


def record_version(conn: duckdb.DuckDBPyConnection) -> tuple[int, bool]:
    """The loaded catalog's version (caller's transaction): a new one when its content differs
    from the newest version's; returns the version and whether it is new."""
    [(digest, products)] = conn.execute(CATALOG_DIGEST_SQL).fetchall()
    newest = conn.execute(
        f"SELECT catalog_version, content_digest FROM {CATALOG_VERSIONS}"
        " ORDER BY catalog_version DESC LIMIT 1"
    ).fetchall()
    if newest and newest[0][1] == digest:
        return newest[0][0], False
    version = (newest[0][0] if newest else 0) + 1
    conn.execute(
        f"INSERT INTO {CATALOG_VERSIONS} BY NAME SELECT ? AS catalog_version,"
        " ? AS content_digest, ? AS products, now() AS loaded_at",
        [version, digest, products],
    )
    return version, True
