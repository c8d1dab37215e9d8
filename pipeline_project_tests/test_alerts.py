"""AlertSink: stored, logged, posted to a real local webhook; cooldown, resolve, failing sinks."""

from __future__ import annotations

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
    """A webhook receiver on 127.0.0.1 at `path` that answers `status` (after `hang` seconds).

    `stalled()` makes it accept every request and never answer, until `recover()`. `bodies`
    holds every request received, `answered` those it answered.
    """

    def __init__(self, status: int = 200, hang: float = 0.0, path: str = "/hook") -> None:
        self.status, self.hang, self.path = status, hang, path
        self.bodies: list[dict] = []
        self.answered: list[dict] = []
        self.paths: list[str] = []
        self._release = threading.Event()
        self._release.set()

    def stalled(self) -> Hook:
        self._release.clear()
        return self

    def recover(self, status: int = 200) -> None:
        self.status = status
        self._release.set()

    @contextmanager
    def running(self):
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                hook.bodies.append(body)
                hook.paths.append(self.path)
                if not hook._release.is_set():  # stalled: accepted, never answered
                    hook._release.wait()
                    self.close_connection = True
                    return
                if hook.hang:
                    time.sleep(hook.hang)
                hook.answered.append(body)
                self.send_response(hook.status)
                self.send_header("content-length", "0")
                self.end_headers()

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            yield f"http://127.0.0.1:{server.server_port}{self.path}"
        finally:
            self._release.set()
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
    assert stored(sink)[0][5] == "pending"  # delivered by the alert_delivery_sensor later


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


def test_an_error_rate_above_the_threshold_fires_under_the_sensor_s_key_and_below_resolves(
    tmp_path, log
):
    hook = Hook()
    with hook.running() as url:
        sink = AlertSink(database=str(tmp_path / "a.duckdb"), webhook_url=url)
        bad = sink.alert_error_rate(
            asset="customers", batch_id="b1", rate=0.5, threshold=0.05, log=log, run_id="r1"
        )
        assert bad.sent and bad.stored and bad.webhook_status == "delivered"
        fine = sink.alert_error_rate(
            asset="customers", batch_id="b1", rate=0.01, threshold=0.05, log=log, run_id="r2"
        )
        assert fine.sent and fine.stored
        # at most the threshold is not above it: nothing fires for b2
        assert not sink.alert_error_rate(
            asset="customers", batch_id="b2", rate=0.2, threshold=0.2, log=log
        ).sent
    assert [(r[0], r[1], r[3]) for r in stored(sink)] == [
        ("error_rate:customers:b1", "firing", "b1"),
        ("error_rate:customers:b1", "resolved", "b1"),
    ]
    assert json.loads(stored(sink)[0][6]) == {"error_rate": 0.5, "threshold": 0.05}
    assert [b["status"] for b in hook.bodies] == ["firing", "resolved"]
    assert hook.bodies[0]["message"] == "customers error rate 50.00% for batch b1 is above 5%"


def test_an_alert_raised_for_a_run_is_not_raised_again_for_that_run_even_after_the_cooldown(
    tmp_path, log
):
    hook = Hook()
    with hook.running() as url:
        sink = AlertSink(database=str(tmp_path / "a.duckdb"), webhook_url=url, cooldown_seconds=0)
        first = sink.emit(severity="error", monitor="m", key="k", message="1", log=log, run_id="r1")
        # the same run seen again (the sensor after the asset, the daemon after the CLI)
        again = sink.emit(severity="error", monitor="m", key="k", message="2", log=log, run_id="r1")
        other = sink.emit(severity="error", monitor="m", key="k", message="3", log=log, run_id="r2")
    assert first.sent and not again.sent and again.webhook_status == "suppressed"
    assert other.sent  # another run: the cooldown (0 s here) decides, as before
    assert [r[4] for r in stored(sink)] == ["/runs/r1", "/runs/r2"]
    assert len(hook.bodies) == 2


def test_an_alert_is_stored_before_it_is_posted_so_a_second_raiser_sees_it_meanwhile(tmp_path, log):
    """The asset's sink is inside its POST (a stalled webhook) when the sensor's sink raises
    the same alert: the sensor's finds it stored and sends nothing."""
    hook = Hook().stalled()
    with hook.running() as url:
        asset_sink = AlertSink(database=str(tmp_path / "a.duckdb"), webhook_url=url,
                               webhook_timeout_seconds=10, webhook_attempts=2)  # fmt: skip
        sensor_sink = AlertSink(database=str(tmp_path / "a.duckdb"), webhook_url=url)
        outcomes = []
        posting = threading.Thread(
            target=lambda: outcomes.append(
                asset_sink.alert_error_rate(
                    asset="customers", batch_id="b1", rate=0.5, threshold=0.05, log=log, run_id="r1"
                )  # fmt: skip
            )
        )
        posting.start()
        deadline = time.monotonic() + 10
        while not hook.bodies and time.monotonic() < deadline:
            time.sleep(0.02)
        assert stored(asset_sink)[0][:2] == ("error_rate:customers:b1", "firing")
        assert stored(asset_sink)[0][5] == "sending"
        second = sensor_sink.alert_error_rate(
            asset="customers", batch_id="b1", rate=0.5, threshold=0.05, log=log, run_id="r1"
        )
        assert not second.sent
        hook.recover()
        posting.join(timeout=30)
    assert outcomes[0].webhook_status == "delivered"
    assert [r[5] for r in stored(asset_sink)] == ["delivered"]
    assert len(hook.answered) == 1


def test_a_slack_body_escapes_what_a_user_typed_and_masks_e_mail_addresses(tmp_path, log):
    """A landing file named to mention the channel or to smuggle a link: Slack sees text."""
    hook = Hook()
    with hook.running() as url:
        sink = AlertSink(database=str(tmp_path / "a.duckdb"), webhook_url=url,
                         webhook_format="slack")  # fmt: skip
        batch = "<!channel> <https://evil.example|click> & more"
        sink.emit(severity="error", monitor="m", key=f"check:customers:c:{batch}",
                  message=f"check failed for batch {batch}; ask jane.doe@example.com",
                  log=log, batch_id=batch)  # fmt: skip
    [body] = hook.bodies
    text = body["text"]
    assert "<" not in text.replace(":red_circle:", "") and ">" not in text
    assert "&lt;!channel&gt;" in text and "&lt;https://evil.example|click&gt;" in text
    assert "&amp; more" in text
    assert "jane.doe@example.com" not in text and "<masked>" not in text  # escaped too
    assert "&lt;masked&gt;" in text
    # the stored alert masks the address as well
    assert "jane.doe@example.com" not in json.dumps(stored(sink), default=str)
