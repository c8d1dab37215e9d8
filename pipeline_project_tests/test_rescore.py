"""rescore_sensor's reading of the event log: each materialization (or a deleted batch's
observation) asks once, and its cursor moves past every record it read."""

import dagster as dg

from pipeline_project.sensors.rescore import RESCORE_METADATA, rescore_requests
from pipeline_project.tables import CUSTOMER_EMBEDDINGS, RAW_CUSTOMERS, SEGMENT_MODEL


def report(instance, event) -> None:
    instance.report_runless_asset_event(event)


def test_every_record_read_moves_the_cursor_so_nothing_is_asked_twice(instance):
    instance.add_dynamic_partitions("batches", ["b1", "b2", "b3"])
    for batches in (["b2"], ["b2", "b3"], ["b3"]):
        report(instance, dg.AssetMaterialization(
            SEGMENT_MODEL, metadata={RESCORE_METADATA: dg.MetadataValue.json(batches)}))  # fmt: skip
    requests, cursor = rescore_requests(instance, {})
    assert [(r.partition_key, r.asset_selection[0].to_user_string()) for r in requests] == [
        ("b2", "customer_segments"), ("b3", "customer_segments")]  # fmt: skip
    assert [r.run_key.count("@") for r in requests] == [2, 2]  # both records of each
    again, same = rescore_requests(instance, cursor)
    assert again == [] and same == cursor

    # a deleted batch: the batches that read its purchases start over from their profiles
    report(instance, dg.AssetObservation(
        RAW_CUSTOMERS, metadata={"deleted_batch": "b1",
                                 RESCORE_METADATA: dg.MetadataValue.json(["b3"])}))  # fmt: skip
    report(instance, dg.AssetObservation(
        RAW_CUSTOMERS, metadata={RESCORE_METADATA: dg.MetadataValue.json(["b2"])}))  # fmt: skip
    requests, cursor = rescore_requests(instance, cursor)
    assert [(r.partition_key, r.asset_selection[0].to_user_string()) for r in requests] == [
        ("b2", CUSTOMER_EMBEDDINGS), ("b3", CUSTOMER_EMBEDDINGS)]  # fmt: skip
    assert rescore_requests(instance, cursor)[0] == []
