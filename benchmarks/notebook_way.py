"""The notebook way: what "worked beautifully on 10,000 records". Figures only.

The whole file in memory, JSON parsed line by line into dicts, a pandas DataFrame, every row
validated by a pydantic model, pandas for profiles, one vector per customer, k-means over all
customers' vectors, a similarity matrix of every customer against every product.

    python benchmarks/notebook_way.py LANDING CATALOG_CSV VECTORS PRODUCT_VECTORS

VECTORS: Parquet of text, embedding (profile texts); PRODUCT_VECTORS: product_id, embedding.
Prints one JSON line of stage seconds, row counts and peak RSS.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from datetime import datetime
from uuid import UUID

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from pydantic import AwareDatetime, BaseModel, Field, ValidationError
from sklearn.cluster import MiniBatchKMeans

from pipeline_project.contract import EMAIL_PATTERN

SEGMENTS, TOP_N, SEGMENT_WEIGHT, MIN_CONFIDENCE = 8, 5, 0.7, 0.3


class Purchase(BaseModel):
    productId: str = Field(min_length=1)
    amount: float = Field(gt=0, allow_inf_nan=False)
    date: AwareDatetime


class Customer(BaseModel):
    id: UUID
    email: str = Field(pattern=EMAIL_PATTERN)
    createdAt: datetime
    purchaseHistory: list[Purchase]


def band(value: float, edges: list[float], names: list[str]) -> str:
    for edge, name in zip(edges, names, strict=False):
        if value < edge:
            return name
    return names[-1]


def main() -> None:
    landing, catalog_csv, vectors_file, product_vectors_file = sys.argv[1:5]
    seconds: dict[str, float] = {}
    t = time.perf_counter()

    def stage(name: str) -> None:
        nonlocal t
        seconds[name] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()

    with open(landing, encoding="utf-8") as f:
        lines = f.read().splitlines()
    records, bad = [], []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            bad.append(line)
    df = pd.DataFrame(records)
    valid, seen = [], set()
    for row in df.to_dict("records"):
        row = {k: v for k, v in row.items() if not (isinstance(v, float) and np.isnan(v))}
        try:
            customer = Customer(**row)
        except ValidationError:
            bad.append(row)
            continue
        if customer.id in seen:
            bad.append(row)
            continue
        seen.add(customer.id)
        valid.append(customer.model_dump())
    customers = pd.DataFrame(valid)
    stage("ingest_validate")

    purchases = customers[["id", "purchaseHistory"]].explode("purchaseHistory").dropna()
    purchases = pd.concat(
        [purchases["id"].reset_index(drop=True),
         pd.DataFrame(purchases["purchaseHistory"].tolist())], axis=1,
    )  # fmt: skip
    catalog = pd.read_csv(catalog_csv)
    purchases = purchases.merge(catalog, left_on="productId", right_on="product_id", how="left")
    purchases["category"] = purchases["category"].fillna("unknown")
    as_of = purchases["date"].max()
    spend = purchases.groupby(["id", "category"])["amount"].sum().reset_index()
    spend = spend.sort_values(["id", "amount", "category"], ascending=[True, False, True])
    top = spend.groupby("id")["category"].apply(lambda c: " and ".join(c.iloc[:2]))
    stats = purchases.groupby("id").agg(n=("amount", "size"), total=("amount", "sum"),
                                        last=("date", "max"))  # fmt: skip
    texts = []
    for cid in customers["id"]:
        if cid not in stats.index:
            texts.append("Customer with no purchases yet.")
            continue
        s = stats.loc[cid]
        days = (as_of - s["last"]).days
        spend_band = band(s["total"], [50, 200, 1000], ["low", "moderate", "high", "very high"])
        frequency = band(s["n"], [3, 10], ["occasional", "regular", "frequent"])
        recency = band(days, [31, 91, 366], ["this month", "this quarter", "this year", "lapsed"])
        texts.append(
            f"Customer who buys mostly {top[cid]}. Spend: {spend_band}. "
            f"Purchase frequency: {frequency}. Last purchase: {recency}."
        )
    customers["profile"] = texts
    cache = pq.read_table(vectors_file).to_pandas()
    lookup = dict(zip(cache["text"], cache["embedding"], strict=True))
    matrix = np.stack([np.asarray(lookup[text], dtype=np.float32) for text in texts])
    stage("profiles_vectors")

    kmeans = MiniBatchKMeans(SEGMENTS, random_state=0, n_init=3, batch_size=4096)
    customers["segment"] = kmeans.fit_predict(matrix)
    stage("segments")

    products = pq.read_table(product_vectors_file).to_pandas().merge(catalog, on="product_id")
    product_matrix = np.stack(products["embedding"].map(np.asarray)).astype(np.float32)
    similarity = matrix @ product_matrix.T
    low, high = similarity.min(axis=1, keepdims=True), similarity.max(axis=1, keepdims=True)
    similarity = (similarity - low) / np.where(high > low, high - low, 1)
    bought = purchases.merge(customers[["id", "segment"]], on="id")
    affinity = bought.groupby(["segment", "productId"]).size().unstack(fill_value=0)
    affinity = affinity.reindex(index=range(SEGMENTS), columns=products["product_id"], fill_value=0)
    affinity = (affinity.T / affinity.max(axis=1).clip(lower=1)).T.to_numpy()
    confidence = (
        SEGMENT_WEIGHT * affinity[customers["segment"].to_numpy()]
        + (1 - SEGMENT_WEIGHT) * similarity
    )
    top_products = np.argsort(-confidence, axis=1)[:, :TOP_N]
    stage("recommendations")

    already = set(zip(purchases["id"], purchases["productId"], strict=True))
    ids, prices = products["product_id"].tolist(), products["price"].tolist()
    in_stock = products["in_stock"].tolist()
    kept = []
    for i, cid in enumerate(customers["id"]):
        for j in top_products[i]:
            score = confidence[i, j]
            value = score * prices[j]
            if (
                in_stock[j]
                and score >= MIN_CONFIDENCE
                and (cid, ids[j]) not in already
                and 0 < value <= 10_000
            ):
                kept.append((cid, ids[j], score, value))  # fmt: skip
    stage("business_rules")

    print(
        json.dumps(
            {
                "seconds": seconds,
                "total_seconds": round(sum(seconds.values()), 2),
                "rows": {
                    "customers": len(customers),
                    "rejected": len(bad),
                    "validated_recommendations": len(kept),
                },  # fmt: skip
                "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            }
        )
    )


if __name__ == "__main__":
    main()
