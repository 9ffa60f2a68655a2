"""Assemble and decide: spans go into the store; traces come out when due and are evaluated.

Two paths lead to a signal. Rules whose violation can only become true as spans arrive
(monotone: no `not`, no `always`, no upper bound on a count) are evaluated on every trace that
just received spans, so they signal within milliseconds. Every rule holds when the trace is
decided. The store's `reserve_signals` lets each (rule, trace) signal once.

A trace whose every span came in one request (the common case behind a batching collector) is
evaluated by every rule straight from that request. When no rule fires, the trace's version is
kept: decided with nothing added since, it is neither read back from the store nor evaluated
again (with Redis, claiming it decides it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping

from sidecar.emit import Emitter
from sidecar.metrics import Metrics
from sidecar.rules import Rule, RuleSet, Violation
from sidecar.span import Span, Trace
from sidecar.store import AppendResult, Claimed, TraceStore

log = logging.getLogger("betrace")
_QUIET_TRACES = 200_000  # remembered quiet fresh traces (about 200 bytes each)


class _Active:
    """A rule set with what the decider keeps about it, swapped as one on a reload."""

    def __init__(self, ruleset: RuleSet) -> None:
        self.ruleset = ruleset
        self.monotone = tuple(r for r in ruleset.rules if r.logic.monotone)
        # Fresh traces on which no rule fired, with their version then: decided at that
        # version, they are quiet without another look.
        self.quiet: OrderedDict[str, object] = OrderedDict()


class Assembler:
    def __init__(self, store: TraceStore, ruleset: RuleSet, emitter: Emitter, metrics: Metrics,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.emitter = emitter
        self.metrics = metrics
        self.clock = clock  # wall clock: a shared store compares times across processes
        self._dirty: set[str] = set()  # traces that grew: read back for monotone rules
        # traces whose every span came in one request: those spans, and the trace's version
        self._fresh: dict[str, tuple[list[Span], object]] = {}
        self._wake = threading.Condition()
        self.set_rules(ruleset)

    def set_rules(self, ruleset: RuleSet) -> None:
        """Swap the rule set in one assignment; evaluations already running finish with the
        old one (and its memory of quiet traces, which the new rules have not seen)."""
        refs = ruleset.refs
        self.store.use_vocabulary(sorted(
            refs.names | refs.attributes | {key for rule in ruleset.rules for key in rule.context}))
        self.projection = ruleset.projection()
        self.active = _Active(ruleset)

    @property
    def ruleset(self) -> RuleSet:
        return self.active.ruleset

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
        if result.touched or result.evicted:
            monotone, new, fresh = self.active.monotone, result.new, self._fresh
            with self._wake:
                for trace_id in result.touched:
                    version = new.get(trace_id)
                    if version is not None and trace_id not in self._dirty:
                        fresh[trace_id] = (batch[trace_id], version)
                    else:
                        fresh.pop(trace_id, None)
                        if monotone:
                            self._dirty.add(trace_id)
                self._wake.notify()
        return result

    def step(self) -> int:
        """Evaluate traces that just grew (monotone rules) and decide traces that are due.
        Returns how many traces were decided."""
        with self._wake:
            dirty, self._dirty = self._dirty, set()
            fresh, self._fresh = self._fresh, {}
        active = self.active  # one rule set for the whole step, whatever a reload does meanwhile
        monotone, everything = active.monotone, active.ruleset.rules
        found: list[Violation] = []
        quiet = []
        observe = self.metrics.rule_evaluation.observe
        for trace_id, (spans, version) in fresh.items():  # the whole trace: no read-back
            started = time.perf_counter()
            violations = self._evaluate(Trace(trace_id, spans), everything)
            observe(time.perf_counter() - started)
            if violations:  # the monotone ones signal now, the others at the decision
                found += [v for v in violations if v.rule.logic.monotone]
            else:
                quiet.append((trace_id, version))
        if dirty and monotone:
            for violations in self.store.with_traces(list(dirty),
                                                     lambda t: self._evaluate(t, monotone)):
                found += violations
        self._emit(found)
        remembered = active.quiet
        remembered.update(quiet)
        while len(remembered) > _QUIET_TRACES:
            remembered.popitem(last=False)
        now = self.clock()
        claimed = self.store.claim_due(now, known=remembered.get)
        self._decide_all(claimed, now, active)
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
                if not self._dirty and not self._fresh and not stop.is_set():
                    self._wake.wait(timeout)

    def wake(self) -> None:
        with self._wake:
            self._wake.notify_all()

    def drain(self) -> int:
        """Decide every open trace now (shutdown). Returns how many were decided."""
        self.step()
        now = self.clock()
        active = self.active
        claimed = self.store.claim_all(now, known=active.quiet.get)
        self._decide_all(claimed, now, active)
        return len(claimed)

    def _decide_all(self, claimed: list[Claimed], now: float, active: _Active) -> None:
        """Evaluate every claimed trace that is not quiet already, emit, then tell the store
        they are decided (in one batch: with Redis, one round trip)."""
        found: list[Violation] = []
        quiet, everything = active.quiet, active.ruleset.rules
        latency, evaluation = self.metrics.decision_latency, self.metrics.rule_evaluation
        for reason, count in Counter(item.reason for item in claimed).items():
            self.metrics.traces_decided.labels(reason=reason).inc(count)
        for item in claimed:
            latency.observe(max(0.0, now - item.due_at))
            quiet.pop(item.trace_id, None)
            if item.trace is None:  # quiet at the version this decider saw: nothing to do
                continue
            started = time.perf_counter()
            found += self._evaluate(item.trace, everything)
            evaluation.observe(time.perf_counter() - started)
        self._emit(found)
        if claimed:
            self.store.finish(claimed)

    def _evaluate(self, trace: Trace, rules: tuple[Rule, ...]) -> list[Violation]:
        trace = trace.without_repeats()
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
        """Send the violations the store lets this caller send (one store call for all)."""
        if not violations:
            return
        pairs = [(v.rule.id, v.trace.trace_id) for v in violations]
        sent = []
        for violation, pair, mine in zip(violations, pairs, self.store.reserve_signals(pairs)):
            if mine:
                self.emitter.emit(violation)
                sent.append(pair)
        if sent:
            self.store.signals_sent(sent)

