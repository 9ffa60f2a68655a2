"""The whole path with real processes, as the Helm chart deploys it: the OpenTelemetry SDK app ->
the OpenTelemetry Collector (deploy/otelcol, v0.161.0, running the chart's rendered config) ->
`betrace serve` (the chart's sidecar command line) -> violation spans back to the collector ->
Jaeger (deploy/jaeger, v1.75.0), where they are looked up through its query API.

The traffic is the seven case studies' own instrumentation (sidecar/live/demo.py), each incident
and its fixed twin; the rules are the catalog's, given to the chart as Helm values."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from chart import REPO, render
from otelcol import built
from pipeline import ChartPod, Jaeger, Process, attributes
from processes import closed_at_end

from sidecar.live.demo import SCENARIOS, send

# A cold cache builds the collector and Jaeger first (minutes; tests/otelcol.py).
pytestmark = pytest.mark.timeout(1800)

CATALOG = {path.name: path.read_text() for path in sorted((REPO / "rules").glob("*.yaml"))}


@pytest.fixture
def start() -> Iterator[Callable[..., Process]]:
    """`start(args, log, env=None, stdout=None)`: a Process, stopped at the end of the test."""
    yield from closed_at_end(Process)


def test_the_collector_has_the_components_the_project_uses() -> None:
    result = subprocess.run([str(built("otelcol")), "components"], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    for name in ("otlp", "batch", "memory_limiter", "tail_sampling", "otlp_grpc", "otlp_http",
                 "file", "debug", "health_check", "bearertokenauth"):
        assert f"- name: {name}\n" in result.stdout, result.stdout
    assert "version: 0.161.0" in result.stdout


@pytest.mark.parametrize("values", [
    {},
    {"collector": {"exporters": {"otlp_grpc/tempo": {"endpoint": "tempo.observability:4317",
                                                     "tls": {"insecure": True}},
                                 "debug": {"verbosity": "basic"}},
                   "pipelineExporters": ["otlp_grpc/tempo"]},
     "redis": {"bundled": {"enabled": True}}},
], ids=["defaults", "exporters-and-redis"])
def test_the_charts_collector_config_passes_otelcol_validate(values: dict[str, Any],
                                                             tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(render(values).get("ConfigMap", "betrace-collector-config")
                      ["data"]["config.yaml"])  # as mounted, unchanged
    result = subprocess.run([str(built("otelcol")), "validate", f"--config={config}"],
                            env={"MY_POD_IP": "10.0.0.7"}, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    # and it uses no deprecated name (v0.161.0 warns of `otlp` for `otlp_grpc`)
    assert "deprecated" not in result.stdout + result.stderr


def test_the_readme_shows_the_config_the_chart_renders() -> None:
    text = (REPO / "README.md").read_text()
    section = text[text.index("### With the OpenTelemetry Collector"):]
    block = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert block
    rendered = render({"collector": {"exporters": {"otlp_grpc/tempo": {
        "endpoint": "tempo.observability:4317", "tls": {"insecure": True}}}}})
    assert yaml.safe_load(block.group(1)) == rendered.collector_config()


def test_violation_spans_land_in_jaeger_inside_the_violating_traces(
        start: Callable[..., Process], tmp_path: Path, sdk_client: Callable[..., Any], wait_until: Callable[..., Any],
        scrape: Callable[[int], Any]) -> None:
    jaeger = Jaeger(start, tmp_path)
    rendered = render({
        "rules": CATALOG,
        "sidecar": {"decisionWait": "1s"},
        "collector": {"exporters": {"otlp_grpc/jaeger": {
            "endpoint": f"127.0.0.1:{jaeger.otlp_grpc}", "tls": {"insecure": True}}}}})
    pod = ChartPod(rendered, tmp_path / "pod").start(start)

    app = sdk_client(pod.otlp_grpc, service="demo-shop")
    for scenario in SCENARIOS:
        send(scenario, app.tracer)
    app.flush()
    incidents = {s.trace_id: s for s in SCENARIOS if s.violates}
    clean = {s.trace_id for s in SCENARIOS if not s.violates}

    # Every incident caught by its own rule; the decision wait is 1 s.
    def caught() -> list[dict[str, Any]]:
        signals = pod.signals()
        found = {(s["trace_id"], s["rule_id"]) for s in signals}
        return signals if all((t, s.rule_id) in found for t, s in incidents.items()) else []

    signals = wait_until(caught, timeout=60, what=f"every incident signalled\n{pod.logs}")
    time.sleep(2.0)  # the clean twins were decided with them; anything late shows now
    signals = pod.signals()
    assert not [s for s in signals if s["trace_id"] in clean], signals
    assert len({s["signal_id"] for s in signals}) == len(signals), "a signal written twice"
    assert all(s["mode"] == "live" for s in signals)

    # In Jaeger, each signal is one betrace.violation span inside its trace: parented by the
    # latest offending span, linked to every offending span, carrying the rule and context.
    def stored(trace_id: str, expected: int) -> list[dict[str, Any]]:
        spans = jaeger.spans(trace_id)
        violations = [s for s in spans if s["name"] == "betrace.violation"]
        return spans if len(violations) >= expected else []

    by_trace: dict[str, list[dict[str, Any]]] = {}
    for signal in signals:
        by_trace.setdefault(signal["trace_id"], []).append(signal)
    for trace_id, trace_signals in by_trace.items():
        spans = wait_until(lambda: stored(trace_id, len(trace_signals)), timeout=30,
                           what=f"{len(trace_signals)} violation span(s) of {trace_id} in "
                                f"Jaeger\n{pod.logs}")
        app_spans = {s["spanId"]: s for s in spans if s["service"] == "demo-shop"}
        violations = {attributes(s)["betrace.signal.id"]: s for s in spans
                      if s["name"] == "betrace.violation"}
        assert sorted(violations) == sorted(s["signal_id"] for s in trace_signals)
        for signal in trace_signals:
            span = violations[signal["signal_id"]]
            assert span["service"] == "betrace"
            assert span["traceId"] == trace_id
            offending = set(signal["span_ids"])
            assert offending and offending <= set(app_spans)
            assert span["parentSpanId"] in offending
            assert {link["spanId"] for link in span["links"]} == offending
            assert all(link["traceId"] == trace_id for link in span["links"])
            said = attributes(span)
            assert said["betrace.rule.id"] == signal["rule_id"]
            assert said["betrace.severity"] == signal["severity"]
            assert said["betrace.mode"] == "live"
            for key, value in signal["context"].items():
                if isinstance(value, str):
                    assert said[f"betrace.context.{key}"] == value
    for trace_id in clean:
        spans = jaeger.spans(trace_id)
        assert spans, f"clean trace {trace_id} missing from Jaeger"
        assert not [s for s in spans if s["name"] == "betrace.violation"]

    # The collector's own metrics: every app span and every violation span (echoed back
    # through the collector) went to the sidecar and to Jaeger; the sidecar took them all and
    # recognised its own.
    app_total = sum(len(jaeger.spans(s.trace_id)) for s in SCENARIOS) - len(signals)
    collector = scrape(pod.telemetry)
    for exporter in ("otlp_grpc/betrace", "otlp_grpc/jaeger"):
        sent = collector.value("otelcol_exporter_sent_spans_total", exporter=exporter)
        assert sent == app_total + len(signals), (exporter, sent, collector.text[-3000:])
        assert collector.value("otelcol_exporter_send_failed_spans_total",
                               exporter=exporter) == 0
    sidecar = scrape(pod.metrics)
    assert sidecar.value("betrace_spans_received_total") == app_total + len(signals)
