"""Rules to a TraceQL search, so Tempo (the distributed store) does the first, coarse filtering.

The query is a *necessary* condition for a violation, never a sufficient one: every trace that
could violate some rule matches it, and replay then fetches each match whole and evaluates the
real rule locally. Nothing is pushed down unless Tempo's semantics make the query at most as
strict as BeTrace's (the design's rules 1-15 against the TraceQL documentation,
https://grafana.com/docs/tempo/latest/traceql/construct-traceql-queries/).

Per rule, from the syntax tree it was compiled from (for when/always/never rules, in YAML keys or
the in-DSL `when {} always {} never {}` form: `when` and (`not always` or `never`)):

- `X.where(p)` / `trace.has(X)` need a span `{ name = "X" && <p pushed down> }`; a quoted glob
  selector becomes `name =~ "(?s)GET /users/.*"` (TraceQL regexes are fully anchored), and a
  selector that is only `*` puts no condition on the name.
- `count(X) op k` needs a span X only when `0 op k` is false (`> 0`, `>= 1`, `== 3`, `!= 0`):
  a count that may be zero needs nothing. Counts themselves are never pushed (`| count() > k`)
  because Tempo may evaluate a trace split across blocks in pieces. `count(A) > count(B)` needs
  an A, `<` needs a B, `!=` needs either; `==`, `<=`, `>=` hold when both are zero: nothing.
  `count(X).where(a == unique)` needs an X (presence of `a` is not pushed: `!= nil` is recent).
- `A before B` needs an A (and a B; see `and`), ignoring order and `within`.
- `or` maps to the spanset operator `||`. Of an `and`, only one side is pushed (the first that
  narrows anything): Tempo may evaluate a trace that is still split across blocks one block at a
  time, so `{A} && {B}` could miss a trace whose A and B spans sit in different blocks, for the
  same reason counts are never pushed. `not` is pushed inwards (De Morgan), and
  a negated existence (`not trace.has(X)`, or `always { trace.has(X) }`) needs nothing. A rule
  that needs nothing makes the whole query `{ }`: every trace in the range is fetched.

Inside `.where(...)`, only comparisons with a literal are pushed; `!=` never is (BeTrace's `!=`
is true for a value of another type, TraceQL's is not), nor is anything under `not` except
through De Morgan. The rest of the where-clause is simply left out, which only widens the query.

- Attributes are span attributes (`span.attempt`); names outside `[A-Za-z_][A-Za-z0-9_]*`
  dotted segments are quoted (`span."http route"`, Tempo 2.4+). String literals escape `\\`,
  `"` and control characters.
- Numbers: Tempo does not compare int attributes with float literals or the reverse (Tempo issue
  #4332, open), while BeTrace compares numbers by value. So `attempt > 1` becomes
  `(span.attempt > 1 || span.attempt > 1.0)`; a fractional bound is rounded outwards on the int
  side (`amount > 50.5` gives `span.amount > 50 || span.amount > 50.5`). Integers beyond 2**53
  are not pushed. Booleans compare with `= true` / `= false`; a bare `.where(flag)` is
  `span.flag = true`. Strings: `=`, and `< <= > >=` (TraceQL orders strings by bytes, and UTF-8
  byte order is code point order, which is Python's). `in [..]` is a disjunction of `=`.
  `matches "re"` becomes `=~ "(?s:.*)(?:re)(?s:.*)"` (Go's regexp is RE2 syntax; anchoring is
  undone), `contains "s"` a regex with `s` quoted.
- Built-in fields resolve to an attribute of that name first (rule 8), so each keeps a span
  attribute alternative: `kind == SERVER` is `(kind = server || span.kind = "SERVER")`,
  `status == ERROR` is `(status = error || span.status = "ERROR")`, `name == "x"` is
  `(name = "x" || span.name = "x")`, `service.name == "x"` is
  `(span.service.name = "x" || resource.service.name = "x")`. `duration_ms > v` and `>= v` are
  `duration > <v>ms` and `duration >= <v>ms` (in ns when v is fractional, with the float
  rounding of duration_ms accounted for); other comparisons on duration_ms, status and kind are
  not pushed, nor are orderings of `name`.

Arrays: TraceQL's `=` matches an array holding the value while BeTrace's does not match arrays
at all; that only widens the query. Events, links and other resource attributes are never used.

For a store searched by span name alone (Jaeger: service and operation, exact), the same
conditions give `span_names_for`: the selector of each spanset of the query, so a trace that
could violate holds a span of one of those names; `{ }`, or a spanset whose selector is `"*"`,
means every trace.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from sidecar.dsl import syntax
from sidecar.dsl.compiler import INTRINSICS
from sidecar.model.spans import KINDS, STATUSES

__all__ = ["ANY_TRACE", "pushdowns", "rule_query", "span_names_for", "traceql_for"]

ANY_TRACE = "{ }"  # the query of a rule set that cannot be narrowed: every trace in the range

_SIMPLE_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_GO_REGEX_META = frozenset("\\.+*?()|[]{}^$")
_COUNT_OPS = {"==": lambda a, b: a == b, "!=": lambda a, b: a != b, "<": lambda a, b: a < b,
              "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b}
_NEGATED = {"==": "!=", "!=": "==", "<": ">=", ">=": "<", ">": "<=", "<=": ">"}
_EXACT_FLOAT = 2**53  # beyond it an int literal has no exact float twin
_MAX_DURATION_NS = 2**52  # below it duration_ms = ns / 1e6 is exact enough to bound (see below)
_NEVER: Any = object()  # a comparison no span can satisfy (e.g. a boolean ordered)


# --- span level: a condition one span must meet (None: no condition) ----------------------------

@dataclass(frozen=True)
class _AllOf:
    terms: tuple[SpanCond, ...]


@dataclass(frozen=True)
class _AnyOf:
    terms: tuple[SpanCond, ...]


SpanCond = str | _AllOf | _AnyOf


def _all_of(parts: Iterable[SpanCond | None]) -> SpanCond | None:
    terms: list[SpanCond] = []
    for part in parts:
        for term in part.terms if isinstance(part, _AllOf) else () if part is None else (part,):
            if term not in terms:
                terms.append(term)
    return None if not terms else terms[0] if len(terms) == 1 else _AllOf(tuple(terms))


def _any_of(parts: Iterable[SpanCond | None]) -> SpanCond | None:
    terms: list[SpanCond] = []
    for part in parts:
        if part is None:
            return None  # one unconstrained alternative leaves the span unconstrained
        for term in part.terms if isinstance(part, _AnyOf) else (part,):
            if term not in terms:
                terms.append(term)
    return None if not terms else terms[0] if len(terms) == 1 else _AnyOf(tuple(terms))


def _render_span(cond: SpanCond, nested: bool = False) -> str:
    if isinstance(cond, str):
        return cond
    if isinstance(cond, _AllOf):
        text = " && ".join(_render_span(t, nested=True) for t in cond.terms)
    else:
        text = " || ".join(_render_span(t, nested=True) for t in cond.terms)
    return f"({text})" if nested else text


# --- trace level: spansets a trace must hold (None: no condition) -------------------------------

@dataclass(frozen=True)
class _Spanset:
    """`{ t1 && t2 ... }`: some span meets every term; `selector` names it (for `span_names_for`;
    its `name = ...` term, if any, is among the terms)."""

    terms: tuple[SpanCond, ...]
    selector: syntax.Selector = field(compare=False)

    def implies(self, other: _Spanset) -> bool:
        return set(other.terms) <= set(self.terms)


@dataclass(frozen=True)
class _Either:
    parts: tuple[TraceCond, ...]


TraceCond = _Spanset | _Either




def _both(parts: Iterable[TraceCond | None]) -> TraceCond | None:
    """What a trace meeting every part must meet, as one condition Tempo can check block by
    block: the first part that narrows anything (see the module docstring on `and`)."""
    return next((part for part in parts if part is not None), None)


def _either(parts: Iterable[TraceCond | None]) -> TraceCond | None:
    flat: list[TraceCond] = []
    for part in parts:
        if part is None:
            return None
        for item in part.parts if isinstance(part, _Either) else (part,):
            if item not in flat:
                flat.append(item)
    # `{a && b} || {a}`: every trace matching the first matches the second
    kept = [p for p in flat if not (isinstance(p, _Spanset) and any(
        q is not p and isinstance(q, _Spanset) and p.implies(q) for q in flat))]
    return None if not kept else kept[0] if len(kept) == 1 else _Either(tuple(kept))


def _render(cond: TraceCond | None, nested: bool = False) -> str:
    if cond is None:
        return ANY_TRACE
    if isinstance(cond, _Spanset):
        return "{ " + " && ".join(_render_span(t, nested=True) for t in cond.terms) + " }"
    text = " || ".join(_render(p, nested=True) for p in cond.parts)
    return f"({text})" if nested else text


# --- rules to conditions ------------------------------------------------------------------------

def traceql_for(ruleset: Any) -> str:
    """One TraceQL query matching every trace that could violate any enabled rule of `ruleset`
    (a RuleSet). `{ }` when some rule cannot be narrowed (see `pushdowns`)."""
    rules: Sequence[Any] = ruleset.rules
    if not rules:
        raise ValueError("no enabled rules: nothing to search Tempo for")
    return _render(_either(_rule_condition(rule) for rule in rules))


def rule_query(rule: Any) -> str:
    """The TraceQL query for one rule alone."""
    return _render(_rule_condition(rule))


def pushdowns(ruleset: Any) -> dict[str, str]:
    """Each enabled rule's own query, to show what Tempo filters and which rule (query `{ }`)
    forces a scan of every trace."""
    return {rule.id: rule_query(rule) for rule in ruleset.rules}


def span_names_for(rules: Iterable[Any]) -> list[tuple[str, bool]] | None:
    """The selectors, as (name, is a glob), of which every trace that could violate one of
    `rules` holds at least one span: what a store searched by span name alone (Jaeger's
    operation) can filter with. None when some rule needs no particular span name (it fires
    without its spans, or only on what `"*"` selects): every trace must then be searched."""
    names: list[tuple[str, bool]] = []
    pending = [_either(_rule_condition(rule) for rule in rules)]
    while pending:
        cond = pending.pop()
        if cond is None:
            return None
        if isinstance(cond, _Either):
            pending.extend(reversed(cond.parts))
            continue
        selector = cond.selector
        if _name(selector) is None:
            return None  # `"*".where(...)`: a span of any name
        if (selector.name, selector.glob) not in names:
            names.append((selector.name, selector.glob))
    return names


def _rule_condition(rule: Any) -> TraceCond | None:
    """What a violating trace must hold, from the syntax tree the rule was compiled from: the
    whole condition, `when` and (`not always` or `never`), or a span for_each selects."""
    tree = rule.logic.tree
    if isinstance(tree, syntax.ForEach):  # some span it checks, at least
        return _query(tree.each)
    if isinstance(tree, syntax.Clauses):
        options = []
        if tree.always is not None:
            options.append(_need(tree.always, positive=False))
        if tree.never is not None:
            options.append(_need(tree.never, positive=True))
        return _both([_need(tree.when, positive=True), _either(options)])
    return _need(tree, positive=True)


def _need(node: syntax.Expr, positive: bool) -> TraceCond | None:
    """A condition every trace meets for which `node` is `positive` (true, or false)."""
    if isinstance(node, syntax.Not):
        return _need(node.operand, not positive)
    if isinstance(node, (syntax.And, syntax.Or)):
        parts = [_need(operand, positive) for operand in node.operands]
        return _both(parts) if isinstance(node, syntax.And) == positive else _either(parts)
    if isinstance(node, syntax.Exists):
        return _query(node.query) if positive else None
    if isinstance(node, syntax.Before):
        return _both([_query(node.first), _query(node.second)]) if positive else None
    if isinstance(node, syntax.CountCompare):
        op = node.op if positive else _NEGATED[node.op]
        if isinstance(node.right, int):
            return None if _COUNT_OPS[op](0, node.right) else _query(node.left.query)
        left, right = _query(node.left.query), _query(node.right.query)
        return {">": left, "<": right, "!=": _either([left, right])}.get(op)
    raise AssertionError(f"unknown node {type(node).__name__}")


def _query(query: syntax.Query) -> TraceCond | None:
    cond = _all_of([_name(query.selector), _pred(query.where, positive=True)])
    if cond is None:
        return None  # `{ }` matches every trace: no condition
    return _Spanset(cond.terms if isinstance(cond, _AllOf) else (cond,), query.selector)


def _name(selector: syntax.Selector) -> SpanCond | None:
    if not selector.glob:
        cond = f"name = {_string(selector.name)}"
    else:
        parts = selector.name.split("*")
        if not any(parts):
            return None  # "*" (or "**"): any name
        cond = f"name =~ {_string('(?s)' + '.*'.join(_quote_meta(p) for p in parts))}"
    return cond


def _pred(pred: syntax.Pred | None, positive: bool) -> SpanCond | None:
    """A condition every span meets for which `pred` is `positive`."""
    if pred is None:
        return None
    if isinstance(pred, syntax.PredNot):
        return _pred(pred.operand, not positive)
    if isinstance(pred, (syntax.PredAnd, syntax.PredOr)):
        parts = [_pred(operand, positive) for operand in pred.operands]
        return _all_of(parts) if isinstance(pred, syntax.PredAnd) == positive else _any_of(parts)
    if not positive:
        return None  # a false comparison holds for a missing attribute: nothing to push
    if isinstance(pred, syntax.Compare):
        return _compare(pred.attr, pred.op, pred.value)
    if isinstance(pred, syntax.Bare):
        return _compare(pred.attr, "==", True)
    return None  # `attr == unique` outside a count cannot parse; nothing to push anyway


def _compare(attr: str, op: str, value: Any) -> SpanCond | None:
    """Alternatives for where `attr` may come from (rule 8): the span attribute, and for the
    built-in fields the intrinsic or the resource's service.name."""
    if attr in INTRINSICS:
        return None  # ids are not attributes; left to the rule itself
    sides = [_attribute(_ref("span.", attr), op, value)]
    if attr == "service.name":
        sides.append(_attribute(_ref("resource.", attr), op, value))
    elif attr in _INTRINSICS:
        sides.insert(0, _INTRINSICS[attr](op, value))
    if any(side is None for side in sides):
        return None
    kept = [side for side in sides if side is not _NEVER]
    return _any_of(kept) if kept else None


def _attribute(ref: str, op: str, value: Any) -> Any:
    """`ref op value` with BeTrace's typing, as TraceQL that is never stricter: a SpanCond,
    None (cannot be pushed) or _NEVER (no attribute value satisfies it)."""
    if isinstance(value, tuple):  # `in [...]`
        return _alternatives(_attribute(ref, "==", item) for item in value)
    if op == "==" and isinstance(value, bool):
        return f"{ref} = {'true' if value else 'false'}"
    if op in ("==", "<", "<=", ">", ">="):
        if isinstance(value, bool):
            return _NEVER  # booleans have no order
        if isinstance(value, str):
            return f"{ref} {'=' if op == '==' else op} {_string(value)}"
        return _number(ref, op, value)
    if op in ("matches", "contains"):
        if not isinstance(value, str):
            return _NEVER
        pattern = _search_regex(value) if op == "matches" else f"(?s).*{_quote_meta(value)}.*"
        return f"{ref} =~ {_string(pattern)}"
    return None  # `!=`: true for a value of another type in BeTrace, false in TraceQL


def _alternatives(sides: Iterable[Any]) -> Any:
    kept = []
    for side in sides:
        if side is None:
            return None
        if side is not _NEVER:
            kept.append(side)
    return _any_of(kept) if kept else _NEVER


def _number(ref: str, op: str, value: float) -> SpanCond | None:
    """Tempo compares an int attribute only with an int literal and a float attribute only with
    a float literal, so both are asked for."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if abs(value) > _EXACT_FLOAT:
        return None
    symbol = "=" if op == "==" else op
    as_float = f"{ref} {symbol} {float(value)!r}"
    if isinstance(value, int) or value.is_integer():
        return _AnyOf((f"{ref} {symbol} {int(value)}", as_float))
    if op == "==":
        return as_float  # no int equals a fractional number
    bound = math.floor(value) if op in (">", ">=") else math.ceil(value)
    int_op = ">" if op in (">", ">=") else "<"  # x > 50.5 and x >= 50.5 are x > 50 for ints
    return _AnyOf((f"{ref} {int_op} {bound}", as_float))


def _status(op: str, value: Any) -> Any:
    return _enum("status", STATUSES, op, value)


def _kind(op: str, value: Any) -> Any:
    return _enum("kind", KINDS, op, value)


def _enum(field: str, names: Sequence[str], op: str, value: Any) -> Any:
    if op == "in" and isinstance(value, tuple):
        return _alternatives(_enum(field, names, "==", item) for item in value)
    if op != "==":
        return None
    if value in names and isinstance(value, str):
        return f"{field} = {value.lower()}"
    return _NEVER  # the built-in value is always one of `names` (case-sensitive)


def _span_name(op: str, value: Any) -> Any:
    if op == "in" and isinstance(value, tuple):
        return _alternatives(_span_name("==", item) for item in value)
    if not isinstance(value, str):
        return None if op == "!=" else _NEVER  # the built-in name is a string
    return _attribute("name", op, value) if op in ("==", "matches", "contains") else None


def _duration(op: str, value: Any) -> Any:
    """`duration_ms` is `(end_ns - start_ns) / 1e6` rounded to a float. For a float bound v and
    a duration d < 2**52 ns: fl(d/1e6) > v implies d/1e6 > v (rounding is monotone and v is a
    float), so d > v*1e6; fl(d/1e6) >= v implies d/1e6 >= v - ulp(v)/2. A longer span passes
    both bounds anyway. `<`, `<=` and `==` are not pushed."""
    if op == "in" and isinstance(value, tuple):
        return _alternatives(_duration("==", item) for item in value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None if op == "!=" else _NEVER  # the built-in is a number
    if op not in (">", ">=") or (isinstance(value, float) and not math.isfinite(value)):
        return None
    bound = Fraction(value) * 1_000_000  # v in ns, exactly
    if op == ">":
        threshold = math.floor(bound)
    else:
        threshold = math.ceil(bound - Fraction(math.ulp(float(value))) / 2 * 1_000_000)
    if threshold < 0 or threshold >= _MAX_DURATION_NS:
        return None
    text = f"{threshold // 1_000_000}ms" if threshold % 1_000_000 == 0 else f"{threshold}ns"
    return f"duration {op} {text}"


_INTRINSICS = {"name": _span_name, "status": _status, "kind": _kind, "duration_ms": _duration}


# --- lexical pieces -----------------------------------------------------------------------------

def _ref(scope: str, key: str) -> str:
    """`span.http.route`, or `span."http route"` when the key needs quoting (only `\\"` and
    `\\\\` are escapes inside a quoted attribute name)."""
    if _SIMPLE_KEY.fullmatch(key):
        return scope + key
    return scope + '"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _string(text: str) -> str:
    """A TraceQL string literal (Go's strconv.Unquote decodes it)."""
    out = ['"']
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\x{ord(char):02x}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def _quote_meta(text: str) -> str:
    """Go's regexp.QuoteMeta: the literal text as a regex."""
    return "".join("\\" + c if c in _GO_REGEX_META else c for c in text)


def _search_regex(pattern: str) -> str:
    """RE2 `search` (anywhere in the value) under TraceQL's full anchoring; the pattern's own
    flags stay inside its group."""
    return f"(?s:.*)(?:{pattern})(?s:.*)"
