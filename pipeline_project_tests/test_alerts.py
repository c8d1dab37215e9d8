"""AlertSink: stored, logged, posted to a real local webhook; cooldown, resolve, failing sinks."""

import json
import logging
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import duckdb
import pytest

from pipeline_project.resources import AlertSink


class Hook:
    """A webhook receiver on 127.0.0.1 that answers `status` (or hangs for `hang` seconds)."""

    def __init__(self, status: int = 200, hang: float = 0.0) -> None:
        self.status, self.hang, self.bodies = status, hang, []

    @contextmanager
    def running(self):
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):  # noqa: N802
                hook.bodies.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
                if hook.hang:
                    time.sleep(hook.hang)
                self.send_response(hook.status)
                self.send_header("content-length", "0")
                self.end_headers()

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            yield f"http://127.0.0.1:{server.server_port}/hook"
        finally:
            server.shutdown()
            server.server_close()


@pytest.fixture
def log():
    return logging.getLogger("test_alerts")


def stored(sink: AlertSink) -> list[tuple]:
    with duckdb.connect(sink.database, read_only=True) as conn:
        return conn.execute(
            "SELECT alert_key, status, severity, batch_id, link, webhook_status, figures FROM alerts"
            " ORDER BY created_at"
        ).fetchall()


def test_alert_is_stored_logged_and_posted_with_every_field(tmp_path, log, caplog):
    hook = Hook()
    with hook.running() as url:
        sink = AlertSink(database=str(tmp_path / "a.duckdb"), webhook_url=url)
        with caplog.at_level(logging.WARNING):
            outcome = sink.emit(severity="warning", monitor="schema_error_rate", key="rate:b1",
                                message="error rate 9% > 5%", log=log, batch_id="b1",
                                figures={"error_rate": 0.09}, run_id="abc")  # fmt: skip
    assert outcome.sent and outcome.stored and outcome.webhook_status == "delivered"
    [body] = hook.bodies
    assert body == {
        "severity": "warning", "monitor": "schema_error_rate", "key": "rate:b1", "status": "firing",
        "batch_id": "b1", "message": "error rate 9% > 5%", "figures": {"error_rate": 0.09},
        "run_id": "abc", "link": "/runs/abc",
    }  # fmt: skip
    [row] = stored(sink)
    assert row[:6] == ("rate:b1", "firing", "warning", "b1", "/runs/abc", "delivered")
    assert json.loads(row[6]) == {"error_rate": 0.09}
    assert "ALERT [warning] schema_error_rate rate:b1" in caplog.text


def test_slack_format_posts_a_text_body(tmp_path, log):
    hook = Hook()
    with hook.running() as url:
        sink = AlertSink(
            database=str(tmp_path / "a.duckdb"), webhook_url=url, webhook_format="slack"
        )
        sink.emit(severity="error", monitor="run_failure", key="k", message="run failed", log=log)
    assert hook.bodies == [{"text": ":red_circle: [firing] run_failure k: run failed"}]


def test_webhook_answering_500_is_retried_and_recorded_not_raised(tmp_path, log):
    hook = Hook(status=500)
    with hook.running() as url:
        sink = AlertSink(database=str(tmp_path / "a.duckdb"), webhook_url=url, webhook_attempts=3)
        outcome = sink.emit(severity="warning", monitor="m", key="k", message="x", log=log)
    assert len(hook.bodies) == 3
    assert outcome.stored and outcome.webhook_status == "failed after 3 attempts: HTTPError"
    assert stored(sink)[0][5] == "failed after 3 attempts: HTTPError"


def test_hanging_webhook_times_out_and_the_alert_is_still_stored(tmp_path, log):
    hook = Hook(hang=3.0)
    with hook.running() as url:
        sink = AlertSink(database=str(tmp_path / "a.duckdb"), webhook_url=url,
                         webhook_timeout_seconds=0.3, webhook_attempts=2)  # fmt: skip
        started = time.monotonic()
        outcome = sink.emit(severity="warning", monitor="m", key="k", message="x", log=log)
        elapsed = time.monotonic() - started
    assert outcome.stored and "ReadTimeout" in outcome.webhook_status
    assert elapsed < 3.0


def test_repeat_alerts_are_suppressed_for_the_cooldown(tmp_path, log):
    sink = AlertSink(database=str(tmp_path / "a.duckdb"), cooldown_seconds=3600)
    assert sink.emit(severity="warning", monitor="m", key="k", message="1", log=log).sent
    second = sink.emit(severity="warning", monitor="m", key="k", message="2", log=log)
    assert not second.sent and second.webhook_status == "suppressed"
    assert sink.emit(severity="warning", monitor="m", key="other", message="3", log=log).sent
    assert [r[0] for r in stored(sink)] == ["k", "other"]
    no_cooldown = AlertSink(database=str(tmp_path / "a.duckdb"), cooldown_seconds=0)
    assert no_cooldown.emit(severity="warning", monitor="m", key="k", message="4", log=log).sent


def test_a_cleared_condition_records_one_resolved_alert(tmp_path, log):
    sink = AlertSink(database=str(tmp_path / "a.duckdb"))
    assert not sink.resolve(monitor="m", key="k", message="fine", log=log).sent  # never fired
    sink.emit(severity="warning", monitor="m", key="k", message="bad", log=log)
    assert sink.is_firing("k", log)
    assert sink.resolve(monitor="m", key="k", message="fine again", log=log).sent
    assert not sink.is_firing("k", log)
    assert not sink.resolve(monitor="m", key="k", message="still fine", log=log).sent
    assert [(r[0], r[1]) for r in stored(sink)] == [("k", "firing"), ("k", "resolved")]
    # after a resolve, the same key fires again at once (no cooldown from the old alert)
    assert sink.emit(severity="warning", monitor="m", key="k", message="bad again", log=log).sent
