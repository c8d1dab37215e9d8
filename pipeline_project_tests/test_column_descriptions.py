"""What the UI says of a column is what the data is: each description a number can check, checked
on the tables of a real run."""

import json

import pytest

from pipeline_project.asset_metadata import column_description
from pipeline_project.core.recommendations import Weights
from pipeline_project.definitions import build_definitions
from pipeline_project.resources.embeddings import HashingEmbedder
from pipeline_project.sample_data import generate_batch
from pipeline_project_tests.helpers import rows

# predicted_value = confidence x the segment's average amount for the product (its price when
# the segment never bought it); confidence = the weighted mean of its parts (default weights).
_SCORE_PARTS_SQL = """
SELECT count(*) FILTER (WHERE abs(r.predicted_value
                                  - r.confidence * coalesce(a.avg_amount, c.price)) > 1e-6),
       count(*) FILTER (WHERE abs(r.confidence - ($segment * r.segment_affinity
                                                  + $taste * r.taste
                                                  + $co_purchase * r.co_purchase
                                                  + $similarity * r.similarity_score) / $total)
                              > 1e-6
                           OR NOT r.segment_affinity BETWEEN 0 AND 1
                           OR NOT r.taste BETWEEN 0 AND 1
                           OR NOT r.co_purchase BETWEEN 0 AND 1),
       count(*)
FROM recommendations AS r
JOIN product_catalog AS c USING (product_id)
LEFT JOIN segment_affinity AS a
    ON a.model_version = r.model_version AND a.segment_id = r.segment_id
   AND a.product_id = r.product_id
"""


@pytest.fixture
def ran(settings, instance, catalog):
    settings.landing_dir.mkdir(parents=True, exist_ok=True)
    path = settings.landing_dir / "b1.jsonl"
    generate_batch(path, 400, 0.0, 7, catalog, population=1)
    defs = build_definitions(settings, embedder=HashingEmbedder())
    assert defs.resolve_job_def("catalog_job").execute_in_process(instance=instance).success
    instance.add_dynamic_partitions("batches", ["b1"])
    result = defs.resolve_job_def("batch_pipeline_job").execute_in_process(
        partition_key="b1", instance=instance, raise_on_error=False
    )
    assert result.success
    return path


def test_the_column_descriptions_a_number_can_check_hold_on_a_run(settings, ran):
    # text_hash: md5 of the embedded text
    assert "md5" in column_description("customer_embeddings", "text_hash")
    assert rows(
        settings,
        "SELECT count(*) FILTER (WHERE text_hash <> md5(profile_text)), count(*)"
        " FROM customer_embeddings",
    ) == [(0, 400)]
    [(wrong, products)] = rows(
        settings,
        "SELECT count(*) FILTER (WHERE text_hash <> md5(product_text)), count(*)"
        " FROM product_embeddings",
    )
    assert wrong == 0 and products > 0

    # predicted_value and confidence: as their descriptions compute them
    assert "average amount" in column_description("recommendations", "predicted_value")
    assert "weighted mean" in column_description("recommendations", "confidence")
    weights = Weights()
    parts = {"segment": weights.segment, "taste": weights.taste,
             "co_purchase": weights.co_purchase, "similarity": weights.similarity}  # fmt: skip
    [(bad_value, bad_confidence, scored)] = rows(
        settings, _SCORE_PARTS_SQL, {**parts, "total": sum(parts.values())}
    )
    assert (bad_value, bad_confidence) == (0, 0) and scored > 0

    # segment_model.weight: a count of the training customers, not a share
    assert "count" in column_description("segment_model", "weight")
    [(whole, total)] = rows(
        settings, "SELECT bool_and(weight = round(weight)), sum(weight) FROM segment_model"
    )
    assert whole and total == 400

    # purchased_at: the entry's `date`, as the same instant
    assert "`date`" in column_description("customer_purchases", "purchased_at")
    first = json.loads(ran.read_text().splitlines()[0])
    stored = rows(
        settings,
        "SELECT strftime(purchased_at AT TIME ZONE 'UTC', '%Y-%m-%dT%H:%M:%S')"
        " FROM customer_purchases WHERE line_no = 1 ORDER BY purchase_idx",
    )
    landed = [p["date"] for p in first["purchaseHistory"]]
    assert [s for (s,) in stored] == [d.replace("Z", "")[:19] for d in landed]
