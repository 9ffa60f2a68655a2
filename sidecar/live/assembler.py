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
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from sidecar.live.exporters import Emitter
from sidecar.live.metrics import Metrics
from sidecar.model.errors import StoreUnavailable
from sidecar.model.spans import Projection, Span, Trace
from sidecar.otlp.decoded import SpanFilter
from sidecar.otlp.protobuf import ProtobufDecoder
from sidecar.rules import Rule, RuleSet, Violation, evaluate
from sidecar.stores import AppendResult, Claimed, TraceStore

log = logging.getLogger(__name__)
_CLAIMS = 1000  # traces claimed per round
# Violations found on arrival, and traces that grew, waiting to be signalled early: beyond this
# many, more wait for their trace's decision instead (which finds them again: the rules are
# monotone), so a decider busy with a flood of signals holds no growing queue of traces.
EARLY_BACKLOG = 10_000
_FAILURE_LOG_SECONDS = 10.0  # a failing rule is logged at most this often


@dataclass(frozen=True)
class ActiveRules:
    """The rules in force and the projection they need, swapped together: a request is decoded
    with the projection of the rules that judge it."""

    ruleset: RuleSet
    keep: SpanFilter  # the rules' projection, as the decoders take it
    decoder: ProtobufDecoder
    monotone: tuple[Rule, ...]  # the rules that may signal as soon as they match

    @classmethod
    def of(cls, ruleset: RuleSet) -> ActiveRules:
        keep = SpanFilter(ruleset.projection())
        return cls(ruleset, keep, ProtobufDecoder(keep),
                   tuple(r for r in ruleset.rules if r.logic.monotone))

    @property
    def projection(self) -> Projection:
        return self.keep.projection

    def keeps_all_read_by(self, rule: Rule) -> bool:
        """Whether spans decoded with this projection hold every span and attribute `rule`
        reads: if not, `rule` cannot judge them (a pruned attribute would read as missing)."""
        kept = self.ruleset.refs.selectors
        if rule.logic.refs.structure and not self.ruleset.refs.structure:
            return False  # spans between a span and its descendants were pruned away
        for selector, glob, attributes in rule.logic.refs.selectors:
            if glob:
                if not any(s == selector and g and attributes <= a for s, g, a in kept):
                    return False
            elif not self.projection.wants_name(selector):
                return False
            else:
                keep = self.projection.attributes_for(selector)
                if keep is not None and not attributes <= keep:
                    return False
        return True


class Assembler:
    def __init__(self, store: TraceStore, ruleset: RuleSet, emitter: Emitter, metrics: Metrics,
                 clock: Callable[[], float] = time.time, horizon: float = 3600.0,
                 early_backlog: int = EARLY_BACKLOG) -> None:
        self.store = store
        self.early_backlog = early_backlog
        self.emitter = emitter
        self.metrics = metrics
        self.clock = clock  # wall clock: a shared store compares times across processes
        self._dirty: set[str] = set()  # traces that grew: read back for monotone rules
        self._found: list[Violation] = []  # monotone violations found on arrival, to signal
        self._wake = threading.Condition()
        self._failures_logged: dict[str, float] = {}  # rule id -> when last logged
        self.horizon = horizon  # how long a trace can stay stored
        # One assignment swaps all three: the active rules; the rule sets they replaced within
        # the horizon, each with when it was replaced (spans stored then were pruned for it);
        # and, by how many of those a trace has seen, the active rules that can judge it
        self._rules: tuple[ActiveRules, list[tuple[float, ActiveRules]],
                           dict[int, tuple[Rule, ...]]] = (ActiveRules.of(ruleset), [], {})
        self._use_vocabulary(ruleset)

    def set_rules(self, ruleset: RuleSet) -> None:
        """Swap the active rules in one assignment; evaluations already running finish with the
        old ones. A trace stored partly before the swap is judged only by the rules that can
        read all they need in what was kept of it (see `_rules_for`)."""
        self._use_vocabulary(ruleset)
        now = self.clock()
        before, replaced, _ = self._rules
        replaced = [(until, old) for until, old in replaced if until > now - self.horizon]
        replaced.append((now, before))
        self._rules = (ActiveRules.of(ruleset), replaced, {})
        judging = self._rules_for(None)
        waiting = [rule.id for rule in ruleset.rules if rule not in judging]
        if waiting:
            log.info("rule(s) %s read spans or attributes the rules before did not keep: they "
                     "judge only traces whose first span arrives after this reload",
                     ", ".join(waiting))

    @property
    def active(self) -> ActiveRules:
        return self._rules[0]

    def _use_vocabulary(self, ruleset: RuleSet) -> None:
        refs = ruleset.refs
        self.store.use_vocabulary(sorted(
            refs.names | refs.attributes | {key for rule in ruleset.rules for key in rule.context}))

    def _rules_for(self, born: float | None) -> tuple[Rule, ...]:
        """The active rules that can judge a trace whose first span was stored at `born` (None:
        at any time within the horizon): those reading nothing that a rule set in force since
        then pruned away. Any other rule could see a pruned attribute as missing and fire."""
        active, replaced, judging = self._rules
        since = 0 if born is None else bisect_right([until for until, _ in replaced], born)
        rules = judging.get(since)
        if rules is None:
            rules = judging[since] = tuple(
                rule for rule in active.ruleset.rules
                if all(old.keeps_all_read_by(rule) for _, old in replaced[since:]))
        return rules

    @property
    def ruleset(self) -> RuleSet:
        return self.active.ruleset

    def ingest(self, batch: Mapping[str, list[Span]], active: ActiveRules | None = None,
               trace_ids: Collection[str] = ()) -> AppendResult:
        """Judge one request's spans by trace, then add them (raises what the store raises,
        e.g. when Redis is down: nothing found is signalled then, the sender retries). `active`
        is the snapshot whose projection decoded the request (default: the current one);
        `trace_ids` names traces with no selected span here, held by id for the rules that
        fire without their spans."""
        rules = (active or self.active).ruleset.rules  # one rule set for the whole request
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
        result = self.store.append(batch, self.clock(), clean, trace_ids)
        metrics = self.metrics
        if result.ids_dropped:
            metrics.traces_dropped.labels(reason="max_trace_ids").inc(result.ids_dropped)
            log.warning("max_trace_ids reached: %d trace(s) known only by id dropped undecided",
                        result.ids_dropped)
        if result.late:
            metrics.late_spans.inc(result.late)
        if result.rejected:
            metrics.spans_rejected.labels(reason="max_spans_per_trace").inc(result.rejected)
            log.warning("refused %d span(s): trace over max_spans_per_trace", result.rejected)
        if result.rejected_bytes:
            metrics.spans_rejected.labels(reason="max_trace_bytes").inc(result.rejected_bytes)
            log.warning("refused %d span(s): trace over max_trace_bytes", result.rejected_bytes)
        if result.evicted:
            log.warning("max_traces reached: %d open trace(s) decided early", result.evicted)
        if result.decided_on_arrival:
            metrics.traces_decided.labels(reason="arrival").inc(result.decided_on_arrival)
        # What was found holds for traces stored as they came; the others (there before, some
        # spans refused, or stored altered) are read back whole for the monotone rules.
        created = result.created
        found = [v for v in found if v.trace.trace_id in created]
        grew = [t for t in result.touched if t not in created] if self.active.monotone else []
        if found or grew:  # (evicted traces wait for the next claim round, like due ones)
            with self._wake:
                if len(self._found) < self.early_backlog:
                    self._found += found
                if len(self._dirty) < self.early_backlog:
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
            except StoreUnavailable as exc:  # count, keep going: the traces wait in the store
                self.metrics.store_errors.labels(operation="decide").inc()
                log.error("deciding traces failed, retrying in 1s: %s", exc)
                stop.wait(1.0)
                continue
            except Exception:  # a bug: loud, with its traceback, and the sidecar keeps serving
                self.metrics.store_errors.labels(operation="decide").inc()
                log.exception("deciding traces failed on an internal error, retrying in 1s")
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
        judging = set(self._rules_for(None))  # when each trace began is not known here
        monotone = tuple(rule for rule in self.active.monotone if rule in judging)
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
        call: with Redis, one round trip)."""
        found: list[Violation] = []
        latency, evaluation = self.metrics.decision_latency, self.metrics.rule_evaluation
        for reason, count in Counter(item.reason for item in claimed).items():
            self.metrics.traces_decided.labels(reason=reason).inc(count)
        for item in claimed:
            latency.observe(max(0.0, now - item.due_at))
            started = time.perf_counter()
            found += self._evaluate(item.trace, self._rules_for(item.born))
            evaluation.observe(time.perf_counter() - started)
        self._emit(found)
        if claimed:
            self.store.finish(claimed)

    def _evaluate(self, trace: Trace, rules: tuple[Rule, ...]) -> list[Violation]:
        """The rules on one trace; a rule that raises is counted and logged (at most every
        few seconds per rule, with the trace id), and the others still run."""
        verdict = evaluate(trace, rules)
        for rule, error in verdict.failures:
            self.metrics.rule_errors.labels(rule=rule.id).inc()
            now = time.monotonic()
            if now - self._failures_logged.get(rule.id, -_FAILURE_LOG_SECONDS) \
                    >= _FAILURE_LOG_SECONDS:
                self._failures_logged[rule.id] = now
                log.error("rule %s failed on trace %s (counted in betrace_rule_errors_total; "
                          "logged at most every %.0fs per rule)", rule.id, trace.trace_id,
                          _FAILURE_LOG_SECONDS, exc_info=error)
        return verdict.violations

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

