"""`betrace serve` end to end, in process, with real parts only.

The client is the real OpenTelemetry SDK (TracerProvider + OTLP gRPC exporter) or a real gRPC /
HTTP client; the sidecar is the real Sidecar on free loopback ports; its violation spans go to a
real OTLP gRPC server started by the test (`otlp_receiver`). Outputs are read where an operator
reads them: the JSONL signal log, GET /metrics, and the exported spans.
"""

from __future__ import annotations

import datetime
import gzip
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import code_pb2, status_pb2
from opentelemetry import trace as otel_trace
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.trace import Span as SdkSpan
from opentelemetry.sdk.trace import Tracer

from sidecar.live.app import Sidecar
from sidecar.live.config import Settings
from sidecar.live.exporters import ViolationSpans
from sidecar.model.signals import signal_id
from sidecar.rules import load_rules_text

RULES = """
rules:
  - id: double-charge
    name: Payment charged more than once
    severity: critical
    condition: count(payment.charge) > 1
    signal:
      message: Order charged more than once
      context: [order_id, amount_cents]
  - id: retry-attempt
    name: Payment retried
    severity: medium
    condition: trace.has(payment.charge).where(attempt > 1)
    signal:
      context: [order_id]
  - id: triple-charge
    name: Payment charged three times
    severity: low
    condition: count(payment.charge) > 2
  - id: admin-audit
    name: Admin action must be audited
    severity: high
    when: trace.has(admin.action)
    always: trace.has(audit.log)
    signal:
      context: [user_id]
"""

EXPORT_PATH = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


# --- helpers ------------------------------------------------------------------------------------

def hex_trace(span: Any) -> str:
    return format(span.get_span_context().trace_id, "032x")


def hex_span(span: Any) -> str:
    return format(span.get_span_context().span_id, "016x")


def read_signals(path: str | Path) -> list[dict[str, Any]]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def charge_trace(tracer: Tracer, amounts: tuple[int, ...] = (500, 700),
                 attempts: tuple[int, ...] | None = None, order_id: str = "o-1",
                 ) -> tuple[SdkSpan, list[SdkSpan]]:
    """A `checkout` root with one nested `payment.charge` per amount, in start order. Every span
    is exported (SimpleSpanProcessor) before this returns."""
    attempts = attempts or tuple(1 for _ in amounts)
    t0 = time.time_ns()
    charges = []
    with tracer.start_as_current_span("checkout", start_time=t0) as root:
        for i, (amount, attempt) in enumerate(zip(amounts, attempts)):
            with tracer.start_as_current_span(
                    "payment.charge", start_time=t0 + (i + 1) * 1_000_000,
                    attributes={"order_id": order_id, "amount_cents": amount,
                                "attempt": attempt}) as charge:
                charges.append(charge)
    return root, charges  # type: ignore[return-value]


def any_value(value: common_pb2.AnyValue) -> Any:
    which = value.WhichOneof("value")
    if which == "array_value":
        return [any_value(v) for v in value.array_value.values]
    return getattr(value, which) if which else None


def attributes(span: trace_pb2.Span) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in span.attributes}


def pb_request(trace_id: bytes, names: list[str], attrs: dict[str, Any] | None = None,
               first_span: int = 1, service: str = "checkout",
               ) -> trace_service_pb2.ExportTraceServiceRequest:
    """An OTLP request with one span per name, all in one trace, built from the proto classes."""
    def kv(key: str, value: Any) -> common_pb2.KeyValue:
        if isinstance(value, bool):
            return common_pb2.KeyValue(key=key, value=common_pb2.AnyValue(bool_value=value))
        if isinstance(value, int):
            return common_pb2.KeyValue(key=key, value=common_pb2.AnyValue(int_value=value))
        return common_pb2.KeyValue(key=key, value=common_pb2.AnyValue(string_value=str(value)))

    now = time.time_ns()
    spans = [trace_pb2.Span(
        trace_id=trace_id, span_id=(first_span + i).to_bytes(8, "big"), name=name,
        kind=trace_pb2.Span.SPAN_KIND_INTERNAL, start_time_unix_nano=now + i * 1000,
        end_time_unix_nano=now + i * 1000 + 500,
        attributes=[kv(k, v) for k, v in (attrs or {}).items()]) for i, name in enumerate(names)]
    return trace_service_pb2.ExportTraceServiceRequest(resource_spans=[trace_pb2.ResourceSpans(
        resource=resource_pb2.Resource(attributes=[kv("service.name", service)]),
        scope_spans=[trace_pb2.ScopeSpans(scope=common_pb2.InstrumentationScope(name="test"),
                                          spans=spans)])])


def json_request(trace_id_hex: str, names: list[str], first_span: int = 1) -> dict[str, Any]:
    """The same, in OTLP/JSON (hex ids, int64 as strings)."""
    now = time.time_ns()
    return {"resourceSpans": [{
        "resource": {"attributes": [{"key": "service.name",
                                     "value": {"stringValue": "checkout"}}]},
        "scopeSpans": [{"scope": {"name": "test"}, "spans": [{
            "traceId": trace_id_hex, "spanId": f"{first_span + i:016x}", "name": name,
            "kind": 1, "startTimeUnixNano": str(now + i * 1000),
            "endTimeUnixNano": str(now + i * 1000 + 500),
            "attributes": [{"key": "order_id", "value": {"stringValue": "o-json"}},
                           {"key": "amount_cents", "value": {"intValue": "100"}}],
        } for i, name in enumerate(names)]}]}]}


def post(port: int, body: bytes, content_type: str, encoding: str | None = None,
         path: str = "/v1/traces") -> tuple[int, str, bytes]:
    """POST over real HTTP; (status, content type, body) for success and errors alike."""
    headers = {"Content-Type": content_type}
    if encoding:
        headers["Content-Encoding"] = encoding
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body,
                                     headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers.get("Content-Type", ""), exc.read()


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()


class Running:
    """A started Sidecar and where its signal log is."""

    def __init__(self, sidecar: Sidecar, log: Path) -> None:
        self.sidecar = sidecar
        self.log = log

    def signals(self, rule_id: str | None = None, trace_id: str | None = None,
                ) -> list[dict[str, Any]]:
        return [s for s in read_signals(self.log)
                if (rule_id is None or s["rule_id"] == rule_id)
                and (trace_id is None or s["trace_id"] == trace_id)]

    def sample(self, name: str, **labels: str) -> float:
        """Sum of a metric's samples whose labels include `labels`, read straight from the
        sidecar's registry (still there after stop())."""
        return sum(sample.value for family in self.sidecar.metrics.registry.collect()
                   for sample in family.samples
                   if sample.name == name
                   and all(sample.labels.get(k) == v for k, v in labels.items()))


@pytest.fixture
def start_sidecar(tmp_path: Path, otlp_receiver: Any) -> Iterator[Callable[..., Running]]:
    """`start_sidecar(rules_text=RULES, **settings)`: a started Sidecar on free loopback ports
    that logs signals to a fresh file and exports violation spans to `otlp_receiver`. With
    `rules_text=None` the rules are loaded from the `rules` setting (paths), as `betrace serve`
    does. Stopped at the end of the test."""
    started: list[Sidecar] = []

    def start(rules_text: str | None = RULES, **overrides: Any) -> Running:
        log = tmp_path / f"signals-{len(started)}.jsonl"
        values: dict[str, Any] = dict(
            listen="127.0.0.1:0", http_listen="127.0.0.1:0", metrics_listen="127.0.0.1:0",
            decision_wait=0.3, signals_out=str(log), export_otlp=otlp_receiver.endpoint)
        values.update(overrides)
        settings = Settings(**values)
        assert settings.validate() == []
        sidecar = Sidecar(settings, ruleset=None if rules_text is None
                          else load_rules_text(rules_text))
        sidecar.start()
        started.append(sidecar)
        return Running(sidecar, log)

    try:
        yield start
    finally:
        for sidecar in started:
            sidecar.stop()


# --- signals: log, metrics, violation span --------------------------------------------------------

def test_a_violation_reaches_the_log_the_metrics_and_the_otlp_receiver(
        start_sidecar: Callable[..., Running], sdk_client: Callable[..., Any],
        otlp_receiver: Any, scrape: Callable[..., Any], wait_until: Callable[..., Any]) -> None:
    running = start_sidecar()
    sidecar = running.sidecar
    tracer = sdk_client(sidecar.grpc_port).tracer
    before = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=1)
    root, charges = charge_trace(tracer, amounts=(500, 700), order_id="o-1")
    trace_id = hex_trace(root)

    [signal] = wait_until(lambda: running.signals("double-charge"), what="signal in the log")
    assert signal["signal_id"] == signal_id("double-charge", trace_id)
    assert signal["rule_id"] == "double-charge"
    assert signal["rule_name"] == "Payment charged more than once"
    assert signal["severity"] == "critical"
    assert signal["trace_id"] == trace_id
    assert signal["span_ids"] == [hex_span(c) for c in charges]
    assert signal["message"] == "Order charged more than once"
    assert signal["context"] == {"order_id": "o-1", "amount_cents": [500, 700]}
    assert signal["mode"] == "live"
    detected = datetime.datetime.fromisoformat(signal["detected_at"].replace("Z", "+00:00"))
    assert before <= detected <= datetime.datetime.now(datetime.timezone.utc)

    metrics = scrape(sidecar.metrics_port)
    assert metrics.value("betrace_violations_total", rule="double-charge",
                         severity="critical") == 1
    assert metrics.value("betrace_violations_total") == 1  # no other rule fired
    assert metrics.value("betrace_spans_received_total", transport="grpc") == 3
    assert metrics.value("betrace_spans_dropped_total", reason="not_selected") == 1  # checkout
    assert metrics.value("betrace_rules_loaded") == 4

    [(resource_spans, violation)] = wait_until(
        lambda: otlp_receiver.spans("betrace.violation"), what="violation span at the receiver")
    assert violation.trace_id == root.get_span_context().trace_id.to_bytes(16, "big")
    latest = charges[-1].get_span_context().span_id.to_bytes(8, "big")
    assert violation.parent_span_id == latest  # the triggering (latest offending) span
    assert {link.span_id for link in violation.links} == {
        c.get_span_context().span_id.to_bytes(8, "big") for c in charges}
    assert {link.trace_id for link in violation.links} == {violation.trace_id}
    attrs = attributes(violation)
    assert attrs["betrace.rule.id"] == "double-charge"
    assert attrs["betrace.rule.name"] == "Payment charged more than once"
    assert attrs["betrace.severity"] == "critical"
    assert attrs["betrace.mode"] == "live"
    assert attrs["betrace.context.order_id"] == "o-1"
    assert attrs["betrace.context.amount_cents"] == [500, 700]
    assert attributes(resource_spans.resource)["service.name"] == "betrace"

    # The trace is decided after decision_wait; the rule has signalled and does not again.
    wait_until(lambda: scrape(sidecar.metrics_port).value(
        "betrace_traces_decided_total", reason="idle") == 1, what="the idle decision")
    assert len(running.signals()) == 1
    assert len(otlp_receiver.spans("betrace.violation")) == 1


def test_a_monotone_rule_signals_long_before_decision_wait(
        start_sidecar: Callable[..., Running], sdk_client: Callable[..., Any],
        scrape: Callable[..., Any], wait_until: Callable[..., Any]) -> None:
    running = start_sidecar(decision_wait=30.0)
    tracer = sdk_client(running.sidecar.grpc_port).tracer
    started = time.monotonic()
    double, _ = charge_trace(tracer, amounts=(100, 100), order_id="o-count")
    retried, _ = charge_trace(tracer, amounts=(100,), attempts=(2,), order_id="o-where")

    wait_until(lambda: running.signals("double-charge", hex_trace(double)), timeout=5,
               what="early count() signal")
    [where] = wait_until(lambda: running.signals("retry-attempt", hex_trace(retried)),
                         timeout=5, what="early .where() signal")
    assert where["context"] == {"order_id": "o-where"}
    assert time.monotonic() - started < 10  # far from the 30s decision wait
    metrics = scrape(running.sidecar.metrics_port)
    assert metrics.value("betrace_traces_active") == 2  # both still open, undecided
    # (a quiet part that came first may have been decided on arrival, then opened again)
    assert metrics.value("betrace_traces_decided_total", reason="idle") == 0


def test_a_when_always_rule_signals_only_once_the_trace_is_decided(
        start_sidecar: Callable[..., Running], sdk_client: Callable[..., Any],
        wait_until: Callable[..., Any]) -> None:
    wait = 2.0
    running = start_sidecar(decision_wait=wait)
    tracer = sdk_client(running.sidecar.grpc_port).tracer
    with tracer.start_as_current_span("admin.action", attributes={"user_id": "u-ok"}) as ok:
        with tracer.start_as_current_span("audit.log"):
            pass
    with tracer.start_as_current_span("admin.action", attributes={"user_id": "u-7"}) as bad:
        for _ in range(2):
            with tracer.start_as_current_span("payment.charge", attributes={"order_id": "o"}):
                pass
    sent = time.time()

    # The monotone rule on the same trace signals at once; the when/always rule cannot yet.
    wait_until(lambda: running.signals("double-charge", hex_trace(bad)), timeout=wait * 0.75,
               what="early signal")
    assert running.signals("admin-audit") == []

    [signal] = wait_until(lambda: running.signals("admin-audit"), timeout=wait + 5,
                          what="signal at decision")
    assert signal["trace_id"] == hex_trace(bad)
    assert signal["span_ids"] == [hex_span(bad)]
    assert signal["context"] == {"user_id": "u-7"}
    detected = datetime.datetime.fromisoformat(
        signal["detected_at"].replace("Z", "+00:00")).timestamp()
    assert detected >= sent + wait - 0.1  # not before decision_wait had passed
    # The compliant trace was decided first and stays quiet.
    wait_until(lambda: running.sample("betrace_traces_decided_total", reason="idle") == 2,
               what="both decisions")
    assert running.signals(trace_id=hex_trace(ok)) == []
    assert len(running.signals()) == 2


def test_a_late_span_reopens_the_trace_and_each_rule_signals_once(
        start_sidecar: Callable[..., Running], sdk_client: Callable[..., Any],
        otlp_receiver: Any, scrape: Callable[..., Any], wait_until: Callable[..., Any]) -> None:
    running = start_sidecar(decision_wait=0.3)
    port = running.sidecar.metrics_port
    tracer = sdk_client(running.sidecar.grpc_port).tracer
    root, charges = charge_trace(tracer, amounts=(100, 200))
    trace_id = hex_trace(root)
    wait_until(lambda: running.signals("double-charge", trace_id), what="first signal")
    wait_until(lambda: scrape(port).value("betrace_traces_decided_total", reason="idle") == 1,
               what="first decision")
    assert running.signals("triple-charge") == []

    # A straggler of the same trace, after the decision.
    late = tracer.start_span("payment.charge", context=otel_trace.set_span_in_context(root),
                             attributes={"order_id": "o-1", "amount_cents": 300})
    late.end()
    assert hex_trace(late) == trace_id

    [triple] = wait_until(lambda: running.signals("triple-charge", trace_id),
                          what="signal that needs the late span")
    # All earlier spans are back in the re-opened trace.
    assert triple["span_ids"] == [hex_span(c) for c in charges] + [hex_span(late)]
    wait_until(lambda: scrape(port).value("betrace_traces_decided_total", reason="idle") == 2,
               what="second decision")
    metrics = scrape(port)
    assert metrics.value("betrace_late_spans_total") == 1
    assert len(running.signals("double-charge", trace_id)) == 1  # not twice
    assert len(running.signals()) == 2
    assert metrics.value("betrace_violations_total", rule="double-charge",
                         severity="critical") == 1
    wait_until(lambda: len(otlp_receiver.spans("betrace.violation")) == 2,
               what="two violation spans")
    time.sleep(0.7)  # one more export interval of the sidecar's batch processor: still two
    assert len(otlp_receiver.spans("betrace.violation")) == 2


ECHO_RULES = RULES + """
  - id: echo
    name: Would fire on BeTrace's own spans if they were not ignored
    severity: info
    condition: count(betrace.violation) > 0
"""


def test_own_violation_spans_coming_back_are_ignored(
        start_sidecar: Callable[..., Running], sdk_client: Callable[..., Any],
        scrape: Callable[..., Any], wait_until: Callable[..., Any]) -> None:
    running = start_sidecar(rules_text=ECHO_RULES)
    port = running.sidecar.metrics_port
    tracer = sdk_client(running.sidecar.grpc_port, service="betrace").tracer
    with tracer.start_as_current_span("betrace.violation") as own:
        with tracer.start_as_current_span("betrace.violation"):
            with tracer.start_as_current_span("betrace.violation",
                                              attributes={"betrace.rule.id": "double-charge"}):
                pass
    assert scrape(port).value("betrace_spans_dropped_total", reason="own_violation") == 3

    # The same, over OTLP/HTTP protobuf and JSON.
    body = pb_request(bytes.fromhex("ab" * 16), ["betrace.violation"]).SerializeToString()
    assert post(running.sidecar.http_port, body, "application/x-protobuf")[0] == 200
    doc = json_request("ab" * 16, ["betrace.violation", "betrace.violation"])
    status, _, _ = post(running.sidecar.http_port, json.dumps(doc).encode(), "application/json")
    assert status == 200
    metrics = scrape(port)
    assert metrics.value("betrace_spans_dropped_total", reason="own_violation") == 6

    # A real trace afterwards, as a marker that everything sent before has been decided.
    marker, _ = charge_trace(sdk_client(running.sidecar.grpc_port).tracer)
    wait_until(lambda: running.signals("double-charge", hex_trace(marker)), what="marker")
    wait_until(lambda: running.sample("betrace_traces_decided_total", reason="idle") == 1,
               what="marker decided")
    assert running.signals("echo") == []
    assert running.signals(trace_id=hex_trace(own)) == []
    # Own spans opened no trace (they would be decided on arrival); the marker's first part
    # may have been, if quiet on its own.
    assert running.sample("betrace_traces_decided_total", reason="arrival") <= 1


@pytest.mark.parametrize("content_type", ["application/x-protobuf", "application/json"])
def test_own_violation_spans_are_counted_as_such_whatever_the_transport(
        start_sidecar: Callable[..., Running], scrape: Callable[..., Any],
        content_type: str) -> None:
    """With the usual rules (none names betrace.violation) an echoed violation span is counted
    as `own_violation`, over OTLP/HTTP JSON as over protobuf, not as an unselected span."""
    running = start_sidecar()
    names = ["betrace.violation", "betrace.violation", "checkout"]
    if content_type == "application/json":
        body = json.dumps(json_request("cd" * 16, names)).encode()
    else:
        body = pb_request(bytes.fromhex("cd" * 16), names).SerializeToString()
    assert post(running.sidecar.http_port, body, content_type)[0] == 200
    metrics = scrape(running.sidecar.metrics_port)
    assert metrics.value("betrace_spans_dropped_total", reason="own_violation") == 2
    assert metrics.value("betrace_spans_dropped_total", reason="not_selected") == 1


# --- OTLP/HTTP and bad input ----------------------------------------------------------------------

@pytest.mark.parametrize("content_type", ["application/x-protobuf", "application/json"])
@pytest.mark.parametrize("encoding", [None, "gzip"])
def test_otlp_http_accepts_protobuf_and_json_plain_or_gzipped(
        start_sidecar: Callable[..., Running], scrape: Callable[..., Any],
        wait_until: Callable[..., Any], content_type: str, encoding: str | None) -> None:
    running = start_sidecar()
    trace_id = "5b8efff798038103d269b633813fc60c"
    names = ["payment.charge", "payment.charge", "checkout"]
    if content_type == "application/json":
        body = json.dumps(json_request(trace_id, names)).encode()
    else:
        body = pb_request(bytes.fromhex(trace_id), names,
                          {"order_id": "o-json", "amount_cents": 100}).SerializeToString()
    if encoding == "gzip":
        body = gzip.compress(body)

    status, answered_type, answer = post(running.sidecar.http_port, body, content_type, encoding)
    assert status == 200, answer
    assert answered_type == content_type
    if content_type == "application/json":
        assert json.loads(answer) == {}  # no partial_success: everything accepted
    else:
        response = trace_service_pb2.ExportTraceServiceResponse.FromString(answer)
        assert not response.HasField("partial_success")

    [signal] = wait_until(lambda: running.signals("double-charge", trace_id),
                          what="signal from an OTLP/HTTP trace")
    assert signal["span_ids"] == [f"{1:016x}", f"{2:016x}"]
    assert signal["context"] == {"order_id": "o-json", "amount_cents": 100}
    metrics = scrape(running.sidecar.metrics_port)
    assert metrics.value("betrace_spans_received_total", transport="http") == 3
    assert metrics.value("betrace_spans_received_total", transport="grpc") == 0


@pytest.mark.parametrize("content_type, body, encoding, reason", [
    ("application/x-protobuf", b"\xff\xff\xff\xff", None, "not an OTLP"),
    ("application/x-protobuf", b"\x0a\x05abc", None, "not an OTLP"),
    ("application/x-protobuf", b"this is not gzip", "gzip", "cannot decompress"),
    ("application/json", b'{"resourceSpans": [', None, "not an OTLP JSON"),
    ("application/json", b"[1, 2, 3]", None, "not a JSON object"),
    ("application/json", b'{"resourceSpans": 5}', None, "is not a list"),
    ("application/json", b"{}", "br", "unsupported Content-Encoding"),
])
def test_otlp_http_answers_400_with_a_reason_for_a_bad_body(
        start_sidecar: Callable[..., Running], scrape: Callable[..., Any],
        wait_until: Callable[..., Any], content_type: str, body: bytes, encoding: str | None,
        reason: str) -> None:
    running = start_sidecar()
    port = running.sidecar.http_port
    status, answered_type, answer = post(port, body, content_type, encoding)
    assert status == 400
    assert answered_type == content_type
    if content_type == "application/json":
        error = json.loads(answer)
        assert error["code"] == code_pb2.INVALID_ARGUMENT
        message = error["message"]
    else:
        error = status_pb2.Status.FromString(answer)
        assert error.code == code_pb2.INVALID_ARGUMENT
        message = error.message
    assert reason in message

    # The server carries on.
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    good = json.dumps(json_request(trace_id, ["payment.charge"] * 2)).encode()
    assert post(port, good, "application/json")[0] == 200
    wait_until(lambda: running.signals("double-charge", trace_id), what="signal after a 400")
    metrics = scrape(running.sidecar.metrics_port)
    if encoding is None:
        assert metrics.value("betrace_export_requests_rejected_total", transport="http",
                             reason="invalid") == 1


def test_otlp_http_refuses_other_media_types_and_paths(
        start_sidecar: Callable[..., Running]) -> None:
    running = start_sidecar()
    status, _, answer = post(running.sidecar.http_port, b"{}", "text/plain")
    assert status == 415
    assert "application/x-protobuf" in status_pb2.Status.FromString(answer).message
    assert post(running.sidecar.http_port, b"{}", "application/json", path="/v1/logs")[0] == 404


def test_bad_protobuf_over_grpc_is_invalid_argument_and_the_server_keeps_serving(
        start_sidecar: Callable[..., Running], sdk_client: Callable[..., Any],
        scrape: Callable[..., Any], wait_until: Callable[..., Any]) -> None:
    running = start_sidecar()
    with grpc.insecure_channel(f"127.0.0.1:{running.sidecar.grpc_port}") as channel:
        export = channel.unary_unary(EXPORT_PATH)  # identity (de)serializers: raw bytes
        with pytest.raises(grpc.RpcError) as failed:
            export(b"\xff\xff\xff\xff", timeout=5)
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not an OTLP ExportTraceServiceRequest" in failed.value.details()

        # The same channel, a valid request: accepted.
        trace_id = bytes.fromhex("4bf92f3577b34da6a3ce929d0e0e4736")
        answer = export(pb_request(trace_id, ["payment.charge"] * 2).SerializeToString(),
                        timeout=5)
        assert not trace_service_pb2.ExportTraceServiceResponse.FromString(answer).HasField(
            "partial_success")
        wait_until(lambda: running.signals("double-charge", trace_id.hex()), what="signal")

    # And the real SDK exporter still gets through.
    root, _ = charge_trace(sdk_client(running.sidecar.grpc_port).tracer)
    wait_until(lambda: running.signals("double-charge", hex_trace(root)), what="SDK signal")
    metrics = scrape(running.sidecar.metrics_port)
    assert metrics.value("betrace_export_requests_rejected_total", transport="grpc",
                         reason="invalid") == 1


def test_a_retried_export_does_not_count_its_spans_twice(
        start_sidecar: Callable[..., Running], scrape: Callable[..., Any],
        wait_until: Callable[..., Any]) -> None:
    """The collector retries an Export whose answer it lost: the same span ids arrive again.
    count(payment.charge) > 1 must stay quiet; a second, distinct charge still fires it."""
    running = start_sidecar()
    once, twice = (bytes.fromhex(f"{n:032x}") for n in (0xA1, 0xA2))
    with grpc.insecure_channel(f"127.0.0.1:{running.sidecar.grpc_port}") as channel:
        export = channel.unary_unary(EXPORT_PATH)
        for _ in range(2):  # the same request twice
            export(pb_request(once, ["payment.charge"]).SerializeToString(), timeout=5)
        export(pb_request(twice, ["payment.charge"]).SerializeToString(), timeout=5)
        export(pb_request(twice, ["payment.charge"], first_span=2).SerializeToString(),
               timeout=5)
    wait_until(lambda: scrape(running.sidecar.metrics_port).value(
        "betrace_traces_decided_total", reason="idle") == 2, what="both traces decided")
    assert running.signals("double-charge", twice.hex())
    assert running.signals(trace_id=once.hex()) == []


def test_violation_spans_the_collector_never_got_are_counted(
        start_sidecar: Callable[..., Running], scrape: Callable[..., Any],
        wait_until: Callable[..., Any], free_port: Callable[[], int]) -> None:
    """The SDK's batch processor exports in the background: a collector that is down must
    still show up in betrace_signal_export_failures_total{sink="otlp"}, not only in a log."""
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    running = start_sidecar(export_otlp=dead)
    emitter = running.sidecar.emitter
    assert emitter.violation_spans is not None
    emitter.violation_spans.close()
    emitter.violation_spans = ViolationSpans(  # the same, giving up after 1s rather than 10s
        dead, failed=running.sidecar.metrics.export_failures.labels(sink="otlp").inc,
        timeout=1.0)
    trace_id = bytes.fromhex(f"{0xB1:032x}")
    with grpc.insecure_channel(f"127.0.0.1:{running.sidecar.grpc_port}") as channel:
        channel.unary_unary(EXPORT_PATH)(
            pb_request(trace_id, ["payment.charge"] * 2).SerializeToString(), timeout=5)
    wait_until(lambda: running.signals("double-charge", trace_id.hex()), what="signal logged")
    wait_until(lambda: scrape(running.sidecar.metrics_port).value(
        "betrace_signal_export_failures_total", sink="otlp") >= 1, timeout=15,
        what="the lost violation span counted")


def test_spans_over_max_spans_per_trace_are_reported_as_partial_success(
        start_sidecar: Callable[..., Running], scrape: Callable[..., Any],
        wait_until: Callable[..., Any]) -> None:
    running = start_sidecar(max_spans_per_trace=3)
    trace_id = bytes.fromhex("11112222333344445555666677778888")
    with grpc.insecure_channel(f"127.0.0.1:{running.sidecar.grpc_port}") as channel:
        stub = trace_service_pb2_grpc.TraceServiceStub(channel)
        response = stub.Export(pb_request(trace_id, ["payment.charge"] * 5), timeout=5)
        assert response.partial_success.rejected_spans == 2
        assert "max_spans_per_trace" in response.partial_success.error_message
        response = stub.Export(pb_request(trace_id, ["payment.charge"], first_span=10),
                               timeout=5)
        assert response.partial_success.rejected_spans == 1
        # Invalid ids are refused the same way, with their own reason.
        response = stub.Export(pb_request(bytes(16), ["payment.charge"]), timeout=5)
        assert response.partial_success.rejected_spans == 1
        assert "invalid trace_id" in response.partial_success.error_message

    # Over OTLP/HTTP JSON: the same trace is full, so both spans are refused.
    doc = json_request(trace_id.hex(), ["payment.charge"] * 2, first_span=20)
    status, _, answer = post(running.sidecar.http_port, json.dumps(doc).encode(),
                             "application/json")
    assert status == 200
    assert int(json.loads(answer)["partialSuccess"]["rejectedSpans"]) == 2

    metrics = scrape(running.sidecar.metrics_port)
    assert metrics.value("betrace_spans_rejected_total", reason="max_spans_per_trace") == 5
    assert metrics.value("betrace_spans_rejected_total", reason="invalid") == 1
    assert metrics.value("betrace_spans_buffered") == 3
    # What was kept is still decided: the first three spans.
    [triple] = wait_until(lambda: running.signals("triple-charge", trace_id.hex()),
                          what="signal on the kept spans")
    assert triple["span_ids"] == [f"{n:016x}" for n in (1, 2, 3)]


# --- memory bounds ------------------------------------------------------------------------------

def test_memory_stays_bounded_under_a_flood_and_evicted_traces_are_decided(
        start_sidecar: Callable[..., Running], sdk_client: Callable[..., Any],
        scrape: Callable[..., Any], wait_until: Callable[..., Any]) -> None:
    max_traces, flood, margin = 50, 500, 5
    running = start_sidecar(decision_wait=30.0, max_traces=max_traces)
    port = running.sidecar.metrics_port
    seen: list[float] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.append(scrape(port).value("betrace_traces_active"))
            done.wait(0.005)

    watcher = threading.Thread(target=watch, name="watch-traces-active")
    watcher.start()
    try:
        client = sdk_client(running.sidecar.grpc_port, batch=True, max_export_batch_size=10,
                            schedule_delay_millis=10, max_queue_size=2 * flood)
        trace_ids = set()
        for i in range(flood):  # one span per trace: a retried charge, which always violates
            with client.tracer.start_as_current_span(
                    "payment.charge", attributes={"attempt": 2, "order_id": f"o-{i}"}) as span:
                trace_ids.add(hex_trace(span))
        client.flush()
        wait_until(lambda: scrape(port).value("betrace_spans_received_total") == flood,
                   what="every span received")
        wait_until(lambda: scrape(port).value("betrace_traces_decided_total",
                                              reason="evicted") == flood - max_traces,
                   what="evicted traces decided")
    finally:
        done.set()
        watcher.join(5)
    assert len(trace_ids) == flood
    assert seen and max(seen) <= max_traces + margin
    metrics = scrape(port)
    assert metrics.value("betrace_traces_active") == max_traces
    assert metrics.value("betrace_traces_decided_total", reason="idle") == 0

    running.sidecar.stop()  # the rest are decided on the way out
    assert running.sample("betrace_traces_decided_total", reason="shutdown") == max_traces
    signals = running.signals("retry-attempt")
    assert sorted(s["trace_id"] for s in signals) == sorted(trace_ids)  # each exactly once
    assert running.sample("betrace_violations_total", rule="retry-attempt",
                          severity="medium") == flood


# --- hot reload -------------------------------------------------------------------------------

REFUND_RULES = """
rules:
  - id: refund-seen
    name: A refund was issued
    severity: info
    condition: count(refund.issued) > 0
"""


def test_hot_reload_swaps_in_valid_rules_and_keeps_the_last_good_ones(
        tmp_path: Path, start_sidecar: Callable[..., Running], sdk_client: Callable[..., Any],
        scrape: Callable[..., Any], wait_until: Callable[..., Any]) -> None:
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    rule_file = rules_dir / "payments.yaml"
    rule_file.write_text(RULES)
    running = start_sidecar(rules_text=None, rules=[str(rules_dir)], reload_interval=0.1)
    port = running.sidecar.metrics_port
    tracer = sdk_client(running.sidecar.grpc_port).tracer
    first = scrape(port)
    assert first.value("betrace_rules_loaded") == 4
    assert first.value("betrace_rules_current") == 1
    [digest] = [s.labels["digest"] for s in first.samples if s.name == "betrace_rules_info"]

    def refund_trace() -> str:
        with tracer.start_as_current_span("refund.issued") as refund:
            pass
        return hex_trace(refund)

    before = refund_trace()  # no rule names refund.issued yet

    rule_file.write_text(REFUND_RULES)
    wait_until(lambda: scrape(port).value("betrace_rule_reloads_total") == 1, what="reload")
    metrics = scrape(port)
    assert metrics.value("betrace_rules_loaded") == 1
    assert not metrics.has("betrace_rules_info", digest=digest)
    after = refund_trace()
    wait_until(lambda: running.signals("refund-seen", after), what="the new rule firing")

    rule_file.write_text(REFUND_RULES.replace("count(refund.issued) > 0",
                                              "count(refund.issued) >>> 0"))
    wait_until(lambda: scrape(port).value("betrace_rule_reload_failures_total") == 1,
               what="reload failure")
    metrics = scrape(port)
    assert metrics.value("betrace_rule_reloads_total") == 1
    assert metrics.value("betrace_rules_loaded") == 1
    assert metrics.value("betrace_rules_current") == 0  # the alert fires while the file is bad
    still = refund_trace()
    wait_until(lambda: running.signals("refund-seen", still),
               what="the last good rules still firing")
    assert running.signals(trace_id=before) == []

    rule_file.write_text(REFUND_RULES)  # fixed: the same rules as running, nothing to swap
    wait_until(lambda: scrape(port).value("betrace_rules_current") == 1, what="back to current")
    assert scrape(port).value("betrace_rule_reloads_total") == 1


# --- health, shutdown, ports ----------------------------------------------------------------

def test_healthz_and_readyz(start_sidecar: Callable[..., Running]) -> None:
    running = start_sidecar()
    port = running.sidecar.metrics_port
    assert get(port, "/healthz") == (200, "ok\n")
    status, body = get(port, "/readyz")
    assert status == 200 and "4 rules" in body
    assert get(port, "/nothing-here")[0] == 404


def test_stop_decides_every_buffered_trace_and_flushes_the_outputs(
        start_sidecar: Callable[..., Running], sdk_client: Callable[..., Any],
        otlp_receiver: Any) -> None:
    running = start_sidecar(decision_wait=30.0, reload_interval=30.0)
    tracer = sdk_client(running.sidecar.grpc_port).tracer
    with tracer.start_as_current_span("admin.action", attributes={"user_id": "u-1"}) as admin:
        pass
    assert running.signals() == []  # a when/always rule waits for the decision
    assert running.sidecar.store.counts() == (1, 1)

    started = time.monotonic()
    running.sidecar.stop()
    # Promptly: neither decision_wait nor reload_interval holds the shutdown up.
    assert time.monotonic() - started < 4.0
    [signal] = running.signals()
    assert (signal["rule_id"], signal["trace_id"]) == ("admin-audit", hex_trace(admin))
    assert running.sample("betrace_traces_decided_total", reason="shutdown") == 1
    [(_, violation)] = otlp_receiver.spans("betrace.violation")  # flushed by stop()
    assert violation.trace_id == admin.get_span_context().trace_id.to_bytes(16, "big")


def test_a_second_sidecar_cannot_take_a_port_already_in_use(
        start_sidecar: Callable[..., Running]) -> None:
    """Two sidecars sharing one OTLP port would split each trace's spans between them."""
    first = start_sidecar(export_otlp=None, signals_out=None)
    second = Sidecar(Settings(listen=f"127.0.0.1:{first.sidecar.grpc_port}", http_listen="",
                              metrics_listen=""), ruleset=load_rules_text(RULES))
    try:
        with pytest.raises(OSError, match=str(first.sidecar.grpc_port)):
            second.start()
    finally:
        if second.grpc_port:
            second.stop()
