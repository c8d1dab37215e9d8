import gzip
import json
from collections import Counter

from pipeline_project.sample_data import (
    BAD_KINDS,
    EDGE_KINDS,
    RETURNING,
    BatchSpec,
    build_catalog,
    generate_batch,
    iter_batch_lines,
)


def test_same_seed_writes_the_same_bytes_and_another_seed_does_not(tmp_path):
    catalog, _ = build_catalog(seed=3)
    generate_batch(tmp_path / "a.jsonl", 500, 0.1, 7, catalog)
    generate_batch(tmp_path / "b.jsonl", 500, 0.1, 7, catalog)
    generate_batch(tmp_path / "c.jsonl", 500, 0.1, 8, catalog)
    a, b, c = ((tmp_path / n).read_bytes() for n in ("a.jsonl", "b.jsonl", "c.jsonl"))
    assert a == b
    assert a != c


def test_bad_rows_cover_every_failure_kind_and_edge_cases_are_present():
    catalog, _ = build_catalog()
    kinds = Counter(kind for kind, _ in iter_batch_lines(400, 0.2, 1, catalog))
    assert set(BAD_KINDS) <= set(kinds)
    assert all(kinds[k] == 1 for k in EDGE_KINDS)
    assert sum(kinds.values()) == 400


def test_edge_cases_are_valid_json_with_the_promised_shape():
    catalog, _ = build_catalog()
    lines = dict((k, line) for k, line in iter_batch_lines(50, 0.0, 1, catalog) if k in EDGE_KINDS)
    assert json.loads(lines["edge_empty_purchases"])["purchaseHistory"] == []
    assert "loyaltyTier" in json.loads(lines["edge_extra_fields"])
    assert len(json.loads(lines["edge_many_purchases"])["purchaseHistory"]) >= 100


def test_gzip_output_and_catalog_prices_are_positive(tmp_path):
    catalog, rows = build_catalog(n_products=50)
    kinds = generate_batch(tmp_path / "b.jsonl.gz", 100, 0.0, 1, catalog)
    with gzip.open(tmp_path / "b.jsonl.gz", "rt") as f:
        assert sum(1 for _ in f) == 100 == sum(kinds.values())
    assert all(r["price"] > 0 for r in rows)
    assert len({r["product_id"] for r in rows}) == 50


def category_shares(seed: int, population: int | None) -> dict[str, float]:
    catalog, rows = build_catalog(seed=1)
    category = {r["product_id"]: r["category"] for r in rows}
    bought = Counter(
        category[p["productId"]]
        for kind, line in iter_batch_lines(3000, 0.0, seed, catalog, population)
        for p in json.loads(line)["purchaseHistory"]
    )
    total = sum(bought.values())
    return {c: n / total for c, n in bought.items()}


def test_batches_of_one_population_buy_alike_and_of_another_do_not():
    def distance(a, b):
        return sum(abs(a.get(c, 0) - b.get(c, 0)) for c in set(a) | set(b))

    same = distance(category_shares(1, population=5), category_shares(2, population=5))
    other = distance(category_shares(1, population=5), category_shares(2, population=6))
    assert same < 0.1 < other
    # without a population each seed draws its own personas, as before
    assert category_shares(2, None) != category_shares(2, population=5)


def test_a_later_batch_brings_back_customers_with_their_history_and_new_purchases():
    """As a CRM's daily export: the returning customer's ID, every purchase of the batch
    before again, 1-3 new ones after them; the first batch's lines are as without it."""
    catalog, _ = build_catalog(seed=1)
    first = BatchSpec(400, 0.05, 11)
    before = {
        json.loads(line)["id"]: json.loads(line)
        for kind, line in iter_batch_lines(400, 0.05, 11, catalog)
        if kind == "valid"
    }
    later = list(iter_batch_lines(400, 0.05, 12, catalog, returning=0.3, previous=first))
    back = [json.loads(line) for kind, line in later if kind == RETURNING]
    assert 0.2 * 400 < len(back) < 0.4 * 400
    assert len(later) == 400
    for record in back:
        earlier = before[record["id"]]
        old = earlier["purchaseHistory"]
        new = record["purchaseHistory"][len(old) :]
        assert record["purchaseHistory"][: len(old)] == old and 1 <= len(new) <= 3
        assert min(p["date"] for p in new) > max([p["date"] for p in old] + [earlier["createdAt"]])
    assert sum(r["email"] != before[r["id"]]["email"] for r in back) >= 1
    # no returning customer without a batch before
    alone = Counter(k for k, _ in iter_batch_lines(400, 0.05, 12, catalog, returning=0.3))
    assert RETURNING not in alone
