"""landing_batches_sensor: new files become partitions and runs; known files are skipped."""

import os

import dagster as dg
import duckdb

from pipeline_project_tests.helpers import customer, run_batch, write_lines


def tick(defs, instance, resources, cursor=None):
    sensor = defs.resolve_sensor_def("landing_batches_sensor")
    with dg.build_sensor_context(
        instance=instance, definitions=defs, resources=resources, cursor=cursor
    ) as context:
        result = sensor(context)
    # build_sensor_context does not apply partition requests; the daemon does, before the runs.
    for request in result.dynamic_partitions_requests:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    return result


def alerts(settings) -> list[tuple]:
    if not settings.alerts_duckdb_path.exists():
        return []
    with duckdb.connect(str(settings.alerts_duckdb_path), read_only=True) as conn:
        return conn.execute("SELECT monitor, alert_key, severity, message FROM alerts").fetchall()


def test_new_files_are_registered_and_launched_in_the_same_tick(
    defs, instance, resources, settings
):
    write_lines(settings.landing_dir / "b001.jsonl", [customer()])
    write_lines(settings.landing_dir / "b002.jsonl.gz", [])
    result = tick(defs, instance, resources)
    assert [r.partition_key for r in result.run_requests] == ["b001", "b002"]
    assert result.dynamic_partitions_requests[0].partition_keys == ["b001", "b002"]
    assert sorted(instance.get_dynamic_partitions("batches")) == ["b001", "b002"]
    assert result.run_requests[0].run_key.startswith("b001:")


def test_known_files_are_skipped_on_the_next_tick(defs, instance, resources, settings):
    write_lines(settings.landing_dir / "b001.jsonl", [customer()])
    first = tick(defs, instance, resources)
    second = tick(defs, instance, resources, cursor=first.cursor)
    assert second.run_requests == []
    assert second.dynamic_partitions_requests == []
    assert "no new batch files" in second.skip_reason.skip_message


def test_redelivered_file_with_new_content_runs_its_batch_again(
    defs, instance, resources, settings
):
    path = write_lines(settings.landing_dir / "b001.jsonl", [customer()])
    first = tick(defs, instance, resources)
    write_lines(path, [customer(), customer(email="x@y.io")])
    os.utime(path, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    second = tick(defs, instance, resources, cursor=first.cursor)
    assert [r.partition_key for r in second.run_requests] == ["b001"]
    assert second.run_requests[0].run_key != first.run_requests[0].run_key
    assert second.dynamic_partitions_requests == []


def test_bad_names_are_reported_once_as_a_stored_alert_and_never_run(
    defs, instance, resources, settings
):
    write_lines(settings.landing_dir / "b001.jsonl", [customer()])
    for name in (
        "../evil.jsonl",
        "has space.jsonl",
        "b;drop table.jsonl",
        "notes.txt",
        "x" * 65 + ".jsonl",
    ):
        target = settings.landing_dir / name
        if ".." not in name:
            write_lines(target, ["{}"])
    write_lines(settings.landing_dir / "b003.jsonl", [])
    write_lines(settings.landing_dir / "b003.jsonl.gz", [])
    write_lines(settings.landing_dir / ".b004.jsonl.partial", [])  # upload in progress: silent

    first = tick(defs, instance, resources)
    assert [r.partition_key for r in first.run_requests] == ["b001"]
    assert instance.get_dynamic_partitions("batches") == ["b001"]
    reported = sorted(key.split(":", 1)[1] for _, key, _, _ in alerts(settings))
    assert reported == sorted(
        [
            "has space.jsonl",
            "b;drop table.jsonl",
            "notes.txt",
            "x" * 65 + ".jsonl",
            "b003.jsonl",
            "b003.jsonl.gz",
        ]
    )
    assert all(
        monitor == "landing_file_name" and sev == "warning"
        for monitor, _, sev, _ in alerts(settings)
    )

    tick(defs, instance, resources, cursor=first.cursor)
    assert len(alerts(settings)) == 6


def test_unstorable_alert_is_reported_again_on_the_next_tick(defs, instance, resources, settings):
    write_lines(settings.landing_dir / "bad name.jsonl", ["{}"])
    settings.alerts_duckdb_path.mkdir(parents=True)  # a directory: the alert store cannot open
    first = tick(defs, instance, resources)
    assert "bad name.jsonl" not in first.cursor
    settings.alerts_duckdb_path.rmdir()
    second = tick(defs, instance, resources, cursor=first.cursor)
    assert "bad name.jsonl" in second.cursor
    assert len(alerts(settings)) == 1


def test_batches_ingested_outside_the_sensor_are_not_run_again(defs, instance, resources, settings):
    write_lines(settings.landing_dir / "b001.jsonl", [customer()])
    assert run_batch(defs, instance, "b001").success
    result = tick(defs, instance, resources)
    assert result.run_requests == []


def test_missing_landing_folder_is_a_skip_not_a_crash(defs, instance, resources, settings):
    settings.landing_dir.rmdir()
    result = tick(defs, instance, resources)
    assert result.run_requests == [] and result.skip_reason is not None


def test_sensor_is_running_by_default_and_targets_the_ingestion_job(defs):
    sensor = defs.resolve_sensor_def("landing_batches_sensor")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    assert sensor.job_name == "batch_ingestion_job"


def test_a_symbolic_link_is_reported_and_never_read(defs, instance, resources, settings, tmp_path):
    secret = write_lines(tmp_path / "outside" / "secret.jsonl", [customer()])
    settings.landing_dir.mkdir(parents=True, exist_ok=True)
    (settings.landing_dir / "b009.jsonl").symlink_to(secret)
    result = tick(defs, instance, resources)
    assert result.run_requests == [] and instance.get_dynamic_partitions("batches") == []
    [(monitor, key, _, message)] = alerts(settings)
    assert (monitor, key) == ("landing_file_name", "landing_file_name:b009.jsonl")
    assert "symbolic link" in message

    launched = run_batch(defs, instance, "b009")  # launched by hand, e.g. from the UI
    assert not launched.success
    error = launched.get_step_failure_events()[0].event_specific_data.error.message
    assert "symbolic link" in error
    assert not (settings.duckdb_path.parent / "warehouse.duckdb.files").exists()  # nothing read
