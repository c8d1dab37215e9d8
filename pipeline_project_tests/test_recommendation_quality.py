"""Recommendation quality: held-out last purchases, the model's hit rate against popularity."""

import numpy as np

from pipeline_project.core.recommendation_quality import HoldoutQuality, _hits, quality_verdict

VERDICT = dict(min_customers=50, min_baselines=3, min_ratio_to_recent=0.5)


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
    assert few.passed and "no verdict" in few.reason


def test_a_model_no_better_than_popularity_fails():
    tie = quality_verdict(HoldoutQuality(500, 400, 10, 40, 40), [0.3, 0.3, 0.3], **VERDICT)
    assert not tie.passed and "not better than popularity" in tie.reason
    better = quality_verdict(HoldoutQuality(500, 400, 10, 41, 40), [], **VERDICT)
    assert better.passed and "no trend yet" in better.reason


def test_a_model_well_below_its_recent_median_fails_once_there_are_enough_batches():
    quality = HoldoutQuality(500, 400, 10, 60, 20)  # 0.15, against popularity's 0.05
    assert quality.model_hit_rate == 0.15 and quality.popularity_hit_rate == 0.05
    assert quality_verdict(quality, [0.4, 0.4], **VERDICT).passed  # two baselines: no trend yet
    low = quality_verdict(quality, [0.4, 0.31, 0.35], **VERDICT)
    assert not low.passed and "recent median 0.350" in low.reason
    assert quality_verdict(quality, [0.2, 0.31, 0.25], **VERDICT).passed
