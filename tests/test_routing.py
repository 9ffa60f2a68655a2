"""Signal routing with real parts: `betrace serve` pushing alerts to a real Alertmanager, whose
own webhook receiver (configured in its alertmanager.yml, as Slack or PagerDuty would be) gets
the notification and later the resolution; Alertmanager down and back with nothing lost; the
plain --webhook sink with its HMAC signature, retries and refusals."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alertmanager_servers import AlertmanagerServer, Receiver
from test_redis_e2e import ADMIN, PAY, Serve, poll, rules_file, send_split  # noqa: F401

TRACE_URL = "https://grafana.example/explore?left={%22queries%22:[{%22query%22:%22{trace_id}%22}]}"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    made = Receiver()
    yield made
    made.close()


@pytest.fixture
def alertmanager(receiver: Receiver) -> Iterator[AlertmanagerServer]:
    server = AlertmanagerServer(f"{receiver.url}/notify")
    yield server
    server.close()


def violating(count: int, tracer: Any) -> dict[str, set[str]]:
    """Send traces 0..count-1 (test_redis_e2e.plan); the rules each violates, by trace id."""
    out = {}
    for i in range(count):
        trace_id, rules = send_split(i, [tracer])
        if rules:
            out[trace_id] = rules
    return out


def test_signals_become_alerts_and_reach_alertmanagers_receiver(
        tmp_path: Path, rules_file: Path, alertmanager: AlertmanagerServer,
        receiver: Receiver, sdk_client: Any) -> None:
    alertmanager.start()
    sidecar = Serve("memory", rules_file, tmp_path / "s.jsonl", "--alertmanager",
                    alertmanager.url, "--trace-url", TRACE_URL,
                    "--alertmanager-resolve-after", "3s")
    try:
        sidecar.listening()
        expected = violating(12, sdk_client(sidecar.grpc_port, version="3.1.0").tracer)
        pairs = {(rule, trace) for trace, rules in expected.items() for rule in rules}
        alerts = poll(lambda: len(alertmanager.alerts()) >= len(pairs) and alertmanager.alerts(),
                      20, "the alerts in Alertmanager")
        assert len(alerts) == len(pairs)
        for alert in alerts:
            labels, notes = alert["labels"], alert["annotations"]
            assert labels["alertname"] == "BetraceViolation"
            assert labels["rule"] in (PAY, ADMIN) and labels["service"] == "checkout"
            assert labels["severity"] == {PAY: "critical", ADMIN: "high"}[labels["rule"]]
            assert (labels["rule"], notes["trace_id"]) in pairs
            assert notes["trace_url"] == TRACE_URL.replace("{trace_id}", notes["trace_id"])
            assert alert["generatorURL"] == notes["trace_url"]
            assert notes["service_version"] == "3.1.0"
            json.loads(notes["context"])
        # Alertmanager's own webhook receiver: what Slack or PagerDuty would get
        notified = poll(lambda: [a for n in receiver.bodies("/notify") if n["status"] == "firing"
                                 for a in n["alerts"]], 20, "a firing notification")
        assert {a["labels"]["rule"] for a in notified} <= {PAY, ADMIN}
        resolved = poll(lambda: [a for n in receiver.bodies("/notify")
                                 if n["status"] == "resolved" for a in n["alerts"]],
                        30, "the resolved notification (resolve-after 3s)")
        assert {a["labels"]["signal_id"] for a in resolved} <= {
            a["labels"]["signal_id"] for a in alerts}
        assert sidecar.metric("betrace_signals_delivered_total", sink="alertmanager") == \
            len(pairs)
        assert sidecar.metric("betrace_signals_dropped_total", sink="alertmanager") == 0
        sidecar.clean_stderr()
    finally:
        sidecar.close()


def test_alertmanager_down_then_up_nothing_lost(tmp_path: Path, rules_file: Path,
                                                alertmanager: AlertmanagerServer,
                                                sdk_client: Any) -> None:
    sidecar = Serve("memory", rules_file, tmp_path / "s.jsonl", "--alertmanager",
                    alertmanager.url)  # not started yet
    try:
        sidecar.listening()
        expected = violating(12, sdk_client(sidecar.grpc_port).tracer)
        count = sum(len(rules) for rules in expected.values())
        poll(lambda: sidecar.metric("betrace_signal_delivery_errors_total",
                                    sink="alertmanager") > 0, 20, "a failed delivery")
        poll(lambda: sidecar.metric("betrace_signal_export_backlog", sink="alertmanager")
             == count, 20, "every signal waiting")
        assert sidecar.get("/readyz")[0] == 200
        alertmanager.start()
        poll(lambda: sidecar.metric("betrace_signal_export_backlog", sink="alertmanager") == 0,
             60, "the backlog delivered")
        assert len(alertmanager.alerts()) == count
        assert sidecar.metric("betrace_signals_delivered_total", sink="alertmanager") == count
        assert sidecar.metric("betrace_signals_dropped_total", sink="alertmanager") == 0
        assert "alertmanager: reachable again" in sidecar.stderr
    finally:
        sidecar.close()


def test_webhook_signed_retried_and_refusals_counted(tmp_path: Path, rules_file: Path,
                                                     receiver: Receiver,
                                                     sdk_client: Any) -> None:
    secret = tmp_path / "hmac"
    secret.write_text("k3y-for-signing\n")
    receiver.answers = [503, 503]  # down for two attempts
    sidecar = Serve("memory", rules_file, tmp_path / "s.jsonl", "--webhook",
                    f"{receiver.url}/betrace", "--webhook-secret-file", str(secret),
                    "--trace-url", TRACE_URL)
    try:
        sidecar.listening()
        expected = violating(12, sdk_client(sidecar.grpc_port).tracer)
        count = sum(len(rules) for rules in expected.values())
        poll(lambda: sum(len(b["signals"]) for b in receiver.bodies("/betrace")) >= count, 30,
             "every signal posted")
        signals = [s for b in receiver.bodies("/betrace") for s in b["signals"]]
        assert sorted((s["rule_id"], s["trace_id"]) for s in signals) == sorted(
            (rule, trace) for trace, rules in expected.items() for rule in rules)
        assert all(s["trace_url"] == TRACE_URL.replace("{trace_id}", s["trace_id"])
                   for s in signals)
        for _, headers, body in receiver.posts:
            assert headers["X-Betrace-Signature"] == "sha256=" + hmac.new(
                b"k3y-for-signing", body, hashlib.sha256).hexdigest()
        assert sidecar.metric("betrace_signal_delivery_errors_total", sink="webhook") == 2
        # a receiver that refuses the request itself: dropped, counted, logged; not retried
        receiver.answers = [400]
        violating(1, sdk_client(sidecar.grpc_port).tracer)  # trace 0 again: a new trace id
        poll(lambda: sidecar.metric("betrace_signals_dropped_total", sink="webhook",
                                    reason="rejected") == 1, 20, "the refusal counted")
        assert "answered 400" in sidecar.stderr
    finally:
        sidecar.close()


def test_routing_settings_are_checked(tmp_path: Path, rules_file: Path) -> None:
    from test_signaldb_live import betrace

    for flags, message in ((["--alertmanager", "am:9093"], "expected an http:// or https://"),
                           (["--trace-url", "https://x/"], "has no {trace_id}"),
                           (["--webhook-secret-file", "f"], "webhook-secret-file needs webhook")):
        run = betrace("serve", "--rules", str(rules_file), *flags)
        assert run.returncode == 2 and message in run.stderr, run.stderr
    run = betrace("serve", "--rules", str(rules_file), "--listen", "127.0.0.1:0",
                  "--http-listen", "", "--metrics-listen", "", "--webhook", "http://x/",
                  "--webhook-secret-file", str(tmp_path / "missing"))
    assert run.returncode == 2 and "cannot read the secret file" in run.stderr
