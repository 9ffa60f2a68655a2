"""Property tests: the parser and the rule loader fail only in their own, reportable way, and a
rule's verdict on a trace never depends on the order its spans arrived in."""

from __future__ import annotations

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.dsl import compile_expression, parse
from sidecar.model.errors import ExpressionError, RuleLoadError
from sidecar.model.spans import Trace
from sidecar.rules import EXAMPLE_KEYS, RULE_KEYS, SIGNAL_KEYS, evaluate, load_rules_text
from sidecar.rules.compact import trace_from_compact

BOUNDED = settings(max_examples=200, deadline=None,
                   suppress_health_check=[HealthCheck.too_slow])


# --- (a) the parser raises ExpressionError and nothing else -------------------------------------

TOKENS = [
    "trace.has", "trace.count", "count", ".where", "where", "trace", ".", "has", "before",
    "within", "and", "or", "not", "in", "matches", "contains", "true", "false", "unique", "when",
    "always", "never", "{", "}", "(", ")", "[", "]", ",", "==", "!=", "<", "<=", ">", ">=", "=",
    "===", "&&", "||", "!", "'", '"', "a", "b", "x", "y", "payment.charge", "http.status_code",
    "name", "status", "duration_ms", "service.name", "USD", '"GET /users/{id}"', '"*"', '"a*"',
    '""', '"\\"', '"\\\\"', '"("', '"[a-"', '"(a)\\\\1"', '"^u.*v$"', "0", "1", "-1", "1.5",
    "-2.25", "1e3", "99999999999999999999999", "200ms", "5s", "1.5m", "2h", "3d", "# comment",
    "\n", "\t", "\r\n", "\x0c", "\u2028", "é", "\x00",
]
SEPARATORS = st.sampled_from(["", " ", " ", "\n", "  "])


@st.composite
def token_soup(draw: st.DrawFn) -> str:
    tokens = draw(st.lists(st.sampled_from(TOKENS), max_size=40))
    out = []
    for token in tokens:
        out.append(token)
        out.append(draw(SEPARATORS))
    return "".join(out)


def _parse_fails_cleanly(text: str) -> None:
    try:
        tree = parse(text)
    except ExpressionError as exc:
        rendered = str(exc)  # rendering must never fail either
        assert rendered.startswith("<expression>:")
        assert 0 <= exc.start <= len(text)
        assert exc.end > exc.start
        return
    # What parses also compiles and evaluates (on an empty trace at least).
    compiled = compile_expression(text)
    assert compiled.test(Trace("0" * 32, [])) in (True, False)
    assert tree is not None


@BOUNDED
@given(st.text(max_size=200))
def test_parse_arbitrary_text_raises_only_expression_error(text: str) -> None:
    _parse_fails_cleanly(text)


@BOUNDED
@given(token_soup())
def test_parse_token_soup_raises_only_expression_error(text: str) -> None:
    _parse_fails_cleanly(text)


@BOUNDED
@given(st.integers(min_value=1, max_value=400),
       st.sampled_from(["not ", "(", "x.where(", "x.where(not ", "x.where(("]))
def test_parse_deep_nesting_raises_only_expression_error(depth: int, opener: str) -> None:
    closer = {"not ": "", "(": ")", "x.where(": ")", "x.where(not ": ")", "x.where((": "))"}
    inner = "trace.has(a)" if opener in ("not ", "(") else "a == 1"
    if opener == "x.where(":
        text = "x.where(" + "(" * depth + inner + ")" * depth + ")"
    elif opener == "x.where(not ":
        text = "x.where(" + "not " * depth + inner + ")"
    elif opener == "x.where((":
        text = "x.where(" + "(not " * depth + inner + ")" * depth + ")"
    else:
        text = opener * depth + inner + closer[opener] * depth
    _parse_fails_cleanly(text)


# --- (b) the rule loader raises RuleLoadError and nothing else ----------------------------------

YAML_TOKENS = [
    "rules:", "tests:", "- ", "-", "id:", " r1", " bad_id", "condition:", "when:", "always:",
    "never:", "signal:", "message:", "context:", "examples:", "violates:", "spans:", "rule:",
    "severity:", " critical", " urgent", "enabled:", " false", " true", "tags:", "name:",
    "description:", " trace.has(a)", " count(b) > 1", " x.where(y == 1)", " a before b",
    ' x.where(y matches "(")', " {name: a}", " [{name: a, attributes: {x: 1}}]",
    " [{name: a, start_ms: .nan}]", " [{name: a, start_ms: .inf}]", " [{name: a, kind: X}]",
    "{", "}", "[", "]", ",", ":", "? ", "|", ">", "|-", '"', "'", '"\\ud800"', "&a", "*a",
    "!!binary", "!!python/object:os.system", "!!set", "!!omap", "%YAML 1.1", "---", "...",
    "# comment", "\t", "\n", "\n  ", "\n    ", "\n      ", " ", "null", "~", "1", "1.5",
    "2020-01-01", "0x1F", "<<: *a",
]


@st.composite
def yaml_soup(draw: st.DrawFn) -> str:
    return "".join(draw(st.lists(st.sampled_from(YAML_TOKENS), max_size=60)))


SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True),
    st.sampled_from(["r1", "r-2", "Bad_Id", "critical", "urgent", "trace.has(a)",
                     "count(a) > 1", "when { trace.has(a) } always { trace.has(b) }",
                     'x.where(y matches "(")', "a before b within 5ms", "x.where(y == unique)",
                     "payment.charge", "", "GET /users/{id}", "\ud800"]),
    st.text(max_size=10),
)
KEYS = st.sampled_from(sorted({*RULE_KEYS, *SIGNAL_KEYS, *EXAMPLE_KEYS, "rules", "tests", "rule",
                               "name", "attributes", "start_ms", "duration_ms", "kind",
                               "status", "service", "span_id", "x", "condtion"}))


TREE = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(KEYS, inner, max_size=5)),
    max_leaves=25,
)
NUMBER = st.one_of(st.integers(-2, 100), st.floats(),
                   st.sampled_from([float("nan"), float("inf"), -0.0, 1e300]))
COMPACT_SPAN = st.fixed_dictionaries(
    {"name": st.one_of(st.sampled_from(["a", "b"]), SCALARS)},
    optional={
        "attributes": st.one_of(st.dictionaries(st.sampled_from(["x", "y"]), TREE), TREE),
        "status": st.sampled_from(["OK", "ERROR", "UNSET", "BAD"]),
        "kind": st.sampled_from(["SERVER", "CLIENT", "INTERNAL", "BAD"]),
        "start_ms": st.one_of(NUMBER, SCALARS), "duration_ms": st.one_of(NUMBER, SCALARS),
        "service": SCALARS, "span_id": SCALARS, "x": SCALARS},
)
EXAMPLE = st.fixed_dictionaries(
    {}, optional={"violates": st.one_of(st.booleans(), SCALARS),
                  "spans": st.one_of(st.lists(COMPACT_SPAN, max_size=3), TREE),
                  "description": SCALARS, "rule": SCALARS, "x": SCALARS})
RULE = st.fixed_dictionaries(
    {"id": st.sampled_from(["r1", "r2", "r1"])},
    optional={**{key: TREE for key in RULE_KEYS if key != "id"},
              "examples": st.lists(EXAMPLE, max_size=2)},
)
DOCUMENT = st.one_of(
    TREE,
    st.fixed_dictionaries({}, optional={"rules": st.lists(RULE, max_size=3),
                                        "tests": st.lists(EXAMPLE, max_size=3)}),
)


def _load_fails_cleanly(text: str) -> None:
    try:
        load_rules_text(text, "soup.yaml")
    except RuleLoadError as exc:
        assert exc.errors
        for error in exc.errors:
            assert str(error).startswith("soup.yaml")


@BOUNDED
@given(st.text(max_size=300))
def test_load_arbitrary_text_raises_only_rule_load_error(text: str) -> None:
    _load_fails_cleanly(text)


@BOUNDED
@given(yaml_soup())
def test_load_yaml_soup_raises_only_rule_load_error(text: str) -> None:
    _load_fails_cleanly(text)


@BOUNDED
@given(DOCUMENT)
def test_load_generated_documents_raises_only_rule_load_error(document: object) -> None:
    _load_fails_cleanly(yaml.safe_dump(document, allow_unicode=True))


@BOUNDED
@given(st.lists(COMPACT_SPAN, max_size=4))
def test_example_spans_raise_only_rule_load_error(spans: list[dict[str, object]]) -> None:
    document = {"rules": [{"id": "r1", "condition": "trace.has(a)",
                           "examples": [{"violates": True, "spans": spans}]}]}
    _load_fails_cleanly(yaml.safe_dump(document, allow_unicode=True))


@pytest.mark.parametrize("depth", [10, 63, 64, 65, 200, 2000])
@pytest.mark.parametrize("opener", ["[", "{a: ", "- "])
def test_load_deeply_nested_yaml_raises_only_rule_load_error(depth: int, opener: str) -> None:
    if opener == "- ":
        text = "rules:\n" + "".join(" " * i + "-\n" for i in range(depth))
    else:
        closer = {"[": "]", "{a: ": "}"}[opener]
        text = "rules: " + opener * depth + "1" + closer * depth
    _load_fails_cleanly(text)


# --- (c) span order never changes a verdict -----------------------------------------------------

SELECTORS = st.sampled_from(["a", "b", "c", '"a"', '"*"', '"b*"'])
ATTRS = st.sampled_from(["x", "y"])
VALUES = st.sampled_from(["0", "1", "2", "-1", "1.5", "true", "false", '"u"', "v", '"1"'])
REGEXES = st.sampled_from(['"^u"', '"v$"', '"u|v"', '"1"', '"[0-9]+"'])
CMP = st.sampled_from(["==", "!=", "<", "<=", ">", ">="])
DURATIONS = st.sampled_from(["5ms", "20ms", "1s", "1m", "1h"])


def _pred(depth: int) -> st.SearchStrategy[str]:
    leaf = st.one_of(
        st.builds(lambda a, o, v: f"{a} {o} {v}", ATTRS, CMP, VALUES),
        st.builds(lambda a, vs: f"{a} in [{', '.join(vs)}]", ATTRS,
                  st.lists(VALUES, min_size=1, max_size=3)),
        st.builds(lambda a, r: f"{a} matches {r}", ATTRS, REGEXES),
        st.builds(lambda a, v: f"{a} contains {v}", ATTRS, st.sampled_from(['"u"', "v", "1"])),
        ATTRS,
    )
    if depth == 0:
        return leaf
    sub = _pred(depth - 1)
    return st.one_of(
        leaf,
        st.builds(lambda p: f"not {p}", sub),
        st.builds(lambda p, q, op: f"({p} {op} {q})", sub, sub, st.sampled_from(["and", "or"])),
    )


PRED = _pred(2)
WHERES = st.lists(PRED, max_size=2).map(lambda ps: "".join(f".where({p})" for p in ps))


@st.composite
def query(draw: st.DrawFn) -> str:
    selector, wheres = draw(SELECTORS), draw(WHERES)
    if draw(st.booleans()):
        return f"{selector}{wheres}"
    return f"trace.has({selector}{wheres})" if draw(st.booleans()) \
        else f"trace.has({selector}){wheres}"


@st.composite
def count(draw: st.DrawFn) -> str:
    selector, wheres = draw(SELECTORS), draw(WHERES)
    prefix = draw(st.sampled_from(["count", "trace.count"]))
    if draw(st.booleans()):
        attr = draw(ATTRS)
        rest = draw(st.one_of(st.none(), PRED))
        unique = f"{attr} == unique" if rest is None else f"{rest} and {attr} == unique"
        wheres += f".where({unique})"
    return f"{prefix}({selector}){wheres}"


@st.composite
def trace_leaf(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["exists", "count-int", "int-count", "count-count", "before"]))
    if kind == "exists":
        return draw(query())
    if kind == "count-int":
        return f"{draw(count())} {draw(CMP)} {draw(st.integers(-1, 4))}"
    if kind == "int-count":
        return f"{draw(st.integers(-1, 4))} {draw(CMP)} {draw(count())}"
    if kind == "count-count":
        return f"{draw(count())} {draw(CMP)} {draw(count())}"
    within = f" within {draw(DURATIONS)}" if draw(st.booleans()) else ""
    return f"{draw(query())} before {draw(query())}{within}"


def _trace_expr(depth: int) -> st.SearchStrategy[str]:
    if depth == 0:
        return trace_leaf()
    sub = _trace_expr(depth - 1)
    return st.one_of(
        trace_leaf(),
        st.builds(lambda p: f"not {p}", sub),
        st.builds(lambda p: f"({p})", sub),
        st.builds(lambda p, q, op: f"{p} {op} {q}", sub, sub, st.sampled_from(["and", "or"])),
    )


TRACE_EXPR = _trace_expr(3)


@st.composite
def condition(draw: st.DrawFn) -> str:
    if draw(st.integers(0, 4)) > 0:
        return draw(TRACE_EXPR)
    clauses = [f"when {{ {draw(TRACE_EXPR)} }}"]
    keywords = draw(st.sampled_from([["always"], ["never"], ["always", "never"],
                                     ["never", "always"]]))
    clauses += [f"{kw} {{ {draw(TRACE_EXPR)} }}" for kw in keywords]
    return " ".join(clauses)


ATTRIBUTE_VALUES = st.one_of(
    st.integers(-1, 3), st.sampled_from([1.0, 1.5, -0.5]), st.booleans(),
    st.sampled_from(["u", "v", "1", "uv", "xu", ""]),
)
COMPACT_SPANS = st.lists(
    st.fixed_dictionaries(
        {"name": st.sampled_from(["a", "b", "c", "d", "ab", "ba"]),
         "start_ms": st.integers(0, 30)},
        optional={"attributes": st.dictionaries(ATTRS, ATTRIBUTE_VALUES, max_size=2),
                  "duration_ms": st.integers(0, 10),
                  "status": st.sampled_from(["OK", "ERROR", "UNSET"])},
    ),
    max_size=8,
)


@BOUNDED
@given(condition(), COMPACT_SPANS, st.data())
def test_verdict_does_not_depend_on_span_order(text: str, spans: list[dict[str, object]],
                                               data: st.DataObject) -> None:
    compiled = compile_expression(text)  # well formed by construction: must compile
    trace = trace_from_compact(spans, seed=text)
    permuted = Trace(trace.trace_id, data.draw(st.permutations(trace.spans), label="order"))
    verdict = compiled.test(trace)
    assert compiled.test(permuted) == verdict
    if verdict:  # the offending spans are the same set, whatever the order
        assert {s.span_id for s in compiled.witness(permuted)} == \
            {s.span_id for s in compiled.witness(trace)}


@BOUNDED
@given(TRACE_EXPR, st.one_of(st.none(), TRACE_EXPR), st.one_of(st.none(), TRACE_EXPR),
       COMPACT_SPANS, st.data())
def test_when_rule_verdict_does_not_depend_on_span_order(
        when: str, always: str | None, never: str | None, spans: list[dict[str, object]],
        data: st.DataObject) -> None:
    if always is None and never is None:
        always = "trace.has(c)"
    rule: dict[str, object] = {"id": "r", "when": when}
    if always is not None:
        rule["always"] = always
    if never is not None:
        rule["never"] = never
    loaded = load_rules_text(yaml.safe_dump({"rules": [rule]})).rules[0]
    trace = trace_from_compact(spans, seed=when)
    permuted = Trace(trace.trace_id, data.draw(st.permutations(trace.spans), label="order"))
    first, second = loaded.evaluate(trace), loaded.evaluate(permuted)
    assert (first is None) == (second is None)
    if first is not None and second is not None:
        assert {s.span_id for s in first.spans} == {s.span_id for s in second.spans}


@BOUNDED
@given(condition(), TRACE_EXPR, COMPACT_SPANS)
def test_a_rule_out_of_scope_never_fires(text: str, clause: str,
                                         spans: list[dict[str, object]]) -> None:
    """Replay skips a rule that does not apply to a trace (its compliance figure needs the
    scope anyway): that may never change what fires, for condition, when and for_each rules."""
    rules = load_rules_text(yaml.safe_dump({"rules": [
        {"id": "condition", "condition": text},
        {"id": "when", "when": "trace.has(a)", "never": clause},
        {"id": "each", "for_each": "b.where(x > 0)", "never": clause}]})).rules
    trace = trace_from_compact(spans, seed=text)
    judged = evaluate(trace, rules, scope=True)
    assert [v.rule.id for v in judged.violations] == \
        [v.rule.id for v in evaluate(trace, rules).violations]
    assert {r.id for r in judged.applied} >= {v.rule.id for v in judged.violations}
