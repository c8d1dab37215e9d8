"""What customers buy, learned with the segment model: co-purchase neighbours and tastes."""

import duckdb
import numpy as np
import scipy.sparse as sp

from pipeline_project.core.co_purchase import learn_neighbours, load_tastes, neighbour_matrix
from pipeline_project.tables import WAREHOUSE_DDL

CUSTOMERS_SQL = "SELECT DISTINCT batch_id, customer_id FROM customer_purchases"


def _warehouse(purchases: list[tuple[int, str, int]]) -> duckdb.DuckDBPyConnection:
    """customer number, product, days before the newest purchase."""
    conn = duckdb.connect()
    for ddl in WAREHOUSE_DDL.values():
        conn.execute(ddl)
    for i, (customer, product, days) in enumerate(purchases):
        conn.execute(
            "INSERT INTO customer_purchases VALUES ('b1', ?::UUID, ?, ?, ?, 1.0,"
            " TIMESTAMPTZ '2024-06-30' - to_days(?))",
            [f"00000000-0000-4000-8000-{customer:012d}", customer, i, product, days],
        )
    return conn


def test_customers_who_buy_alike_share_a_taste_and_its_products():
    # forty customers buy from A1..A4, forty from B1..B4, each three of their four products
    purchases = []
    for c in range(80):
        group = "A" if c < 40 else "B"
        for k in range(4):
            if k != c % 4:
                purchases.append((c, f"{group}{k + 1}", (c * 7 + k) % 60))
    conn = _warehouse(purchases)
    learn_neighbours(conn, 1, CUSTOMERS_SQL, {}, neighbours=3, recency_days=30.0, tastes=2)
    products = [f"{g}{k}" for g in "AB" for k in range(1, 5)]
    tastes = load_tastes(conn, 1, products)
    # a customer who bought A1 and A2 is of the A taste, whose share of A3 is high, of B3 none
    bought = sp.csr_matrix(np.array([[1, 1, 0, 0, 0, 0, 0, 0]], dtype=np.float32))
    [cosine] = tastes.membership_cosine(bought)
    mine = int(np.argmax(cosine))
    assert tastes.share[mine, products.index("A3")] > 0.3
    assert tastes.share[mine, products.index("B3")] == 0.0
    # the neighbours of A1 are A products only, each bought together with it
    neighbours = neighbour_matrix(conn, 1, {p: i for i, p in enumerate(products)}).toarray()
    assert set(np.flatnonzero(neighbours[0])) <= {1, 2, 3} and neighbours[0].sum() > 0
    assert not neighbours[:4, 4:].any() and not neighbours[4:, :4].any()
