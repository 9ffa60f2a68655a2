"""The assembler against a reload that lands in the middle of a decision step (the reload thread
runs whenever it likes). The real store, rules, emitter and metrics; only the moment of the
reload is forced, from inside the step's own evaluation."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry

from sidecar.assembler import Assembler
from sidecar.emit import Emitter
from sidecar.metrics import Metrics
from sidecar.rules import Violation, load_rules_text
from sidecar.span import Span
from sidecar.store import MemoryStore, StoreLimits

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


class ReloadedMidStep(Assembler):
    """Swaps in NEW right after the first evaluation of the old rules, as the reload thread
    could."""

    def _evaluate(self, trace: Any, rules: Any) -> list[Violation]:
        found = super()._evaluate(trace, rules)
        if "1000" in self.ruleset.rules[0].logic.text:
            self.set_rules(load_rules_text(NEW))
        return found


def test_a_reload_during_a_step_does_not_let_the_new_rules_skip_a_trace() -> None:
    """A fresh trace that the old monotone rule found quiet must still meet the new rule."""
    now = [1000.0]
    metrics = Metrics(CollectorRegistry())
    emitter = Recording(metrics)
    assembler = ReloadedMidStep(MemoryStore(StoreLimits(decision_wait=1.0)),
                                load_rules_text(OLD), emitter, metrics, clock=lambda: now[0])
    assembler.ingest({TRACE: [Span(TRACE, "00000000000000a1", "refund", start_ns=1, end_ns=2,
                                   attributes={"amount": 100})]})
    assembler.step()  # early evaluation with the old rule: quiet; the reload lands here
    now[0] += 5
    assembler.step()  # the decision, under the new rule: 100 > 50
    assert emitter.rules == ["big-refund"]
