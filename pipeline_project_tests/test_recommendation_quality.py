"""Recommendation quality: held-out last purchases, the model's hit rate against popularity."""

import numpy as np

from pipeline_project.core.recommendation_quality import HoldoutQuality, _hits, quality_verdict

VERDICT = dict(min_customers=50, min_baselines=3, min_ratio_to_recent=0.5, min_lead_z=0.0)


def test_a_hit_is_the_held_out_product_among_the_first_n_products_not_excluded():
    order = np.array([[0, 1, 2, 3], [0, 1, 2, 3], [3, 2, 1, 0]])
    excluded = np.array([[True, False, False, False], [False, False, False, False], [False] * 4])
    held = np.array([2, 2, 0])
    # row 0: product 0 excluded, so the top 2 shown are 1, 2; row 1: 0, 1; row 2: 3, 2
    assert _hits(order, excluded, held, top_n=2).tolist() == [True, False, False]
    assert _hits(order, excluded, held, top_n=4).tolist() == [True, True, True]
    assert _hits(order, excluded, np.array([-1, -1, -1]), top_n=4).tolist() == [False] * 3


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
