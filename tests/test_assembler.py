"""The assembler: against a reload that lands in the middle of a decision step (the reload thread
runs whenever it likes), and on traces it saw whole. The real stores, rules,
emitter and metrics; only the moment of the reload is forced, from inside the assembler's own
evaluation."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
from prometheus_client import CollectorRegistry

from sidecar.live.assembler import Assembler
from sidecar.live.exporters import Emitter
from sidecar.live.metrics import Metrics
from sidecar.model.spans import Span
from sidecar.rules import Violation, load_rules_text
from sidecar.stores import StoreLimits, TraceStore
from sidecar.stores.memory import MemoryStore
from sidecar.stores.redis.store import RedisStore

OLD = """rules:
  - id: big-refund
    condition: refund.where(amount > 1000)
"""
NEW = OLD.replace("amount > 1000", "amount > 50")
TRACE = "0102030405060708090a0b0c0d0e0f10"


class Recording(Emitter):
    def __init__(self, metrics: Metrics) -> None:
        super().__init__(metrics)
        self.rules: list[str] = []

    def emit(self, violation: Violation) -> Any:
        self.rules.append(violation.rule.id)
        return super().emit(violation)


class ReloadedMidEvaluation(Assembler):
    """Swaps in NEW right after the first evaluation of the old rules, as the reload thread
    could."""

    def _evaluate(self, trace: Any, rules: Any) -> list[Violation]:
        found = super()._evaluate(trace, rules)
        if "1000" in self.ruleset.rules[0].logic.text:
            self.set_rules(load_rules_text(NEW))
        return found


def test_a_reload_applies_to_what_arrives_after_it() -> None:
    """A request is judged by one rule set: the one loaded when it arrived. Its trace, quiet
    under the old rules, is decided on arrival by them; the next request meets the new ones."""
    now = [1000.0]
    metrics = Metrics(CollectorRegistry())
    emitter = Recording(metrics)
    assembler = ReloadedMidEvaluation(MemoryStore(StoreLimits(decision_wait=1.0)),
                                      load_rules_text(OLD), emitter, metrics,
                                      clock=lambda: now[0])
    second = TRACE.replace("01", "ff", 1)
    for trace_id in (TRACE, second):
        result = assembler.ingest({trace_id: [
            Span(trace_id, "00000000000000a1", "refund", start_ns=1, end_ns=2,
                 attributes={"amount": 100})]})
        assembler.step()
    assert result.decided_on_arrival == 0  # the second: 100 > 50
    now[0] += 5
    assert assembler.step() == 1
    assert emitter.rules == ["big-refund"]
    assert metrics.traces_decided.labels(reason="arrival")._value.get() == 1


# --- traces seen whole ----------------------------------------------------------------------------

UNAUDITED = """rules:
  - id: unaudited-admin
    when: trace.has(admin.action)
    always: trace.has(audit.log)
  - id: unlocked-write
    condition: trace.has(db.write) and not trace.has(lock.acquire)
  - id: big-refund
    condition: refund.where(amount > 1000)
"""


@pytest.fixture(params=["memory", "redis"])
def make_store(request: pytest.FixtureRequest) -> Callable[[], TraceStore]:
    def make() -> TraceStore:
        limits = StoreLimits(decision_wait=1.0)
        if request.param == "memory":
            return MemoryStore(limits)
        client = redis.Redis.from_url(request.getfixturevalue("redis_url"))
        client.flushdb()
        return RedisStore(client, limits)
    return make


def span(name: str, n: int, **attributes: Any) -> Span:
    return Span(TRACE, f"{n:016x}", name, start_ns=n, end_ns=n + 1, attributes=attributes)


def assembled(store: TraceStore) -> tuple[Assembler, Recording, list[float]]:
    now = [1000.0]
    metrics = Metrics(CollectorRegistry())
    emitter = Recording(metrics)
    return (Assembler(store, load_rules_text(UNAUDITED), emitter, metrics, clock=lambda: now[0]),
            emitter, now)


def test_a_fresh_trace_signals_monotone_rules_at_once_and_the_others_at_its_decision(
        make_store: Callable[[], TraceStore]) -> None:
    """A trace seen whole meets every rule at once, but only the monotone ones may signal
    before the decision; each rule signals once."""
    assembler, emitter, now = assembled(make_store())
    assembler.ingest({TRACE: [span("admin.action", 1), span("refund", 2, amount=5000)]})
    assembler.step()
    assert emitter.rules == ["big-refund"]  # monotone: at once
    now[0] += 2
    assert assembler.step() == 1
    assert sorted(emitter.rules) == ["big-refund", "unaudited-admin"]  # once each


def test_early_signals_beyond_the_backlog_wait_for_the_decision_and_none_is_lost(
        make_store: Callable[[], TraceStore]) -> None:
    """A decider busy with a flood of signals must not hold a growing queue of violating
    traces: beyond the backlog, a violation found on arrival is left to its trace's decision,
    which finds it again. Each trace still signals exactly once."""
    store = make_store()
    now = [1000.0]
    metrics = Metrics(CollectorRegistry())
    emitter = Recording(metrics)
    assembler = Assembler(store, load_rules_text(UNAUDITED), emitter, metrics,
                          clock=lambda: now[0], early_backlog=5)
    traces = [f"{n:032x}" for n in range(1, 21)]
    for n, trace_id in enumerate(traces):
        assembler.ingest({trace_id: [Span(trace_id, f"{n + 1:016x}", "refund", start_ns=n,
                                          end_ns=n + 1, attributes={"amount": 5000})]})
    assembler.step()
    assert emitter.rules == ["big-refund"] * 5  # at once, up to the backlog
    now[0] += 2  # past decision_wait
    while assembler.step():
        pass
    assert emitter.rules == ["big-refund"] * 20  # the rest at their decision, none twice


def test_a_violation_found_on_the_first_request_is_withdrawn_by_a_later_span(
        make_store: Callable[[], TraceStore]) -> None:
    assembler, emitter, now = assembled(make_store())
    assembler.ingest({TRACE: [span("admin.action", 1)]})
    assembler.step()  # unaudited then: not quiet
    assembler.ingest({TRACE: [span("audit.log", 2)]})
    now[0] += 2
    assert assembler.step() == 1
    assert emitter.rules == []


def test_a_quiet_verdict_does_not_hide_what_a_later_span_completes(
        make_store: Callable[[], TraceStore]) -> None:
    assembler, emitter, now = assembled(make_store())
    assembler.ingest({TRACE: [span("http.request", 1)]})
    assembler.step()  # quiet then
    assembler.ingest({TRACE: [span("db.write", 2)]})
    now[0] += 2
    assert assembler.step() == 1
    assert emitter.rules == ["unlocked-write"]


def test_a_trace_stored_altered_is_judged_on_what_is_stored(redis_url: str) -> None:
    """Redis keeps integers beyond 64 bits (OTLP JSON can spell them) as decimal text; a trace
    so altered is not judged from its request, or it would meet the rules as a number on one
    sidecar and as text on another."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    now = [1000.0]
    metrics = Metrics(CollectorRegistry())
    emitter = Recording(metrics)
    rules = load_rules_text("""rules:
  - id: small-refund
    condition: trace.has(refund) and not refund.where(amount > 1000)
""")
    assembler = Assembler(RedisStore(client, StoreLimits(decision_wait=1.0)), rules, emitter,
                          metrics, clock=lambda: now[0])
    result = assembler.ingest({TRACE: [span("refund", 1, amount=2**70)]})
    assert result.decided_on_arrival == 0  # quiet as a number, but stored as text: decided as stored
    assert TRACE not in result.created  # nor is what was found on arrival signalled
    assembler.step()
    now[0] += 2
    assert assembler.step() == 1
    assert emitter.rules == ["small-refund"]  # "1180591620717411303424" is no number > 1000


def test_the_decider_keeps_deciding_when_the_wall_clock_steps_back() -> None:
    """Its rounds are timed on the monotonic clock: after the wall clock steps back 5 s, a trace
    due 0.2 s later (by the stepped clock) is decided about then, not 5 s later."""
    offset = [0.0]
    metrics = Metrics(CollectorRegistry())
    emitter = Recording(metrics)
    assembler = Assembler(MemoryStore(StoreLimits(decision_wait=0.2)), load_rules_text(UNAUDITED),
                          emitter, metrics, clock=lambda: time.time() - offset[0])
    stop = threading.Event()
    decider = threading.Thread(target=assembler.run, args=(stop,), daemon=True)
    decider.start()
    try:
        time.sleep(0.1)  # a round on the clock as it was
        offset[0] = 5.0
        assembler.ingest({TRACE: [span("admin.action", 1)]})  # unaudited: signals when decided
        started = time.monotonic()
        while not emitter.rules and time.monotonic() - started < 3:
            time.sleep(0.01)
        assert emitter.rules == ["unaudited-admin"]
        assert time.monotonic() - started < 2
    finally:
        stop.set()
        assembler.wake()
        decider.join(5)
