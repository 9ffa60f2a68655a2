"""`betrace demo`: the seven incident scenarios, violating and clean twins, sent through a real
sidecar the way production traffic arrives (OpenTelemetry SDK -> OTLP gRPC), then a table of what
was caught. The scenarios are the catalog's own examples, so the demo shows the shipped rules.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer, set_span_in_context

from sidecar.live.app import Sidecar
from sidecar.live.config import Settings
from sidecar.model.signal_writers import JsonLinesWriter
from sidecar.rules import Example, RuleSet, trace_from_compact

INCIDENTS = (
    "payment-retry-idempotency", "patient-query-requires-tenant-filter", "admin-action-audit-log",
    "free-tier-rate-limit", "payment-requires-confirmed-reservation",
    "agent-refund-human-approval", "gdpr-deletion-30-days",
)
_KINDS = {"INTERNAL": SpanKind.INTERNAL, "SERVER": SpanKind.SERVER, "CLIENT": SpanKind.CLIENT,
          "PRODUCER": SpanKind.PRODUCER, "CONSUMER": SpanKind.CONSUMER}
_STATUS = {"OK": StatusCode.OK, "ERROR": StatusCode.ERROR, "UNSET": StatusCode.UNSET}


@dataclass
class Scenario:
    example: Example
    trace_id: str = ""


def scenarios(ruleset: RuleSet) -> list[Scenario]:
    """The first violating and the first clean example of each incident rule."""
    chosen = []
    for rule_id in INCIDENTS:
        # (a captured-file test has no spans to send)
        examples = [e for e in ruleset.examples if e.rule_id == rule_id and e.file is None]
        for violates in (True, False):
            example = next((e for e in examples if e.violates is violates), None)
            if example is not None:
                chosen.append(Scenario(example))
    return chosen


class _Senders:
    """One SDK TracerProvider per service name: the resource is per provider, as in real apps."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.providers: dict[str, TracerProvider] = {}

    def tracer(self, service: str) -> Tracer:
        provider = self.providers.get(service)
        if provider is None:
            provider = TracerProvider(resource=Resource.create({"service.name": service}))
            provider.add_span_processor(SimpleSpanProcessor(
                OTLPSpanExporter(endpoint=self.endpoint, insecure=True)))
            self.providers[service] = provider
        return provider.get_tracer("betrace.demo")

    def close(self) -> None:
        for provider in self.providers.values():
            provider.shutdown()


def send(scenario: Scenario, senders: _Senders) -> None:
    """Replay one example as real SDK spans: the first span is the root, the rest its children,
    at the times the compact form gives them."""
    root_context = None
    for span in trace_from_compact(scenario.example.spans).spans:
        tracer = senders.tracer(span.service or "demo-shop")
        sdk_span = tracer.start_span(span.name, context=root_context, start_time=span.start_ns,
                                     kind=_KINDS[span.kind], attributes=span.attributes)
        if span.status != "UNSET":
            sdk_span.set_status(Status(_STATUS[span.status]))
        if root_context is None:
            root_context = set_span_in_context(sdk_span)
            scenario.trace_id = f"{sdk_span.get_span_context().trace_id:032x}"
        sdk_span.end(end_time=span.end_ns)


def run_demo(ruleset: RuleSet, decision_wait: float = 1.0) -> int:
    log = io.StringIO()
    sidecar = Sidecar(Settings(listen="127.0.0.1:0", http_listen="", metrics_listen="",
                               decision_wait=decision_wait), ruleset)
    sidecar.emitter.log_writer = JsonLinesWriter(log)
    sidecar.start()
    chosen = scenarios(ruleset)
    senders = _Senders(f"127.0.0.1:{sidecar.grpc_port}")
    try:
        for scenario in chosen:
            send(scenario, senders)
        print(f"sent {len(chosen)} scenarios over OTLP gRPC to 127.0.0.1:{sidecar.grpc_port}; "
              f"waiting {decision_wait:g}s for their traces to be decided...\n")
        deadline = time.monotonic() + decision_wait + 10
        while sidecar.stores.trace_store.counts()[0] and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        senders.close()
        sidecar.stop()
    signals = [json.loads(line) for line in log.getvalue().splitlines()]
    for signal in signals:
        print(f"{signal['severity']:<8}  {signal['rule_id']}  trace={signal['trace_id']}  "
              f"{signal['message']}")
    fired = {(s["rule_id"], s["trace_id"]) for s in signals}
    print(f"\n{'scenario':<42}{'expected':<12}{'got':<12}")
    wrong = 0
    for scenario in chosen:
        example = scenario.example
        hit = (example.rule_id, scenario.trace_id) in fired
        ok = hit == example.violates
        wrong += not ok
        print(f"{example.rule_id:<42}{'violation' if example.violates else 'clean':<12}"
              f"{'violation' if hit else 'clean':<12}{'' if ok else 'MISMATCH'}")
    caught = sum(1 for s in chosen if s.example.violates
                 and (s.example.rule_id, s.trace_id) in fired)
    total = sum(1 for s in chosen if s.example.violates)
    print(f"\ncaught {caught}/{total} incidents; {len(signals)} signal(s) in all "
          f"(other catalog rules may fire on a scenario too)")
    return 1 if wrong else 0
