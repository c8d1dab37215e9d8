"""Every table the pipeline owns, declared once: its columns (name, type, NOT NULL, default).

The DDL, the column lists of every insert, the schema the UI shows and the warehouse's
migrations all follow from these declarations (see schema.py). Each table is named after the
asset that writes it; the few that no asset writes alone (the batch register, the embedding
cache, the dead letters) say so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipeline_project.contract import CONTRACT

RAW_CUSTOMERS = "raw_customers"
CUSTOMERS = "customers"
CUSTOMER_PURCHASES = "customer_purchases"
SCHEMA_ERRORS = "schema_errors"
DROPPED_PURCHASES = "dropped_purchases"
PRODUCT_CATALOG = "product_catalog"
CATALOG_VERSIONS = "catalog_versions"
CUSTOMER_EMBEDDINGS = "customer_embeddings"
PRIOR_PURCHASES = "prior_purchases"
EMBEDDING_CACHE = "embedding_cache"
DEAD_LETTER = "dead_letter"
SEGMENT_MODEL = "segment_model"
SEGMENT_AFFINITY = "segment_affinity"
PRODUCT_NEIGHBOURS = "product_neighbours"
PRODUCT_FACTORS = "product_factors"
TASTES = "tastes"
TASTE_SHARES = "taste_shares"
CUSTOMER_SEGMENTS = "customer_segments"
PRODUCT_EMBEDDINGS = "product_embeddings"
RECOMMENDATIONS = "recommendations"
RECOMMENDATION_SHORTFALLS = "recommendation_shortfalls"
VALIDATED_RECOMMENDATIONS = "validated_recommendations"
REJECTED_RECOMMENDATIONS = "rejected_recommendations"
BATCHES = "batches"
BATCH_PUBLICATIONS = "batch_publications"
WAREHOUSE_SCHEMA = "warehouse_schema"
ERASURE_LOG = "erasure_log"
ALERTS = "alerts"


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    not_null: bool = True
    # SQL default: what an older warehouse's rows get when a migration adds the column
    default: str | None = None

    def ddl(self, constrained: bool = True) -> str:
        """The column's definition; without its NOT NULL when not `constrained` (a column that
        a migration adds to rows that have no value for it)."""
        text = f"{_quoted(self.name)} {self.type}"
        if self.default is not None:
            text += f" DEFAULT {self.default}"
        return text + (" NOT NULL" if self.not_null and constrained else "")


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[Column, ...]
    primary_key: tuple[str, ...] = ()

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    def column(self, name: str) -> Column:
        return next(c for c in self.columns if c.name == name)

    def ddl(self, lakehouse: bool = False) -> str:
        """CREATE TABLE IF NOT EXISTS; DuckLake enforces NOT NULL but no PRIMARY KEY or
        UNIQUE constraint: the writes keep those rows unique themselves (embedding_cache.py)."""
        parts = [c.ddl() for c in self.columns]
        if self.primary_key and not lakehouse:
            parts.append(f"PRIMARY KEY ({', '.join(self.primary_key)})")
        return f"CREATE TABLE IF NOT EXISTS {self.name} (\n    " + ",\n    ".join(parts) + "\n)"

    def columns_sql(self) -> str:
        """The column list an INSERT names, in the declared order."""
        return ", ".join(_quoted(name) for name in self.column_names)


_RESERVED = {"name", "text", "error", "distance", "similarity", "rank"}


def _quoted(name: str) -> str:
    return f'"{name}"' if name in _RESERVED else name


def _table(name: str, *columns: Column, primary_key: tuple[str, ...] = ()) -> Table:
    return Table(name, columns, primary_key)


def _c(name: str, type_: str, not_null: bool = True, default: str | None = None) -> Column:
    return Column(name, type_, not_null, default)


def _contract_columns(fields, landed: bool = False) -> tuple[Column, ...]:
    """The columns of the contract's stored fields (Field.stored_type, NOT NULL when required;
    `landed`: the values as they came, NULL where broken, see Field.landed_type)."""
    return tuple(
        _c(f.column, f.landed_type, False) if landed else _c(f.column, f.stored_type, f.required)
        for f in fields
    )


# A recommendation and the parts of its score (explainable): confidence = the weighted mean of
# segment_affinity, co_purchase and similarity_score (core/recommendations.py).
_RECOMMENDATION_COLUMNS = (
    _c("batch_id", "VARCHAR"),
    _c("line_no", "BIGINT"),
    _c("customer_id", "UUID"),
    _c("rank", "INTEGER"),
    _c("product_id", "VARCHAR"),
    _c("segment_id", "INTEGER"),
    _c("confidence", "DOUBLE"),
    _c("predicted_value", "DOUBLE"),
    _c("segment_affinity", "DOUBLE"),
    _c("similarity", "DOUBLE"),
    _c("similarity_score", "DOUBLE"),
    _c("model_version", "INTEGER"),
    # the co-purchase and taste parts of the score (0..1); older rows: 0
    _c("co_purchase", "DOUBLE", default="0"),
    _c("taste", "DOUBLE", default="0"),
)

# raw_customers is a view over one Parquet file per batch (see resources/warehouse.py).
RAW_CUSTOMERS_COLUMNS: dict[str, str] = {
    "batch_id": "VARCHAR",
    "line_no": "BIGINT",
    "raw": "VARCHAR",
    "byte_length": "BIGINT",
    "utf8_ok": "BOOLEAN",
    "read_error": "VARCHAR",
    "ingested_at": "TIMESTAMPTZ",
}

# No primary keys on the batch tables: DuckDB keeps ART indexes in memory, which would grow with
# the batch size. Uniqueness and conservation are asset checks instead.
_TABLES = [
    # The register of batches: one row per batch, in the order they arrived (arrival_seq: the
    # order the batches were registered as partitions, whatever order their runs take). Written
    # by raw_customers (arrival, content) and validated_customers (accepted or not).
    _table(
        BATCHES,
        _c("batch_id", "VARCHAR"),
        _c("arrival_seq", "BIGINT"),
        _c("landing_file", "VARCHAR", False),
        _c("content_digest", "VARCHAR", False),
        _c("lines", "BIGINT", False),
        _c("arrived_at", "TIMESTAMPTZ"),
        _c("ingested_at", "TIMESTAMPTZ", False),
        _c("accepted", "BOOLEAN", False),
        _c("validated_at", "TIMESTAMPTZ", False),
        # the catalog's vocabulary (core/catalog.vocabulary) its profiles were built with;
        # NULL: built without a catalog (rebuilt once one is there)
        _c("profile_vocabulary", "VARCHAR", False),
    ),
    # The valid records and their purchases: a column per stored field of the record's
    # contract (contract.py), an optional field's NULL for rows where it was absent.
    _table(
        CUSTOMERS,
        _c("batch_id", "VARCHAR"),
        _c("line_no", "BIGINT"),
        *_contract_columns(CONTRACT.stored_customer),
        _c("purchase_count", "INTEGER"),
        _c("total_spend", "DOUBLE"),
    ),
    _table(
        CUSTOMER_PURCHASES,
        _c("batch_id", "VARCHAR"),
        _c("customer_id", "UUID"),
        _c("line_no", "BIGINT"),
        _c("purchase_idx", "INTEGER"),
        *_contract_columns(CONTRACT.stored_purchase),
    ),
    _table(
        SCHEMA_ERRORS,
        _c("batch_id", "VARCHAR"),
        _c("line_no", "BIGINT"),
        _c("raw", "VARCHAR"),
        _c("errors", "VARCHAR[]"),
        _c("error_count", "INTEGER"),
        _c("detected_at", "TIMESTAMPTZ"),
    ),
    # Purchases dropped from a kept record's history because they broke a rule the configuration
    # drops purchases for (validated_customers' drop_purchases_breaking), with every reason.
    _table(
        DROPPED_PURCHASES,
        _c("batch_id", "VARCHAR"),
        _c("line_no", "BIGINT"),
        _c("purchase_idx", "INTEGER"),
        _c("customer_id", "UUID"),
        # the purchase's values as landed (a field that broke its kind: NULL)
        *_contract_columns(CONTRACT.stored_purchase, landed=True),
        _c("reasons", "VARCHAR[]"),
    ),
    _table(
        PRODUCT_CATALOG,
        _c("product_id", "VARCHAR"),
        _c("name", "VARCHAR"),
        _c("category", "VARCHAR"),
        _c("price", "DOUBLE"),
        _c("in_stock", "BOOLEAN"),
    ),
    # Every catalog that replaced the one before: the newest row is the catalog in use.
    _table(
        CATALOG_VERSIONS,
        _c("catalog_version", "INTEGER"),
        _c("content_digest", "VARCHAR"),
        _c("products", "BIGINT"),
        _c("loaded_at", "TIMESTAMPTZ"),
    ),
    # One vector per distinct text and model: customers who behave alike share a profile text,
    # so a batch of millions of customers stores (and embeds) only its few thousand profiles.
    # FLOAT[] rather than FLOAT[n]: one cache serves models of different widths; every row is
    # checked to hold exactly `dimensions` finite values before it is written.
    _table(
        EMBEDDING_CACHE,
        _c("model", "VARCHAR"),
        _c("dimensions", "INTEGER"),
        _c("text_hash", "VARCHAR"),
        _c("text", "VARCHAR"),
        _c("embedding", "FLOAT[]"),
        _c("created_at", "TIMESTAMPTZ"),
        primary_key=("model", "dimensions", "text_hash"),
    ),
    _table(
        CUSTOMER_EMBEDDINGS,
        _c("batch_id", "VARCHAR"),
        _c("line_no", "BIGINT"),
        _c("customer_id", "UUID"),
        _c("model", "VARCHAR"),
        _c("dimensions", "INTEGER"),
        _c("text_hash", "VARCHAR"),
        _c("profile_text", "VARCHAR"),
    ),
    # The purchases of a batch's customers that earlier accepted batches (in arrival order)
    # delivered and the batch's own records do not hold, counted once each: with the batch's own
    # purchases, each customer's whole known history as of the batch. Written with the profiles.
    _table(
        PRIOR_PURCHASES,
        _c("batch_id", "VARCHAR"),
        _c("line_no", "BIGINT"),
        _c("customer_id", "UUID"),
        _c("product_id", "VARCHAR"),
        _c("amount", "DOUBLE"),
        _c("purchased_at", "TIMESTAMPTZ"),
        _c("quantity", "INTEGER"),
        _c("first_batch_id", "VARCHAR"),
    ),
    _table(
        DEAD_LETTER,
        _c("batch_id", "VARCHAR"),
        _c("stage", "VARCHAR"),
        _c("record_key", "VARCHAR"),
        _c("reason", "VARCHAR"),
        _c("error", "VARCHAR"),
        _c("attempts", "INTEGER"),
        _c("payload", "VARCHAR", False),
        _c("created_at", "TIMESTAMPTZ"),
        _c("replayed_at", "TIMESTAMPTZ", False),
    ),
    # Every trained model is kept; the newest version assigns segments.
    _table(
        SEGMENT_MODEL,
        _c("model_version", "INTEGER"),
        _c("segment_id", "INTEGER"),
        _c("centroid", "FLOAT[]"),
        _c("weight", "DOUBLE"),
        _c("embedding_model", "VARCHAR"),
        _c("dimensions", "INTEGER"),
        _c("trained_at", "TIMESTAMPTZ"),
        # what it was trained on: a model trained on less, or on another vocabulary, than the
        # profiles it would score is retrained (customer_segments); NULL: not recorded
        _c("trained_batches", "BIGINT", False),
        _c("trained_profiles", "BIGINT", False),
        _c("vocabulary", "VARCHAR", False),
    ),
    # What each segment of a model version bought, learned with the model from the customers it
    # was trained on: recommendations read it, never the purchases of other batches.
    _table(
        SEGMENT_AFFINITY,
        _c("model_version", "INTEGER"),
        _c("segment_id", "INTEGER"),
        _c("product_id", "VARCHAR"),
        _c("purchases", "DOUBLE"),
        _c("avg_amount", "DOUBLE"),
        # the segment's customers who bought it, each weighted by how recently (exp(-days /
        # recency_days) before the newest training purchase), over the segment's customers
        _c("share", "DOUBLE", default="0"),
        _c("customers", "DOUBLE", default="0"),  # the segment's customers
    ),
    # Each product's most co-purchased products (cosine over customers), learned with the
    # segment model version (core/co_purchase.py).
    _table(
        PRODUCT_NEIGHBOURS,
        _c("model_version", "INTEGER"),
        _c("product_id", "VARCHAR"),
        _c("neighbour_id", "VARCHAR"),
        _c("similarity", "DOUBLE"),
    ),
    # What customers buy, learned with the segment model version (core/co_purchase.py): each
    # product's purchase vector, the tastes (clusters of customers' purchase vectors) and each
    # taste's recency-weighted share of each product.
    _table(
        PRODUCT_FACTORS,
        _c("model_version", "INTEGER"),
        _c("product_id", "VARCHAR"),
        _c("factor", "FLOAT[]"),
    ),
    _table(
        TASTES,
        _c("model_version", "INTEGER"),
        _c("taste_id", "INTEGER"),
        _c("centroid", "FLOAT[]"),
        _c("customers", "DOUBLE"),
    ),
    _table(
        TASTE_SHARES,
        _c("model_version", "INTEGER"),
        _c("taste_id", "INTEGER"),
        _c("product_id", "VARCHAR"),
        _c("share", "DOUBLE"),
    ),
    _table(
        CUSTOMER_SEGMENTS,
        _c("batch_id", "VARCHAR"),
        _c("line_no", "BIGINT"),
        _c("customer_id", "UUID"),
        _c("text_hash", "VARCHAR"),
        _c("segment_id", "INTEGER"),
        _c("distance", "DOUBLE"),
        _c("model_version", "INTEGER"),
    ),
    _table(
        PRODUCT_EMBEDDINGS,
        _c("product_id", "VARCHAR"),
        _c("model", "VARCHAR"),
        _c("dimensions", "INTEGER"),
        _c("text_hash", "VARCHAR"),
        _c("product_text", "VARCHAR"),
    ),
    _table(RECOMMENDATIONS, *_RECOMMENDATION_COLUMNS),
    # Customers for whom fewer than top_n products were in stock and not bought: why a customer
    # has fewer recommendations than promised, when the catalog is the reason.
    _table(
        RECOMMENDATION_SHORTFALLS,
        _c("batch_id", "VARCHAR"),
        _c("customer_id", "UUID"),
        _c("candidates", "INTEGER"),
        _c("reason", "VARCHAR"),
    ),
    _table(VALIDATED_RECOMMENDATIONS, *_RECOMMENDATION_COLUMNS),
    _table(
        REJECTED_RECOMMENDATIONS,
        *_RECOMMENDATION_COLUMNS,
        _c("rejected_rule", "VARCHAR"),
        _c("failed_rules", "VARCHAR[]"),
    ),
    # A batch's recommendations are published (current for its customers, see the view
    # current_recommendations) once the business rules' step committed them; one row per batch.
    _table(
        BATCH_PUBLICATIONS,
        _c("batch_id", "VARCHAR"),
        _c("published_at", "TIMESTAMPTZ"),
        _c("segment_model_version", "INTEGER"),
        _c("catalog_version", "INTEGER", False),
        _c("customers", "BIGINT"),
        _c("recommendations", "BIGINT"),
    ),
    # What each erasure of a customer did (core/lifecycle.py): the customer's ID hashed (never
    # the ID), when, the batches and raw lines it touched and the rows it removed per table. No
    # personal data. A later delivery of a batch that held the customer is ingested with their
    # lines already erased (their ID's hash is here).
    _table(
        ERASURE_LOG,
        _c("erasure_id", "UUID"),
        _c("customer_hash", "VARCHAR"),
        _c("erased_at", "TIMESTAMPTZ"),
        _c("batches", "INTEGER"),
        _c("raw_lines", "INTEGER"),
        _c("rows_removed", "JSON"),
    ),
    # The warehouse's schema version, one row per migration applied (see schema.py).
    _table(
        WAREHOUSE_SCHEMA,
        _c("version", "INTEGER"),
        _c("project_version", "VARCHAR"),
        _c("applied_at", "TIMESTAMPTZ"),
    ),
]
WAREHOUSE_TABLES: dict[str, Table] = {table.name: table for table in _TABLES}
WAREHOUSE_DDL: dict[str, str] = {name: t.ddl() for name, t in WAREHOUSE_TABLES.items()}

# Tables keyed by batch_id that hold what a batch's content gave, from validation on, in the
# order the stages write them: withdrawing a batch from a stage on deletes its rows from these.
BATCH_TABLES_BY_STAGE: dict[str, tuple[str, ...]] = {
    "validation": (CUSTOMERS, CUSTOMER_PURCHASES, SCHEMA_ERRORS, DROPPED_PURCHASES),
    "inference": (CUSTOMER_EMBEDDINGS, PRIOR_PURCHASES),
    "segmentation": (CUSTOMER_SEGMENTS,),
    "recommendations": (RECOMMENDATIONS, RECOMMENDATION_SHORTFALLS),
    "publication": (VALIDATED_RECOMMENDATIONS, REJECTED_RECOMMENDATIONS, BATCH_PUBLICATIONS),
}


def lakehouse_ddl(ddl: str) -> str:
    """The DDL for DuckLake, which enforces NOT NULL but no PRIMARY KEY or UNIQUE constraint:
    the writes keep those rows unique themselves (see core/embedding_cache.py)."""
    return re.sub(r",\s*PRIMARY KEY\s*\([^)]*\)", "", ddl)


# A customer's known purchases across accepted batches, each counted once: a purchase is its
# product, instant and amount; a record that lists the same purchase k times bought it k times,
# and a batch that delivers it again (a CRM re-sending the whole history) adds nothing.
_HISTORY = f"""
SELECT customer_id, product_id, purchased_at, amount, max(n) AS quantity,
       arg_min(batch_id, arrival_seq) AS first_batch_id
FROM (SELECT p.batch_id, any_value(b.arrival_seq) AS arrival_seq, p.customer_id, p.product_id,
             p.purchased_at, p.amount, count(*) AS n
      FROM {CUSTOMER_PURCHASES} AS p JOIN {BATCHES} AS b USING (batch_id)
      WHERE b.accepted
      GROUP BY p.batch_id, p.customer_id, p.product_id, p.purchased_at, p.amount)
GROUP BY customer_id, product_id, purchased_at, amount"""


def _latest_batch(holding: str, published: bool = False) -> str:
    """Each customer's newest accepted batch (arrival order) among those whose `holding` table
    holds them (and, if `published`, whose recommendations were published)."""
    only = f" JOIN {BATCH_PUBLICATIONS} USING (batch_id)" if published else ""
    return f"""
SELECT h.customer_id, arg_max(h.batch_id, b.arrival_seq) AS batch_id
FROM {holding} AS h JOIN {BATCHES} AS b USING (batch_id){only}
WHERE b.accepted
GROUP BY h.customer_id"""


# Views: the customer across batches, the one current answer per customer, and each customer's
# vector (`embedding::FLOAT[<dimensions>]` gives the fixed-size array).
WAREHOUSE_VIEWS: dict[str, str] = {
    "customer_embedding_vectors": """
        CREATE OR REPLACE VIEW customer_embedding_vectors AS
        SELECT e.batch_id, e.line_no, e.customer_id, e.model, e.dimensions, e.text_hash,
               c.embedding
        FROM customer_embeddings AS e
        JOIN embedding_cache AS c USING (model, dimensions, text_hash)""",
    "customer_purchase_history": f"""
        CREATE OR REPLACE VIEW customer_purchase_history AS {_HISTORY}""",
    # One row per customer: the record of their newest accepted batch.
    "current_customers": f"""
        CREATE OR REPLACE VIEW current_customers AS
        SELECT c.customer_id, c.batch_id, c.email, c.created_at, b.arrival_seq
        FROM ({_latest_batch(CUSTOMERS)}) AS latest
        JOIN customers AS c USING (customer_id, batch_id)
        JOIN batches AS b USING (batch_id)""",
    # THE answer to read: each customer's recommendations from the newest batch (arrival order)
    # that segmented them and whose recommendations were published; older batches' lists are
    # history. A customer whose every recommendation that batch was rejected has none here.
    "current_recommendations": f"""
        CREATE OR REPLACE VIEW current_recommendations AS
        SELECT v.*
        FROM ({_latest_batch(CUSTOMER_SEGMENTS, published=True)}) AS latest
        JOIN validated_recommendations AS v USING (customer_id, batch_id)""",
}

ALERTS_TABLE = _table(
    ALERTS,
    _c("alert_id", "UUID", default="uuid()"),
    _c("created_at", "TIMESTAMPTZ", default="now()"),
    _c("severity", "VARCHAR"),
    _c("monitor", "VARCHAR"),
    _c("alert_key", "VARCHAR"),
    _c("batch_id", "VARCHAR", False),
    _c("status", "VARCHAR"),
    _c("message", "VARCHAR"),
    _c("figures", "JSON", False),
    _c("run_id", "VARCHAR", False),
    _c("link", "VARCHAR", False),
    _c("webhook_status", "VARCHAR"),
)
ALERTS_DDL: dict[str, str] = {ALERTS: ALERTS_TABLE.ddl()}
# The same table in PostgreSQL (DuckDB's postgres extension passes defaults through as written)
ALERTS_POSTGRES_DDL: dict[str, str] = {
    ALERTS: ALERTS_TABLE.ddl().replace("DEFAULT uuid()", "DEFAULT gen_random_uuid()")
}
