"""The quality gate in a real run: a scorer no better than popularity publishes nothing, and the
batch's previous answer stays current."""

from unittest import mock

from benchmarks.monitor_sensitivity import customer_blind
from pipeline_project.core import recommendation_quality, recommendations
from pipeline_project.definitions import build_definitions
from pipeline_project.resources.embeddings import HashingEmbedder
from pipeline_project.sample_data import generate_batch
from pipeline_project_tests.helpers import rows

# enough customers evaluated on 3,000 rows; personalization left out (not judged) so that the
# quality gate alone decides
CONFIG = {
    "ops": {
        "recommendations": {
            "config": {"quality_min_customers": 500, "personalization_min_profiles": 10**9}
        }
    }
}
CURRENT = "SELECT * FROM current_recommendations ORDER BY ALL"


def test_a_scorer_no_better_than_popularity_publishes_nothing_and_the_answer_stays(
    settings, instance, catalog
):
    settings.landing_dir.mkdir(parents=True, exist_ok=True)
    generate_batch(settings.landing_dir / "b1.jsonl", 3000, 0.0, 3, catalog, population=1)
    defs = build_definitions(settings, embedder=HashingEmbedder())
    assert defs.resolve_job_def("catalog_job").execute_in_process(instance=instance).success
    instance.add_dynamic_partitions("batches", ["b1"])
    job = defs.resolve_job_def("batch_pipeline_job")

    def run():
        return job.execute_in_process(
            partition_key="b1", instance=instance, run_config=CONFIG, raise_on_error=False
        )

    def quality(result):
        [check] = [
            e for e in result.get_asset_check_evaluations()
            if e.check_name == "recommendation_hit_rate_beats_popularity"
        ]  # fmt: skip
        return check

    good = run()
    assert good.success and quality(good).passed, quality(good).description
    published = rows(settings, CURRENT)
    assert published

    blind = customer_blind(recommendations.score_customers)
    with (
        mock.patch.object(recommendations, "score_customers", blind),
        mock.patch.object(recommendation_quality, "score_customers", blind),
    ):
        bad = run()
    check = quality(bad)
    assert not bad.success, check.description
    assert not check.passed and check.severity.value == "ERROR"
    assert "no better than popularity" in check.description
    assert check.metadata["lead_standard_errors"].value <= 0
    # nothing written: the batch's previous recommendations are what is current
    assert rows(settings, CURRENT) == published
    assert "recommendations" not in {
        e.asset_key.to_user_string() for e in bad.get_asset_materialization_events()
    }
