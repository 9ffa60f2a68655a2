"""Write the bundled sample traffic for the rule catalog: OTLP JSON, as the Collector's file
exporter writes it, with each of the seven incidents once (plus its clean twin), three SRE
incidents (plus twins) and unrelated noise. Deterministic: the same seed always gives
byte-identical output.

Regenerate (from the repository root):  python3 rules/samples/generate.py
It writes, next to this script:
  incidents.otlp.jsonl  one ExportTraceServiceRequest per line; a trace's spans are spread over
                        several lines, interleaved with other traces, as the SDKs of several
                        services export them in batches;
  expected.json         the (rule_id, trace_id) pairs a correct replay with rules/ must produce:
                        exactly these, nothing else.

Check it:  python -m sidecar replay --rules rules/ rules/samples/incidents.otlp.jsonl
Standard library only.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

SEED = 20261017
HERE = Path(__file__).resolve().parent
OUT = HERE / "incidents.otlp.jsonl"
EXPECTED = HERE / "expected.json"

KIND = {"INTERNAL": 1, "SERVER": 2, "CLIENT": 3, "PRODUCER": 4, "CONSUMER": 5}
STATUS = {"UNSET": 0, "OK": 1, "ERROR": 2}
MS = 1_000_000  # nanoseconds per millisecond

# Traffic comes in bursts (a few seconds each) so that concurrent traces interleave in the file.
BURSTS = [
    datetime(2026, 10, 3, 14, 5, tzinfo=timezone.utc),
    datetime(2026, 10, 9, 9, 31, tzinfo=timezone.utc),
    datetime(2026, 10, 17, 22, 12, tzinfo=timezone.utc),
    datetime(2026, 10, 28, 16, 47, tzinfo=timezone.utc),
]
SERVICES = {  # service.name -> service.version
    "edge": "1.27.3", "checkout": "2.14.0", "payments": "3.2.1", "inventory": "1.9.0",
    "orders": "5.1.2", "cart": "2.0.7", "catalog": "4.4.0", "search": "0.9.12",
    "records-api": "4.0.3", "audit": "1.3.0", "admin-api": "2.2.0", "auth": "6.0.1",
    "public-api": "3.8.0", "support-agent": "0.7.4", "approvals": "1.1.0",
    "privacy-worker": "1.0.9", "reports": "2.6.1",
}
PHI_TABLES = ("patient_records", "patient_encounters", "lab_results")

rng = random.Random(SEED)


def hex_id(bits: int) -> str:
    return f"{rng.getrandbits(bits) or 1:0{bits // 4}x}"


class Trace:
    """One trace under construction; times are milliseconds from the trace's start."""

    def __init__(self, label: str, start_ns: int) -> None:
        self.label = label
        self.trace_id = hex_id(128)
        self.start_ns = start_ns
        self.spans: list[dict] = []

    def span(self, name: str, service: str, at: float, ms: float, *, parent: dict | None = None,
             kind: str = "INTERNAL", status: str = "UNSET", scope: str | None = None,
             attrs: dict | None = None, error: str | None = None) -> dict:
        jitter = rng.randrange(0, 90_000)  # sub-millisecond noise, as real clocks have
        start = self.start_ns + int(at * MS) + jitter
        span = {
            "service": service,
            "scope": scope or default_scope(name, kind, service),
            "traceId": self.trace_id,
            "spanId": hex_id(64),
            "parentSpanId": parent["spanId"] if parent else "",
            "name": name,
            "kind": KIND[kind],
            "startTimeUnixNano": start,
            "endTimeUnixNano": start + int(ms * MS) + rng.randrange(0, 40_000),
            "attributes": attrs or {},
            "status": STATUS[status],
            "error": error,
        }
        self.spans.append(span)
        return span

    def http_server(self, method: str, route: str, service: str, at: float, ms: float,
                    code: int = 200, parent: dict | None = None, **attrs: object) -> dict:
        return self.span(
            f"{method} {route}", service, at, ms, parent=parent, kind="SERVER",
            status="ERROR" if code >= 500 else "UNSET",
            attrs={"http.request.method": method, "http.route": route,
                   "http.response.status_code": code, "url.scheme": "https", **attrs},
        )

    def db(self, service: str, at: float, ms: float, parent: dict, table: str, op: str = "SELECT",
           **attrs: object) -> dict:
        return self.span("db.query", service, at, ms, parent=parent, kind="CLIENT", attrs={
            "db.system": "postgresql", "db.operation.name": op, "db.sql.table": table,
            "server.address": "pg-main.internal", **attrs})


def default_scope(name: str, kind: str, service: str) -> str:
    if name == "db.query":
        return "opentelemetry.instrumentation.sqlalchemy"
    if kind == "SERVER" and " /" in name:
        return "opentelemetry.instrumentation.fastapi"
    if name in ("http.retry", "GET", "POST"):
        return "opentelemetry.instrumentation.httpx"
    if name == "log.error":
        return "opentelemetry.instrumentation.logging"
    return f"{service.replace('-', '_')}.instrumentation"


def edge(t: Trace, method: str, route: str, ms: float, code: int = 200) -> dict:
    """The API gateway's server span that fronts most requests."""
    return t.http_server(method, route, "edge", 0, ms, code, **{"client.address": client_ip()})


def client_ip() -> str:
    return f"203.0.113.{rng.randrange(2, 250)}"


# --- the seven incidents -------------------------------------------------------------------------
# Each emits the spans and attributes of its case study's instrumentation snippet
# (../shared/seeds, case studies 1-7): the snippet's spans are siblings under the service's
# request span (`tracer.start_span` does not make a span current), in the snippet's order.

def checkout(t: Trace, cart: str, reserved: bool, intents: list[str], total: float) -> None:
    """A checkout: reserve stock (case study 5), then charge_payment once per intent (case study
    1: attempt 1, 2, ...). A lost race leaves the reservation unconfirmed, and the buggy code
    charges anyway."""
    root = edge(t, "POST", "/checkout", 420 + 2300 * (len(intents) - 1))
    svc = t.http_server("POST", "/checkout", "checkout", 3, 410 + 2300 * (len(intents) - 1),
                        parent=root)
    reservation = "res_" + hex_id(32)[:10]
    reserve = {"item.id": "item_" + hex_id(16)[:5], "confirmed": reserved}
    if reserved:
        reserve["reservation.id"] = reservation
    res = t.span("inventory.reserve", "checkout", 8, 45, parent=svc, attrs=reserve)
    t.db("inventory", 11, 9, res, "stock_levels", "UPDATE")
    at = 70.0
    for attempt, intent in enumerate(intents, 1):
        last = attempt == len(intents)
        charge = {"amount": total, "payment_intent_id": intent, "attempt": attempt,
                  "cart.id": cart}
        if reserved:
            charge["reservation.id"] = reservation
        t.span("payment.charge", "checkout", at, 280 if last else 2000, parent=svc,
               status="UNSET" if last else "ERROR",
               error=None if last else "psp timeout after 2000ms", attrs=charge)
        at += 2300
    t.db("checkout", at - 2300 + 290, 6, svc, "orders", "INSERT")


def patient_records(t: Trace, tenant: str, filtered: bool) -> None:
    """export_patient_records (case study 2); the incident's bulk export left the filter out."""
    root = edge(t, "GET", "/patients/export", 95)
    svc = t.http_server("GET", "/patients/export", "records-api", 2, 90, parent=root)
    t.span("tenant.context_loaded", "records-api", 4, 3, parent=svc, attrs={"tenant.id": tenant})
    query = {"table": "patient_records", "tenant.id": tenant}
    if filtered:
        query["tenant_filter"] = True
    t.span("database.query", "records-api", 9, 14, parent=svc, attrs=query)


def admin_action(t: Trace, audited: bool) -> None:
    """bulk_deactivate_users (case study 3); the incident's new feature wrote no audit log."""
    admin, users = "adm_" + hex_id(16)[:5], ["u_" + hex_id(16)[:6] for _ in range(3)]
    root = edge(t, "POST", "/admin/users/deactivate", 160)
    svc = t.http_server("POST", "/admin/users/deactivate", "admin-api", 3, 150, parent=root)
    action = t.span("admin.action", "admin-api", 70, 55, parent=svc, attrs={
        "admin.id": admin, "action": "bulk_deactivate", "user_count": len(users),
        "compliance.framework": "SOC2", "compliance.control": "CC7.2"})
    t.db("admin-api", 74, 7, action, "users", "UPDATE")
    if audited:
        t.span("audit.log", "admin-api", 128, 8, parent=svc, attrs={
            "admin.id": admin, "action": "bulk_deactivate", "affected_users": users})


def api_request(t: Trace, tier: str, count_1m: int, cached: bool) -> None:
    """handle_api_request (case study 4): a cache hit returned before the rate limiter ran."""
    user = "u_" + hex_id(16)[:6]
    root = edge(t, "GET", "/v1/reports", 6 if cached else 40)
    svc = t.http_server("GET", "/v1/reports", "public-api", 1, 5 if cached else 38, parent=root)
    request = {"user.id": user, "tier": tier, "endpoint": "/v1/reports",
               "request_count_1m": count_1m}
    if cached:
        request["cache_hit"] = True
    t.span("api.request", "public-api", 2, 3 if cached else 35, parent=svc, attrs=request)
    if not cached:
        t.span("rate_limit.check", "public-api", 3, 2, parent=svc, attrs={"tier": tier})


def agent_refund(t: Trace, amount: float, approved: bool) -> None:
    """agent_refund (case study 6) inside an agent run; the incident's currency bug skipped the
    approval. The approval is the refund's sibling, started while the refund runs."""
    order = f"ord_{rng.randrange(10_000, 99_999)}"
    root = edge(t, "POST", "/v1/support/messages", 6200)
    svc = t.http_server("POST", "/v1/support/messages", "support-agent", 2, 6190, parent=root,
                        **{"session.id": "s_" + hex_id(32)})
    run = t.span("agent.run", "support-agent", 5, 6180, parent=svc,
                 attrs={"gen_ai.agent.name": "support-bot"})
    llm = {"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o-mini",
           "gen_ai.system": "openai"}
    t.span("chat gpt-4o-mini", "support-agent", 8, 900, parent=run, kind="CLIENT", attrs=llm)
    t.span("agent.refund", "support-agent", 2100, 2600, parent=run, attrs={
        "order.id": order, "amount": amount, "reason": "item damaged"})
    if approved:
        t.span("human.approval", "support-agent", 2150, 2200, parent=run,
               attrs={"approved": True})
    t.span("chat gpt-4o-mini", "support-agent", 4800, 1300, parent=run, kind="CLIENT", attrs=llm)


def gdpr_deletion(t: Trace, days: int) -> None:
    """process_deletion_request (case study 7), run by a worker off the erasure queue."""
    user = "u_" + hex_id(16)[:6]
    root = t.span("dsr.erasure process", "privacy-worker", 0, 1900, kind="CONSUMER", attrs={
        "messaging.system": "kafka", "messaging.destination.name": "dsr.erasure"})
    process = t.span("deletion.process", "privacy-worker", 5, 1840, parent=root, attrs={
        "user.id": user, "days_since_request": days, "compliance.framework": "GDPR",
        "compliance.article": "17"})
    for i, table in enumerate(("users", "addresses", "orders_archive", "marketing_contacts")):
        t.db("privacy-worker", 20 + i * 400, rng.randrange(40, 380), process, table, "DELETE")
    t.span("deletion.complete", "privacy-worker", 1850, 20, parent=root, attrs={
        "user.id": user, "days_since_request": days})


# --- SRE incidents -------------------------------------------------------------------------------

def order_lookup(t: Trace, code: int, logged: bool) -> None:
    root = edge(t, "GET", "/orders/{id}", 320, code)
    svc = t.http_server("GET", "/orders/{id}", "orders", 3, 310, code, parent=root)
    failed = code >= 500
    q = t.db("orders", 6, 300 if failed else 4, svc, "orders")
    if failed:
        q["status"] = STATUS["ERROR"]
        q["error"] = "QueuePool limit of size 20 overflow 0 reached, connection timed out"
        q["attributes"]["error.type"] = "TimeoutError"
        if logged:
            t.span("log.error", "orders", 308, 0.2, parent=svc, attrs={
                "log.message": "order lookup failed: connection pool exhausted",
                "exception.type": "TimeoutError"})


def cart_pricing(t: Trace, retries: int) -> None:
    root = edge(t, "GET", "/cart", 200 + retries * 180)
    svc = t.http_server("GET", "/cart", "cart", 3, 190 + retries * 180, parent=root)
    t.db("cart", 5, 4, svc, "cart_items")
    at = 12.0
    for i in range(retries):
        t.span("http.retry", "cart", at, 30, parent=svc, kind="CLIENT", status="ERROR", attrs={
            "http.request.method": "GET", "server.address": "pricing.internal",
            "http.request.resend_count": i + 1, "error.type": "503"})
        at += 30 + 40 * (i + 1)  # growing, but far too short, backoff
    t.span("GET", "cart", at, 35, parent=svc, kind="CLIENT", attrs={
        "http.request.method": "GET", "server.address": "pricing.internal",
        "http.response.status_code": 200})


def sales_report(t: Trace, query_ms: int) -> None:
    root = edge(t, "GET", "/reports/sales", query_ms + 120)
    svc = t.http_server("GET", "/reports/sales", "reports", 4, query_ms + 110, parent=root)
    t.db("reports", 10, query_ms, svc, "orders", **{"db.query.summary": "SELECT orders by day"})
    t.span("report.render", "reports", query_ms + 20, 80, parent=svc)


# --- noise ---------------------------------------------------------------------------------------

def product_page(t: Trace) -> None:
    found = rng.random() > 0.2
    root = edge(t, "GET", "/products/{id}", 40, 200 if found else 404)
    svc = t.http_server("GET", "/products/{id}", "catalog", 2, 35, 200 if found else 404,
                        parent=root)
    t.span("GET", "catalog", 4, 2, parent=svc, kind="CLIENT",
           scope="opentelemetry.instrumentation.redis",
           attrs={"db.system": "redis", "db.operation.name": "GET"})
    t.db("catalog", 8, rng.randrange(2, 20), svc, "products")


def search(t: Trace) -> None:
    root = edge(t, "GET", "/search", 120)
    svc = t.http_server("GET", "/search", "search", 2, 110, parent=root,
                        **{"search.query.length": rng.randrange(3, 40)})
    t.span("POST", "search", 6, 90, parent=svc, kind="CLIENT", attrs={
        "http.request.method": "POST", "server.address": "opensearch.internal",
        "http.response.status_code": 200})


def add_to_cart(t: Trace) -> None:
    root = edge(t, "POST", "/cart/items", 60)
    svc = t.http_server("POST", "/cart/items", "cart", 2, 55, parent=root)
    t.db("cart", 6, 7, svc, "cart_items", "INSERT")
    if rng.random() < 0.5:  # one retried call to pricing is normal
        t.span("http.retry", "cart", 15, 12, parent=svc, kind="CLIENT", status="ERROR", attrs={
            "http.request.method": "GET", "server.address": "pricing.internal",
            "http.request.resend_count": 1, "error.type": "502"})
    t.span("GET", "cart", 30, 15, parent=svc, kind="CLIENT", attrs={
        "http.request.method": "GET", "server.address": "pricing.internal",
        "http.response.status_code": 200})


def login(t: Trace) -> None:
    root = edge(t, "POST", "/login", 260)
    svc = t.http_server("POST", "/login", "auth", 2, 250, parent=root)
    t.db("auth", 5, 3, svc, "users")
    t.span("auth.password_verify", "auth", 10, 230, parent=svc, attrs={"auth.hash": "argon2id"})


def probe(t: Trace, route: str, code: int) -> None:
    t.http_server("GET", route, "orders", 0, 1, code)


def agent_faq(t: Trace) -> None:
    root = edge(t, "POST", "/v1/support/messages", 2100)
    svc = t.http_server("POST", "/v1/support/messages", "support-agent", 2, 2090, parent=root)
    run = t.span("agent.run", "support-agent", 5, 2080, parent=svc,
                 attrs={"gen_ai.agent.name": "support-bot"})
    t.span("agent.tool_call", "support-agent", 10, 150, parent=run, attrs={
        "gen_ai.agent.name": "support-bot", "gen_ai.tool.name": "search_faq"})
    t.span("chat gpt-4o-mini", "support-agent", 170, 1900, parent=run, kind="CLIENT",
           attrs={"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o-mini"})


def vacuum(t: Trace) -> None:
    job = t.span("maintenance.vacuum", "orders", 0, 51_600, kind="INTERNAL")
    t.db("orders", 5, 48_100, job, "orders", "VACUUM")
    t.db("orders", 48_200, 3_300, job, "orders", "ANALYZE")


def admin_listing(t: Trace) -> None:
    root = edge(t, "GET", "/admin/users", 70)
    svc = t.http_server("GET", "/admin/users", "admin-api", 2, 65, parent=root)
    t.db("admin-api", 5, 12, svc, "users")


# --- assembly ------------------------------------------------------------------------------------

def scenarios() -> list[tuple[str, object, tuple[str, ...]]]:
    """(label, builder, rule ids it must violate)."""
    return [
        ("payment retry, new intent", lambda t: checkout(t, "cart_81723", True,
                                                         ["pi_3Q1abcR", "pi_3Q2xyzS"], 129.99),
         ("payment-retry-idempotency",)),
        ("payment retry, same intent", lambda t: checkout(t, "cart_81790", True,
                                                          ["pi_3Q7kfmT", "pi_3Q7kfmT"], 45.5),
         ()),
        ("patient records, no tenant filter", lambda t: patient_records(t, "clinic_12", False),
         ("patient-query-requires-tenant-filter",)),
        ("patient records, tenant filter", lambda t: patient_records(t, "clinic_12", True), ()),
        ("bulk deactivation, no audit", lambda t: admin_action(t, False),
         ("admin-action-audit-log",)),
        ("bulk deactivation, audited", lambda t: admin_action(t, True), ()),
        ("free tier at 140/min, cache hit", lambda t: api_request(t, "free", 140, True),
         ("free-tier-rate-limit",)),
        ("free tier at 140/min, rate-limited", lambda t: api_request(t, "free", 140, False), ()),
        ("free tier at 100/min, cache hit", lambda t: api_request(t, "free", 100, True), ()),
        ("race lost, charged anyway", lambda t: checkout(t, "cart_81802", False,
                                                         ["pi_3QAp0dD"], 23.99),
         ("payment-requires-confirmed-reservation",)),
        ("charge on a confirmed reservation", lambda t: checkout(t, "cart_81811", True,
                                                                 ["pi_3QB11cE"], 23.99), ()),
        ("agent refund 5000 unapproved", lambda t: agent_refund(t, 5000.0, False),
         ("agent-refund-human-approval",)),
        ("agent refund 180 approved", lambda t: agent_refund(t, 180.0, True), ()),
        ("gdpr erasure on day 45", lambda t: gdpr_deletion(t, 45), ("gdpr-deletion-30-days",)),
        ("gdpr erasure on day 30", lambda t: gdpr_deletion(t, 30), ()),
        ("503 without error log", lambda t: order_lookup(t, 503, False),
         ("http-5xx-without-error-log",)),
        ("503 with error log", lambda t: order_lookup(t, 503, True), ()),
        ("retry storm of 6", lambda t: cart_pricing(t, 6), ("retry-storm",)),
        ("three retries", lambda t: cart_pricing(t, 3), ()),
        ("2.4 s report query", lambda t: sales_report(t, 2400), ("slow-db-query",)),
        ("0.6 s report query", lambda t: sales_report(t, 640), ()),
        # noise: ordinary traffic, including rules' near-misses that must stay quiet
        *[("product page", product_page, ()) for _ in range(8)],
        *[("search", search, ()) for _ in range(5)],
        *[("add to cart", add_to_cart, ()) for _ in range(5)],
        *[("login", login, ()) for _ in range(3)],
        ("order lookup", lambda t: order_lookup(t, 200, False), ()),
        ("order lookup", lambda t: order_lookup(t, 200, False), ()),
        ("checkout", lambda t: checkout(t, "cart_81844", True, ["pi_3QC9zzF"], 8.99), ()),
        ("liveness probe", lambda t: probe(t, "/healthz", 200), ()),
        ("readiness probe failing at shutdown", lambda t: probe(t, "/readyz", 503), ()),
        ("agent answers from the FAQ", agent_faq, ()),
        ("agent refund within its limit", lambda t: agent_refund(t, 35.0, False), ()),
        ("gdpr erasure on day 3", lambda t: gdpr_deletion(t, 3), ()),
        ("nightly vacuum", vacuum, ()),
        ("admin user listing", admin_listing, ()),
    ]


def encode_value(value: object) -> dict:
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}
    if isinstance(value, float):
        return {"doubleValue": value}
    if isinstance(value, (list, tuple)):
        return {"arrayValue": {"values": [encode_value(v) for v in value]}}
    return {"stringValue": str(value)}


def encode_span(span: dict) -> dict:
    out = {"traceId": span["traceId"], "spanId": span["spanId"]}
    if span["parentSpanId"]:
        out["parentSpanId"] = span["parentSpanId"]
    out.update({
        "flags": 257,  # sampled, with the parent's remote flag known
        "name": span["name"], "kind": span["kind"],
        "startTimeUnixNano": str(span["startTimeUnixNano"]),
        "endTimeUnixNano": str(span["endTimeUnixNano"]),
    })
    if span["attributes"]:
        out["attributes"] = [{"key": k, "value": encode_value(v)}
                             for k, v in span["attributes"].items()]
    if span["error"]:
        out["events"] = [{
            "timeUnixNano": str(span["endTimeUnixNano"] - 1000), "name": "exception",
            "attributes": [{"key": "exception.message", "value": {"stringValue": span["error"]}}]}]
    status = {"code": span["status"]} if span["status"] else {}
    if span["error"]:
        status["message"] = span["error"]
    out["status"] = status
    return out


def export_lines(spans: list[dict]) -> list[dict]:
    """Each service's SDK exports ended spans every second (its own phase) in batches of at most
    6; the collector merges the exports that reach it within the same 50ms into one request,
    which the file exporter writes as one line."""
    names = sorted(SERVICES)
    rng.shuffle(names)  # SDKs start at different moments: phases at least 58ms apart
    phase = {s: i * 1000 * MS // len(names) for i, s in enumerate(names)}
    exports: dict[tuple[int, str], list[dict]] = defaultdict(list)
    for span in sorted(spans, key=lambda s: s["endTimeUnixNano"]):
        p = phase[span["service"]]
        flush = (span["endTimeUnixNano"] - p) // (1000 * MS) * (1000 * MS) + 1000 * MS + p
        exports[(flush, span["service"])].append(span)
    requests: dict[int, list[tuple[str, list[dict]]]] = defaultdict(list)
    for (flush, service), batch in sorted(exports.items()):
        for i in range(0, len(batch), 6):
            delay = rng.randrange(0, 8) * MS + i // 6 * 5 * MS  # network, then queued batches
            requests[(flush + delay) // (50 * MS)].append((service, batch[i:i + 6]))
    lines = []
    for _, exports_ in sorted(requests.items()):
        resource_spans = []
        for service, batch in exports_:
            by_scope: dict[str, list[dict]] = defaultdict(list)
            for span in batch:
                by_scope[span["scope"]].append(span)
            resource_spans.append({
                "resource": {"attributes": [
                    {"key": "service.name", "value": {"stringValue": service}},
                    {"key": "service.version", "value": {"stringValue": SERVICES[service]}},
                    {"key": "deployment.environment.name", "value": {"stringValue": "production"}},
                    {"key": "telemetry.sdk.language", "value": {"stringValue": "python"}},
                ]},
                "scopeSpans": [
                    {"scope": {"name": scope, "version": "0.48b0" if scope.startswith(
                        "opentelemetry") else SERVICES[service]},
                     "spans": [encode_span(s) for s in members]}
                    for scope, members in by_scope.items()],
                "schemaUrl": "https://opentelemetry.io/schemas/1.26.0",
            })
        lines.append({"resourceSpans": resource_spans})
    return lines


def main() -> None:
    plan = scenarios()
    order = list(range(len(plan)))
    rng.shuffle(order)
    traces: list[Trace] = []
    expected: list[dict] = []
    for n, index in enumerate(order):
        label, build, violates = plan[index]
        burst = BURSTS[n % len(BURSTS)]
        start = int(burst.timestamp()) * 1_000_000_000 + rng.randrange(0, 6000) * MS
        trace = Trace(label, start)
        build(trace)
        traces.append(trace)
        expected += [{"rule_id": rule, "trace_id": trace.trace_id} for rule in violates]
    lines = export_lines([s for t in traces for s in t.spans])
    with OUT.open("w") as f:
        for line in lines:
            f.write(json.dumps(line, separators=(",", ":")) + "\n")
    expected.sort(key=lambda e: (e["rule_id"], e["trace_id"]))
    EXPECTED.write_text(json.dumps(expected, indent=2) + "\n")

    spread = defaultdict(set)
    for number, line in enumerate(lines):
        for rs in line["resourceSpans"]:
            for ss in rs["scopeSpans"]:
                for s in ss["spans"]:
                    spread[s["traceId"]].add(number)
    one_line = sum(1 for t in traces if len(t.spans) > 1 and len(spread[t.trace_id]) == 1)
    print(f"{OUT.name}: {len(lines)} lines, {sum(len(t.spans) for t in traces)} spans, "
          f"{len(traces)} traces ({len(expected)} violating, "
          f"{one_line} multi-span traces on one line)")
    print(f"{EXPECTED.name}: {len(expected)} expected signals")


if __name__ == "__main__":
    main()
