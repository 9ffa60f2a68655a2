"""The rule language's second edition (DESIGN.md rules 16-20) end to end: live, a real sidecar
fed by the real OpenTelemetry SDK exporter, with the memory store and with Redis; and replay
of OTLP JSON files through `betrace replay`."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_cli import REPO, otlp_line, otlp_span
from test_serve_e2e import Running, hex_trace, start_sidecar  # noqa: F401 (a fixture)

ROOT_QUERY = """
rules:
  - id: root-db-query
    severity: high
    condition: db.query.where(not parent_span_id matches ".")
"""


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> str:
    return "memory" if request.param == "memory" else request.getfixturevalue("redis_url")


def test_intrinsic_ids_come_from_the_exporter(
        start_sidecar: Callable[..., Running], sdk_client: Callable[..., Any],
        wait_until: Callable[..., Any], store: str) -> None:
    """Rule 19: a db.query with no parent (a root, as a background job emits it) fires; one
    under a request span does not."""
    running = start_sidecar(ROOT_QUERY, store=store)
    tracer = sdk_client(running.sidecar.grpc_port).tracer
    with tracer.start_as_current_span("db.query") as lone:
        pass
    with tracer.start_as_current_span("GET /orders"):
        with tracer.start_as_current_span("db.query"):
            pass
    [signal] = wait_until(lambda: running.signals("root-db-query"), what="the root db.query")
    assert signal["trace_id"] == hex_trace(lone)
    running.sidecar.stop()
    assert [s["trace_id"] for s in running.signals("root-db-query")] == [hex_trace(lone)]


ORDERS = """
rules:
  - id: order-email
    severity: high
    for_each: order.placed
    always: email.send.where(order_id == this.order_id) after this within 5s
    signal: {message: an order got no email, context: [order_id]}
  - id: refund-approved
    severity: critical
    for_each: agent.refund
    always: human.approval.where(approved == true) under this
"""


def test_for_each_joins_and_descent_live(
        start_sidecar: Callable[..., Running], sdk_client: Callable[..., Any],
        wait_until: Callable[..., Any], store: str) -> None:
    """Rules 16-18: two orders and one email signal the order without its email (and only it);
    an approval two levels under the refund, through a span no rule names, satisfies it, a
    sibling approval does not."""
    running = start_sidecar(ORDERS, store=store)
    tracer = sdk_client(running.sidecar.grpc_port).tracer
    with tracer.start_as_current_span("POST /checkout") as checkout:
        for order in ("o-1", "o-2"):
            with tracer.start_as_current_span("order.placed", attributes={"order_id": order}):
                pass
        with tracer.start_as_current_span("email.send", attributes={"order_id": "o-1"}):
            pass
    with tracer.start_as_current_span("POST /refunds") as good:
        with tracer.start_as_current_span("agent.refund"):
            with tracer.start_as_current_span("llm.call"):
                with tracer.start_as_current_span("human.approval",
                                                  attributes={"approved": True}):
                    pass
    with tracer.start_as_current_span("POST /refunds") as bad:
        with tracer.start_as_current_span("agent.refund"):
            pass
        with tracer.start_as_current_span("human.approval", attributes={"approved": True}):
            pass
    [order] = wait_until(lambda: running.signals("order-email"), what="the order without email")
    assert order["trace_id"] == hex_trace(checkout)
    assert order["context"] == {"order_id": "o-2"}
    [refund] = wait_until(lambda: running.signals("refund-approved"), what="the lone refund")
    assert refund["trace_id"] == hex_trace(bad)
    running.sidecar.stop()
    assert len(running.signals("order-email")) == 1
    assert [s["trace_id"] for s in running.signals("refund-approved")] == [hex_trace(bad)]
    assert hex_trace(good) not in {s["trace_id"] for s in running.signals()}


def test_for_each_joins_and_descent_in_replay(tmp_path: Path) -> None:
    """The same rules over OTLP JSON lines, each trace split over two lines as a file exporter
    writes them: the intermediate span no rule names still links the approval to its refund."""
    orders, good, bad = "1" * 32, "2" * 32, "3" * 32

    def child(span: dict[str, Any], parent: str) -> dict[str, Any]:
        return {**span, "parentSpanId": parent}

    lines = [
        otlp_line("shop",
                  otlp_span(orders, "0000000000000001", "order.placed", 0, order_id="o-1"),
                  otlp_span(orders, "0000000000000002", "order.placed", 1, order_id="o-2"),
                  otlp_span(good, "00000000000000a1", "agent.refund", 0),
                  child(otlp_span(good, "00000000000000a2", "llm.call", 1), "00000000000000a1"),
                  otlp_span(bad, "00000000000000b0", "POST /refunds", 0),
                  child(otlp_span(bad, "00000000000000b1", "agent.refund", 1),
                        "00000000000000b0")),
        otlp_line("shop",
                  otlp_span(orders, "0000000000000003", "email.send", 2000, order_id="o-1"),
                  child(otlp_span(good, "00000000000000a3", "human.approval", 2, approved=True),
                        "00000000000000a2"),
                  child(otlp_span(bad, "00000000000000b2", "human.approval", 2, approved=True),
                        "00000000000000b0")),
    ]
    traces, rules = tmp_path / "traces.jsonl", tmp_path / "rules.yaml"
    traces.write_text("\n".join(lines) + "\n")
    rules.write_text(ORDERS)
    done = subprocess.run([sys.executable, "-m", "sidecar", "replay", "--rules", str(rules),
                           str(traces)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    signals = [json.loads(line) for line in done.stdout.splitlines()]
    assert sorted((s["rule_id"], s["trace_id"], s["span_ids"][0]) for s in signals) == [
        ("order-email", orders, "0000000000000002"), ("refund-approved", bad, "00000000000000b1")]


def test_for_each_analysis_prefilter_monotone_and_pruning() -> None:
    """What the engine derives from a for_each rule: a Tempo prefilter on the span it checks,
    whether it can signal on arrival (only `never` of a monotone clause), and what pruning
    keeps (`under` keeps every span, for the parent links; `this.attr` is kept on the checked
    span)."""
    from sidecar.dsl import rule_query
    from sidecar.rules import load_rules_text

    ruleset = load_rules_text("""
rules:
  - id: order-email
    severity: high
    for_each: order.placed.where(total > 5)
    always: email.send.where(order_id == this.order_id) after this within 5s
  - id: refund-repeated
    severity: critical
    for_each: refund
    never: refund.where(refund_id == this.refund_id and span_id != this.span_id)
""")
    email, repeated = ruleset.rules
    assert rule_query(email) == '{ name = "order.placed" && (span.total > 5 || span.total > 5.0) }'
    assert rule_query(repeated) == '{ name = "refund" }'
    assert (email.logic.monotone, repeated.logic.monotone) == (False, True)
    projection = ruleset.projection()
    assert not projection.wants_name("llm.call")
    assert projection.attributes_for("order.placed") == {"total", "order_id"}
    assert projection.attributes_for("refund") == {"refund_id"}
    with_under = load_rules_text(ORDERS).projection()
    # (signal context attributes are kept on every span; nothing else on unnamed ones)
    assert with_under.wants_name("llm.call") and with_under.attributes_for("llm.call") == {"order_id"}


NAMED = """
lists:
  risky_actions: [bulk_deactivate, role_change]
macros:
  risky: admin.action.where(action in risky_actions)
  same_admin: admin.id == this.admin.id and action == this.action
rules:
  - id: risky-action-audited
    severity: high
    for_each: risky
    always: audit.log.where(same_admin) after this
"""


def test_lists_and_macros_live(
        start_sidecar: Callable[..., Running], sdk_client: Callable[..., Any],
        wait_until: Callable[..., Any], store: str) -> None:
    """Rule 20 live: a macro as the for_each selector, over a list, and a macro using `this`;
    only the risky action without its audit log signals."""
    running = start_sidecar(NAMED, store=store)
    tracer = sdk_client(running.sidecar.grpc_port).tracer

    def admin(action: str, audited: bool) -> Any:
        with tracer.start_as_current_span("POST /admin") as request:
            tracer.start_span("admin.action", attributes={"admin.id": "a1",
                                                          "action": action}).end()
            if audited:
                tracer.start_span("audit.log", attributes={"admin.id": "a1",
                                                           "action": action}).end()
        return request

    unaudited = admin("bulk_deactivate", audited=False)
    admin("role_change", audited=True)
    admin("password_reset", audited=False)  # not in the list: out of scope
    [signal] = wait_until(lambda: running.signals("risky-action-audited"), what="the signal")
    assert signal["trace_id"] == hex_trace(unaudited)
    running.sidecar.stop()
    assert len(running.signals("risky-action-audited")) == 1


def test_a_monotone_for_each_rule_signals_on_arrival(
        start_sidecar: Callable[..., Running], sdk_client: Callable[..., Any],
        wait_until: Callable[..., Any], store: str) -> None:
    """`for_each` with `never` alone, of a monotone clause, signals as the spans arrive: long
    before the trace's decision (30 s here)."""
    rules = """
rules:
  - id: refund-repeated
    severity: critical
    for_each: refund
    never: refund.where(refund_id == this.refund_id and span_id != this.span_id)
"""
    running = start_sidecar(rules, store=store, decision_wait=30.0, max_trace_age=60.0)
    tracer = sdk_client(running.sidecar.grpc_port).tracer
    with tracer.start_as_current_span("POST /refunds") as request:
        for _ in range(2):
            tracer.start_span("refund", attributes={"refund_id": "r-1"}).end()
    [signal] = wait_until(lambda: running.signals("refund-repeated"), timeout=10,
                          what="the signal, on arrival")
    assert signal["trace_id"] == hex_trace(request)
    assert running.sidecar.store.counts()[0] == 1  # the trace is still open, undecided
