"""Assemble and decide: spans go into the store; traces come out when due and are evaluated.

Two paths lead to a signal. Rules whose violation can only become true as spans arrive
(monotone: no `not`, no `always`, no upper bound on a count) are evaluated on every trace that
just received spans, so they signal within milliseconds (a trace whose every span came in one
request is evaluated from that request, not read back from the store). Every rule is evaluated
when the trace is decided. The store's `reserve_signals` lets each (rule, trace) signal once.
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
_QUIET_TRACES = 200_000  # remembered quiet fresh traces (about 100 bytes each)


class _Active:
    """A rule set with what the decider keeps about it, swapped as one on a reload."""

    def __init__(self, ruleset: RuleSet) -> None:
        self.ruleset = ruleset
        self.monotone = tuple(r for r in ruleset.rules if r.logic.monotone)
        self.others = tuple(r for r in ruleset.rules if not r.logic.monotone)
        # Fresh traces whose monotone rules found nothing, with their span count then: decided
        # with no span added since, those rules cannot fire, and only the others run.
        self.quiet: OrderedDict[str, int] = OrderedDict()


class Assembler:
    def __init__(self, store: TraceStore, ruleset: RuleSet, emitter: Emitter, metrics: Metrics,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.emitter = emitter
        self.metrics = metrics
        self.clock = clock  # wall clock: a shared store compares times across processes
        self._dirty: set[str] = set()  # traces that grew: read back for monotone rules
        self._fresh: dict[str, list[Span]] = {}  # traces whose every span came in one request
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
        monotone = self.active.monotone
        if monotone and result.touched or result.evicted:
            with self._wake:
                if monotone:
                    new = set(result.new)
                    for trace_id in result.touched:
                        if trace_id in new and trace_id not in self._dirty:
                            self._fresh[trace_id] = batch[trace_id]
                        else:
                            self._fresh.pop(trace_id, None)
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
        monotone = active.monotone
        found: list[Violation] = []
        quiet = []
        for trace_id, spans in fresh.items():  # the request held the whole trace: no read-back
            violations = self._evaluate(Trace(trace_id, spans), monotone)
            if violations:
                found += violations
            else:
                quiet.append((trace_id, len(spans)))
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
        claimed = self.store.claim_due(now)
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
        claimed = self.store.claim_all(now)
        self._decide_all(claimed, now, self.active)
        return len(claimed)

    def _decide_all(self, claimed: list[Claimed], now: float, active: _Active) -> None:
        """Evaluate every claimed trace, emit, then tell the store they are decided (in one
        batch: with Redis, one round trip)."""
        found: list[Violation] = []
        quiet, everything = active.quiet, active.ruleset.rules
        for reason, count in Counter(item.reason for item in claimed).items():
            self.metrics.traces_decided.labels(reason=reason).inc(count)
        for item in claimed:
            self.metrics.decision_latency.observe(max(0.0, now - item.due_at))
            started = time.perf_counter()
            unchanged = quiet.pop(item.trace.trace_id, None) == len(item.trace.spans)
            found += self._evaluate(item.trace, active.others if unchanged else everything)
            self.metrics.rule_evaluation.observe(time.perf_counter() - started)
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

