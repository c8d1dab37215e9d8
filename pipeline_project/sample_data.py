"""Deterministic, realistic sample batches and a product catalog, written as a stream.

Customers follow personas (favourite categories, spend and frequency bands), so customers who
behave alike look alike. Bad rows cover every failure kind of the data contract; valid edge
cases (empty purchase list, unknown extra fields, hundreds of purchases) are always present.

A batch may bring back customers of the batch before it (`returning`), as a CRM's daily export
does: the same ID, their whole purchase history again and a few new purchases, sometimes a new
e-mail address.
"""

from __future__ import annotations

import csv
import gzip
import json
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CATEGORIES = (
    "electronics", "books", "home", "garden", "sports",
    "toys", "beauty", "grocery", "fashion", "automotive",
)  # fmt: skip
_ADJECTIVES = ("Classic", "Smart", "Eco", "Pro", "Compact", "Deluxe", "Essential", "Ultra")
_NOUNS = {
    "electronics": ("Headphones", "Charger", "Speaker", "Monitor", "Keyboard"),
    "books": ("Novel", "Cookbook", "Atlas", "Biography", "Guide"),
    "home": ("Lamp", "Blanket", "Vase", "Kettle", "Shelf"),
    "garden": ("Hose", "Planter", "Shears", "Seeds", "Rake"),
    "sports": ("Racket", "Yoga Mat", "Dumbbell", "Bottle", "Helmet"),
    "toys": ("Puzzle", "Robot", "Doll", "Kite", "Blocks"),
    "beauty": ("Serum", "Lipstick", "Shampoo", "Perfume", "Cream"),
    "grocery": ("Coffee", "Tea", "Olive Oil", "Chocolate", "Pasta"),
    "fashion": ("Jacket", "Sneakers", "Scarf", "Watch", "Backpack"),
    "automotive": ("Wiper", "Car Wax", "Floor Mat", "Jump Starter", "Tyre Gauge"),
}
_PRICE_MEDIAN = {
    "electronics": 80.0, "books": 15.0, "home": 35.0, "garden": 25.0, "sports": 40.0,
    "toys": 20.0, "beauty": 18.0, "grocery": 8.0, "fashion": 55.0, "automotive": 30.0,
}  # fmt: skip
_FIRST = (
    "anna",
    "ben",
    "chloe",
    "david",
    "emma",
    "felix",
    "grace",
    "hugo",
    "ines",
    "jonas",
    "karla",
    "liam",
    "mia",
    "noah",
    "olga",
    "paul",
    "rosa",
    "sam",
    "tara",
    "victor",
)
_LAST = (
    "smith",
    "garcia",
    "mueller",
    "rossi",
    "dubois",
    "kowalski",
    "jensen",
    "silva",
    "novak",
    "brown",
    "tanaka",
    "olsen",
)
_DOMAINS = ("example.com", "mail.example.org", "shop.example.net")

BAD_KINDS = (
    "broken_json", "missing_field", "wrong_type", "non_uuid_id",
    "bad_email", "nonpositive_amount", "bad_date", "duplicate_id",
)  # fmt: skip
EDGE_KINDS = ("edge_empty_purchases", "edge_extra_fields", "edge_many_purchases")
RETURNING = "returning"  # a valid customer of the batch before, with new purchases

_EPOCH_START = np.datetime64("2019-01-01T00:00:00", "s").astype(np.int64)
_CREATED_END = np.datetime64("2025-06-30T00:00:00", "s").astype(np.int64)
_PURCHASES_END = np.datetime64("2025-11-01T00:00:00", "s").astype(np.int64)
_N_PERSONAS = 40
_CHUNK = 20_000


@dataclass(frozen=True)
class Catalog:
    product_ids: list[str]
    categories: np.ndarray  # category index per product, products sorted by category
    prices: np.ndarray
    category_start: np.ndarray
    category_size: np.ndarray


def build_catalog(n_products: int = 500, seed: int = 0) -> tuple[Catalog, list[dict]]:
    """The product catalog: IDs, names, categories, prices (log-normal per category), stock."""
    rng = np.random.default_rng([seed, 7919])
    cats = np.sort(np.arange(n_products) % len(CATEGORIES))
    rows = []
    prices = np.empty(n_products)
    for i, c in enumerate(cats):
        category = CATEGORIES[c]
        price = round(float(_PRICE_MEDIAN[category] * rng.lognormal(0.0, 0.45)), 2)
        prices[i] = price
        rows.append(
            {
                "product_id": f"P{i + 1:05d}",
                "name": f"{_ADJECTIVES[rng.integers(len(_ADJECTIVES))]} "
                f"{_NOUNS[category][rng.integers(len(_NOUNS[category]))]}",
                "category": category,
                "price": price,
                "in_stock": bool(rng.random() < 0.85),
            }
        )
    start = np.searchsorted(cats, np.arange(len(CATEGORIES)))
    size = np.bincount(cats, minlength=len(CATEGORIES))
    catalog = Catalog([r["product_id"] for r in rows], cats, prices, start, size)
    return catalog, rows


def write_catalog(path: Path, n_products: int = 500, seed: int = 0) -> Catalog:
    catalog, rows = build_catalog(n_products, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(
            f, fieldnames=["product_id", "name", "category", "price", "in_stock"]
        )
        writer.writeheader()
        writer.writerows(rows)
    return catalog


@dataclass(frozen=True)
class BatchSpec:
    """How a sample batch is generated (the arguments of iter_batch_lines)."""

    rows: int
    bad_rate: float
    seed: int
    population: int | None = None
    returning: float = 0.0
    previous: BatchSpec | None = None


def iter_batch_lines(
    rows: int,
    bad_rate: float,
    seed: int,
    catalog: Catalog,
    population: int | None = None,
    returning: float = 0.0,
    previous: BatchSpec | None = None,
) -> Iterator[tuple[str, str]]:
    """(kind, JSON line) for each customer of a batch; kind is "valid", "returning", an edge or
    a bad kind. The customers' personas (what they buy, how often) come from `population` when
    given, so batches of different seeds can be drawn from one customer base; else from `seed`.
    With `previous` (the batch before, as generated), about `returning` of the lines bring back
    that batch's valid customer on the same line: their record again, with new purchases."""
    spec = BatchSpec(rows, bad_rate, seed, population, returning, previous)
    for kind, item in _batch_items(spec, catalog):
        yield kind, item if isinstance(item, str) else json.dumps(item, separators=(",", ":"))


def _batch_items(spec: BatchSpec, catalog: Catalog) -> Iterator[tuple[str, dict | str]]:
    """(kind, record) of each line of the batch; a bad line is its broken text."""
    if spec.previous is None or spec.returning <= 0.0:
        yield from _new_items(spec, catalog)
        return
    rng = np.random.default_rng([spec.seed, 65537])
    earlier = _batch_items(spec.previous, catalog)
    for kind, item in _new_items(spec, catalog):
        before = next(earlier, None)
        comes_back = rng.random() < spec.returning
        if comes_back and kind == "valid" and before is not None and before[0] in _GOOD:
            yield RETURNING, _come_back(before[1], rng, catalog)
        else:
            yield kind, item


_GOOD = ("valid", RETURNING)


def _come_back(record: dict, rng: np.random.Generator, catalog: Catalog) -> dict:
    """A customer of the batch before, exported again: their history and 1-3 new purchases
    after it (in the categories they bought before), one in ten with a new e-mail address."""
    record = dict(record)
    history = list(record["purchaseHistory"])
    last = max([p["date"] for p in history] + [record["createdAt"]])
    when = int(np.datetime64(last.rstrip("Z"), "s").astype(np.int64))
    bought = [int(p["productId"][1:]) - 1 for p in history] or [
        int(rng.integers(len(catalog.product_ids)))
    ]
    for _ in range(int(rng.integers(1, 4))):
        category = catalog.categories[bought[int(rng.integers(len(bought)))]]
        product = catalog.category_start[category] + int(
            rng.integers(catalog.category_size[category])
        )
        when += int(rng.integers(86_400, 30 * 86_400))
        history.append(
            {
                "productId": catalog.product_ids[product],
                "amount": round(float(catalog.prices[product]) * int(rng.integers(1, 3)), 2),
                "date": f"{np.datetime_as_string(np.datetime64(when, 's'), unit='s')}Z",
            }
        )
    record["purchaseHistory"] = history
    if rng.random() < 0.1:
        name, domain = record["email"].split("@")
        record["email"] = f"{name}.new@{domain}"
    return record


def _new_items(spec: BatchSpec, catalog: Catalog) -> Iterator[tuple[str, dict | str]]:
    """The batch's own customers: (kind, record), a bad one as its broken line."""
    rows, bad_rate, seed, population = spec.rows, spec.bad_rate, spec.seed, spec.population
    if rows < 0 or not 0.0 <= bad_rate <= 1.0:
        raise ValueError("rows must be >= 0 and bad_rate within [0, 1]")
    rng = np.random.default_rng([seed, 104729])
    personas = _personas(rng)
    if population is not None:
        personas = _personas(np.random.default_rng([population, 104729]))
    edge_rows = {2: EDGE_KINDS[0], 3: EDGE_KINDS[1], 4: EDGE_KINDS[2]} if rows >= 10 else {}
    is_bad = rng.random(rows) < bad_rate
    for i in edge_rows:
        is_bad[i] = False
    bad_order = {
        int(i): BAD_KINDS[j % len(BAD_KINDS)] for j, i in enumerate(np.flatnonzero(is_bad))
    }
    first_id: str | None = None
    for start in range(0, rows, _CHUNK):
        n = min(_CHUNK, rows - start)
        for offset, record in enumerate(
            _chunk_records(rng, start, n, personas, catalog, edge_rows)
        ):
            i = start + offset
            kind = edge_rows.get(i) or bad_order.get(i, "valid")
            if kind == "duplicate_id" and first_id is None:
                kind = "bad_email"  # nothing valid to duplicate yet
            if kind in BAD_KINDS:
                yield kind, _break(kind, record, rng, first_id)
            else:
                # A duplicate repeats the first *valid* line's id: that line owns the id.
                first_id = first_id or record["id"]
                yield kind, record


def generate_batch(
    path: Path,
    rows: int,
    bad_rate: float,
    seed: int,
    catalog: Catalog,
    population: int | None = None,
    returning: float = 0.0,
    previous: BatchSpec | None = None,
) -> Counter:
    """Write one batch file (gzip when the name ends in .gz); returns the count of each kind.
    `returning` and `previous`: see iter_batch_lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    kinds: Counter = Counter()
    tmp = path.with_name(f".{path.name}.partial")  # dot-files are ignored by the landing sensor
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(tmp, "wt", encoding="utf-8", newline="\n") as f:
        buffer: list[str] = []
        lines = iter_batch_lines(rows, bad_rate, seed, catalog, population, returning, previous)
        for kind, line in lines:
            kinds[kind] += 1
            buffer.append(line)
            if len(buffer) >= 10_000:
                f.write("\n".join(buffer) + "\n")
                buffer.clear()
        if buffer:
            f.write("\n".join(buffer) + "\n")
    tmp.replace(path)
    return kinds


def _personas(rng: np.random.Generator) -> dict[str, np.ndarray]:
    weights = 1.0 / np.arange(1, _N_PERSONAS + 1) ** 0.8
    return {
        "weights": weights / weights.sum(),
        "primary": rng.integers(0, len(CATEGORIES), _N_PERSONAS),
        "secondary": rng.integers(0, len(CATEGORIES), _N_PERSONAS),
        "frequency": rng.choice([2.0, 5.0, 12.0], _N_PERSONAS, p=[0.35, 0.45, 0.2]),
        "quantity": rng.choice([1, 2, 3], _N_PERSONAS, p=[0.6, 0.3, 0.1]),
    }


def _chunk_records(
    rng: np.random.Generator,
    start: int,
    n: int,
    personas: dict[str, np.ndarray],
    catalog: Catalog,
    edge_rows: dict[int, str],
) -> Iterator[dict]:
    persona = rng.choice(_N_PERSONAS, n, p=personas["weights"])
    counts = rng.poisson(personas["frequency"][persona])
    counts[rng.random(n) < 0.05] = 0
    for i, kind in edge_rows.items():
        if start <= i < start + n:
            counts[i - start] = {EDGE_KINDS[0]: 0, EDGE_KINDS[2]: 300}.get(
                kind, max(counts[i - start], 1)
            )
    created = rng.integers(_EPOCH_START, _CREATED_END, n)
    id_bytes = rng.bytes(16 * n)
    ids = [str(uuid.UUID(bytes=id_bytes[16 * k : 16 * k + 16], version=4)) for k in range(n)]
    first = rng.integers(0, len(_FIRST), n)
    last = rng.integers(0, len(_LAST), n)
    domain = rng.integers(0, len(_DOMAINS), n)
    created_text = np.datetime_as_string(created.astype("datetime64[s]"), unit="s")

    total = int(counts.sum())
    owner = np.repeat(np.arange(n), counts)
    roll = rng.random(total)
    category = np.where(
        roll < 0.6,
        personas["primary"][persona[owner]],
        np.where(
            roll < 0.85,
            personas["secondary"][persona[owner]],
            rng.integers(0, len(CATEGORIES), total),
        ),
    )
    product = catalog.category_start[category] + (
        rng.random(total) * catalog.category_size[category]
    ).astype(np.int64)
    quantity = np.maximum(1, rng.poisson(personas["quantity"][persona[owner]]))
    amount = np.round(catalog.prices[product] * quantity, 2)
    # sqrt skews purchase dates toward the present: recent activity is the common case.
    span = _PURCHASES_END - created[owner]
    when = created[owner] + (np.sqrt(rng.random(total)) * span).astype(np.int64)
    when_text = np.datetime_as_string(when.astype("datetime64[s]"), unit="s")
    product_ids = catalog.product_ids
    purchases = [
        {"productId": product_ids[p], "amount": a, "date": f"{d}Z"}
        for p, a, d in zip(product.tolist(), amount.tolist(), when_text.tolist(), strict=True)
    ]
    bounds = np.concatenate([[0], np.cumsum(counts)]).tolist()
    for k in range(n):
        record = {
            "id": ids[k],
            "email": f"{_FIRST[first[k]]}.{_LAST[last[k]]}{start + k}@{_DOMAINS[domain[k]]}",
            "createdAt": f"{created_text[k]}Z",
            "purchaseHistory": purchases[bounds[k] : bounds[k + 1]],
        }
        if edge_rows.get(start + k) == EDGE_KINDS[1] or rng.random() < 0.02:
            record["loyaltyTier"] = "gold"
            record["_source"] = {"system": "crm", "exportedBy": "nightly"}
        yield record


def _break(kind: str, record: dict, rng: np.random.Generator, first_id: str | None) -> str:
    """Turn a valid record into a bad line of the given kind."""
    if kind == "broken_json":
        text = json.dumps(record, separators=(",", ":"))
        return text[: max(1, len(text) // 2)]
    if kind == "missing_field":
        del record[("id", "email", "createdAt", "purchaseHistory")[rng.integers(4)]]
    elif kind == "wrong_type":
        field = ("id", "email", "purchaseHistory")[rng.integers(3)]
        record[field] = {"id": 12345, "email": ["not", "a", "string"], "purchaseHistory": "none"}[
            field
        ]
    elif kind == "non_uuid_id":
        record["id"] = f"cust-{rng.integers(10**6):06d}"
    elif kind == "bad_email":
        record["email"] = record["email"].replace("@", " at ")
    elif kind == "nonpositive_amount":
        if not record["purchaseHistory"]:
            record["purchaseHistory"] = [
                {"productId": "P00001", "amount": 1.0, "date": record["createdAt"]}
            ]
        record["purchaseHistory"][0]["amount"] = float(-rng.integers(0, 50))
    elif kind == "bad_date":
        record["createdAt"] = ("2024-13-45T25:61:00Z", "yesterday", "31/12/2024")[rng.integers(3)]
    elif kind == "duplicate_id":
        record["id"] = first_id
    return json.dumps(record, separators=(",", ":"))
