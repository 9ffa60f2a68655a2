"""Replay: run a rule set over recorded traces and report every violation.

Spans of one trace may sit anywhere in the input (any line, any file), so all sources are read
and grouped by trace id before any trace is evaluated; each trace is then evaluated exactly once
and yields at most one signal per rule.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from sidecar.otlp_json import InputError, read_spans
from sidecar.rules import RuleSet
from sidecar.signal import Signal
from sidecar.span import Span, Trace


@dataclass
class RuleStats:
    """Per rule: traces it applied to, violations, and when the first and last happened."""

    applied: int = 0
    violations: int = 0
    first: str | None = None
    last: str | None = None

    @property
    def compliance(self) -> float:
        return 100.0 if not self.applied else 100.0 * (1 - self.violations / self.applied)


@dataclass
class ReplaySummary:
    sources: int = 0
    spans_read: int = 0
    traces: int = 0
    signals: int = 0
    seconds: float = 0.0
    errors: list[InputError] = field(default_factory=list)
    rules: dict[str, RuleStats] = field(default_factory=dict)

    def lines(self) -> list[str]:
        """The human summary printed to stderr."""
        out = [f"replayed {self.traces} traces ({self.spans_read} spans kept) from "
               f"{self.sources} source(s) in {self.seconds:.2f}s: {self.signals} signal(s)"]
        for rule_id, stats in self.rules.items():
            when = f", first {stats.first}, last {stats.last}" if stats.violations else ""
            out.append(f"  {rule_id}: {stats.violations} violation(s) in {stats.applied} "
                       f"applicable trace(s), {stats.compliance:.2f}% compliant{when}")
        if self.errors:
            out.append(f"  skipped {len(self.errors)} malformed input item(s)")
        return out


def replay(ruleset: RuleSet, sources: Sequence[str], emit: Callable[[Signal], None],
           on_error: Callable[[InputError], None] = lambda e: None) -> ReplaySummary:
    """Evaluate every trace in `sources` once; `emit` receives each signal as it is found.
    An unreadable source raises OSError before anything is evaluated."""
    started = time.perf_counter()
    summary = ReplaySummary(sources=len(sources))
    summary.rules = {rule.id: RuleStats() for rule in ruleset.rules}
    projection = ruleset.projection()
    traces: dict[str, list[Span]] = {}
    for source in sources:
        errors: list[InputError] = []
        for span in read_spans(source, projection, errors):
            bucket = traces.get(span.trace_id)
            if bucket is None:
                traces[span.trace_id] = [span]
            else:
                bucket.append(span)
            summary.spans_read += 1
        for error in errors:
            on_error(error)
        summary.errors.extend(errors)
    detected_ns = time.time_ns()
    for trace_id, spans in traces.items():
        trace = Trace(trace_id, spans)
        for rule in ruleset.rules:
            stats = summary.rules[rule.id]
            if rule.applies(trace):
                stats.applied += 1
            violation = rule.evaluate(trace)
            if violation is None:
                continue
            signal = Signal.from_violation(violation, "replay", detected_ns)
            stats.violations += 1
            when = signal.violation_time
            if when is not None:
                stats.first = when if stats.first is None else min(stats.first, when)
                stats.last = when if stats.last is None else max(stats.last, when)
            summary.signals += 1
            emit(signal)
    summary.traces = len(traces)
    summary.seconds = time.perf_counter() - started
    return summary
