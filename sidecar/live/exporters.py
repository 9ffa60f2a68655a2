"""Emit: a violation becomes a signal in the log, a Prometheus count, and a `betrace.violation`
span inside the violating trace (so it shows up next to the trace in Tempo or Jaeger).

The violation span's parent is the triggering span (the latest offending one) and it links to
every offending span. It is exported through the OpenTelemetry SDK's OTLP gRPC exporter.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
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
from sidecar.live.metrics import Metrics
from sidecar.model.names import SCOPE, VIOLATION_SPAN
from sidecar.model.signal_writers import SignalWriter
from sidecar.model.signals import Signal
from sidecar.model.spans import Span
from sidecar.rules import Violation, span_order

log = logging.getLogger(__name__)


class _Counted(SpanExporter):
    """The OTLP exporter, reporting the violation spans it could not deliver: the batch
    processor exports in the background, so its failures never reach `ViolationSpans.write`."""

    def __init__(self, inner: SpanExporter, failed: Callable[[int], object]) -> None:
        self.inner, self.failed = inner, failed

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        result = self.inner.export(spans)
        if result is not SpanExportResult.SUCCESS:
            self.failed(len(spans))
            log.error("could not export %d violation span(s) over OTLP", len(spans))
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class ViolationSpans:
    """Writes `betrace.violation` spans into the violating traces over OTLP gRPC; `failed` is
    told how many spans each failed export lost (after the exporter's own retries)."""

    def __init__(self, endpoint: str, insecure: bool = True,
                 failed: Callable[[int], object] = lambda count: None,
                 timeout: float = 10.0) -> None:
        self.ids = _IntoTrace()
        self.provider = TracerProvider(
            resource=Resource.create({"service.name": "betrace",
                                      "service.version": __version__}),
            sampler=ALWAYS_ON, id_generator=self.ids)
        exporter = OTLPSpanExporter(endpoint=endpoint, insecure=insecure, timeout=timeout)
        self.provider.add_span_processor(BatchSpanProcessor(
            _Counted(exporter, failed), schedule_delay_millis=500))
        self.tracer = self.provider.get_tracer(SCOPE, __version__)

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


class Emitter:
    """Sends every signal to every output; a failing output is counted and logged, and never
    stops the others."""

    def __init__(self, metrics: Metrics, log_writer: SignalWriter | None = None,
                 violation_spans: ViolationSpans | None = None, mode: str = "live") -> None:
        self.metrics = metrics
        self.log_writer = log_writer
        self.violation_spans = violation_spans
        self.mode = mode
        self._lock = threading.Lock()  # one writer at a time keeps JSON lines whole

    def emit(self, violation: Violation) -> Signal:
        signal = violation.signal(self.mode, time.time_ns())
        self.metrics.violations.labels(rule=signal.rule_id, severity=signal.severity).inc()
        log.info("violation %s trace=%s severity=%s", signal.rule_id, signal.trace_id,
                 signal.severity)
        with self._lock:
            if self.log_writer is not None:
                try:
                    self.log_writer.write(signal)
                except OSError as exc:
                    self.metrics.export_failures.labels(sink="log").inc()
                    log.error("cannot write signal log: %s", exc)
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
        if self.log_writer is not None:
            self.log_writer.close()


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
