"""Replay skips evaluating a trace no rule applies to, told span by span (`CompiledExpr.scope`):
the shortcut must be false only where every rule's own `applies` is false (and, without
repeated span ids, true exactly where one is), and a rule whose
scope takes the whole trace to tell (a `when`, a glob, a rule that fires without its spans)
turns it off."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.model.spans import Trace, span_of
from sidecar.replay.partitions import _applying
from sidecar.rules import load_rules_text

SPAN_SCOPED = {
    "each-where": ("for_each: charge.where(attempt > 1)\n"
                   "    never: charge.where(intent != this.intent)"),
    "each-all": "for_each: charge\n    always: charge.where(intent == this.intent)",
    "condition": "condition: trace.count(charge) > 1 or refund.where(amount > 10)",
    "absence": "condition: charge and not audit",
}
WHOLE_TRACE = {
    "when": "when: charge\n    always: audit",
    "glob": "condition: '\"char*\"'",
    "fires-without-spans": "condition: not audit",
}


def ruleset(*bodies: str):  # type: ignore[no-untyped-def]
    text = "rules:\n" + "".join(f"  - id: r{i}\n    severity: low\n    {body}\n"
                                 for i, body in enumerate(bodies))
    return load_rules_text(text)


SPAN = st.builds(
    lambda n, name, attempt, intent, amount: span_of(
        "ab" * 16, f"{n:016x}", name, "", 1, 2, "UNSET", "INTERNAL", None, None,
        {k: v for k, v in (("attempt", attempt), ("intent", intent), ("amount", amount))
         if v is not None}, None),
    st.integers(1, 6), st.sampled_from(["charge", "refund", "audit", "other", "charges"]),
    st.one_of(st.none(), st.integers(0, 3), st.just("2")), st.sampled_from([None, "a", "b"]),
    st.one_of(st.none(), st.integers(0, 20), st.just(11.5)))


@settings(max_examples=300, deadline=None)
@given(st.lists(SPAN, max_size=5), st.lists(st.sampled_from(sorted(SPAN_SCOPED)), min_size=1,
                                            max_size=3))
def test_the_shortcut_says_no_only_where_no_rule_applies(spans: list, chosen: list[str]) -> None:
    rules = ruleset(*(SPAN_SCOPED[name] for name in chosen)).rules
    may_apply = _applying(rules)
    assert may_apply is not None
    trace = Trace("ab" * 16, spans).without_repeats()
    applies = any(rule.logic.applies(trace) for rule in rules)
    if len(trace.spans) == len(spans):
        assert may_apply(spans) == applies
    else:  # a repeated span id: evaluation keeps the first copy, the shortcut looks at all
        assert may_apply(spans) or not applies


def test_a_rule_judged_on_the_whole_trace_turns_the_shortcut_off() -> None:
    for body in WHOLE_TRACE.values():
        assert _applying(ruleset(SPAN_SCOPED["each-where"], body).rules) is None, body
