"""Emit: a violation becomes a signal in the log, a Prometheus count, and a `betrace.violation`
span inside the violating trace (so it shows up next to the trace in Tempo or Jaeger).

The violation span's parent is the triggering span (the latest offending one) and it links to
every offending span. It is exported through the OpenTelemetry SDK's OTLP gRPC exporter.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    TraceFlags,
    set_span_in_context,
)

from sidecar import __version__
from sidecar.live.credentials import CredentialError
from sidecar.live.metrics import Metrics
from sidecar.model.names import SCOPE, VIOLATION_SPAN
from sidecar.model.signal_writers import SignalWriter
from sidecar.model.signals import MAX_VALUE_BYTES, Signal
from sidecar.model.spans import Span
from sidecar.routing.dispatcher import Dispatcher
from sidecar.rules import Violation, span_order

log = logging.getLogger(__name__)


class _Outbox(SpanProcessor):
    """Violation spans on their way out: a bounded queue, exported in batches by one thread.
    The SDK's BatchSpanProcessor drops spans from its full queue with one log line and no count
    (7,440 of 10,000 went uncounted with the collector down); here every span is delivered, or
    counted in `lost`: queue full, export failed after the exporter's retries, or still queued
    when the sidecar stops."""

    def __init__(self, exporter: SpanExporter, lost: Callable[[int], object],
                 max_queue: int = 2048, batch: int = 512, delay: float = 0.5) -> None:
        self.exporter, self.lost, self.batch, self.delay = exporter, lost, batch, delay
        self.queue: queue.Queue[ReadableSpan] = queue.Queue(max_queue)
        self._stopping = threading.Event()
        self._idle = threading.Event()  # nothing queued and nothing being exported
        self._idle.set()
        self._full_logged = 0.0
        self.failing: str | None = None  # why the latest export failed; None once one succeeds
        self._thread = threading.Thread(target=self._run, name="violation-spans", daemon=True)
        self._thread.start()

    def on_end(self, span: ReadableSpan) -> None:
        self._idle.clear()
        try:
            self.queue.put_nowait(span)
        except queue.Full:
            self.lost(1)
            now = time.monotonic()
            if now - self._full_logged > 10:
                self._full_logged = now
                log.error("violation span export queue full (%d): spans are dropped and counted "
                          "in betrace_signal_export_failures_total{sink=\"otlp\"}",
                          self.queue.maxsize)

    def _run(self) -> None:
        while not (self._stopping.is_set() and self.queue.empty()):
            try:
                spans = [self.queue.get(timeout=self.delay)]
            except queue.Empty:
                self._idle.set()
                continue
            while len(spans) < self.batch:
                try:
                    spans.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            self._export(spans)
            if self.queue.empty():
                self._idle.set()

    def _export(self, spans: list[ReadableSpan]) -> None:
        try:
            result = self.exporter.export(spans)
        except Exception:  # noqa: BLE001 - counted as lost like any failed export
            log.exception("violation span export raised")
            result = SpanExportResult.FAILURE
        if result is SpanExportResult.SUCCESS:
            self.failing = None
            return
        self.lost(len(spans))
        self.failing = f"the latest export of {len(spans)} span(s) failed"
        log.error("could not export %d violation span(s) over OTLP", len(spans))

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._idle.wait(timeout_millis / 1000)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Export what is queued (for at most `timeout`); what is left then is counted lost."""
        self._stopping.set()
        self._thread.join(timeout)
        left = 0
        while True:
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break
            left += 1
        if left:
            self.lost(left)
            log.error("%d violation span(s) still queued at shutdown were not exported", left)
        self.exporter.shutdown()


class ViolationSpans:
    """Writes `betrace.violation` spans into the violating traces over OTLP gRPC; `failed` is
    told of every span lost (see `_Outbox`)."""

    def __init__(self, endpoint: str, failed: Callable[[int], object] = lambda count: None,
                 timeout: float = 10.0, ca: str = "",
                 headers: dict[str, str] | None = None) -> None:
        self.endpoint = endpoint
        self.ids = _IntoTrace()
        self.provider = TracerProvider(
            resource=Resource.create({"service.name": "betrace",
                                      "service.version": __version__}),
            sampler=ALWAYS_ON, id_generator=self.ids)
        exporter = OTLPSpanExporter(endpoint=endpoint, timeout=timeout, headers=headers or None,
                                    **_channel(endpoint, ca))
        self.outbox = _Outbox(exporter, failed)
        self.provider.add_span_processor(self.outbox)
        self.tracer = self.provider.get_tracer(SCOPE, __version__)

    def backlog(self) -> int:
        """Violation spans queued for export."""
        return self.outbox.queue.qsize()

    def healthy(self) -> tuple[bool, str]:
        """False while exports fail (after the exporter's own retries), until one succeeds."""
        failing = self.outbox.failing
        if failing is None:
            return True, "violation span export ok"
        return False, f"violation span export to {self.endpoint} failing ({failing}; " \
                      f"{self.backlog()} queued)"

    def write(self, violation: Violation, signal: Signal) -> None:
        """Callers write one span at a time (the Emitter's lock): see `_IntoTrace`."""
        spans = sorted(violation.spans, key=span_order)
        trigger = spans[-1] if spans else _root(violation.trace.spans)
        if trigger is not None:
            parent = set_span_in_context(NonRecordingSpan(_context(trigger)))
        else:  # a trace known by its id alone: the violation span is its root
            parent = Context()
            self.ids.trace_id = int(violation.trace.trace_id, 16)
        attributes: dict[str, Any] = {
            "betrace.rule.id": signal.rule_id,
            "betrace.rule.name": signal.rule_name,
            "betrace.severity": signal.severity,
            "betrace.mode": signal.mode,
            "betrace.signal.id": signal.signal_id,
            "betrace.message": signal.message,
        }
        for key, value in signal.context.items():
            if value is not None:
                attributes[f"betrace.context.{key}"] = _attribute(value)
        span = self.tracer.start_span(
            VIOLATION_SPAN, context=parent, kind=SpanKind.INTERNAL, attributes=attributes,
            links=[Link(_context(s)) for s in spans])
        span.end()

    def close(self) -> None:
        self.provider.force_flush(timeout_millis=5000)
        self.provider.shutdown()


def _channel(endpoint: str, ca: str) -> dict[str, Any]:
    """TLS for an `https://` endpoint or one given a CA (verified against the CA, else the
    system's roots); plain text otherwise, as for the collector in the same pod."""
    if not (ca or endpoint.startswith("https://")):
        return {"insecure": True}
    try:
        roots = Path(ca).read_bytes() if ca else None
    except OSError as exc:
        raise CredentialError(f"cannot read the export CA {ca}: {exc.strerror or exc}") \
            from None
    return {"insecure": False, "credentials": grpc.ssl_channel_credentials(roots)}


class SignalBudget:
    """Per rule, a token bucket: `rate` signals a second, up to `10 * rate` at once. Beyond it a
    rule's signals are counted, and summarised in one log line every `every` seconds, instead of
    written one by one: one noisy rule cannot fill the sinks' queues (or the log's disk) for the
    others. Its violations are still counted in betrace_violations_total."""

    def __init__(self, rate: float, every: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.every, self.clock = rate, 10 * rate, every, clock
        self._tokens: dict[str, tuple[float, float]] = {}  # rule: (tokens, when)
        self._over: dict[str, tuple[int, float]] = {}  # rule: (suppressed, since)

    def allow(self, rule_id: str) -> bool:
        now = self.clock()
        tokens, when = self._tokens.get(rule_id, (self.burst, now))
        tokens = min(self.burst, tokens + (now - when) * self.rate)
        allowed = tokens >= 1
        self._tokens[rule_id] = (tokens - 1 if allowed else tokens, now)
        suppressed, since = self._over.get(rule_id, (0, now))
        if not allowed:
            suppressed += 1
        if suppressed and now - since >= self.every:
            log.warning("rule %s is over its signal budget (%g/s): %d signal(s) in the last "
                        "%.0fs were counted, not written", rule_id, self.rate, suppressed,
                        now - since)
            suppressed, since = 0, now
        self._over[rule_id] = (suppressed, since)
        return allowed


class Emitter:
    """Sends every signal to every output; a failing output is counted and logged, and never
    stops the others."""

    def __init__(self, metrics: Metrics, log_writer: SignalWriter | None = None,
                 violation_spans: ViolationSpans | None = None, mode: str = "live",
                 value_limit: int = MAX_VALUE_BYTES, budget: SignalBudget | None = None,
                 queued: Sequence[Dispatcher] = ()) -> None:
        self.metrics = metrics
        self.queued = queued  # the signal database, Alertmanager, webhooks
        self.value_limit = value_limit
        self.budget = budget
        self.log_writer = log_writer
        self.violation_spans = violation_spans
        self.mode = mode
        self._lock = threading.Lock()  # one writer at a time keeps JSON lines whole

    def emit(self, violation: Violation) -> Signal:
        signal = violation.signal(self.mode, time.time_ns(), self.value_limit)
        self.metrics.violations.labels(rule=signal.rule_id, severity=signal.severity).inc()
        with self._lock:
            if self.budget is not None and not self.budget.allow(signal.rule_id):
                self.metrics.signals_suppressed.labels(rule=signal.rule_id).inc()
                return signal
            # (debug: the signal log and the violation span are the record; a log line per
            # signal at info cost the sidecar 7% of its CPU on a busy stream)
            log.debug("violation %s trace=%s severity=%s", signal.rule_id, signal.trace_id,
                      signal.severity)
            if self.log_writer is not None:
                try:
                    self.log_writer.write(signal)
                except OSError as exc:
                    self.metrics.export_failures.labels(sink="log").inc()
                    log.error("cannot write signal log: %s", exc)
            for sink in self.queued:
                sink.submit(signal)  # (never waits; drops are counted)
            if self.violation_spans is not None:
                try:
                    self.violation_spans.write(violation, signal)
                except Exception as exc:  # the SDK must not take the sidecar down
                    self.metrics.export_failures.labels(sink="otlp").inc()
                    log.error("cannot export violation span: %s", exc)
        return signal

    def close(self) -> None:
        if self.violation_spans is not None:
            self.violation_spans.close()
        for sink in self.queued:
            sink.close()
        if self.log_writer is not None:
            try:
                self.log_writer.close()
            except OSError as exc:  # stdout closed or full: nothing left to tell it
                log.error("cannot flush the signal log: %s", exc)


def _context(span: Span) -> SpanContext:
    return SpanContext(int(span.trace_id, 16), int(span.span_id, 16), is_remote=True,
                       trace_flags=TraceFlags(TraceFlags.SAMPLED))


def _root(spans: list[Span]) -> Span | None:
    roots = [s for s in spans if not s.parent_span_id]
    return min(roots or spans, key=lambda s: s.start_ns) if spans else None


class _IntoTrace(RandomIdGenerator):
    """Span ids at random; the trace id of a root span is the one set just before (once): a
    violation span without a parent must still land in the violating trace."""

    trace_id: int | None = None

    def generate_trace_id(self) -> int:
        trace_id, self.trace_id = self.trace_id, None
        return trace_id if trace_id is not None else super().generate_trace_id()


def _attribute(value: Any) -> Any:
    """OTel attributes are scalars or homogeneous lists of scalars; anything else as text."""
    if isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, list) and value and all(type(v) is type(value[0]) for v in value) \
            and isinstance(value[0], (str, bool, int, float)):
        return value
    return str(value)
