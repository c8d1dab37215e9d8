"""DDL of every table the pipeline owns. Each table is named after the asset that writes it."""

import re

RAW_CUSTOMERS = "raw_customers"
CUSTOMERS = "customers"
CUSTOMER_PURCHASES = "customer_purchases"
SCHEMA_ERRORS = "schema_errors"
PRODUCT_CATALOG = "product_catalog"
CUSTOMER_EMBEDDINGS = "customer_embeddings"
EMBEDDING_CACHE = "embedding_cache"
DEAD_LETTER = "dead_letter"
SEGMENT_MODEL = "segment_model"
CUSTOMER_SEGMENTS = "customer_segments"
PRODUCT_EMBEDDINGS = "product_embeddings"
RECOMMENDATIONS = "recommendations"
VALIDATED_RECOMMENDATIONS = "validated_recommendations"
REJECTED_RECOMMENDATIONS = "rejected_recommendations"
ALERTS = "alerts"

# A recommendation and the parts of its score (explainable): confidence =
# segment_weight * segment_affinity + similarity_weight * similarity_score.
_RECOMMENDATION_COLUMNS = """
    CREATE TABLE IF NOT EXISTS {table} (
        batch_id VARCHAR NOT NULL,
        line_no BIGINT NOT NULL,
        customer_id UUID NOT NULL,
        rank INTEGER NOT NULL,
        product_id VARCHAR NOT NULL,
        segment_id INTEGER NOT NULL,
        confidence DOUBLE NOT NULL,
        predicted_value DOUBLE NOT NULL,
        segment_affinity DOUBLE NOT NULL,
        similarity DOUBLE NOT NULL,
        similarity_score DOUBLE NOT NULL,
        model_version INTEGER NOT NULL{extra}
    )"""

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

# No primary keys: DuckDB keeps ART indexes in memory, which would grow with the batch size.
# Uniqueness and conservation are asset checks instead.
WAREHOUSE_DDL: dict[str, str] = {
    CUSTOMERS: """
        CREATE TABLE IF NOT EXISTS customers (
            batch_id VARCHAR NOT NULL,
            line_no BIGINT NOT NULL,
            customer_id UUID NOT NULL,
            email VARCHAR NOT NULL,
            created_at TIMESTAMPTZ NOT NULL,
            purchase_count INTEGER NOT NULL,
            total_spend DOUBLE NOT NULL
        )""",
    CUSTOMER_PURCHASES: """
        CREATE TABLE IF NOT EXISTS customer_purchases (
            batch_id VARCHAR NOT NULL,
            customer_id UUID NOT NULL,
            line_no BIGINT NOT NULL,
            purchase_idx INTEGER NOT NULL,
            product_id VARCHAR NOT NULL,
            amount DOUBLE NOT NULL,
            purchased_at TIMESTAMPTZ NOT NULL
        )""",
    SCHEMA_ERRORS: """
        CREATE TABLE IF NOT EXISTS schema_errors (
            batch_id VARCHAR NOT NULL,
            line_no BIGINT NOT NULL,
            raw VARCHAR NOT NULL,
            errors VARCHAR[] NOT NULL,
            error_count INTEGER NOT NULL,
            detected_at TIMESTAMPTZ NOT NULL
        )""",
    PRODUCT_CATALOG: """
        CREATE TABLE IF NOT EXISTS product_catalog (
            product_id VARCHAR NOT NULL,
            name VARCHAR NOT NULL,
            category VARCHAR NOT NULL,
            price DOUBLE NOT NULL,
            in_stock BOOLEAN NOT NULL
        )""",
    # One vector per distinct text and model: customers who behave alike share a profile text,
    # so a batch of millions of customers stores (and embeds) only its few thousand profiles.
    # FLOAT[] rather than FLOAT[n]: one cache serves models of different widths; every row is
    # checked to hold exactly `dimensions` finite values before it is written.
    EMBEDDING_CACHE: """
        CREATE TABLE IF NOT EXISTS embedding_cache (
            model VARCHAR NOT NULL,
            dimensions INTEGER NOT NULL,
            text_hash VARCHAR NOT NULL,
            text VARCHAR NOT NULL,
            embedding FLOAT[] NOT NULL,
            created_at TIMESTAMPTZ NOT NULL,
            PRIMARY KEY (model, dimensions, text_hash)
        )""",
    CUSTOMER_EMBEDDINGS: """
        CREATE TABLE IF NOT EXISTS customer_embeddings (
            batch_id VARCHAR NOT NULL,
            line_no BIGINT NOT NULL,
            customer_id UUID NOT NULL,
            model VARCHAR NOT NULL,
            dimensions INTEGER NOT NULL,
            text_hash VARCHAR NOT NULL,
            profile_text VARCHAR NOT NULL
        )""",
    DEAD_LETTER: """
        CREATE TABLE IF NOT EXISTS dead_letter (
            batch_id VARCHAR NOT NULL,
            stage VARCHAR NOT NULL,
            record_key VARCHAR NOT NULL,
            reason VARCHAR NOT NULL,
            error VARCHAR NOT NULL,
            attempts INTEGER NOT NULL,
            payload VARCHAR,
            created_at TIMESTAMPTZ NOT NULL,
            replayed_at TIMESTAMPTZ
        )""",
    # Every trained model is kept; the newest version assigns segments.
    SEGMENT_MODEL: """
        CREATE TABLE IF NOT EXISTS segment_model (
            model_version INTEGER NOT NULL,
            segment_id INTEGER NOT NULL,
            centroid FLOAT[] NOT NULL,
            weight DOUBLE NOT NULL,
            embedding_model VARCHAR NOT NULL,
            dimensions INTEGER NOT NULL,
            trained_at TIMESTAMPTZ NOT NULL
        )""",
    CUSTOMER_SEGMENTS: """
        CREATE TABLE IF NOT EXISTS customer_segments (
            batch_id VARCHAR NOT NULL,
            line_no BIGINT NOT NULL,
            customer_id UUID NOT NULL,
            text_hash VARCHAR NOT NULL,
            segment_id INTEGER NOT NULL,
            distance DOUBLE NOT NULL,
            model_version INTEGER NOT NULL
        )""",
    PRODUCT_EMBEDDINGS: """
        CREATE TABLE IF NOT EXISTS product_embeddings (
            product_id VARCHAR NOT NULL,
            model VARCHAR NOT NULL,
            dimensions INTEGER NOT NULL,
            text_hash VARCHAR NOT NULL,
            product_text VARCHAR NOT NULL
        )""",
    RECOMMENDATIONS: _RECOMMENDATION_COLUMNS.format(table=RECOMMENDATIONS, extra=""),
    VALIDATED_RECOMMENDATIONS: _RECOMMENDATION_COLUMNS.format(
        table=VALIDATED_RECOMMENDATIONS, extra=""
    ),
    REJECTED_RECOMMENDATIONS: _RECOMMENDATION_COLUMNS.format(
        table=REJECTED_RECOMMENDATIONS,
        extra=", rejected_rule VARCHAR NOT NULL, failed_rules VARCHAR[] NOT NULL",
    ),
}


def lakehouse_ddl(ddl: str) -> str:
    """The DDL for DuckLake, which enforces NOT NULL but no PRIMARY KEY or UNIQUE constraint:
    the writes keep those rows unique themselves (see core/embedding_cache.py)."""
    return re.sub(r",\s*PRIMARY KEY \([^)]*\)", "", ddl)


# Views: the vector of each customer, as a fixed-size array is `embedding::FLOAT[<dimensions>]`.
WAREHOUSE_VIEWS: dict[str, str] = {
    "customer_embedding_vectors": """
        CREATE VIEW IF NOT EXISTS customer_embedding_vectors AS
        SELECT e.batch_id, e.line_no, e.customer_id, e.model, e.dimensions, e.text_hash,
               c.embedding
        FROM customer_embeddings AS e
        JOIN embedding_cache AS c USING (model, dimensions, text_hash)""",
}

ALERTS_DDL: dict[str, str] = {
    ALERTS: """
        CREATE TABLE IF NOT EXISTS alerts (
            alert_id UUID NOT NULL DEFAULT uuid(),
            created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
            severity VARCHAR NOT NULL,
            monitor VARCHAR NOT NULL,
            alert_key VARCHAR NOT NULL,
            batch_id VARCHAR,
            status VARCHAR NOT NULL,
            message VARCHAR NOT NULL,
            figures JSON,
            run_id VARCHAR,
            link VARCHAR,
            webhook_status VARCHAR NOT NULL
        )""",
}
