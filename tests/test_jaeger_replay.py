"""Replay from Jaeger (`betrace replay --jaeger URL`) against the real Jaeger v1.75.0
(deploy/jaeger, built once by deploy/build.sh; tests/otelcol.py), filled through the
OpenTelemetry SDK over OTLP gRPC. One Jaeger serves the module: every trace sits at a fixed
offset from T0, an hour ago, so each test picks what it replays by time range."""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace as otel_trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from pipeline import Jaeger, Process
from processes import closed_at_end, free_port

from sidecar.otlp.json_spans import InputError
from sidecar.replay.jaeger import JaegerClient, JaegerError
from sidecar.replay.runner import ReplayOptions, replay_backend
from sidecar.rules import load_rules_text

# The first test to need the binary builds it when the cache is cold (minutes on 2 cores).
pytestmark = pytest.mark.timeout(1800)

NS, MS = 1_000_000_000, 1_000_000
T0 = (time.time_ns() // NS - 3600) * NS  # an hour ago, whole seconds
SINCE, UNTIL = T0 - 60 * NS, T0 + 600 * NS

RULES = """
rules:
  - id: double-charge
    severity: critical
    condition: count(payment.charge) > 1
    signal:
      context: [order_id]
  - id: admin-audited
    severity: high
    when: trace.has(admin.action)
    always: trace.has(audit.log)
"""
# Absence: true on every trace without auth.check, so no span name can narrow the search.
ABSENCE = """
rules:
  - id: authenticated
    severity: medium
    condition: not trace.has(auth.check)
"""
# (service, span name, start offset from the trace's time in seconds, attributes); the first is
# the root, the others its children.
Spec = tuple[str, str, float, dict[str, Any]]
TRAFFIC: dict[str, tuple[float, list[Spec]]] = {
    # the two charges come from two services: only the whole trace shows two
    "charged-twice": (0, [("checkout", "checkout", 0, {"order_id": "o-1"}),
                          ("checkout", "payment.charge", 0.01, {"order_id": "o-1"}),
                          ("billing", "payment.charge", 0.02, {"order_id": "o-1"})]),
    "charged-once": (10, [("checkout", "checkout", 0, {}),
                          ("checkout", "payment.charge", 0.01, {"order_id": "o-2"})]),
    "unaudited": (20, [("admin", "admin.action", 0, {})]),
    # audited by another service: the search finds admin.action, the audit comes with the trace
    "audited": (30, [("admin", "admin.action", 0, {}), ("audit", "audit.log", 0.01, {})]),
    # audited before --since: a trace cut at the range would look unaudited
    "audited-earlier": (40, [("admin", "admin.action", 0, {}),
                             ("audit", "audit.log", -1800, {})]),
    "unrelated": (50, [("web", "GET /health", 0, {})]),
    "authenticated": (60, [("web", "GET /orders", 0, {}), ("auth", "auth.check", 0.01, {})]),
    # before --since: never replayed
    "charged-twice-long-ago": (-3000, [("checkout", "checkout", 0, {}),
                                       ("checkout", "payment.charge", 0.01, {}),
                                       ("checkout", "payment.charge", 0.02, {})]),
}


@dataclass
class Stored:
    jaeger: Jaeger
    traces: dict[str, str]  # TRAFFIC's names -> trace ids

    @property
    def query(self) -> str:  # the query service's URL, what --jaeger takes
        return self.jaeger.query


def send(grpc_port: int, traffic: dict[str, tuple[float, list[Spec]]]) -> dict[str, str]:
    """Each trace of `traffic` through the SDK, one provider per service; their trace ids."""
    providers: dict[str, TracerProvider] = {}

    def tracer(service: str) -> otel_trace.Tracer:
        if service not in providers:
            providers[service] = TracerProvider(resource=Resource.create(
                {"service.name": service}))
            providers[service].add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(
                endpoint=f"127.0.0.1:{grpc_port}", insecure=True, timeout=5)))
        return providers[service].get_tracer("betrace-tests")

    ids = {}
    try:
        for name, (at_s, specs) in traffic.items():
            (service, span_name, _, attributes), *children = specs
            start = T0 + int(at_s * NS)
            root = tracer(service).start_span(span_name, start_time=start,
                                              attributes=attributes)
            parent = otel_trace.set_span_in_context(root)
            for service, span_name, offset_s, attributes in children:
                child_start = start + int(offset_s * NS)
                tracer(service).start_span(span_name, context=parent, start_time=child_start,
                                           attributes=attributes).end(child_start + MS)
            root.end(start + 100 * MS)
            ids[name] = format(root.get_span_context().trace_id, "032x")
    finally:
        for provider in providers.values():
            provider.shutdown()
    return ids


@pytest.fixture(scope="module")
def jaeger(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stored]:
    """The real Jaeger (in-memory store) holding TRAFFIC, every span of it queryable."""
    with contextmanager(closed_at_end)(Process) as start:
        jaeger = Jaeger(start, tmp_path_factory.mktemp("jaeger"))
        traces = send(jaeger.otlp_grpc, TRAFFIC)
        deadline = time.monotonic() + 30
        # Jaeger batches what it receives: wait until all of it is in
        while not all(len(jaeger.spans(traces[name])) == len(specs)
                      for name, (_, specs) in TRAFFIC.items()):
            assert time.monotonic() < deadline, f"traffic not stored:\n{jaeger.process.output}"
            time.sleep(0.1)
        yield Stored(jaeger, traces)


def moment(ns: int) -> str:
    return datetime.datetime.fromtimestamp(ns / NS, datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%SZ")


def betrace_replay(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sidecar", "replay", "--progress", "never",
                           *args], capture_output=True, text=True, timeout=120)


def signalled(stdout: str) -> set[tuple[str, str]]:
    signals = [json.loads(line) for line in stdout.splitlines()]
    assert all(signal["mode"] == "replay" for signal in signals)
    return {(signal["rule_id"], signal["trace_id"]) for signal in signals}


# --- betrace replay --jaeger, through the real command line ---------------------------------------

def test_replay_from_jaeger_signals_exactly_the_violating_traces(jaeger: Stored,
                                                                 tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    done = betrace_replay("--rules", str(rules), "--jaeger", jaeger.query,
                          "--since", moment(SINCE), "--until", moment(UNTIL))
    assert done.returncode == 0, done.stderr
    ids = jaeger.traces
    assert signalled(done.stdout) == {("double-charge", ids["charged-twice"]),
                                      ("admin-audited", ids["unaudited"])}
    [charge] = [s for s in map(json.loads, done.stdout.splitlines())
                if s["rule_id"] == "double-charge"]
    assert charge["context"] == {"order_id": "o-1"} and len(charge["span_ids"]) == 2
    # searched by the two span names in the three services having them; a trace found in two
    # services is fetched once; the unrelated and the long-ago ones are never fetched
    assert ("jaeger: query span name(s) payment.charge, admin.action: 3 operation(s) in 3 of 6 "
            "service(s)") in done.stderr
    assert "3 search window(s) (0 split), 5 candidate trace(s), 5 fetched, 0 missing" \
        in done.stderr
    assert "double-charge: 1 violation(s) in 2 applicable trace(s)" in done.stderr


def test_a_rule_on_absence_searches_every_service(jaeger: Stored, tmp_path: Path) -> None:
    """No span name narrows `not trace.has(auth.check)`: every trace in the range is fetched,
    those no other rule names too, and the absence rule judges each."""
    (tmp_path / "rules.yaml").write_text(RULES)
    (tmp_path / "absence.yaml").write_text(ABSENCE)
    done = betrace_replay("--rules", str(tmp_path / "rules.yaml"), "--rules",
                          str(tmp_path / "absence.yaml"), "--jaeger", jaeger.query,
                          "--since", moment(SINCE), "--until", moment(UNTIL))
    assert done.returncode == 0, done.stderr
    ids = jaeger.traces
    in_range = {name for name, (at_s, _) in TRAFFIC.items() if at_s >= 0}
    assert signalled(done.stdout) == {
        ("double-charge", ids["charged-twice"]), ("admin-audited", ids["unaudited"]),
        *(("authenticated", ids[name]) for name in in_range - {"authenticated"})}
    assert "rule authenticated cannot narrow the Jaeger search" in done.stderr
    assert "jaeger: query any span name, in each of 6 service(s)" in done.stderr
    assert f"{len(in_range)} candidate trace(s), {len(in_range)} fetched" in done.stderr


def test_full_search_windows_are_split_until_none_is(jaeger: Stored) -> None:
    """Jaeger answers at most num_traces traces per search: with a limit of 2, the window
    holding both checkout charges comes back full and is halved; nothing is missed."""
    ruleset = load_rules_text(RULES)
    client = JaegerClient(jaeger.query)
    signals: list[Any] = []
    errors: list[InputError] = []
    summary = replay_backend(ruleset, client, signals.append, errors.append,
                             ReplayOptions(since_ns=SINCE, until_ns=UNTIL), limit=2)
    assert {(s.rule_id, s.trace_id) for s in signals} == {
        ("double-charge", jaeger.traces["charged-twice"]),
        ("admin-audited", jaeger.traces["unaudited"])}
    assert not errors and summary.traces == 5
    stats = client.stats
    assert stats.split > 0 and stats.truncated == 0 and not stats.incomplete
    assert stats.candidates == stats.fetched == 5 and stats.retries == 0


def test_a_range_without_traces_replays_nothing(jaeger: Stored, tmp_path: Path) -> None:
    """Jaeger answers a search that finds nothing with a 404 ("No traces found")."""
    (tmp_path / "rules.yaml").write_text(RULES)
    done = betrace_replay("--rules", str(tmp_path / "rules.yaml"), "--jaeger", jaeger.query,
                          "--since", moment(T0 + 1000 * NS), "--until", moment(T0 + 2000 * NS))
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert "0 candidate trace(s)" in done.stderr


# --- what is not Jaeger's query API -------------------------------------------------------------

def test_a_url_that_is_not_jaegers_query_api_is_a_clear_error(jaeger: Stored,
                                                              tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(RULES)
    rules = ("--rules", str(tmp_path / "rules.yaml"), "--since", moment(SINCE))
    # Jaeger's own OTLP/HTTP receiver: 404 for /api/v3/services
    otlp_http = f"http://127.0.0.1:{jaeger.jaeger.otlp_http}"
    done = betrace_replay(*rules, "--jaeger", otlp_http)
    assert done.returncode == 2, done.stderr
    assert f"{otlp_http}/api/v3/services: HTTP 404: 404 page not found (is this the " \
        "URL of Jaeger's query service" in done.stderr
    # a wrong path prefix: the query service answers its UI's HTML page
    done = betrace_replay(*rules, "--jaeger", f"{jaeger.query}/jaeger")
    assert done.returncode == 2, done.stderr
    assert f"{jaeger.query}/jaeger/api/v3/services: answer is not JSON (Content-Type " \
        "text/html" in done.stderr
    # a search limit above the memory store's max_traces (100000 in deploy/jaeger)
    client = JaegerClient(jaeger.query, retries=0)
    with pytest.raises(JaegerError, match="HTTP 500: search depth must be greater than 0 and "
                       r"less than max traces \(lower --search-limit\)"):
        list(client.traces(load_rules_text(RULES), SINCE, UNTIL, limit=100_001))


def test_an_unreachable_jaeger_is_a_clear_error_naming_the_url(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(RULES)
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    done = betrace_replay("--rules", str(tmp_path / "rules.yaml"), "--jaeger", url,
                          "--since", "1h")
    assert done.returncode == 2, done.stderr
    assert f"{url}/api/v3/services: request failed" in done.stderr
    assert "(after 5 attempts)" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(("args", "message"), [
    (("--jaeger", "http://127.0.0.1:9"), "--jaeger needs --since"),
    (("--jaeger", "http://127.0.0.1:9", "--since", "1h", "x.jsonl"),
     "either SOURCE files or --jaeger"),
    (("--jaeger", "http://127.0.0.1:9", "--tempo", "http://127.0.0.1:9", "--since", "1h"),
     "not allowed with argument"),
    (("--jaeger", "127.0.0.1:16686", "--since", "1h"), "Jaeger URL must be http(s)://"),
    (("--jaeger", "http://127.0.0.1:9", "--since", "1h", "--search-limit", "0"),
     "--search-limit must be at least 1"),
])
def test_unusable_jaeger_options_are_refused(tmp_path: Path, args: tuple[str, ...],
                                             message: str) -> None:
    (tmp_path / "rules.yaml").write_text(RULES)
    done = betrace_replay("--rules", str(tmp_path / "rules.yaml"), *args)
    assert done.returncode == 2 and message in done.stderr, done.stderr
