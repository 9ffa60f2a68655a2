"""Benchmark: what each rule costs per trace, relative to walking the trace's attributes once.

    .venv/bin/python bench/rules.py [--traces N] [--repeat R] [--rules PATH]

Generates N deterministic 10-span traces shaped like the shipped catalog's domain (checkout,
admin, AI-agent, patient-record, public-API, GDPR-deletion and SRE traffic under an HTTP server
span, padded with unrelated spans; 8-12 attributes per span; some traces violate rules), builds
the Trace objects before any timing, then measures with perf_counter_ns and the GC disabled:

  ns/trace  per rule: median over R repeats of (time of rule.evaluate(t) for all N traces) / N;
            catalog: the same for RuleSet.evaluate(t), i.e. every enabled rule on a trace.
  baseline  median per trace of one plain pass over the trace's attributes:
            for span in trace.spans: for key, value in span.attributes.items(): touch value.
  ratio     ns/trace / baseline. This is the figure to report: the cost of checking one rule
            (or the catalog) against a trace, relative to just reading each attribute once.
            0.25 means a rule costs a quarter of one walk over the trace's attributes.

Glob selectors ("*") are cached per trace, so that cache is cleared before every timed pass
(outside the timer): each pass pays what a freshly received trace pays.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sidecar.model.spans import Span, Trace  # noqa: E402
from sidecar.rules import load_rules  # noqa: E402

SPANS_PER_TRACE = 10
MS = 1_000_000  # ns per ms
PHI_TABLES = ("patient_records", "patient_encounters", "lab_results")
Rng = random.Random
FILLER: dict[str, Callable[[Rng], Any]] = {  # attributes no rule reads, to reach 8-12 per span
    "thread.id": lambda r: r.randrange(1, 64),
    "thread.name": lambda r: f"worker-{r.randrange(8)}",
    "code.function": lambda r: r.choice(("handle", "run", "process", "dispatch")),
    "code.namespace": lambda r: r.choice(("app.handlers", "app.jobs", "lib.client")),
    "code.lineno": lambda r: r.randrange(10, 900),
    "host.name": lambda r: f"ip-10-0-{r.randrange(4)}-{r.randrange(250)}",
    "deployment.environment": lambda r: "production",
    "service.version": lambda r: r.choice(("1.4.2", "2.0.0", "3.1.7")),
    "k8s.pod.name": lambda r: f"pod-{r.getrandbits(24):06x}",
    "cloud.region": lambda r: r.choice(("eu-west-1", "us-east-1")),
    "net.peer.port": lambda r: r.choice((443, 5432, 6379, 8080)),
    "sampled": lambda r: r.random() < 0.5,
    "sample.rate": lambda r: round(r.random(), 3),
    "feature.flags": lambda r: ("new-checkout", "dark-mode")[: r.randrange(3)],
}
NOISE: tuple[tuple[str, str, str, dict[str, Any]], ...] = (  # name, kind, service, attributes
    ("cache.get", "CLIENT", "cart", {"db.system": "redis", "cache.hit": True}),
    ("render.template", "INTERNAL", "edge", {"template.name": "page.html"}),
    ("GET", "CLIENT", "catalog", {"http.request.method": "GET", "server.address": "search",
                                  "http.response.status_code": 200}),
    ("queue.publish", "PRODUCER", "orders", {"messaging.system": "kafka"}),
    ("feature_flag.evaluate", "INTERNAL", "edge", {"feature_flag.key": "new-checkout"}),
    ("db.query", "CLIENT", "catalog", {"db.system": "postgresql", "db.operation.name": "SELECT",
                                       "db.sql.table": "products"}),
)


class Builder:
    """One trace under construction: spans start one after another on a millisecond clock."""

    def __init__(self, r: Rng, index: int) -> None:
        self.r, self.trace_id, self.clock = r, f"{index + 1:032x}", 0.0
        self.spans: list[Span] = []

    def add(self, name: str, service: str, attrs: dict[str, Any], *, kind: str = "INTERNAL",
            status: str = "UNSET", ms: float | None = None, gap: float | None = None) -> None:
        r = self.r
        self.clock += r.uniform(1, 20) if gap is None else gap
        start, attributes, target = int(self.clock * MS), dict(attrs), r.randint(8, 12)
        for key in r.sample(list(FILLER), len(FILLER)):
            if len(attributes) >= target:
                break
            attributes[key] = FILLER[key](r)
        dur = r.uniform(0.5, 40) if ms is None else ms
        self.spans.append(Span(
            self.trace_id, f"{len(self.spans) + 1:016x}", name, start_ns=start,
            end_ns=start + int(dur * MS), status=status, kind=kind, service=service,
            parent_span_id=self.spans[0].span_id if self.spans else "", attributes=attributes))


def _id(r: Rng, prefix: str) -> str:
    return f"{prefix}_{r.getrandbits(32):08x}"


def checkout(b: Builder, r: Rng) -> None:
    order, late = _id(r, "ord"), r.random() < 0.04  # late: reservation after the charge
    reserve = {"order_id": order, "sku": _id(r, "sku"), "quantity": r.randint(1, 3),
               "reservation.status": "confirmed" if r.random() < 0.94 else "pending"}
    if not late:
        b.add("inventory.reserve", "inventory", reserve, kind="CLIENT")
    intent, amount, attempts = _id(r, "pi"), r.randrange(500, 50_000), 1 + (r.random() < 0.15)
    for attempt in range(1, attempts + 1):
        if attempt > 1 and r.random() < 0.3:
            intent = _id(r, "pi")  # the double-charge bug: a retry with a fresh intent
        b.add("payment.charge", "payments", {"order_id": order, "payment_intent_id": intent,
              "attempt": attempt, "amount_cents": amount, "currency": "EUR"},
              kind="CLIENT", status="ERROR" if attempt < attempts else "OK")
    if late:
        b.add("inventory.reserve", "inventory", reserve, kind="CLIENT")
    b.add("db.query", "orders", {"db.system": "postgresql", "db.operation.name": "INSERT",
                                 "db.sql.table": "orders"}, kind="CLIENT")


def admin(b: Builder, r: Rng) -> None:
    user, mfa_late = _id(r, "u_ops"), r.random() < 0.04
    mfa = {"auth.result": "success" if r.random() < 0.92 else "failure", "enduser.id": user}
    if not mfa_late:
        b.add("auth.mfa", "auth", mfa)
    b.add("admin.action", "admin-api", {"admin.operation": r.choice(("role_change", "impersonate")),
                                        "enduser.id": user, "target.id": _id(r, "u")})
    if mfa_late:
        b.add("auth.mfa", "auth", mfa)
    roll = r.random()  # 5% failed audit write, 8% none at all
    if roll < 0.92:
        b.add("audit.log", "audit", {"audit.category": "admin"},
              status="ERROR" if roll < 0.05 else "OK")


def agent(b: Builder, r: Rng) -> None:
    bot, order = {"gen_ai.agent.name": "support-bot"}, _id(r, "ord")
    b.add("agent.run", "support-agent", {**bot, "gen_ai.request.model": "m-1"}, ms=3000)
    if r.random() < 0.9:
        b.add("agent.tool_call", "support-agent",
              {**bot, "gen_ai.tool.name": "lookup_order", "order_id": order})
    for _ in range(r.randrange(3)):
        b.add("agent.tool_call", "support-agent",
              {**bot, "gen_ai.tool.name": r.choice(("search_faq", "get_customer"))})
    amount = round(r.uniform(5, 50) if r.random() < 0.5 else r.uniform(5, 400), 2)
    if amount > 50 and r.random() < 0.85:
        b.add("human.approval", "approvals", {"approver.id": _id(r, "u_sup"),
              "approval.decision": "approved" if r.random() < 0.95 else "rejected"})
    b.add("agent.refund", "support-agent",
          {**bot, "order_id": order, "amount": amount, "currency": "EUR"})


def patient_records(b: Builder, r: Rng) -> None:
    query = {"db.system": "postgresql", "db.operation.name": "SELECT",
             "db.sql.table": r.choice(PHI_TABLES), "tenant_id": _id(r, "clinic"),
             "enduser.id": _id(r, "u_doc")}
    roll = r.random()  # 88% filtered, else explicitly unfiltered, the string "true", or missing
    if roll < 0.88:
        query["tenant_filter_applied"] = True
    elif roll < 0.94:
        query["tenant_filter_applied"] = r.choice((False, "true"))
    b.add("db.query", "records-api", query, kind="CLIENT", ms=r.uniform(2, 30))
    roll = r.random()  # 85% audited in time, 5% late, 10% never
    if roll < 0.9:
        b.add("audit.log", "audit", {"audit.category": "phi_access"},
              gap=r.uniform(5, 120) if roll < 0.85 else r.uniform(250, 600))


def public_api(b: Builder, r: Rng) -> None:
    tier, key = r.choice(("free", "free", "pro", "enterprise")), _id(r, "key")
    for _ in range(r.randint(2, 6)):
        b.add("api.request", "public-api", {"tier": tier, "api.key_id": key, "customer_id":
              _id(r, "cus"), "http.route": r.choice(("/v1/items", "/v1/bulk"))}, kind="SERVER")


def deletion(b: Builder, r: Rng) -> None:
    request = _id(r, "dsr")
    b.add("deletion.run", "privacy-worker", {"dsr.request_id": request}, ms=5000)
    days = round(r.uniform(0.5, 30) if r.random() < 0.9 else r.uniform(30.01, 60), 2)
    b.add("deletion.complete", "privacy-worker", {"dsr.request_id": request,
          "days_since_request": days, "deletion.scope": "full_account"})


def sre(b: Builder, r: Rng) -> None:
    for _ in range(r.choice((0, 0, 1, 2, 3, 4, 5))):  # 4 or 5 retries is a storm
        b.add("http.retry", "checkout", {"server.address": "inventory", "error.type": "503",
              "http.request.method": "GET"}, kind="CLIENT", status="ERROR")
    op, slow = "VACUUM" if r.random() < 0.1 else "SELECT", r.random() < 0.25
    b.add("db.query", "orders", {"db.system": "postgresql", "db.operation.name": op,
          "db.sql.table": "orders"}, kind="CLIENT",
          ms=r.uniform(1001, 4000) if slow or op == "VACUUM" else r.uniform(1, 900))


SCENARIOS: dict[str, Callable[[Builder, Rng], None]] = {
    "POST /checkout": checkout, "POST /admin/users/{id}": admin, "POST /support/chat": agent,
    "GET /patients/{id}": patient_records, "POST /v1/bulk": public_api,
    "POST /privacy/erase": deletion, "GET /orders/{id}": sre,
}


def make_trace(r: Rng, index: int) -> Trace:
    """An HTTP server root, one domain scenario, maybe an error log, then unrelated spans."""
    b, route = Builder(r, index), r.choice(list(SCENARIOS))
    code = r.choice((500, 502, 503)) if r.random() < 0.08 else 200
    root = {"http.request.method": route.split()[0], "http.route": route.split()[1],
            "url.scheme": "https", "client.address": f"10.1.{r.randrange(250)}.{r.randrange(250)}"}
    if code == 503 and r.random() < 0.3:
        root["http.route"] = "/readyz"  # a failing probe during shutdown: excluded by the rule
    root["http.status_code" if r.random() < 0.1 else "http.response.status_code"] = code
    b.add(route, "edge", root, kind="SERVER", status="ERROR" if code >= 500 else "OK", gap=0)
    SCENARIOS[route](b, r)
    if code >= 500 and r.random() < 0.5:
        b.add(r.choice(("log.error", "exception")), "edge", {"log.message": "upstream failed"})
    while len(b.spans) < SPANS_PER_TRACE:
        name, kind, service, attrs = r.choice(NOISE)
        b.add(name, service, attrs, kind=kind)
    assert len(b.spans) == SPANS_PER_TRACE, (route, len(b.spans))
    b.spans[0].end_ns = max(s.end_ns for s in b.spans) + MS
    r.shuffle(b.spans)  # spans arrive in any order; rules go by start time
    return Trace(b.trace_id, b.spans)


def walk_attributes(traces: list[Trace]) -> int:
    """The baseline: touch every attribute value of every span once."""
    touched = 0
    for trace in traces:
        for span in trace.spans:
            for _key, value in span.attributes.items():
                if value is not None:
                    touched += 1
    return touched


def per_trace_ns(run: Callable[[], object], traces: list[Trace], repeat: int) -> float:
    """Median over `repeat` timed passes of `run()` over all traces, divided by the trace count."""
    run()  # warm-up
    samples = []
    for _ in range(repeat):
        for trace in traces:
            trace._glob_cache.clear()  # untimed: each pass starts from fresh traces
        start = time.perf_counter_ns()
        run()
        samples.append(time.perf_counter_ns() - start)
    return statistics.median(samples) / len(traces)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traces", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--rules", default=str(ROOT / "rules"))
    args = parser.parse_args()
    ruleset = load_rules([args.rules])
    r = random.Random(20261017)
    traces = [make_trace(r, i) for i in range(args.traces)]
    attrs = sum(len(s.attributes) for t in traces for s in t.spans) / len(traces) / SPANS_PER_TRACE

    def loop(evaluate: Callable[[Trace], object]) -> Callable[[], None]:
        def run() -> None:
            for trace in traces:
                evaluate(trace)
        return run

    fired = {rule.id: sum(rule.evaluate(t) is not None for t in traces) for rule in ruleset.rules}
    gc.collect()
    gc.disable()
    try:
        base = per_trace_ns(lambda: walk_attributes(traces), traces, args.repeat)
        costs = {rule.id: per_trace_ns(loop(rule.evaluate), traces, args.repeat)
                 for rule in ruleset.rules}
        catalog = per_trace_ns(loop(ruleset.evaluate), traces, args.repeat)
    finally:
        gc.enable()
    any_fired = sum(bool(ruleset.evaluate(t)) for t in traces)

    print(f"{len(traces)} traces x {SPANS_PER_TRACE} spans ({attrs:.1f} attributes/span), "
          f"{len(ruleset.rules)} rules from {args.rules}, median of {args.repeat} repeats")
    print(f"baseline (walk every attribute once): {base:,.0f} ns/trace\n")
    width = max(len(rule_id) for rule_id in costs) + 2
    print(f"{'rule':<{width}}{'ns/trace':>10}{'ratio':>8}{'fired':>8}")
    for rule_id, cost in costs.items():
        print(f"{rule_id:<{width}}{cost:>10,.0f}{cost / base:>8.2f}{fired[rule_id]:>8}")
    print(f"{'catalog (RuleSet.evaluate)':<{width}}{catalog:>10,.0f}{catalog / base:>8.2f}"
          f"{any_fired:>8}  (traces with >= 1 violation)")
    silent = [rule_id for rule_id, n in fired.items() if n == 0]
    if silent:
        print(f"\n!!! WARNING: {len(silent)} rule(s) NEVER FIRED on the generated traces: "
              f"{', '.join(silent)}\n!!! Their timing covers only the non-violating path "
              f"(a count threshold above {SPANS_PER_TRACE} spans per trace can never be reached).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
