"""DDL of every table the pipeline owns. Each table is named after the asset that writes it."""

RAW_CUSTOMERS = "raw_customers"
CUSTOMERS = "customers"
CUSTOMER_PURCHASES = "customer_purchases"
SCHEMA_ERRORS = "schema_errors"
ALERTS = "alerts"

# No primary keys: DuckDB keeps ART indexes in memory, which would grow with the batch size.
# Uniqueness and conservation are asset checks instead.
WAREHOUSE_DDL: dict[str, str] = {
    RAW_CUSTOMERS: """
        CREATE TABLE IF NOT EXISTS raw_customers (
            batch_id VARCHAR NOT NULL,
            line_no BIGINT NOT NULL,
            raw VARCHAR NOT NULL,
            byte_length BIGINT NOT NULL,
            utf8_ok BOOLEAN NOT NULL,
            read_error VARCHAR,
            ingested_at TIMESTAMPTZ NOT NULL
        )""",
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
            run_id VARCHAR
        )""",
}
