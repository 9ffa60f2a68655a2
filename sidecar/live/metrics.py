"""Prometheus metrics, in a registry the sidecar owns (tests build their own).

Labels are bounded: rule ids, severities and fixed reasons, never a trace id. Gauges that mirror
live state (traces and spans buffered) are read from the store at scrape time.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Callable, Iterable

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from sidecar.live.credentials import BearerToken
from sidecar.live.http_server import HTTP_TIMEOUT, HttpServer

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_EVAL_BUCKETS = (1e-6, 5e-6, 1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        disable_created_metrics()  # `_created` series double the scrape for nothing alerts use
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.violations = Counter("betrace_violations", "Signals emitted, by rule.",
                                  ["rule", "severity"], registry=r)
        self.spans_received = Counter(
            "betrace_spans_received", "Spans received over OTLP, counted once taken (a request "
            "refused as unavailable is retried, and counted then).", ["transport"], registry=r)
        self.spans_dropped = Counter(
            "betrace_spans_dropped", "Spans dropped on purpose: no rule selects them, or they "
            "are BeTrace's own violation spans.", ["reason"], registry=r)
        self.spans_rejected = Counter(
            "betrace_spans_rejected", "Spans refused (reported to the sender as partial "
            "success): invalid, over max_spans_per_trace, or over max_trace_bytes.", ["reason"],
            registry=r)
        self.requests_rejected = Counter(
            "betrace_export_requests_rejected", "Export requests refused whole.",
            ["transport", "reason"], registry=r)
        self.late_spans = Counter("betrace_late_spans",
                                  "Spans that arrived after their trace was decided.",
                                  registry=r)
        self.traces_decided = Counter(
            "betrace_traces_decided", "Traces decided, by why: idle (decision_wait), max_age, "
            "evicted (max_traces), shutdown, arrival (whole in one request, no rule fired).",
            ["reason"], registry=r)
        self.traces_dropped = Counter(
            "betrace_traces_dropped", "Traces dropped before their decision, never signalled: "
            "max_trace_ids (traces known only by id, held for rules that fire without their "
            "spans).", ["reason"], registry=r)
        self.decision_latency = Histogram(
            "betrace_decision_latency_seconds", "Delay from a trace falling due to its decision.",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.rule_evaluation = Histogram(
            "betrace_rule_evaluation_seconds", "Time to evaluate the rule set on one trace.",
            buckets=_EVAL_BUCKETS, registry=r)
        self.rule_errors = Counter(
            "betrace_rule_errors", "Rule evaluations that raised (the trace id is logged; every "
            "other rule still ran on the trace).", ["rule"], registry=r)
        self.rules_loaded = Gauge("betrace_rules_loaded", "Enabled rules in the active set.",
                                  registry=r)
        self.rules_info = Gauge("betrace_rules_info", "The active rule set's digest (sha256).",
                                ["digest"], registry=r)
        self.reloads = Counter("betrace_rule_reloads", "Successful rule reloads.", registry=r)
        self.reload_failures = Counter(
            "betrace_rule_reload_failures", "Rule reloads refused; the last good rules stay.",
            registry=r)
        self.rules_current = Gauge(
            "betrace_rules_current", "1 while the rules on disk are the ones running; 0 from a "
            "refused reload until a good one (an alert on it clears only once the file is fixed).",
            registry=r)
        self.rules_current.set(1)
        self.reload_last_success = Gauge(
            "betrace_rule_reload_last_success_timestamp_seconds", "When the rules on disk were "
            "last read without error (start-up included), in Unix seconds.", registry=r)
        self.reload_last_success.set_to_current_time()
        self.reload_last_check = Gauge(
            "betrace_rule_reload_last_check_timestamp_seconds", "When the reload thread last "
            "looked at the rule files, in Unix seconds: the watchdog (old: the thread is stuck).",
            registry=r)
        self.reload_last_check.set_to_current_time()
        self.store_errors = Counter("betrace_store_errors", "Failed trace-store operations.",
                                    ["operation"], registry=r)
        self.export_failures = Counter("betrace_signal_export_failures",
                                       "Violation spans or log lines that could not be written.",
                                       ["sink"], registry=r)
        self.signals_suppressed = Counter(
            "betrace_signals_suppressed", "Signals over their rule's --signal-budget: counted "
            "(and summarised in the log), not written to any sink.", ["rule"], registry=r)
        self.credential_reload_failures = Counter(
            "betrace_credential_reload_failures", "Rotated TLS certificates or bearer tokens "
            "that could not be loaded (the last good one is kept).", registry=r)
        self.signals_delivered = Counter(
            "betrace_signals_delivered", "Signals delivered to a queued sink: signal_db (one "
            "row per signal_id: a signal found again updates its row), alertmanager, webhook.",
            ["sink"], registry=r)
        self.signals_dropped = Counter(
            "betrace_signals_dropped", "Signals a queued sink never got: queue_full (while it "
            "was down), shutdown (still queued at exit), rejected (refused for good), error (a "
            "bug, logged).", ["sink", "reason"], registry=r)
        self.signal_delivery_errors = Counter(
            "betrace_signal_delivery_errors", "Failed attempts to deliver a batch of signals to "
            "a queued sink (each is retried with backoff).", ["sink"], registry=r)
        self.export_backlog = Gauge("betrace_signal_export_backlog",
                                    "Signals queued for a sink, not yet delivered.", ["sink"],
                                    registry=r)

    def set_rules(self, rules: Iterable[tuple[str, str]], digest: str) -> None:
        """Publish the active rule set: (rule id, severity) pairs and the files' digest. Each
        rule's violation series starts at 0, so an alert on increase() sees the first one."""
        rules = list(rules)
        for rule_id, severity in rules:
            self.violations.labels(rule=rule_id, severity=severity)
        self.rules_loaded.set(len(rules))
        self.rules_info.clear()
        self.rules_info.labels(digest=digest).set(1)

    def watch_store(self, counts: Callable[[], tuple[int, int]]) -> None:
        """Export the store's live sizes, read at scrape time."""
        self.registry.register(_StoreCollector(counts))


class _StoreCollector(Collector):
    def __init__(self, counts: Callable[[], tuple[int, int]]) -> None:
        self._counts = counts

    def collect(self):  # type: ignore[no-untyped-def]
        try:
            traces, spans = self._counts()
        except Exception:  # a store that cannot answer must not break /metrics
            return
        yield GaugeMetricFamily("betrace_traces_active", "Open traces awaiting a decision.",
                                value=traces)
        yield GaugeMetricFamily("betrace_spans_buffered", "Spans held in open traces.",
                                value=spans)


class MetricsServer:
    """`/metrics` for Prometheus, `/healthz` (the process runs) and, given `ready`, `/readyz`
    (rules loaded and the store reachable: what a Kubernetes readiness probe should gate on).
    The sidecar and the webhook both serve their registry with it. A scrape is built on a
    thread, off the event loop: a Redis-backed gauge may wait for Redis."""

    def __init__(self, registry: CollectorRegistry, address: tuple[str, int],
                 ready: Callable[[], tuple[bool, str]] | None = None,
                 timeout: float = HTTP_TIMEOUT, tls: ssl.SSLContext | None = None,
                 token: BearerToken | None = None) -> None:
        self.registry = registry
        self.ready = ready
        self.token = token  # asked of /metrics only: the kubelet's probes send none
        self.server = HttpServer(self._handle, address, "metrics-http", timeout, tls=tls)
        self.port = self.server.port

    async def _handle(self, request: web.BaseRequest) -> web.Response:
        path, ready = request.path, self.ready
        if request.method not in ("GET", "HEAD"):
            return _text(405, "only GET is served here\n", {"Allow": "GET, HEAD"})
        loop = asyncio.get_running_loop()
        if path == "/metrics":
            if self.token is not None and not self.token.allows(
                    request.headers.get("Authorization")):
                return _text(401, "a bearer token is required\n",
                             {"WWW-Authenticate": 'Bearer realm="metrics"'})
            body = await loop.run_in_executor(None, generate_latest, self.registry)
            return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
        if path == "/healthz":
            return _text(200, "ok\n")
        if path == "/readyz" and ready is not None:
            ok, reason = await loop.run_in_executor(None, ready)
            return _text(200 if ok else 503, f"{reason}\n")
        paths = "/metrics, /healthz or /readyz" if ready else "/metrics or /healthz"
        return _text(404, f"not found: try {paths}\n")

    def start(self) -> threading.Thread:
        return self.server.start()

    def close(self) -> None:
        self.server.close()


def _text(status: int, text: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=text.encode(),
                        headers={"Content-Type": "text/plain", **(headers or {})})
