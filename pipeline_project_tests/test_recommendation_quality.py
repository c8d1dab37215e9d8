"""Recommendation quality: held-out last purchases, the model's hit rate against popularity."""

from dataclasses import replace

import numpy as np
import pytest
import scipy.sparse as sp

from pipeline_project.core.co_purchase import Tastes
from pipeline_project.core.recommendation_quality import HoldoutQuality, quality_verdict
from pipeline_project.core.recommendations import (
    Customers,
    ScoringInputs,
    Weights,
    score_customers,
)

VERDICT = dict(min_customers=50, min_baselines=3, min_ratio_to_recent=0.5, min_lead_z=0.0)


def _customers(recency: list[list[float]], profiles=None) -> Customers:
    """Customers (rows) with one profile each on the first axis, bought with `recency`."""
    n = len(recency)
    vectors = np.asarray(profiles if profiles is not None else [[1.0, 0.0]] * n)
    return Customers(vectors, np.arange(n), np.zeros(n, dtype=np.int64),
                     sp.csr_matrix(np.asarray(recency, dtype=np.float32)))  # fmt: skip


def _inputs(share, neighbours) -> ScoringInputs:
    products = len(share[0])
    return ScoringInputs(
        [f"P{i}" for i in range(products)],
        product_vectors=np.tile([1.0, 0.0], (products, 1)),
        centroids=np.array([[1.0, 0.0], [0.0, 1.0]]),
        share=np.asarray(share, dtype=float),
        expected_value=np.full((2, products), 10.0),
        neighbours=sp.csr_matrix(np.asarray(neighbours, dtype=np.float32)),
        tastes=Tastes(np.zeros((products, 1)), np.zeros((1, 1)), np.zeros((1, products))),
        popularity=np.ones(products),
        segment_customers=np.array([10.0, 10.0]),
    )


def test_a_customer_is_offered_the_best_products_they_may_be_offered_by_every_part():
    # segment 0 buys P0 most, then P1, P2; segment 1 buys P3; P1 is bought with P0
    inputs = _inputs(
        share=[[0.9, 0.5, 0.4, 0.0], [0.0, 0.0, 0.0, 0.9]],
        neighbours=[[0, 1.0, 0, 0], [1.0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],
    )
    allowed = np.array([True, True, True, False])  # P3 out of stock
    # customer 0 bought P0 (recently), customer 1 nothing; both in segment 0 (profile [1, 0])
    customers = _customers([[1.0, 0, 0, 0], [0, 0, 0, 0]])
    weights = Weights(segment=1.0, taste=0.0, co_purchase=0.25, similarity=0.25,
                      temperature=0.01)  # fmt: skip
    scored = score_customers(customers, inputs, allowed, weights, top_n=2)
    lists = {c: [] for c in range(2)}
    for c, p in zip(scored["customer"], scored["product"], strict=True):
        lists[int(c)].append(int(p))
    # P0 bought and P3 out of stock are never ranked: customer 0 gets P1 (segment and
    # co-purchase), then P2; customer 1 gets P0, P1
    assert lists == {0: [1, 2], 1: [0, 1]}
    assert scored["available"].tolist() == [2, 3]
    first = (scored["customer"] == 0) & (scored["rank"] == 1)
    # each part is 1 for the customer's best product of that part
    assert scored["segment_affinity"][first] == pytest.approx(1.0)
    assert scored["co_purchase"][first] == pytest.approx(1.0)
    # every product's text alike: no similarity to tell them apart (0); the weighted mean
    assert scored["similarity_score"][first] == pytest.approx(0.0)
    assert scored["confidence"][first] == pytest.approx((1.0 + 0.25 * 1.0) / 1.5)
    # without excluding what they bought (the personalization check): P0 again first
    raw = score_customers(customers, inputs, allowed, weights, top_n=1, exclude_bought=False)
    assert raw["product"].tolist() == [0, 0]


SEGMENTS_ONLY = Weights(segment=1.0, taste=0.0, co_purchase=0.0, similarity=0.0, temperature=0.01)


def test_soft_membership_mixes_the_segments_by_closeness():
    inputs = _inputs(share=[[1.0, 0.0], [0.0, 1.0]], neighbours=np.zeros((2, 2)))
    allowed = np.array([True, True])
    # a profile nearer segment 1 than segment 0, but not by much
    customers = _customers([[0, 0]], profiles=[[0.6, 0.8]])
    sharp = score_customers(customers, inputs, allowed, SEGMENTS_ONLY, top_n=2)
    soft = score_customers(customers, inputs, allowed, replace(SEGMENTS_ONLY, temperature=100.0),
                           top_n=2)  # fmt: skip
    assert sharp["product"].tolist()[0] == 1 and soft["product"].tolist()[0] == 1
    # sharp: segment 1 only (segment 0's product scores nothing); soft: both count
    assert sharp["segment_affinity"][1] == pytest.approx(0.0, abs=1e-6)
    assert 0.9 < soft["segment_affinity"][1] < 1.0


def test_no_verdict_on_too_few_customers():
    few = quality_verdict(HoldoutQuality(60, 49, 10, 0, 40), [], **VERDICT)
    assert few.passed is None and "fewer than 50" in few.reason  # not judged, never "passed"


def test_a_model_no_better_than_popularity_or_with_exactly_its_hits_fails():
    # 40 customers only the model hit, 60 only popularity: z = -20 / 10 = -2
    behind = HoldoutQuality(2000, 1900, 10, 90, 110, model_only=40, popularity_only=60)
    assert behind.lead_z == -2.0
    failed = quality_verdict(behind, [], **VERDICT)
    assert failed.passed is False and "no better than popularity" in failed.reason
    # a tie (as many customers only one of them hit): no better, not published
    tie = HoldoutQuality(2000, 1900, 10, 95, 95, model_only=45, popularity_only=45)
    assert tie.lead_z == 0.0 and quality_verdict(tie, [], **VERDICT).passed is False
    # the lead the gate asks for is configurable: +1 standard error needed, +1 is not enough
    ahead_by_one = HoldoutQuality(2000, 1900, 10, 100, 95, model_only=50, popularity_only=45)
    strict = {**VERDICT, "min_lead_z": 1.0}
    assert 0 < ahead_by_one.lead_z < 1.0
    assert quality_verdict(ahead_by_one, [], **VERDICT).passed
    assert quality_verdict(ahead_by_one, [], **strict).passed is False
    # the same hits on the same customers: the model recommends what popularity does
    same = quality_verdict(HoldoutQuality(500, 400, 10, 40, 40, 0, 0), [], **VERDICT)
    assert not same.passed and "exactly popularity's" in same.reason
    ahead = quality_verdict(HoldoutQuality(500, 400, 10, 41, 40, 11, 10), [], **VERDICT)
    assert ahead.passed and "no trend yet" in ahead.reason


def test_a_model_well_below_its_recent_median_fails_once_there_are_enough_batches():
    quality = HoldoutQuality(500, 400, 10, 60, 20, 45, 5)  # 0.15, against popularity's 0.05
    assert quality.model_hit_rate == 0.15 and quality.popularity_hit_rate == 0.05
    assert quality_verdict(quality, [0.4, 0.4], **VERDICT).passed  # two baselines: no trend yet
    low = quality_verdict(quality, [0.4, 0.31, 0.35], **VERDICT)
    assert not low.passed and "recent median 0.350" in low.reason
    assert quality_verdict(quality, [0.2, 0.31, 0.25], **VERDICT).passed
