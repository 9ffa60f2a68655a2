"""`betrace demo`: the seven case studies' traffic, emitted as their instrumentation snippets
emit it (start_span siblings inside a request span) through a real sidecar, against the shipped
catalog."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from sidecar.live.demo import SCENARIOS, run_demo
from sidecar.rules import load_rules

RULES_DIR = Path(__file__).resolve().parent.parent / "rules"


def test_the_demo_catches_all_seven_and_no_clean_twin_draws_a_signal(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert run_demo(load_rules([RULES_DIR]), decision_wait=0.5) == 0
    out = capsys.readouterr().out
    assert "caught 7/7 incidents; 0 clean twin(s) drew a signal; 7 signal(s) in all" in out
    assert "MISMATCH" not in out
    assert len({s.rule_id for s in SCENARIOS}) == 7
    assert all(s.trace_id for s in SCENARIOS)


def test_the_demo_says_when_a_rule_misses(capsys: pytest.CaptureFixture[str]) -> None:
    """Without the payment rule, its incident is missed and the demo fails."""
    rules = load_rules([RULES_DIR])
    ruleset = replace(rules, rules=tuple(r for r in rules.rules
                                         if r.id != "payment-retry-idempotency"))
    assert run_demo(ruleset, decision_wait=0.5) == 1
    out = capsys.readouterr().out
    assert "caught 6/7 incidents" in out and "MISMATCH" in out


# The seven rules as the case studies print them (../shared/seeds, case studies 1-7).
PRINTED = [
    "trace.has(payment.charge).where(attempt > 1)\n"
    "  and trace.count(payment.charge).where(payment_intent_id == unique) == 1",
    'trace.has(database.query).where(table contains "patient_records")\n'
    "  and trace.has(database.query).where(tenant_filter == true)",
    "trace.has(admin.action)\n  and trace.has(audit.log)",
    "trace.has(api.request).where(tier == free and request_count_1m > 100)",
    "trace.has(payment.charge)\n  and trace.has(inventory.reserve).where(confirmed == true)",
    "trace.has(agent.refund).where(amount > 50)\n  and trace.has(human.approval)",
    "trace.has(deletion.complete).where(days_since_request > 30)",
]


@pytest.mark.parametrize("text", PRINTED)
def test_every_rule_the_case_studies_print_parses_as_it_is(text: str) -> None:
    from sidecar.dsl import compile_expression

    compiled = compile_expression(text)
    assert compiled.refs.names
