"""Syntax tree to Python closures, compiled once per rule and evaluated against many traces.

Each node type has one builder in a dispatch table. Span-level builders return `Span -> bool`;
trace-level builders return `Trace -> bool`. A second, slower builder (`_witness`) finds the
spans that made a true expression true: it runs only when a rule fires, to name the offending
spans in the signal. Compile passes also collect the span names, globs and attributes a rule
reads (for pruning) and whether a violation can only appear as spans arrive (for early signals).
"""

from __future__ import annotations

import operator
import threading
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import re2

from sidecar.dsl import syntax
from sidecar.dsl.definitions import NO_DEFINITIONS, Definitions
from sidecar.dsl.parser import compile_regex, parse_expression, walk_preds
from sidecar.model.errors import ExpressionError
from sidecar.model.spans import Span, Trace

SpanTest = Callable[[Span], bool]
TraceTest = Callable[[Trace], bool]
SpanSource = Callable[[Trace], list[Span]]
# A span test as data, for code that reads spans without making them (replay's C Packer and
# judge): (UNKNOWN,), (COMPARE, key, op, literal) with op an index of PLAIN_OPS, (BARE, key),
# (COMPARE_THIS, key, op, this_key) against the span a for_each rule checks, (NOT, test),
# (AND, test, ...), (OR, test, ...). Keys are span attributes (never an intrinsic, a built-in or
# service.name, which come from elsewhere). UNKNOWN stands for what it cannot say.
PlainTest = tuple[Any, ...]
# A trace test as data: (EXISTS, name, PlainTest | None), (NOT, e), (AND, e, ...), (OR, e, ...),
# (UNKNOWN,) for the rest (counts, before/after, globs).
PlainExpr = tuple[Any, ...]
# A rule's whole verdict as data (CompiledExpr.plain): (CONDITION, names, PlainExpr), applying
# where a span of one of `names` is; (FOR_EACH, name, where, always, never), with `where` a
# PlainTest or None (any span of the name); or (WHEN, when, always, never), applying where the
# PlainExpr `when` holds; always/never a PlainExpr or None.
PlainRule = tuple[Any, ...]
UNKNOWN, COMPARE, BARE, NOT, AND, OR, COMPARE_THIS, EXISTS = range(8)
CONDITION, FOR_EACH, WHEN = range(3)
PLAIN_OPS = ("==", "!=", "<", "<=", ">", ">=")


class ScopeTest(NamedTuple):
    """Where a rule applies: a span named `name` passing `test` (None: any span of the name);
    `plain` is `test` as data (None with no test)."""

    name: str
    test: SpanTest | None
    plain: PlainTest | None


MISSING: Any = object()  # an attribute the span does not have
_NUMBER = (int, float)
_EMPTY: list[Span] = []
_EMPTY_TRACE_ID = "0" * 32
_ORDER = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}
_COUNT_OPS = {"==": operator.eq, "!=": operator.ne, **_ORDER}
# The span a for_each rule is checking, for `this` in its clauses: set per evaluating thread
# (the live sidecar judges traces on several threads with the same compiled rules).
_THIS = threading.local()

# Span ids as lowercase hex; they win over span attributes spelled the same (a root span has no
# parent_span_id), so an attribute of that name is never read, and never kept for a rule.
INTRINSICS = frozenset(("span_id", "parent_span_id", "trace_id"))

_BUILTINS: dict[str, Callable[[Span], Any]] = {
    "name": lambda s: s.name,
    "status": lambda s: s.status,
    "kind": lambda s: s.kind,
    "duration_ms": lambda s: s.duration_ms,
}


@dataclass(frozen=True)
class References:
    """What an expression reads: exact span names, `*` globs, and attribute names."""

    names: frozenset[str] = frozenset()
    globs: frozenset[str] = frozenset()
    attributes: frozenset[str] = frozenset()
    # (selector text, is glob, attributes read from the spans it selects), for pruning per name
    selectors: frozenset[tuple[str, bool, frozenset[str]]] = frozenset()
    # reads parent links across the whole trace (`X under this`): every span's ids must be kept
    structure: bool = False

    def __or__(self, other: References) -> References:
        return References(self.names | other.names, self.globs | other.globs,
                          self.attributes | other.attributes, self.selectors | other.selectors,
                          self.structure or other.structure)


@dataclass(frozen=True)
class CompiledExpr:
    """A compiled expression: `test(trace)` is true when the rule it belongs to fires."""

    text: str
    # its syntax tree, kept for the passes that read it (TraceQL translation, analysis)
    tree: syntax.Expr | syntax.Clauses | syntax.ForEach = field(repr=False, compare=False)
    test: TraceTest = field(repr=False)
    witness: SpanSource = field(repr=False)  # the spans that made `test` true
    refs: References
    monotone: bool  # once true, more spans can never make it false
    applies: TraceTest = field(repr=False)  # the trace is in scope: `when` held, or a named span
    # true on a trace holding none of the spans it names: true on every such trace, so such a
    # trace is never pruned away unseen (DESIGN: absence is part of the semantics)
    fires_on_empty: bool = False
    uses: frozenset[str] = frozenset()  # the lists and macros it uses (through macros too)
    # `applies` span by span: true exactly on traces holding a span of one of these names that
    # passes that name's test (None: any span of the name). None when applying takes more than
    # one span to tell (`when`, a glob, a rule that fires without its spans).
    scope: tuple[ScopeTest, ...] | None = None
    # the rule's verdict as data (PlainRule), for replay's C judge; None when a glob selects
    # what it applies to, or it fires on a trace without its spans
    plain: PlainRule | None = None


def compile_expression(text: str, definitions: Definitions = NO_DEFINITIONS) -> CompiledExpr:
    """Compile a condition: an expression, or the in-DSL `when {} always {} never {}` form."""
    tree, uses, _ = parse_expression(text, definitions)
    _refuse_this(text, tree)
    if isinstance(tree, syntax.Clauses):
        return combine_clauses(
            _compile_tree(text, tree.when, uses),
            _compile_tree(text, tree.always, uses) if tree.always is not None else None,
            _compile_tree(text, tree.never, uses) if tree.never is not None else None,
        )
    return _compile_tree(text, tree, uses)


def compile_clause(text: str, definitions: Definitions = NO_DEFINITIONS,
                   for_each: bool = False) -> CompiledExpr:
    """Compile one `when`, `always` or `never` clause given as its own YAML key; `this` only
    in the always/never of a for_each rule."""
    tree, uses, _ = parse_expression(text, definitions)
    if isinstance(tree, syntax.Clauses):
        raise ExpressionError("a when/always/never block cannot be nested inside a clause",
                              text, tree.start, tree.end)
    if not for_each:
        _refuse_this(text, tree)
    return _compile_tree(text, tree, uses)


def compile_selector(text: str, definitions: Definitions = NO_DEFINITIONS) -> CompiledExpr:
    """Compile a `for_each` selector: one span selector with optional `.where(...)` (or a macro
    standing for one)."""
    tree, uses, _ = parse_expression(text, definitions)
    if not isinstance(tree, syntax.Exists):
        raise ExpressionError("for_each takes one span selector, with optional .where(...), "
                              "such as order.placed.where(total > 0)", text, tree.start, tree.end)
    _refuse_this(text, tree, "the for_each selector defines the span 'this' names")
    return _compile_tree(text, tree, uses)


def combine_for_each(each: CompiledExpr, always: CompiledExpr | None,
                     never: CompiledExpr | None) -> CompiledExpr:
    """A violation when, for some span `each` selects, `always` is false or `never` is true;
    the offending spans are those failing spans."""
    if always is None and never is None:
        raise ValueError("a for_each rule needs always or never")
    assert isinstance(each.tree, syntax.Exists)
    spans = _query(each.tree.query)
    selector = each.tree.query.selector
    where_tree = each.tree.query.where
    where = None if where_tree is None else _pred(where_tree)
    a, n = always.test if always else None, never.test if never else None

    def failing(trace: Trace, first_only: bool = False) -> list[Span]:
        found: list[Span] = []
        selected = spans(trace)
        if not selected:  # (most traces: no span to check)
            return found
        outer = getattr(_THIS, "span", None)
        try:
            for span in selected:
                _THIS.span = span
                if (a is not None and not a(trace)) or (n is not None and n(trace)):
                    found.append(span)
                    if first_only:
                        break
        finally:
            _THIS.span = outer
        return found

    clauses = [c for c in (always, never) if c is not None]
    refs = each.refs
    for clause in clauses:
        refs = refs | clause.refs
    # what the clauses read through `this` is read from the spans `each` selects
    this_reads = frozenset().union(*(_this_attributes(c.tree) for c in clauses))
    if this_reads:
        refs = refs | References(attributes=this_reads, selectors=frozenset(
            {(selector.name, selector.glob, this_reads)}))
    tree = syntax.ForEach(each.tree.query, always.tree if always else None,
                          never.tree if never else None)
    return CompiledExpr(each.text, tree, lambda trace: bool(failing(trace, first_only=True)),
                        failing, refs, always is None and never is not None and never.monotone,
                        applies=lambda trace: bool(spans(trace)), fires_on_empty=False,
                        uses=each.uses.union(*(c.uses for c in clauses)),
                        scope=None if selector.glob else (ScopeTest(
                            selector.name, where,
                            None if where_tree is None else plain_test(where_tree)),),
                        plain=None if selector.glob else (
                            FOR_EACH, selector.name,
                            None if where_tree is None else plain_test(where_tree),
                            *_plain_clauses(always, never)))


def _refuse_this(text: str, tree: syntax.Expr | syntax.Clauses,
                 why: str = "'this' names the span a for_each rule checks") -> None:
    """`this` outside the always/never of a for_each rule has nothing to name: a load error,
    never a string "this.x" that silently never matches."""
    for node in _this_nodes(tree):
        raise ExpressionError(f"'this' cannot be used here: {why}, so it may stand only in "
                              "that rule's always/never", text, node.start, node.end,
                              code="misplaced-this")


def combine_clauses(when: CompiledExpr, always: CompiledExpr | None,
                    never: CompiledExpr | None) -> CompiledExpr:
    """A violation when `when` holds and (`always` is false or `never` is true)."""
    if always is None and never is None:
        raise ValueError("a when rule needs always or never")
    w, a, n = when.test, always.test if always else None, never.test if never else None

    def test(trace: Trace) -> bool:
        return w(trace) and ((a is not None and not a(trace)) or (n is not None and n(trace)))

    def witness(trace: Trace) -> list[Span]:
        spans = when.witness(trace)
        if never is not None and never.test(trace):
            spans = _union(spans, never.witness(trace))
        return spans

    refs, uses = when.refs, when.uses
    for clause in (always, never):
        if clause is not None:
            refs, uses = refs | clause.refs, uses | clause.uses
    monotone = always is None and when.monotone and never is not None and never.monotone
    tree = syntax.Clauses(when=when.tree, always=always.tree if always else None,
                          never=never.tree if never else None)
    on_empty = _true_on_empty(test)
    return CompiledExpr(when.text, tree, test, witness, refs, monotone, applies=when.test,
                        fires_on_empty=on_empty, uses=uses,
                        plain=None if on_empty else (
                            WHEN, plain_expr(when.tree), *_plain_clauses(always, never)))


def _compile_tree(text: str, tree: syntax.Expr, uses: frozenset[str]) -> CompiledExpr:
    refs = _references(tree)
    sources = [_candidates(syntax.Selector(name)) for name in sorted(refs.names)]
    sources += [_candidates(syntax.Selector(glob, glob=True)) for glob in sorted(refs.globs)]
    test = _expr(tree)
    on_empty = _true_on_empty(test)
    return CompiledExpr(text, tree, test, _witness(tree), refs, _monotone(tree, positive=True),
                        applies=lambda trace: on_empty or any(source(trace) for source in sources),
                        fires_on_empty=on_empty, uses=uses,
                        scope=None if on_empty or refs.globs else
                        tuple(ScopeTest(name, None, None) for name in sorted(refs.names)),
                        plain=None if on_empty or refs.globs else
                        (CONDITION, tuple(sorted(refs.names)), plain_expr(tree)))


def _true_on_empty(test: TraceTest) -> bool:
    """Whether `test` holds on a trace with no spans (so on any trace without the spans it
    names). An expression that raises there is taken as false: it cannot be judged without
    spans, and a rule failure is reported where it is evaluated."""
    try:
        return bool(test(Trace(_EMPTY_TRACE_ID, ())))
    except Exception:
        return False


# --- span level ---------------------------------------------------------------------------------

def attribute_getter(key: str) -> Callable[[Span], Any]:
    """Resolve an attribute: the id intrinsics first, then span attributes, then resource
    service.name, then built-ins (DESIGN rules 8 and 19)."""
    if key in INTRINSICS:
        def intrinsic(s: Span) -> Any:
            value = getattr(s, key)
            return value if value.strip("0") else MISSING  # "" or all zeros: no such id
        return intrinsic
    if key == "service.name":
        return lambda s: s.attributes.get(key, MISSING if s.service is None else s.service)
    builtin = _BUILTINS.get(key)
    if builtin is not None:
        def get(s: Span) -> Any:
            value = s.attributes.get(key, MISSING)
            return builtin(s) if value is MISSING else value
        return get
    return lambda s: s.attributes.get(key, MISSING)


def _is_number(value: Any) -> bool:
    kind = type(value)
    return kind is int or kind is float


def literal_equals(value: Any, literal: Any) -> bool:
    """Equality without coercion: numbers by value, booleans only with booleans. (Strings
    first: they are most of what rules compare.)"""
    if type(value) is str:
        return type(literal) is str and value == literal
    if type(value) is bool or type(literal) is bool:
        return value is literal
    return _is_number(literal) and _is_number(value) and value == literal


def _compare(node: syntax.Compare) -> SpanTest:
    if isinstance(node.value, syntax.ThisAttr):
        return _compare_this(node.attr, node.op, node.value.attr)
    get, op, literal = attribute_getter(node.attr), node.op, node.value
    if op == "==":
        if type(literal) is str:
            return lambda s: get(s) == literal  # only a str equals a str
        return lambda s: literal_equals(get(s), literal)
    if op == "!=":
        return lambda s: (v := get(s)) is not MISSING and not literal_equals(v, literal)
    if op in _ORDER:
        order = _ORDER[op]
        if isinstance(literal, bool):
            return lambda s: False  # booleans have no order; never silently true
        if type(literal) is str:
            return lambda s: type(v := get(s)) is str and order(v, literal)
        return lambda s: _is_number(v := get(s)) and order(v, literal)
    if op == "in":
        items = tuple(literal)  # type: ignore[arg-type]
        strings = frozenset(i for i in items if type(i) is str)
        numbers = frozenset(i for i in items if _is_number(i))
        booleans = frozenset(i for i in items if isinstance(i, bool))

        def member(s: Span) -> bool:
            value = get(s)
            kind = type(value)
            if kind is str:
                return value in strings
            if kind is int or kind is float:
                return value in numbers  # a set of non-bool numbers: 1 == 1.0, never True
            return kind is bool and value in booleans
        return member
    if op == "matches":
        regex = compile_regex(literal)
        search = memoized(lambda text: regex.search(text) is not None)
        return lambda s: type(v := get(s)) is str and search(v)
    if op == "contains":
        if type(literal) is not str:
            return lambda s: False  # a substring test needs a string on both sides
        return lambda s: type(v := get(s)) is str and literal in v
    raise AssertionError(f"unknown operator {op}")


def _compare_this(attr: str, op: str, this_attr: str) -> SpanTest:
    """`attr op this.this_attr`: the same typing as against a literal (rules 10, 11), with the
    checked span's value as the literal; false when either side is missing."""
    get, get_this = attribute_getter(attr), attribute_getter(this_attr)
    compare = _THIS_OPS.get(op) or _ordered(_ORDER[op])

    def test(s: Span) -> bool:
        value, other = get(s), get_this(_THIS.span)
        return value is not MISSING and other is not MISSING and compare(value, other)
    return test


def _ordered(order: Callable[[Any, Any], bool]) -> Callable[[Any, Any], bool]:
    """An order between two strings or two numbers; false across types."""
    return lambda value, other: (type(value) is str and type(other) is str
                                 or _is_number(value) and _is_number(other)) \
        and order(value, other)


_THIS_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "==": literal_equals,
    "!=": lambda value, other: not literal_equals(value, other),
    "contains": lambda value, other: type(value) is str and type(other) is str
    and other in value,
}


def _bare(node: syntax.Bare) -> SpanTest:
    get = attribute_getter(node.attr)
    return lambda s: get(s) is True


def _pred_not(node: syntax.PredNot) -> SpanTest:
    inner = _pred(node.operand)
    return lambda s: not inner(s)


def _pred_and(node: syntax.PredAnd) -> SpanTest:
    parts = tuple(_pred(p) for p in node.operands)
    if len(parts) == 2:
        first, second = parts
        return lambda s: first(s) and second(s)
    return lambda s: all(p(s) for p in parts)


def _pred_or(node: syntax.PredOr) -> SpanTest:
    parts = tuple(_pred(p) for p in node.operands)
    if len(parts) == 2:
        first, second = parts
        return lambda s: first(s) or second(s)
    return lambda s: any(p(s) for p in parts)


def plain_test(node: syntax.Pred) -> PlainTest:
    """`node` as data (PlainTest), saying what _pred's test says: comparisons of a span
    attribute with a literal or a `this` attribute (== != < <= > >=), bare attributes, not, and,
    or; UNKNOWN for the rest (in, matches, contains, intrinsics, built-ins, service.name)."""
    if isinstance(node, syntax.PredNot):
        return (NOT, plain_test(node.operand))
    if isinstance(node, (syntax.PredAnd, syntax.PredOr)):
        return (AND if isinstance(node, syntax.PredAnd) else OR,
                *(plain_test(operand) for operand in node.operands))
    if not isinstance(node, (syntax.Compare, syntax.Bare)) or not _plain_key(node.attr):
        return (UNKNOWN,)
    if isinstance(node, syntax.Bare):
        return (BARE, node.attr)
    if node.op not in PLAIN_OPS:
        return (UNKNOWN,)
    if isinstance(node.value, syntax.ThisAttr):
        if not _plain_key(node.value.attr):
            return (UNKNOWN,)
        return (COMPARE_THIS, node.attr, PLAIN_OPS.index(node.op), node.value.attr)
    if type(node.value) not in (str, int, float, bool):
        return (UNKNOWN,)
    return (COMPARE, node.attr, PLAIN_OPS.index(node.op), node.value)


def _plain_clauses(always: CompiledExpr | None,
                   never: CompiledExpr | None) -> tuple[PlainExpr | None, PlainExpr | None]:
    """A rule's always and never as PlainExprs (None: no such clause)."""
    return (None if always is None else plain_expr(always.tree),
            None if never is None else plain_expr(never.tree))


def _plain_key(key: str) -> bool:
    """A key read from the span's attributes alone (see attribute_getter)."""
    return key not in INTRINSICS and key not in _BUILTINS and key != "service.name"


def plain_expr(node: syntax.Expr) -> PlainExpr:
    """`node` as data (PlainExpr), saying what _expr's test says: existence of a span named
    exactly (with a `where` as plain_test has it), not, and, or; UNKNOWN for the rest."""
    if isinstance(node, syntax.Not):
        return (NOT, plain_expr(node.operand))
    if isinstance(node, (syntax.And, syntax.Or)):
        return (AND if isinstance(node, syntax.And) else OR,
                *(plain_expr(operand) for operand in node.operands))
    if not isinstance(node, syntax.Exists) or node.query.selector.glob:
        return (UNKNOWN,)
    where = node.query.where
    return (EXISTS, node.query.selector.name, None if where is None else plain_test(where))


_PRED_BUILDERS: dict[type, Callable[[Any], SpanTest]] = {
    syntax.Compare: _compare, syntax.Bare: _bare, syntax.PredNot: _pred_not,
    syntax.PredAnd: _pred_and, syntax.PredOr: _pred_or,
}


def _pred(node: syntax.Pred) -> SpanTest:
    return _PRED_BUILDERS[type(node)](node)


# --- trace level --------------------------------------------------------------------------------

def memoized(test: Callable[[str], bool], size: int = 4096) -> Callable[[str], bool]:
    """Remember a string test's answers: span names and attribute values repeat a lot, and one
    call into RE2 costs microseconds."""
    answers: dict[str, bool] = {}

    def remembered(text: str) -> bool:
        answer = answers.get(text)
        if answer is None:
            if len(answers) >= size:
                answers.clear()
            answer = answers[text] = test(text)
        return answer
    return remembered


def glob_matcher(pattern: str) -> Callable[[str], bool]:
    """`*` in a quoted selector matches any run of characters; nothing else is special."""
    parts = pattern.split("*")
    if len(parts) == 1:
        return lambda name: name == pattern
    if len(parts) == 2:
        head, tail = parts
        size = len(head) + len(tail)
        return lambda name: len(name) >= size and name.startswith(head) and name.endswith(tail)
    regex = compile_regex(".*".join(re2.escape(part) for part in parts))
    return memoized(lambda name: regex.fullmatch(name) is not None)


def _candidates(selector: syntax.Selector) -> SpanSource:
    name = selector.name
    if selector.glob:
        matches = glob_matcher(name)
        return lambda trace: trace.matching(name, matches)
    return lambda trace: trace.by_name.get(name, _EMPTY)


def _query(query: syntax.Query) -> SpanSource:
    candidates = _candidates(query.selector)
    if query.where is None:
        return candidates
    pred = _pred(query.where)
    return lambda trace: [s for s in candidates(trace) if pred(s)]


def _exists(node: syntax.Exists) -> TraceTest:
    candidates = _candidates(node.query.selector)
    if node.query.where is None:
        return lambda trace: bool(candidates(trace))
    pred = _pred(node.query.where)

    def exists(trace: Trace) -> bool:
        for span in candidates(trace):
            if pred(span):
                return True
        return False
    return exists


def distinct_key(value: Any) -> Any:
    """Keys for counting distinct values without coercion (True and 1 stay apart)."""
    if isinstance(value, bool):
        return ("bool", value)
    if _is_number(value):
        return ("number", value)
    try:
        hash(value)
    except TypeError:
        return ("other", repr(value))
    return (type(value).__name__, value)


def _count(node: syntax.Count) -> Callable[[Trace], int]:
    spans = _query(node.query)
    if node.unique is None:
        return lambda trace: len(spans(trace))
    get = attribute_getter(node.unique)

    def distinct(trace: Trace) -> int:
        return len({distinct_key(v) for s in spans(trace) if (v := get(s)) is not MISSING})
    return distinct


def _count_compare(node: syntax.CountCompare) -> TraceTest:
    left, op = _count(node.left), _COUNT_OPS[node.op]
    if isinstance(node.right, int):
        bound = node.right
        return lambda trace: op(left(trace), bound)
    right = _count(node.right)
    return lambda trace: op(left(trace), right(trace))


def _before(node: syntax.Before) -> TraceTest:
    firsts, seconds, within = _query(node.first), _query(node.second), node.within_ns

    def before(trace: Trace) -> bool:
        a_spans = firsts(trace)
        if not a_spans:
            return False
        b_spans = seconds(trace)
        if not b_spans:
            return False
        if within is None:
            return min(s.start_ns for s in a_spans) < max(s.start_ns for s in b_spans)
        starts = sorted(s.start_ns for s in a_spans)
        for b in b_spans:
            i = bisect_left(starts, b.start_ns - within)
            if i < len(starts) and starts[i] < b.start_ns:
                return True
        return False
    return before


def _relative(node: syntax.Relative) -> TraceTest:
    """`X before/after this [within D]`, `X under this`: against the span being checked."""
    spans, within = _query(node.query), node.within_ns
    if node.relation == "under":
        def under(trace: Trace) -> bool:
            found = spans(trace)
            if not found:
                return False
            below = trace.descends_from(_THIS.span)
            return any(s.span_id in below for s in found)
        return under
    sign = 1 if node.relation == "before" else -1

    def ordered(trace: Trace) -> bool:
        start = _THIS.span.start_ns
        for s in spans(trace):
            gap = (start - s.start_ns) * sign  # how long s starts before (after) this
            if gap > 0 and (within is None or gap <= within):
                return True
        return False
    return ordered


def _not(node: syntax.Not) -> TraceTest:
    inner = _expr(node.operand)
    return lambda trace: not inner(trace)


def _and(node: syntax.And) -> TraceTest:
    parts = tuple(_expr(p) for p in node.operands)
    if len(parts) == 2:
        first, second = parts
        return lambda trace: first(trace) and second(trace)
    return lambda trace: all(p(trace) for p in parts)


def _or(node: syntax.Or) -> TraceTest:
    parts = tuple(_expr(p) for p in node.operands)
    if len(parts) == 2:
        first, second = parts
        return lambda trace: first(trace) or second(trace)
    return lambda trace: any(p(trace) for p in parts)


_EXPR_BUILDERS: dict[type, Callable[[Any], TraceTest]] = {
    syntax.Exists: _exists, syntax.CountCompare: _count_compare, syntax.Before: _before,
    syntax.Relative: _relative,
    syntax.Not: _not, syntax.And: _and, syntax.Or: _or,
}


def _expr(node: syntax.Expr) -> TraceTest:
    return _EXPR_BUILDERS[type(node)](node)


# --- passes: witnesses, references, monotonicity ------------------------------------------------

def _union(first: list[Span], second: list[Span]) -> list[Span]:
    seen = {id(s) for s in first}
    return first + [s for s in second if id(s) not in seen]


def _witness(node: syntax.Expr) -> SpanSource:
    """The spans behind a true expression; negated parts contribute none (they are absences)."""
    if isinstance(node, syntax.Exists):
        return _query(node.query)
    if isinstance(node, syntax.Relative):
        return _query(node.query)
    if isinstance(node, syntax.CountCompare):
        counted = [_query(node.left.query)]
        if isinstance(node.right, syntax.Count):
            counted.append(_query(node.right.query))
        unique = attribute_getter(node.left.unique) if node.left.unique is not None else None

        def counted_spans(trace: Trace) -> list[Span]:
            spans: list[Span] = []
            for source in counted:
                spans = _union(spans, source(trace))
            return spans if unique is None else [s for s in spans if unique(s) is not MISSING]
        return counted_spans
    if isinstance(node, syntax.Before):
        firsts, seconds = _query(node.first), _query(node.second)
        within = node.within_ns if node.within_ns is not None else float("inf")

        def ordered_pairs(trace: Trace) -> list[Span]:
            pairs = [(a, b) for a in firsts(trace) for b in seconds(trace)
                     if 0 < b.start_ns - a.start_ns <= within]
            return _union([a for a, _ in pairs], [b for _, b in pairs])
        return ordered_pairs
    if isinstance(node, (syntax.And, syntax.Or)):
        parts = [(_expr(operand), _witness(operand)) for operand in node.operands]

        def true_parts(trace: Trace) -> list[Span]:
            spans: list[Span] = []
            for test, witness in parts:
                if test(trace):
                    spans = _union(spans, witness(trace))
            return spans
        return true_parts
    return lambda trace: []


def _queries(node: syntax.Expr) -> list[syntax.Query]:
    if isinstance(node, (syntax.Exists, syntax.Relative)):
        return [node.query]
    if isinstance(node, syntax.CountCompare):
        right = [node.right.query] if isinstance(node.right, syntax.Count) else []
        return [node.left.query, *right]
    if isinstance(node, syntax.Before):
        return [node.first, node.second]
    if isinstance(node, syntax.Not):
        return _queries(node.operand)
    return [q for operand in node.operands for q in _queries(operand)]


def _pred_attributes(pred: syntax.Pred | None) -> set[str]:
    if pred is None:
        return set()
    if isinstance(pred, (syntax.Compare, syntax.Bare, syntax.Unique)):
        return set() if pred.attr in INTRINSICS else {pred.attr}
    if isinstance(pred, syntax.PredNot):
        return _pred_attributes(pred.operand)
    return set().union(*(_pred_attributes(p) for p in pred.operands))


def _this_nodes(node: Any) -> list[syntax.Node]:
    """Every use of `this` in a trace-level tree (ThisAttr values and Relative terms)."""
    if isinstance(node, syntax.Clauses):
        parts = [node.when, node.always, node.never]
        return [found for part in parts if part is not None for found in _this_nodes(part)]
    found: list[syntax.Node] = []
    for query in _queries(node):
        found += [p.value for p in walk_preds(query.where)
                  if isinstance(p, syntax.Compare) and isinstance(p.value, syntax.ThisAttr)]
    return found + list(_relatives(node))


def _relatives(node: syntax.Expr) -> list[syntax.Relative]:
    if isinstance(node, syntax.Relative):
        return [node]
    if isinstance(node, syntax.Not):
        return _relatives(node.operand)
    if isinstance(node, (syntax.And, syntax.Or)):
        return [r for operand in node.operands for r in _relatives(operand)]
    return []


def _this_attributes(node: Any) -> frozenset[str]:
    """The attributes read from the checked span through `this.attr`."""
    return frozenset(n.attr for n in _this_nodes(node)
                     if isinstance(n, syntax.ThisAttr) and n.attr not in INTRINSICS)


def _references(node: syntax.Expr) -> References:
    reads: dict[tuple[str, bool], set[str]] = {}
    for query in _queries(node):
        key = (query.selector.name, query.selector.glob)
        reads.setdefault(key, set()).update(_pred_attributes(query.where))
    for count in _counts(node):
        if count.unique is not None and count.unique not in INTRINSICS:
            selector = count.query.selector
            reads[(selector.name, selector.glob)].add(count.unique)
    return References(
        names=frozenset(name for name, glob in reads if not glob),
        globs=frozenset(name for name, glob in reads if glob),
        attributes=frozenset(a for attrs in reads.values() for a in attrs),
        selectors=frozenset((name, glob, frozenset(attrs)) for (name, glob), attrs in reads.items()),
        structure=any(r.relation == "under" for r in _relatives(node)),
    )


def _counts(node: syntax.Expr) -> list[syntax.Count]:
    if isinstance(node, syntax.CountCompare):
        return [node.left] + ([node.right] if isinstance(node.right, syntax.Count) else [])
    if isinstance(node, syntax.Not):
        return _counts(node.operand)
    if isinstance(node, (syntax.And, syntax.Or)):
        return [c for operand in node.operands for c in _counts(operand)]
    return []


def _monotone(node: syntax.Expr, positive: bool) -> bool:
    """Can more spans only ever turn this from false to true (never back)?"""
    if isinstance(node, syntax.Not):
        return _monotone(node.operand, not positive)
    if isinstance(node, (syntax.And, syntax.Or)):
        return all(_monotone(operand, positive) for operand in node.operands)
    if not positive:
        return False  # a negated existence can flip back when a span arrives
    if isinstance(node, syntax.CountCompare):
        return isinstance(node.right, int) and node.op in (">", ">=")
    return True  # Exists and Before only gain witnesses as spans arrive
