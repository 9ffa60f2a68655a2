"""Replay notes of each trace it packs whether a rule may apply to it and whether it starts in
the window (`_spill.Packer`), reads those notes before making any span (`_spill.scan`), and makes
only the traces some rule may apply to (`unpack(..., only)`). That must never drop a trace a rule
applies to: a `where` is judged as the compiler's own test does (exactly, on the values and
literals it can read; "maybe" otherwise), the traces in the window are counted as `_evaluate`
counts them, and a worker finds the same signals and statistics with the scan as without it."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.dsl import syntax
from sidecar.dsl.compiler import PLAIN_OPS, UNKNOWN, _pred, plain_test
from sidecar.model.spans import NO_ATTRIBUTES, SLOT_DESCRIPTORS, Span, span_of
from sidecar.otlp.decoded import SpanFilter
from sidecar.replay._spill import Packer, scan, unpack
from sidecar.replay.partitions import Plan, Worker
from sidecar.rules import load_rules_text

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


def plain(value: Any) -> bool:
    """A value the scan reads exactly (a number within 2**53: int against float is exact)."""
    if type(value) is str:
        return not any(0xD800 <= ord(c) < 0xE000 for c in value)
    if type(value) is int:
        return -2**53 <= value <= 2**53
    return value is None or type(value) in (bool, float)


def exact(test: tuple[Any, ...], attributes: dict[str, Any]) -> bool:
    """Whether the scan must tell `test` exactly on these attributes."""
    kind = test[0]
    if kind == UNKNOWN:
        return False
    if kind in (1, 2):  # COMPARE, BARE: the value read, and the literal
        read = attributes.get(test[1])
        return plain(read) and (kind == 2 or plain(test[3]))
    return all(exact(part, attributes) for part in test[1:])


@BOUNDED
@given(PREDS, st.lists(st.dictionaries(KEYS, VALUES, max_size=3), min_size=1, max_size=6))
def test_scan_judges_a_where_as_the_compiler_does(pred: Any, attribute_sets: list) -> None:
    spans = [span(n, attributes) for n, attributes in enumerate(attribute_sets)]
    test, program = _pred(pred), plain_test(pred)
    inside: set[str] = set()
    wanted: set[str] = set()
    scan(packed(spans, {"n": (program,)}), inside, wanted)
    assert inside == {s.trace_id for s in spans}  # no window: every trace counts
    for one in spans:
        applies = test(one)
        if applies:
            assert one.trace_id in wanted, (pred, one.attributes)
        if exact(program, one.attributes):
            assert (one.trace_id in wanted) == applies, (pred, one.attributes)


GRID = [True, False, 0, 1, -1, 2, 2**53, 2**53 + 1, -2**53 - 1, 2**63 - 1, -2**63, 2**64, 0.5,
        1.0, -0.0, 2.0**53, float("nan"), float("inf"), "", "a", "b", "ab", "ü", "\U0001f600",
        "A", "\ud800"]


def test_scan_compares_every_kind_of_value_with_every_kind_of_literal() -> None:
    """Each comparison, each value (and None, a tuple, none at all) against each literal."""
    values = [*GRID, None, (1,)]
    spans = [span(n, {"a": value}) for n, value in enumerate(values)] + [span(len(values), {})]
    for op in PLAIN_OPS:
        for literal in GRID:
            where = compare("a", op, literal)
            wanted: set[str] = set()
            scan(packed(spans, {"n": (plain_test(where),)}), set(), wanted)
            negated: set[str] = set()
            scan(packed(spans, {"n": (plain_test(syntax.PredNot(where)),)}), set(), negated)
            test = _pred(where)
            for one in spans:
                expected, told = test(one), exact(plain_test(where), one.attributes)
                for found, truth in ((wanted, expected), (negated, not expected)):
                    if truth:
                        assert one.trace_id in found, (op, literal, one.attributes)
                    elif told:
                        assert one.trace_id not in found, (op, literal, one.attributes)


def test_scan_is_exact_on_the_common_shapes() -> None:
    """Not a scan that says "maybe" to everything: `attempt > 1` on an int is told."""
    spans = [span(n, {"attempt": n}) for n in range(4)] + [span(9, {}), span(8, {"attempt": "2"})]
    where = syntax.PredAnd((compare("attempt", ">", 1),
                            syntax.PredNot(compare("attempt", "==", 3))))
    wanted: set[str] = set()
    scan(packed(spans, {"n": (plain_test(where),)}), set(), wanted)
    assert wanted == {spans[2].trace_id}
    wanted.clear()  # a name no rule tests: never wanted; a name any span of which will do: always
    scan(packed(spans, {"other": (None,)}), set(), wanted)
    assert wanted == set()
    scan(packed(spans, {"n": (None,)}), set(), wanted)
    assert wanted == {s.trace_id for s in spans}
    wanted.clear()  # without tests: every trace
    scan(packed(spans), set(), wanted)
    assert wanted == {s.trace_id for s in spans}


STARTS = st.one_of(st.integers(0, 40), st.integers(2**64 - 3, 2**64 - 1),
                   st.sampled_from([-1, 2**64, 2**70]))
BOUNDS = st.one_of(st.integers(-5, 50), st.sampled_from([2**64 - 1, 2**64, 2**70, -2**70]))


@BOUNDED
@given(st.lists(st.lists(STARTS, min_size=0, max_size=3), min_size=1, max_size=5), BOUNDS, BOUNDS)
def test_scan_counts_the_window_as_evaluate_does(starts: list[list[int]], since: int,
                                                until: int) -> None:
    traces = [(f"{n:032x}", [span(n, {}, start) for start in found])
              for n, found in enumerate(starts)]
    packer = Packer(1, 0, SLOT_DESCRIPTORS, {}, (since, until))
    packer.add(traces)
    [chunk] = packer.take()
    assert chunk is not None
    inside: set[str] = set()
    wanted: set[str] = set()
    scan(chunk, inside, wanted)
    for trace_id, spans in traces:
        if not spans or any(not 0 <= s.start_ns < 2**64 for s in spans):
            assert trace_id in wanted  # known by id alone, or a start it cannot read: evaluated
        else:
            assert trace_id not in wanted
            assert (trace_id in inside) == any(since <= s.start_ns < until for s in spans)


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


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(WORKER_SPANS, max_size=4), min_size=1, max_size=8),
       st.one_of(st.none(), st.tuples(st.integers(0, 30), st.integers(0, 40))))
def test_a_worker_finds_what_it_finds_without_the_scan(traces: list, window: Any) -> None:
    rules = load_rules_text(RULES).rules
    plan = Plan(rules, SpanFilter.of(load_rules_text(RULES).projection()), "", 2, 1, 2**30, 0,
                None, window)
    worker = Worker(plan, [0, 0])
    assert worker.tests is not None
    packer = worker._packer(2, 0)
    for n, found in enumerate(traces):  # each trace in two halves, as two files would have it
        trace_id = f"{n:032x}"
        spans = [worker_span(trace_id, *params) for params in found]
        packer.add([(trace_id, spans[::2])])
        packer.add([(trace_id, spans[1::2])])
    chunks = [chunk for chunk in packer.take() if chunk is not None]
    scanned = [worker._evaluate_chunks([chunk]) for chunk in chunks]
    worker.tests = None
    plain_run = [worker._evaluate_chunks([chunk]) for chunk in chunks]
    for with_scan, without in zip(scanned, plain_run):
        assert with_scan.traces == without.traces
        assert [(s.rule_id, s.trace_id) for s in with_scan.signals] == \
            [(s.rule_id, s.trace_id) for s in without.signals]
        assert {k: (v.applied, v.violations, v.errors) for k, v in with_scan.stats.items()} == \
            {k: (v.applied, v.violations, v.errors) for k, v in without.stats.items()}
