"""Assemble and decide: spans go into the store; traces come out when due and are evaluated.

Two paths lead to a signal. Rules whose violation can only become true as spans arrive
(monotone: no `not`, no `always`, no upper bound on a count) are evaluated on every trace that
just received spans, so they signal within milliseconds. Every rule is evaluated when the trace
is decided. The store's `signal_once` makes sure each (rule, trace) signals at most once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping

from sidecar.emit import Emitter
from sidecar.metrics import Metrics
from sidecar.rules import Rule, RuleSet, Violation
from sidecar.span import Span, Trace
from sidecar.store import AppendResult, Claimed, TraceStore

log = logging.getLogger("betrace")


class Assembler:
    def __init__(self, store: TraceStore, ruleset: RuleSet, emitter: Emitter, metrics: Metrics,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.emitter = emitter
        self.metrics = metrics
        self.clock = clock  # wall clock: a shared store compares times across processes
        self._dirty: set[str] = set()
        self._wake = threading.Condition()
        self.set_rules(ruleset)

    def set_rules(self, ruleset: RuleSet) -> None:
        """Swap the rule set; evaluations already running finish with the old one."""
        self.ruleset = ruleset
        self.projection = ruleset.projection()
        self._monotone: tuple[Rule, ...] = tuple(r for r in ruleset.rules if r.logic.monotone)

    def ingest(self, batch: Mapping[str, list[Span]]) -> AppendResult:
        """Add one request's spans (raises what the store raises, e.g. when Redis is down)."""
        result = self.store.append(batch, self.clock())
        if result.late:
            self.metrics.late_spans.inc(result.late)
        if result.rejected:
            self.metrics.spans_rejected.labels(reason="max_spans_per_trace").inc(result.rejected)
            log.warning("refused %d span(s): trace over max_spans_per_trace", result.rejected)
        if result.evicted:
            log.warning("max_traces reached: %d open trace(s) decided early", result.evicted)
        if self._monotone and result.touched or result.evicted:
            with self._wake:
                self._dirty.update(result.touched if self._monotone else ())
                self._wake.notify()
        return result

    def step(self) -> int:
        """Evaluate traces that just grew (monotone rules) and decide traces that are due.
        Returns how many traces were decided."""
        with self._wake:
            dirty, self._dirty = self._dirty, set()
        monotone = self._monotone
        if dirty and monotone:
            for found in self.store.with_traces(list(dirty),
                                                lambda t: self._evaluate(t, monotone)):
                self._emit(found)
        now = self.clock()
        claimed = self.store.claim_due(now)
        self._decide_all(claimed, now)
        return len(claimed)

    def run(self, stop: threading.Event, idle: float = 0.25) -> None:
        """Decide traces until `stop` is set; sleep until the next deadline or new spans."""
        while not stop.is_set():
            try:
                self.step()
                due = self.store.next_due()
            except Exception as exc:  # e.g. the store is unreachable: count, keep going
                self.metrics.store_errors.labels(operation="decide").inc()
                log.error("deciding traces failed, retrying in 1s: %s", exc)
                stop.wait(1.0)
                continue
            timeout = idle if due is None else min(idle, max(0.0, due - self.clock()))
            with self._wake:
                if not self._dirty and not stop.is_set():
                    self._wake.wait(timeout)

    def wake(self) -> None:
        with self._wake:
            self._wake.notify_all()

    def drain(self) -> int:
        """Decide every open trace now (shutdown). Returns how many were decided."""
        self.step()
        now = self.clock()
        claimed = self.store.claim_all(now)
        self._decide_all(claimed, now)
        return len(claimed)

    def _decide_all(self, claimed: list[Claimed], now: float) -> None:
        """Evaluate every claimed trace, emit, then tell the store they are decided (in one
        batch: with Redis, one round trip)."""
        for item in claimed:
            self.metrics.traces_decided.labels(reason=item.reason).inc()
            self.metrics.decision_latency.observe(max(0.0, now - item.due_at))
            started = time.perf_counter()
            found = self._evaluate(item.trace, self.ruleset.rules)
            self.metrics.rule_evaluation.observe(time.perf_counter() - started)
            self._emit(found)
        if claimed:
            self.store.finish(claimed)

    def _evaluate(self, trace: Trace, rules: tuple[Rule, ...]) -> list[Violation]:
        found = []
        for rule in rules:
            try:
                violation = rule.evaluate(trace)
            except Exception:  # a rule bug must not stop the other rules or the sidecar
                log.exception("rule %s failed on trace %s", rule.id, trace.trace_id)
                continue
            if violation is not None:
                found.append(violation)
        return found

    def _emit(self, violations: list[Violation]) -> None:
        for violation in violations:
            rule_id, trace_id = violation.rule.id, violation.trace.trace_id
            if self.store.signal_once(rule_id, trace_id):
                self.emitter.emit(violation)
                self.store.signal_sent(rule_id, trace_id)
