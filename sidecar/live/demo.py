"""`betrace demo`: the seven case studies' incidents, caught by a live sidecar.

Each scenario runs the case study's own instrumentation, as its snippet shows it (span names,
attributes, and `tracer.start_span`, which does not make the new span current, so the spans a
function opens are siblings), inside one request span, as a web framework's instrumentation
would. The buggy code and its fixed twin both run; the spans go through a real sidecar over OTLP
gRPC with the OpenTelemetry SDK, and a table shows what was caught.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind, Tracer

from sidecar.live.app import Sidecar
from sidecar.live.config import Settings
from sidecar.model.signal_writers import JsonLinesWriter
from sidecar.rules import RuleSet


class RefundDeniedError(Exception):
    """What the case study's agent raises when the human says no."""


# --- the case studies' instrumentation (../shared/seeds: case studies 1-7) -----------------------

def charge_payment(tracer: Tracer, cart_id: str, total: float, payment_intent_id: str,
                   attempt: int) -> None:
    with tracer.start_span("payment.charge") as span:
        span.set_attribute("amount", total)
        span.set_attribute("payment_intent_id", payment_intent_id)
        span.set_attribute("attempt", attempt)
        span.set_attribute("cart.id", cart_id)


def export_patient_records(tracer: Tracer, tenant_id: str, filtered: bool) -> None:
    with tracer.start_span("tenant.context_loaded") as span:
        span.set_attribute("tenant.id", tenant_id)
    with tracer.start_span("database.query") as span:
        span.set_attribute("table", "patient_records")
        span.set_attribute("tenant.id", tenant_id)
        if filtered:  # the bulk export of the incident left the filter (and its flag) out
            span.set_attribute("tenant_filter", True)


def bulk_deactivate_users(tracer: Tracer, admin_id: str, user_ids: list[str],
                          audited: bool) -> None:
    with tracer.start_span("admin.action") as span:
        span.set_attribute("admin.id", admin_id)
        span.set_attribute("action", "bulk_deactivate")
        span.set_attribute("user_count", len(user_ids))
        span.set_attribute("compliance.framework", "SOC2")
        span.set_attribute("compliance.control", "CC7.2")
    if audited:  # the new bulk feature of the incident forgot the audit write
        with tracer.start_span("audit.log") as span:
            span.set_attribute("admin.id", admin_id)
            span.set_attribute("action", "bulk_deactivate")
            span.set_attribute("affected_users", user_ids)


def handle_api_request(tracer: Tracer, user_id: str, tier: str, endpoint: str,
                       request_count_1m: int, cached: bool) -> None:
    with tracer.start_span("api.request") as span:
        span.set_attribute("user.id", user_id)
        span.set_attribute("tier", tier)
        span.set_attribute("endpoint", endpoint)
        span.set_attribute("request_count_1m", request_count_1m)  # set by the app's counter
        if cached:  # the cache key lacked the tier: a hit returned before the limiter
            span.set_attribute("cache_hit", True)
            return
        with tracer.start_span("rate_limit.check") as rl_span:
            rl_span.set_attribute("tier", tier)


def checkout(tracer: Tracer, item_id: str, reservation_id: str | None) -> None:
    with tracer.start_span("inventory.reserve") as span:
        span.set_attribute("item.id", item_id)
        if reservation_id is not None:
            span.set_attribute("reservation.id", reservation_id)
        span.set_attribute("confirmed", reservation_id is not None)
    # the racing code of the incident charged without checking the reservation
    with tracer.start_span("payment.charge") as span:
        if reservation_id is not None:
            span.set_attribute("reservation.id", reservation_id)


def agent_refund(tracer: Tracer, order_id: str, amount: float, reason: str,
                 limit_checked_on: float) -> None:
    with tracer.start_span("agent.refund") as span:
        span.set_attribute("order.id", order_id)
        span.set_attribute("amount", amount)
        span.set_attribute("reason", reason)
        if limit_checked_on > 50:  # the incident compared the amount in the wrong currency
            with tracer.start_span("human.approval") as approval_span:
                approval_span.set_attribute("approved", True)


def process_deletion_request(tracer: Tracer, user_id: str, days_elapsed: int) -> None:
    with tracer.start_span("deletion.process") as span:
        span.set_attribute("user.id", user_id)
        span.set_attribute("days_since_request", days_elapsed)
        span.set_attribute("compliance.framework", "GDPR")
        span.set_attribute("compliance.article", "17")
    with tracer.start_span("deletion.complete") as span:
        span.set_attribute("user.id", user_id)
        span.set_attribute("days_since_request", days_elapsed)


# --- the scenarios ------------------------------------------------------------------------------

@dataclass
class Scenario:
    rule_id: str
    violates: bool
    title: str
    request: str  # the request span the framework opens
    run: Callable[[Tracer], None]
    trace_id: str = ""


SCENARIOS = [
    Scenario("payment-retry-idempotency", True, "1 retry mints a new payment intent",
             "POST /checkout", lambda t: (charge_payment(t, "cart_1", 49.99, "pi_1abc", 1),
                                          charge_payment(t, "cart_1", 49.99, "pi_2xyz", 2))),
    Scenario("payment-retry-idempotency", False, "1 retry reuses its payment intent",
             "POST /checkout", lambda t: (charge_payment(t, "cart_2", 49.99, "pi_3def", 1),
                                          charge_payment(t, "cart_2", 49.99, "pi_3def", 2))),
    Scenario("patient-query-requires-tenant-filter", True, "2 bulk export without tenant filter",
             "GET /export", lambda t: export_patient_records(t, "clinic_7", filtered=False)),
    Scenario("patient-query-requires-tenant-filter", False, "2 export with tenant filter",
             "GET /export", lambda t: export_patient_records(t, "clinic_7", filtered=True)),
    Scenario("admin-action-audit-log", True, "3 bulk deactivation, no audit log",
             "POST /admin/deactivate",
             lambda t: bulk_deactivate_users(t, "adm_1", ["u_1", "u_2"], audited=False)),
    Scenario("admin-action-audit-log", False, "3 bulk deactivation, audited",
             "POST /admin/deactivate",
             lambda t: bulk_deactivate_users(t, "adm_1", ["u_1", "u_2"], audited=True)),
    Scenario("free-tier-rate-limit", True, "4 cache hit skips the rate limiter",
             "GET /v1/reports",
             lambda t: handle_api_request(t, "u_free", "free", "/v1/reports", 150, cached=True)),
    Scenario("free-tier-rate-limit", False, "4 tier in the cache key: limiter runs",
             "GET /v1/reports",
             lambda t: handle_api_request(t, "u_free", "free", "/v1/reports", 150, cached=False)),
    Scenario("payment-requires-confirmed-reservation", True, "5 race lost, charged anyway",
             "POST /checkout", lambda t: checkout(t, "item_123", None)),
    Scenario("payment-requires-confirmed-reservation", False, "5 reserved, then charged",
             "POST /checkout", lambda t: checkout(t, "item_123", "res_9")),
    Scenario("agent-refund-human-approval", True, "6 5,000 refund read as 50, no approval",
             "POST /support/messages",
             lambda t: agent_refund(t, "ord_1", 5000, "damaged", limit_checked_on=50)),
    Scenario("agent-refund-human-approval", False, "6 120 refund approved by a human",
             "POST /support/messages",
             lambda t: agent_refund(t, "ord_2", 120, "damaged", limit_checked_on=120)),
    Scenario("gdpr-deletion-30-days", True, "7 deletion completed on day 45",
             "deletion-job", lambda t: process_deletion_request(t, "u_501", 45)),
    Scenario("gdpr-deletion-30-days", False, "7 deletion completed on day 12",
             "deletion-job", lambda t: process_deletion_request(t, "u_502", 12)),
]


def send(scenario: Scenario, tracer: Tracer) -> None:
    """Run a scenario inside its request span; every span is exported as it ends."""
    with tracer.start_as_current_span(scenario.request, kind=SpanKind.SERVER) as request:
        scenario.trace_id = f"{request.get_span_context().trace_id:032x}"
        scenario.run(tracer)


def run_demo(ruleset: RuleSet, decision_wait: float = 1.0) -> int:
    """0 when every incident is caught by its rule and no clean twin draws any signal."""
    log = io.StringIO()
    sidecar = Sidecar(Settings(listen="127.0.0.1:0", http_listen="", metrics_listen="",
                               decision_wait=decision_wait), ruleset)
    sidecar.emitter.log_writer = JsonLinesWriter(log)
    sidecar.start()
    provider = TracerProvider(resource=Resource.create({"service.name": "demo-shop"}))
    provider.add_span_processor(SimpleSpanProcessor(
        OTLPSpanExporter(endpoint=f"127.0.0.1:{sidecar.grpc_port}", insecure=True)))
    try:
        tracer = provider.get_tracer("betrace.demo")
        for scenario in SCENARIOS:
            send(scenario, tracer)
        print(f"sent {len(SCENARIOS)} scenarios (each incident's buggy code and its fix) over "
              f"OTLP gRPC to 127.0.0.1:{sidecar.grpc_port}; waiting {decision_wait:g}s for "
              "their traces to be decided...\n")
        deadline = time.monotonic() + decision_wait + 10
        while sidecar.store.counts()[0] and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        provider.shutdown()
        sidecar.stop()
    signals = [json.loads(line) for line in log.getvalue().splitlines()]
    return _report(signals)


def _report(signals: list[dict[str, object]]) -> int:
    by_trace: dict[object, list[str]] = {}
    for signal in signals:
        by_trace.setdefault(signal["trace_id"], []).append(str(signal["rule_id"]))
        print(f"{signal['severity']:<8}  {signal['rule_id']}  trace={signal['trace_id']}  "
              f"{signal['message']}")
    print(f"\n{'scenario':<44}{'rule':<40}{'expected':<11}{'got'}")
    wrong = 0
    for scenario in SCENARIOS:
        fired = by_trace.get(scenario.trace_id, [])
        hit = scenario.rule_id in fired
        others = [rule for rule in fired if rule != scenario.rule_id]
        ok = hit == scenario.violates and not (others and not scenario.violates)
        wrong += not ok
        got = "violation" if hit else "clean"
        if others:
            got += f" (+{', '.join(others)})"
        print(f"{scenario.title:<44}{scenario.rule_id:<40}"
              f"{'violation' if scenario.violates else 'clean':<11}{got}"
              f"{'' if ok else '  MISMATCH'}")
    incidents = [s for s in SCENARIOS if s.violates]
    caught = sum(1 for s in incidents if s.rule_id in by_trace.get(s.trace_id, []))
    noisy = sum(1 for s in SCENARIOS if not s.violates and by_trace.get(s.trace_id))
    print(f"\ncaught {caught}/{len(incidents)} incidents; {noisy} clean twin(s) drew a signal; "
          f"{len(signals)} signal(s) in all")
    return 1 if wrong else 0
