"""The real OpenTelemetry Collector (deploy/otelcol, v0.161.0) and Jaeger (deploy/jaeger, v1.75.0),
built once into the user cache by deploy/build.sh (tests/otelcol.py), run as processes on loopback.

This is the first slice of issue 14: the binaries run, and the SDK -> collector -> `betrace serve`
path delivers a violating trace to the sidecar, which signals it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from otelcol import REPO, built
from processes import closed_at_end, stop

# The first test to need a binary builds it when the cache is cold: 2.5 min for the collector and
# several for Jaeger with an empty Go module cache on this 2-core machine, past the suite's 120 s.
pytestmark = pytest.mark.timeout(1800)

RULES = """
rules:
  - id: double-charge
    name: Payment charged more than once
    severity: critical
    condition: count(payment.charge) > 1
    signal:
      context: [order_id]
"""


class Process:
    """A binary started by a test; its output goes to a file, shown when something fails."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        with log.open("wb") as out:
            self.process = subprocess.Popen(args, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                            stdout=out, stderr=subprocess.STDOUT)

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def close(self) -> None:
        stop(self.process)


@pytest.fixture
def start() -> Iterator[Callable[..., Process]]:
    """`start(args, log, env=None)`: a Process, stopped (SIGTERM, then SIGKILL) at the end."""
    yield from closed_at_end(Process)


def http_status(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")
    except OSError:
        return 0, ""


def wait_http_ok(url: str, process: Process, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.process.poll() is not None:
            raise AssertionError(f"{process.process.args[0]} exited "
                                 f"({process.process.returncode}):\n{process.output}")
        status, body = http_status(url)
        if status == 200:
            return body
        time.sleep(0.1)
    raise AssertionError(f"no 200 from {url} within {timeout}s:\n{process.output}")


def read_signals(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_the_collector_has_the_components_the_project_uses() -> None:
    otelcol = built("otelcol")
    result = subprocess.run([str(otelcol), "components"], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for name in ("otlp", "batch", "memory_limiter", "tail_sampling", "otlp_grpc", "otlp_http",
                 "file", "debug", "health_check", "bearertokenauth"):
        assert f"- name: {name}\n" in out, out
    assert "version: 0.161.0" in out


def test_a_violating_trace_sent_through_the_real_collector_is_signalled_by_betrace_serve(
        start: Callable[..., Process], tmp_path: Path, free_port: Callable[[], int],
        sdk_client: Callable[..., Any], wait_until: Callable[..., Any]) -> None:
    otelcol = built("otelcol")
    sidecar_port, metrics_port = free_port(), free_port()
    otlp_port, health_port = free_port(), free_port()

    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    signals = tmp_path / "signals.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BETRACE_")}
    sidecar = start([sys.executable, "-m", "sidecar", "serve", "--rules", str(rules),
                     "--listen", f"127.0.0.1:{sidecar_port}", "--http-listen", "",
                     "--metrics-listen", f"127.0.0.1:{metrics_port}",
                     "--decision-wait", "1s", "--signals-out", str(signals)],
                    tmp_path / "serve.log", env)

    # As the chart names it: otlp/betrace (the otlp_grpc exporter under its older type name),
    # with the collector's defaults for compression, queue and retries.
    config = tmp_path / "otelcol.yaml"
    config.write_text(f"""
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:{otlp_port}
processors:
  batch:
    timeout: 200ms
exporters:
  otlp/betrace:
    endpoint: 127.0.0.1:{sidecar_port}
    tls:
      insecure: true
extensions:
  health_check:
    endpoint: 127.0.0.1:{health_port}
service:
  extensions: [health_check]
  telemetry:
    metrics:
      level: none
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [otlp/betrace]
""")
    collector = start([str(otelcol), "--config", str(config)], tmp_path / "otelcol.log")
    wait_http_ok(f"http://127.0.0.1:{health_port}/", collector)
    wait_http_ok(f"http://127.0.0.1:{metrics_port}/readyz", sidecar)

    tracer = sdk_client(otlp_port).tracer
    with tracer.start_as_current_span("checkout") as clean:
        with tracer.start_as_current_span("payment.charge", attributes={"order_id": "o-1"}):
            pass
    with tracer.start_as_current_span("checkout") as bad:
        for _ in range(2):
            with tracer.start_as_current_span("payment.charge", attributes={"order_id": "o-2"}):
                pass
    clean_id = format(clean.get_span_context().trace_id, "032x")
    bad_id = format(bad.get_span_context().trace_id, "032x")

    found = wait_until(lambda: read_signals(signals), timeout=30,
                       what=f"a signal in {signals}\ncollector:\n{collector.output}\n"
                            f"sidecar:\n{sidecar.output}")
    # Both traces reached the sidecar together (one batch); give the clean one the same wait.
    time.sleep(2.0)
    found = read_signals(signals)
    assert [(s["rule_id"], s["trace_id"]) for s in found] == [("double-charge", bad_id)], found
    assert found[0]["context"]["order_id"] == "o-2"
    assert clean_id not in {s["trace_id"] for s in found}


def test_jaeger_takes_otlp_in_and_answers_its_query_api(
        start: Callable[..., Process], tmp_path: Path, free_port: Callable[[], int],
        sdk_client: Callable[..., Any], wait_until: Callable[..., Any]) -> None:
    jaeger = built("jaeger")
    ports = {name: free_port() for name in ("JAEGER_OTLP_GRPC_PORT", "JAEGER_OTLP_HTTP_PORT",
                                             "JAEGER_QUERY_HTTP_PORT", "JAEGER_QUERY_GRPC_PORT")}
    env = {**os.environ, **{k: str(v) for k, v in ports.items()}}
    process = start([str(jaeger), "--config", str(REPO / "deploy" / "jaeger" / "config.yaml")],
                    tmp_path / "jaeger.log", env)
    query = f"http://127.0.0.1:{ports['JAEGER_QUERY_HTTP_PORT']}"
    wait_http_ok(f"{query}/api/services", process)

    client = sdk_client(ports["JAEGER_OTLP_GRPC_PORT"], service="jaeger-smoke")
    with client.tracer.start_as_current_span("smoke.span") as span:
        pass
    trace_id = format(span.get_span_context().trace_id, "032x")

    def stored() -> list[str]:
        status, body = http_status(f"{query}/api/traces/{trace_id}")
        if status != 200:
            return []
        return [s["operationName"] for t in json.loads(body)["data"] for s in t["spans"]]

    assert wait_until(stored, timeout=20, what=f"trace {trace_id} in Jaeger") == ["smoke.span"]
    services = json.loads(wait_http_ok(f"{query}/api/services", process))["data"]
    assert "jaeger-smoke" in services
