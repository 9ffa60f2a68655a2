"""Assemble and decide: spans go into the store; traces come out when due and are evaluated.

Every request's spans meet every rule as they arrive, grouped by trace. Rules whose violation
can only become true as spans arrive (monotone: no `not`, no `always`, no upper bound on a count)
signal from there, within milliseconds; so do they on traces that grew, read back whole. Every
rule holds when the trace is decided. The store's `reserve_signals` lets each (rule, trace)
signal once.

A trace whose every span came in one request (the common case behind a batching collector) and
on which no rule fires is decided on arrival: the store keeps its spans for whatever comes later
but sets it no deadline, so it is neither claimed, read back nor evaluated again. A span that
arrives later opens it again and it is decided whole, as any other trace.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping

from sidecar.live.exporters import Emitter
from sidecar.live.metrics import Metrics
from sidecar.model.spans import Span, Trace
from sidecar.rules import Rule, RuleSet, Violation
from sidecar.stores.trace_store import AppendResult, Claimed, TraceStore

log = logging.getLogger(__name__)
_CLAIMS = 1000  # traces claimed per round


class Assembler:
    def __init__(self, store: TraceStore, ruleset: RuleSet, emitter: Emitter, metrics: Metrics,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.emitter = emitter
        self.metrics = metrics
        self.clock = clock  # wall clock: a shared store compares times across processes
        self._dirty: set[str] = set()  # traces that grew: read back for monotone rules
        self._found: list[Violation] = []  # monotone violations found on arrival, to signal
        self._wake = threading.Condition()
        self.set_rules(ruleset)

    def set_rules(self, ruleset: RuleSet) -> None:
        """Swap the rule set; evaluations already running finish with the old one."""
        refs = ruleset.refs
        self.store.use_vocabulary(sorted(
            refs.names | refs.attributes | {key for rule in ruleset.rules for key in rule.context}))
        self.projection = ruleset.projection()
        self.ruleset = ruleset
        self.monotone = tuple(r for r in ruleset.rules if r.logic.monotone)

    def ingest(self, batch: Mapping[str, list[Span]]) -> AppendResult:
        """Judge one request's spans by trace, then add them (raises what the store raises,
        e.g. when Redis is down: nothing found is signalled then, the sender retries)."""
        rules = self.ruleset.rules  # one rule set for the whole request
        found: list[Violation] = []
        clean: set[str] = set()
        observe = self.metrics.rule_evaluation.observe
        for trace_id, spans in batch.items():
            started = time.perf_counter()
            violations = self._evaluate(Trace(trace_id, spans), rules)
            observe(time.perf_counter() - started)
            if violations:  # the monotone ones signal now, the others at the decision
                found += [v for v in violations if v.rule.logic.monotone]
            else:
                clean.add(trace_id)
        result = self.store.append(batch, self.clock(), clean)
        metrics = self.metrics
        if result.late:
            metrics.late_spans.inc(result.late)
        if result.rejected:
            metrics.spans_rejected.labels(reason="max_spans_per_trace").inc(result.rejected)
            log.warning("refused %d span(s): trace over max_spans_per_trace", result.rejected)
        if result.evicted:
            log.warning("max_traces reached: %d open trace(s) decided early", result.evicted)
        if result.decided_on_arrival:
            metrics.traces_decided.labels(reason="arrival").inc(result.decided_on_arrival)
        # What was found holds for traces stored as they came; the others (there before, some
        # spans refused, or stored altered) are read back whole for the monotone rules.
        created = result.created
        found = [v for v in found if v.trace.trace_id in created]
        grew = [t for t in result.touched if t not in created] if self.monotone else []
        if found or grew:  # (evicted traces wait for the next claim round, like due ones)
            with self._wake:
                self._found += found
                self._dirty.update(grew)
                self._wake.notify()
        return result

    def step(self) -> int:
        """Signal what arrivals found, then decide the traces that are due. Returns how many
        traces were decided."""
        self._signal_arrivals()
        return self._decide_due()

    def run(self, stop: threading.Event, idle: float = 0.25, tick: float = 0.05) -> None:
        """Decide traces until `stop` is set. What arrivals found is signalled at once; due
        traces are claimed in rounds at least `tick` apart, so deadlines falling a few ms apart
        cost one round (a claim is several round trips to a shared store), and at most `idle`
        apart, to see deadlines other sidecars set. Rounds are timed on the monotonic clock:
        a wall clock stepped back must not hold them up."""
        next_round = 0.0
        while not stop.is_set():
            try:
                self._signal_arrivals()
                if time.monotonic() >= next_round:
                    delay = 0.0  # a full round: there may be more due at once
                    if self._decide_due() < _CLAIMS:
                        due = self.store.next_due()
                        delay = idle if due is None else min(idle, max(tick, due - self.clock()))
                    next_round = time.monotonic() + delay
            except Exception as exc:  # e.g. the store is unreachable: count, keep going
                self.metrics.store_errors.labels(operation="decide").inc()
                log.error("deciding traces failed, retrying in 1s: %s", exc)
                stop.wait(1.0)
                continue
            with self._wake:
                if not self._dirty and not self._found and not stop.is_set():
                    self._wake.wait(max(0.0, next_round - time.monotonic()))

    def _signal_arrivals(self) -> None:
        """Signal the monotone violations arrivals found, and those of traces that grew (read
        back whole: a rule may need spans from several requests)."""
        with self._wake:
            dirty, self._dirty = self._dirty, set()
            found, self._found = self._found, []
        monotone = self.monotone
        if dirty and monotone:
            for violations in self.store.with_traces(list(dirty),
                                                     lambda t: self._evaluate(t, monotone)):
                found += violations
        self._emit(found)

    def _decide_due(self) -> int:
        now = self.clock()
        claimed = self.store.claim_due(now, _CLAIMS)
        self._decide_all(claimed, now)
        return len(claimed)

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
        found: list[Violation] = []
        rules = self.ruleset.rules  # one rule set for the whole batch
        latency, evaluation = self.metrics.decision_latency, self.metrics.rule_evaluation
        for reason, count in Counter(item.reason for item in claimed).items():
            self.metrics.traces_decided.labels(reason=reason).inc(count)
        for item in claimed:
            latency.observe(max(0.0, now - item.due_at))
            started = time.perf_counter()
            found += self._evaluate(item.trace, rules)
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

