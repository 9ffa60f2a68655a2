"""Replay notes of each trace it packs whether a rule may apply to it and whether it starts in
the window (`_spill.Packer`), reads those notes and judges the traces some rule may apply to from
their packed bytes (`_spill.judge`), and makes only the traces where a rule may fire
(`unpack(..., only)`). That must never drop a trace a rule applies
to or fires on: a `where` and a rule are judged as the compiler's own tests do (exactly, on the
values and literals it can read; "maybe" otherwise), the traces in the window are counted as
`_evaluate` counts them, and a worker finds the same signals and statistics with judge as
without it."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.dsl import syntax
from sidecar.dsl.compiler import FOR_EACH, MISSING, PLAIN_OPS, UNKNOWN, _pred, plain_test
from sidecar.model.spans import NO_ATTRIBUTES, SLOT_DESCRIPTORS, Span, Trace, span_of
from sidecar.otlp.decoded import SpanFilter
from sidecar.replay._spill import Packer, judge, unpack
from sidecar.replay.partitions import Plan, Worker
from sidecar.rules import Rule, evaluate, load_rules_text

BOUNDED = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KEYS = st.sampled_from(["a", "b", "a.b"])
ANY_KEY = st.one_of(KEYS, st.sampled_from(["service.name", "duration_ms", "span_id", "name"]))
TEXTS = st.one_of(st.sampled_from(["", "a", "b", "ab", "ü", "é", "\U0001f600", "A"]),
                  st.text(max_size=3))
NUMBERS = st.one_of(st.integers(-3, 3), st.integers(-2**70, 2**70), st.sampled_from(
    [2**53, 2**53 + 1, -2**53 - 1, 2**63 - 1, -2**63, 2**63]),
    st.floats(), st.sampled_from([0.5, 1.0, -0.0, 2.0**53, float("nan"), float("inf")]))
LITERALS = st.one_of(st.booleans(), TEXTS, NUMBERS)
VALUES = st.one_of(st.none(), LITERALS, st.tuples(st.integers(0, 2)))


def compare(attr: str, op: str, literal: Any) -> syntax.Compare:
    return syntax.Compare(attr, op, literal)


LEAVES = st.one_of(
    st.builds(compare, ANY_KEY, st.sampled_from(PLAIN_OPS), LITERALS),
    st.builds(compare, KEYS, st.just("in"), st.tuples(LITERALS, LITERALS)),
    st.builds(compare, KEYS, st.just("contains"), TEXTS),
    st.builds(syntax.Bare, ANY_KEY))
PREDS = st.recursive(LEAVES, lambda inner: st.one_of(
    st.builds(syntax.PredNot, inner),
    st.builds(lambda ps: syntax.PredAnd(tuple(ps)), st.lists(inner, min_size=2, max_size=3)),
    st.builds(lambda ps: syntax.PredOr(tuple(ps)), st.lists(inner, min_size=2, max_size=3))),
    max_leaves=5)


def span(number: int, attributes: dict[str, Any], start: int = 10, name: str = "n") -> Span:
    return span_of(f"{number:032x}", f"{number + 1:016x}", name, "", start, start + 1, "UNSET",
                   "SERVER", "svc", None, attributes, None)


def packed(spans: list[Span], tests: dict[str, Any] | None = None) -> bytes:
    packer = Packer(1, 0, SLOT_DESCRIPTORS, tests)
    packer.add([(s.trace_id, [s]) for s in spans])
    [chunk] = packer.take()
    assert chunk is not None
    return chunk


# A rule as data that applies wherever a span named "n" is and leaves each such trace to evaluate:
# `judge` then leaves exactly the traces with such spans the Packer noted a rule may apply to.
LEAVE_N = (FOR_EACH, "n", None, (UNKNOWN,), None)


def wanted_of(chunk: bytes) -> set[str]:
    """The traces of `chunk` (all of whose spans are named n) the Packer noted as wanted."""
    return judge([chunk], (LEAVE_N,))[0]


def plain(value: Any) -> bool:
    """A value the Packer reads exactly (a number within 2**53: int against float is exact)."""
    if type(value) is str:
        return not any(0xD800 <= ord(c) < 0xE000 for c in value)
    if type(value) is int:
        return -2**53 <= value <= 2**53
    return value is None or type(value) in (bool, float)


def exact(test: tuple[Any, ...], attributes: dict[str, Any]) -> bool:
    """Whether the Packer must tell `test` exactly on these attributes."""
    kind = test[0]
    if kind == UNKNOWN:
        return False
    if kind in (1, 2):  # COMPARE, BARE: the value read, and the literal
        read = attributes.get(test[1])
        return plain(read) and (kind == 2 or plain(test[3]))
    return all(exact(part, attributes) for part in test[1:])


@BOUNDED
@given(PREDS, st.lists(st.dictionaries(KEYS, VALUES, max_size=3), min_size=1, max_size=6))
def test_packer_judges_a_where_as_the_compiler_does(pred: Any, attribute_sets: list) -> None:
    spans = [span(n, attributes) for n, attributes in enumerate(attribute_sets)]
    test, program = _pred(pred), plain_test(pred)
    wanted, _, counted = judge([packed(spans, {"n": (program,)})], (LEAVE_N,))
    assert len(wanted) + counted == len(spans)  # no window: every trace counts
    for one in spans:
        applies = test(one)
        if applies:
            assert one.trace_id in wanted, (pred, one.attributes)
        if exact(program, one.attributes):
            assert (one.trace_id in wanted) == applies, (pred, one.attributes)


GRID = [True, False, 0, 1, -1, 2, 2**53, 2**53 + 1, -2**53 - 1, 2**63 - 1, -2**63, 2**64, 0.5,
        1.0, -0.0, 2.0**53, float("nan"), float("inf"), "", "a", "b", "ab", "ü", "\U0001f600",
        "A", "\ud800"]


def test_packer_compares_every_kind_of_value_with_every_kind_of_literal() -> None:
    """Each comparison, each value (and None, a tuple, none at all) against each literal."""
    values = [*GRID, None, (1,)]
    spans = [span(n, {"a": value}) for n, value in enumerate(values)] + [span(len(values), {})]
    for op in PLAIN_OPS:
        for literal in GRID:
            where = compare("a", op, literal)
            wanted = wanted_of(packed(spans, {"n": (plain_test(where),)}))
            negated = wanted_of(packed(spans, {"n": (plain_test(syntax.PredNot(where)),)}))
            test = _pred(where)
            for one in spans:
                expected, told = test(one), exact(plain_test(where), one.attributes)
                for found, truth in ((wanted, expected), (negated, not expected)):
                    if truth:
                        assert one.trace_id in found, (op, literal, one.attributes)
                    elif told:
                        assert one.trace_id not in found, (op, literal, one.attributes)


def test_packer_is_exact_on_the_common_shapes() -> None:
    """Not a Packer that says "maybe" to everything: `attempt > 1` on an int is told."""
    spans = [span(n, {"attempt": n}) for n in range(4)] + [span(9, {}), span(8, {"attempt": "2"})]
    where = syntax.PredAnd((compare("attempt", ">", 1),
                            syntax.PredNot(compare("attempt", "==", 3))))
    assert wanted_of(packed(spans, {"n": (plain_test(where),)})) == {spans[2].trace_id}
    # a name no rule tests: never wanted; a name any span of which will do: always
    assert wanted_of(packed(spans, {"other": (None,)})) == set()
    assert wanted_of(packed(spans, {"n": (None,)})) == {s.trace_id for s in spans}
    assert wanted_of(packed(spans)) == {s.trace_id for s in spans}  # without tests: every trace


def test_packer_reads_spans_with_many_attributes() -> None:
    """Past the attribute views kept in place (16), the rest are allocated: judged alike."""
    many = {f"k{i}": i for i in range(40)}
    spans = [span(0, {**many, "attempt": 2}), span(1, {"attempt": 2, **many}),
             span(2, {**many, "attempt": 1})]
    where = compare("attempt", ">", 1)
    assert wanted_of(packed(spans, {"n": (plain_test(where),)})) == {spans[0].trace_id,
                                                                     spans[1].trace_id}


STARTS = st.one_of(st.integers(0, 40), st.integers(2**64 - 3, 2**64 - 1),
                   st.sampled_from([-1, 2**64, 2**70]))
BOUNDS = st.one_of(st.integers(-5, 50), st.sampled_from([2**64 - 1, 2**64, 2**70, -2**70]))


@BOUNDED
@given(st.lists(st.lists(STARTS, min_size=0, max_size=3), min_size=1, max_size=5), BOUNDS, BOUNDS)
def test_judge_counts_the_window_as_evaluate_does(starts: list[list[int]], since: int,
                                                until: int) -> None:
    for n, found in enumerate(starts):
        trace_id, spans = f"{n:032x}", [span(n, {}, start) for start in found]
        packer = Packer(1, 0, SLOT_DESCRIPTORS, {}, (since, until))
        packer.add([(trace_id, spans)])
        [chunk] = packer.take()
        assert chunk is not None
        left, _, counted = judge([chunk], (LEAVE_N,))
        if not spans or any(not 0 <= s.start_ns < 2**64 for s in spans):
            # known by id alone, or a start it cannot read: evaluate judges it
            assert (left, counted) == ({trace_id}, 0)
        else:
            assert left == set()
            assert counted == any(since <= s.start_ns < until for s in spans)


TRACE_SPANS = st.lists(st.builds(
    lambda n, name, attributes: span(n, attributes, name=name), st.integers(0, 5),
    st.sampled_from(["n", "m", "ü"]), st.dictionaries(KEYS, VALUES, max_size=2)), max_size=3)


@BOUNDED
@given(st.lists(st.tuples(st.sampled_from(["t1", "t2", "t3", "t4"]), TRACE_SPANS), max_size=6),
       st.sets(st.sampled_from(["t1", "t2", "t3", "t4"])))
def test_unpack_makes_only_the_traces_asked_for(traces: list, only: set[str]) -> None:
    """Strings shared with a trace passed over (written the first time there) still read."""
    packer = Packer(1, 0, SLOT_DESCRIPTORS)
    packer.add(traces)
    [chunk] = packer.take()
    if chunk is None:
        return
    every: dict[str, list[Span]] = {}
    some: dict[str, list[Span]] = {}
    assert unpack(chunk, every, Span, SLOT_DESCRIPTORS, NO_ATTRIBUTES) == \
        sum(len(spans) for _, spans in traces)
    unpack(chunk, some, Span, SLOT_DESCRIPTORS, NO_ATTRIBUTES, only)
    assert set(some) == set(every) & only
    for trace_id, spans in some.items():
        assert [repr(s) for s in spans] == [repr(s) for s in every[trace_id]]


RULES = """rules:
  - id: retry
    severity: high
    for_each: charge.where(attempt > 1 and not (region == "eu"))
    never: charge.where(intent != this.intent)
  - id: refund
    severity: low
    condition: refund.where(amount > 10) and not audit
  - id: big
    severity: low
    for_each: order.where(total >= 100.5 or vip)
    always: audit
"""
WHEN_RULE = """  - id: reserved
    severity: low
    when: charge and not refund
    always: audit.where(vip) or order.where(total > 10)
"""
WORKER_SPANS = st.tuples(
    st.integers(1, 9), st.sampled_from(["charge", "refund", "audit", "order", "other"]),
    st.one_of(st.none(), st.integers(0, 3), st.just("2"), st.just(2.0)),
    st.sampled_from([None, "eu", "us"]), st.sampled_from([None, "a", "b"]),
    st.one_of(st.none(), st.integers(0, 200), st.just(100.5), st.just(True)),
    st.sampled_from([None, True, False, "true"]), st.integers(0, 30))


def worker_span(trace_id: str, n: int, name: str, attempt: Any, region: Any, intent: Any,
                amount: Any, vip: Any, start: int) -> Span:
    attributes = {"attempt": attempt, "region": region, "intent": intent, "amount": amount,
                  "total": amount, "vip": vip}
    return span_of(trace_id, f"{n:016x}", name, "", start, start + 1, "UNSET", "SERVER", None,
                   None, {k: v for k, v in attributes.items() if v is not None}, None)


WORKER_TRACES = st.lists(st.lists(WORKER_SPANS, max_size=4), min_size=1, max_size=8)
WINDOWS = st.one_of(st.none(), st.tuples(st.integers(0, 30), st.integers(0, 40)))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(WORKER_TRACES, WINDOWS)
def test_a_worker_finds_what_it_finds_without_judge(traces: list, window: Any) -> None:
    same_with_and_without_judge(traces, window, RULES)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(WORKER_TRACES, WINDOWS)
def test_a_worker_with_a_when_rule_finds_what_it_finds_without_judge(traces: list,
                                                                     window: Any) -> None:
    """A `when` rule has no span-by-span scope: the Packer wants every trace, and judge still
    judges them all."""
    same_with_and_without_judge(traces, window, RULES + WHEN_RULE)


def same_with_and_without_judge(traces: list, window: Any, text: str) -> None:
    rules = load_rules_text(text).rules
    plan = Plan(rules, SpanFilter.of(load_rules_text(text).projection()), "", 2, 1, 2**30, 0,
                None, window)
    worker = Worker(plan, [0, 0])
    assert worker.plain is not None and (worker.tests is None) == (text != RULES)
    packer = worker._packer(2, 0)
    for n, found in enumerate(traces):  # each trace in two halves, as two files would have it
        trace_id = f"{n:032x}"
        spans = [worker_span(trace_id, *params) for params in found]
        packer.add([(trace_id, spans[::2])])
        packer.add([(trace_id, spans[1::2])])
    chunks = [chunk for chunk in packer.take() if chunk is not None]
    judged = [worker._evaluate_chunks([chunk]) for chunk in chunks]
    worker.plain = None
    plain_run = [worker._evaluate_chunks([chunk]) for chunk in chunks]
    for with_judge, without in zip(judged, plain_run):
        assert with_judge.traces == without.traces
        assert [(s.rule_id, s.trace_id) for s in with_judge.signals] == \
            [(s.rule_id, s.trace_id) for s in without.signals]
        assert {k: (v.applied, v.violations, v.errors) for k, v in with_judge.stats.items()} == \
            {k: (v.applied, v.violations, v.errors) for k, v in without.stats.items()}


# --- judge: whole traces, from the packed bytes ----------------------------------------------

NAMES = st.sampled_from(["c", "d"])
LITERAL_TEXT = st.sampled_from(["1", "2", "2.0", "0.5", "-1", '"x"', '"y"', "true", "false"])
OPS = st.sampled_from(PLAIN_OPS)


def where_text(this: bool) -> st.SearchStrategy[str]:
    """A `where` as rule text: what judge tells (comparisons, bare keys, not/and/or) and what it
    leaves to evaluate (in, contains, built-ins, service.name); `this.x` inside a for_each's
    clauses only."""
    leaves = [st.builds("{} {} {}".format, KEYS_TEXT, OPS, LITERAL_TEXT), KEYS_TEXT,
              st.sampled_from(['a in [1, "x"]', 'b contains "x"', "duration_ms > 0",
                               'service.name == "svc"'])]
    if this:
        leaves.append(st.builds("{} {} this.{}".format, KEYS_TEXT, OPS, KEYS_TEXT))
    return st.recursive(st.one_of(*leaves), lambda inner: st.one_of(
        st.builds("not ({})".format, inner),
        st.builds("({}) and ({})".format, inner, inner),
        st.builds("({}) or ({})".format, inner, inner)), max_leaves=4)


KEYS_TEXT = st.sampled_from(["a", "b"])


def expr_text(this: bool) -> st.SearchStrategy[str]:
    """A trace-level expression as rule text: existence (with or without a where), not/and/or,
    and what judge leaves to evaluate (count, before; `after this` in a for_each)."""
    leaves = [NAMES, st.builds("{}.where({})".format, NAMES, where_text(this)),
              st.sampled_from(["count(c) > 1", "c before d"])]
    if this:
        leaves.append(st.just("d after this"))
    return st.recursive(st.one_of(*leaves), lambda inner: st.one_of(
        st.builds("not ({})".format, inner),
        st.builds("({}) and ({})".format, inner, inner),
        st.builds("({}) or ({})".format, inner, inner)), max_leaves=4)


def rule_text(number: int, form: str, selector: str, where: str | None, clause: str,
              expression: str, other: str) -> str:
    head = f"  - id: r{number}\n    severity: low\n"
    if form == "condition":
        return head + f"    condition: {json.dumps(f'({expression}) and {selector}')}\n"
    if form.startswith("when "):
        return head + (f"    when: {json.dumps(expression)}\n"
                       f"    {form[5:]}: {json.dumps(f'{selector} or ({other})')}\n")
    each = selector if where is None else f"{selector}.where({where})"
    return head + f"    for_each: {json.dumps(each)}\n    {form}: {json.dumps(clause)}\n"


RULE_TEXTS = st.lists(st.builds(
    rule_text, st.just(0), st.sampled_from(["condition", "never", "always", "when always",
                                            "when never"]), NAMES,
    st.one_of(st.none(), where_text(False)), expr_text(True), expr_text(False), expr_text(False)),
    min_size=1, max_size=3)
SPAN_VALUES = st.sampled_from([1, 2, 2.0, 0.5, -1, "x", "y", True, False, None, 2**60, (1,),
                               2**70])
JUDGED_SPANS = st.lists(st.tuples(NAMES, st.dictionaries(KEYS, SPAN_VALUES, max_size=2),
                                  st.integers(0, 5)), max_size=5)


def judged_trace(n: int, found: list) -> tuple[str, list[Span]]:
    trace_id = f"{n:032x}"
    return trace_id, [span_of(trace_id, f"{i:016x}", name, "", start, start + 1, "UNSET",
                              "SERVER", "svc", None, attributes, None)
                      for i, (name, attributes, start) in enumerate(found)]


def judged_rules(texts: list[str]) -> list[Rule]:
    """Rules from their texts, numbered; the ones whose scope judge can read."""
    body = "".join(text.replace("id: r0", f"id: r{n}", 1) for n, text in enumerate(texts))
    return [rule for rule in load_rules_text("rules:\n" + body).rules
            if rule.logic.plain is not None]


@BOUNDED
@given(RULE_TEXTS, st.lists(JUDGED_SPANS, min_size=1, max_size=6))
def test_judge_agrees_with_evaluate(texts: list[str], found: list) -> None:
    """A trace judge does not leave has no rule firing on it, and each rule it counts as
    applying is one `evaluate` finds in scope (with each trace split over two chunks, each with
    its own table of shared strings, and over two entries in the second)."""
    rules = judged_rules(texts)
    traces = [judged_trace(n, spans) for n, spans in enumerate(found)]
    first, second = Packer(1, 0, SLOT_DESCRIPTORS), Packer(1, 0, SLOT_DESCRIPTORS)
    for trace_id, spans in traces:
        first.add([(trace_id, spans[::2])])
        second.add([(trace_id, spans[1::3])])
        second.add([(trace_id, spans[3::6])])
    chunks = [chunk for chunk in first.take() + second.take() if chunk is not None]
    asked = {trace_id for trace_id, _ in traces}
    left, applied, counted = judge(chunks, tuple(rule.logic.plain for rule in rules))
    assert counted == len(asked - left) and left <= asked
    expected = [0] * len(rules)
    for trace_id, spans in traces:
        verdict = evaluate(Trace(trace_id, spans), rules, scope=True)
        if trace_id in left:
            continue
        assert not verdict.violations and not verdict.failures, (texts, spans)
        for rule in verdict.applied:
            expected[rules.index(rule)] += 1
    assert applied == expected, texts


COMMON = """rules:
  - id: retry
    severity: high
    for_each: charge.where(attempt > 1)
    never: charge.where(cart == this.cart and intent != this.intent)
  - id: refund
    severity: low
    condition: refund.where(amount > 10) and not audit
"""


def test_judge_is_exact_on_the_common_shapes() -> None:
    """Not a judge that leaves everything to evaluate: the whitepaper's retry rule and a
    condition rule are told on plain values, and only the traces where they fire are left."""
    rules = load_rules_text(COMMON).rules
    shapes = {
        "same intent": [("charge", {"attempt": 1, "cart": "c1", "intent": "i1"}),
                        ("charge", {"attempt": 2, "cart": "c1", "intent": "i1"})],
        "new intent": [("charge", {"attempt": 1, "cart": "c1", "intent": "i1"}),
                       ("charge", {"attempt": 2, "cart": "c1", "intent": "i2"})],
        "first try": [("charge", {"attempt": 1, "cart": "c1", "intent": "i1"})],
        "audited refund": [("refund", {"amount": 20}), ("audit", {})],
        "lone refund": [("refund", {"amount": 20.5})],
        "small refund": [("refund", {"amount": 5})],
    }
    traces = {shape: judged_trace(n, [(name, attributes, 0) for name, attributes in spans])
              for n, (shape, spans) in enumerate(shapes.items())}
    packer = Packer(1, 0, SLOT_DESCRIPTORS)
    packer.add(list(traces.values()))
    left, applied, counted = judge(packer.take(), tuple(rule.logic.plain for rule in rules))
    assert left == {traces["new intent"][0], traces["lone refund"][0]}
    assert applied == [1, 2] and counted == 4  # same intent; audited and small refund


def test_judge_compares_every_kind_of_value_with_this_values() -> None:
    """`a op this.b` for each operator and each pair of values (and none): a firing is always
    left to evaluate, and a pair of values judge reads exactly is told."""
    values = [*GRID, None, (1,), MISSING]
    for op in PLAIN_OPS:
        rules = load_rules_text(f"""rules:
  - id: r
    severity: low
    for_each: c
    never: d.where(a {op} this.b)
""").rules
        traces = []
        for n, (this, other) in enumerate((x, y) for x in values for y in values):
            spans = [("c", {} if this is MISSING else {"b": this}, 0),
                     ("d", {} if other is MISSING else {"a": other}, 0)]
            traces.append((judged_trace(n, spans), this, other))
        packer = Packer(1, 0, SLOT_DESCRIPTORS)
        packer.add([trace for trace, _, _ in traces])
        left, _, _ = judge(packer.take(), tuple(rule.logic.plain for rule in rules))
        for (trace_id, spans), this, other in traces:
            fires = bool(evaluate(Trace(trace_id, spans), rules).violations)
            if fires:
                assert trace_id in left, (op, this, other)
            elif all(value is MISSING or plain(value) for value in (this, other)):
                assert trace_id not in left, (op, this, other)


LEAVE_CHARGE = (FOR_EACH, "charge", None, (UNKNOWN,), None)
SHORT = (0, 1, 2, 3, 6, 7)  # kinds of test a lone kind does not make (an empty and/or does)


def test_judge_leaves_repeated_span_ids_and_strange_rules_to_evaluate() -> None:
    """A span id twice (a collector's retry: evaluate counts it once), a rule as data judge
    does not know: left, never judged."""
    rules = load_rules_text(COMMON).rules
    plain_rules = tuple(rule.logic.plain for rule in rules)
    trace_id, spans = judged_trace(1, [("charge", {"attempt": 1}, 0)])
    packer = Packer(1, 0, SLOT_DESCRIPTORS)
    packer.add([(trace_id, spans * 2)])
    [chunk] = packer.take()
    assert judge([chunk], plain_rules)[0] == {trace_id}
    packer.add([(trace_id, spans)])
    [chunk] = packer.take()
    assert judge([chunk], plain_rules) == (set(), [0, 0], 1)
    for strange in ((), (9,), (0, "charge", None), (1, "charge", None, None), "rule",
                    (1, "charge", (9, "x"), None, (7, "charge", None)),
                    *((1, "charge", (kind,), None, (7, "charge", (kind,))) for kind in SHORT)):
        assert judge([chunk], (strange,))[0] == {trace_id}, strange
    for kind in SHORT:  # (the Packer's tests, too: "maybe")
        packer = Packer(1, 0, SLOT_DESCRIPTORS, {"charge": ((kind,),)})
        packer.add([(trace_id, spans)])
        assert judge(packer.take(), (LEAVE_CHARGE,))[0] == {trace_id}
    assert judge([], plain_rules) == (set(), [0, 0], 0)


def test_judge_leaves_attributes_it_cannot_read_to_evaluate() -> None:
    """Attributes with a key that is not a str, on the checked span or the other: left."""
    rules = load_rules_text(COMMON).rules
    shapes = [[("charge", {1: 0, "attempt": 2, "cart": "c", "intent": "i"}, 0)],
              [("charge", {"attempt": 2, "cart": "c", "intent": "i"}, 0),
               ("charge", {1: 0, "attempt": 1, "cart": "c", "intent": "j"}, 0)],
              [("charge", {1: 0, "attempt": 1, "cart": "c", "intent": "i"}, 0),
               ("charge", {"attempt": 2, "cart": "c", "intent": "j"}, 0)]]
    traces = [judged_trace(n, spans) for n, spans in enumerate(shapes)]
    packer = Packer(1, 0, SLOT_DESCRIPTORS)
    packer.add(traces)
    left, _, _ = judge(packer.take(), tuple(rule.logic.plain for rule in rules))
    assert left == {t for t, _ in traces}
    this_rule = load_rules_text("""rules:
  - id: r
    severity: low
    for_each: c
    never: d.where(a == this.a)
""").rules[0]
    trace = judged_trace(9, [("c", {1: 0, "a": 5}, 0), ("d", {"a": 5}, 0)])
    packer.add([trace])
    assert judge(packer.take(), (this_rule.logic.plain,))[0] == {trace[0]}


def test_judge_leaves_a_trace_whose_id_only_marshal_can_pack() -> None:
    """A trace id UTF-8 cannot hold (a lone surrogate) is packed through marshal, whose bytes for
    one str differ with its reference count: judge cannot find its entries by their bytes, so it
    leaves the trace to evaluate, which merges it by the str (here: a retry under a new intent,
    split over two entries)."""
    rules = load_rules_text(COMMON).rules
    trace_id = "".join(["\ud800", "t"])
    _, [first] = judged_trace(1, [("charge", {"attempt": 1, "cart": "c", "intent": "i"}, 0)])
    _, [second] = judged_trace(2, [("charge", {"attempt": 2, "cart": "c", "intent": "j"}, 0)])
    packer = Packer(1, 0, SLOT_DESCRIPTORS)
    packer.add([("".join(["\ud800", "t"]), [first])])  # (held by the list alone)
    packer.add([(trace_id, [second])])
    left, applied, counted = judge(packer.take(), tuple(rule.logic.plain for rule in rules))
    assert (left, applied, counted) == ({trace_id}, [0, 0], 0)
