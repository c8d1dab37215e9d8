"""Personal data stays in the tables: no e-mail address, valid or mistyped, reaches Dagster's
event log (metadata, logs, check results) or the alerts, on the DuckDB file and on DuckLake."""

from pipeline_project.core.personal_data import mask_personal
from pipeline_project.definitions import build_definitions
from pipeline_project_tests.helpers import alerts_of, customer, query, run_batch, write_lines

GOOD = "ada.lovelace@example.com"
TYPOS = ["grace.hopper@@example.com", "alan.turing.example.com", "edsger@"]


def test_mask_personal_masks_addresses_and_a_personal_field_s_value_whatever_it_is():
    assert mask_personal(f"write to {GOOD}") == "write to <masked>"
    assert mask_personal("email: is not an e-mail address (got 'alan.turing.example.com')") == (
        "email: is not an e-mail address (got <masked>)"
    )
    kept = "id: duplicates the id of a later line, which is kept (got line 5)"
    assert mask_personal(kept) == kept


def test_no_e_mail_address_reaches_the_event_log_or_the_alerts(backend_settings, instance):
    settings = backend_settings
    settings.landing_dir.mkdir(parents=True, exist_ok=True)
    defs = build_definitions(settings)
    lines = [customer(id=f"6f1c2a3b-4d5e-4f60-8a7b-{i:012d}", email=GOOD) for i in range(20)]
    lines += [
        customer(id=f"6f1c2a3b-4d5e-4f60-8a7b-{100 + i:012d}", email=typo)
        for i, typo in enumerate(TYPOS)
    ]
    write_lines(settings.landing_dir / "b001.jsonl", lines)
    result = run_batch(defs, instance, "b001")
    assert result.success  # 3 of 23 rejected: above the WARN threshold, an alert
    [(rejected,)] = query(settings, "SELECT count(*) FROM schema_errors")
    assert rejected == len(TYPOS)  # the table keeps them, with their reasons
    from pipeline_project.sensors.alerting import alert_finished_run

    sink = alerts_of(settings)
    alert_finished_run(instance, result.dagster_run, sink)
    events = "\n".join(repr(entry) for entry in instance.all_logs(result.run_id))
    assert "schema_error_rate_below_threshold" in events  # the log was read
    with sink._store().get_connection() as conn:
        alerts = repr(conn.execute("SELECT * FROM alerts").fetchall())
    assert alerts != "[]"
    for address in [GOOD, *TYPOS]:
        assert address not in events, address
        assert address not in alerts, address
