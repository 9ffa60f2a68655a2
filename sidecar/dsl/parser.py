"""Text to syntax tree: lark (LALR) parses, one Transformer pass builds frozen AST nodes.

Every failure leaves this module as an ExpressionError with an offset and a friendly
"expected ..." text; lark's own exceptions are unwrapped in `_parse` and nowhere else.

Lists and macros (see `definitions`) are resolved in the same pass: a list name after `in`
becomes its items, and a macro's name becomes its body, parsed in the context of the use (as a
condition, `expr`, or as a predicate, `pred`) and spliced in, as if written there in parentheses.
"""

from __future__ import annotations

import difflib
import functools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import re2
from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, VisitError

from sidecar.dsl import syntax
from sidecar.dsl.definitions import KEYWORDS, NO_DEFINITIONS, Definitions, Macro
from sidecar.model.errors import ExpressionError

MAX_EXPRESSION_BYTES = 64 * 1024
MAX_DEPTH = 100  # far below Python's recursion limit, far above any rule a person writes

_GRAMMAR = (Path(__file__).parent / "grammar.lark").read_text()
# One parser per start symbol: a rule, and a macro's body used as a condition or a predicate
# (one parser with several start symbols would build other tables, and other "expected" texts).
_PARSERS = {start: Lark(_GRAMMAR, parser="lalr", propagate_positions=True, cache=True,
                        start=start)
            for start in ("start", "expr", "pred")}

# What each terminal is called in "expected ..." messages, in the order they are listed (the
# for_each forms `after`, `under`, `this` are left out: listed everywhere, they would crowd out
# what the author most likely meant).
_EXPECTED = {
    "NAME": "a name", "STRING": 'a "quoted string"', "NUMBER": "a number",
    "COUNT": "count(...)", "HAS": "trace.has(...)", "CMP_OP": "a comparison (== != < <= > >=)",
    "IN": "in", "MATCHES": "matches", "CONTAINS": "contains", "WHERE": ".where(...)",
    "BEFORE": "before", "WITHIN": "within", "DURATION": "a duration such as 200ms",
    "_AND": "and", "_OR": "or", "_NOT": "not", "TRUE": "true", "FALSE": "false",
    "UNIQUE": "unique", "WHEN": "when", "ALWAYS": "always", "NEVER": "never",
    "LPAR": "'('", "RPAR": "')'", "LBRACE": "'{'", "RBRACE": "'}'", "LSQB": "'['",
    "RSQB": "']'", "COMMA": "','", "$END": "the end of the expression",
}
_HINTS = {
    "=": "'=' is not an operator; did you mean '=='?",
    "&": "use 'and' instead of '&&'", "|": "use 'or' instead of '||'",
    "!": "use 'not' for negation ('!=' compares)",
    "'": "strings are written in double quotes",
}
# What a name followed by `(` may have meant: the calls the grammar has, under the names an
# author may reach for.
_FUNCTIONS = {"trace.has": "trace.has", "has": "trace.has", "trace.count": "trace.count",
              "count": "count"}
_STRING_FUNCTIONS = frozenset({
    "lower", "upper", "tolower", "toupper", "lowercase", "uppercase", "len", "length", "trim",
    "strip", "substr", "substring", "concat", "replace", "split", "startswith", "starts_with",
    "endswith", "ends_with", "str", "string", "regex", "match", "like", "ilike"})
# Words the grammar reads as keywords, which never name a function
_KEYWORDS = KEYWORDS | {"after", "under", "this"}
_CALLED_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*$")
_CALLED_METHOD = re.compile(r"\.\s*([A-Za-z_][A-Za-z0-9_]*)\s*\(")
_DURATION_UNITS_NS = {"ms": 1_000_000, "s": 1_000_000_000, "m": 60_000_000_000,
                      "h": 3_600_000_000_000}
_FLIPPED = {"==": "==", "!=": "!=", "<": ">", "<=": ">=", ">": "<", ">=": "<="}
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # we report bad patterns ourselves, with a caret
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_NUMBER = re.compile(r"-?\d+(\.\d+)?([eE][-+]?\d+)?")  # the grammar's NUMBER


class Parsed(NamedTuple):
    tree: Any
    uses: frozenset[str]  # the lists and macros it uses, directly or through a macro
    size: int  # in bytes, once its macros are expanded


class Ungrammatical(ExpressionError):
    """Text the grammar cannot read from the start symbol tried, or that uses a macro of the
    other kind (a macro's body may still read in its other context)."""


def parse(text: str, definitions: Definitions = NO_DEFINITIONS) -> syntax.Expr | syntax.Clauses:
    """Parse one expression (a condition, a clause, or the in-DSL when/always/never form)."""
    return parse_expression(text, definitions).tree


def parse_expression(text: str, definitions: Definitions = NO_DEFINITIONS) -> Parsed:
    """`parse`, also telling which lists and macros the expression uses."""
    return _parse(text, definitions, "start", None)


def check_macro(macro: Macro, definitions: Definitions) -> None:
    """Raise what is wrong with a macro's body (offsets in its own text) unless it reads as a
    condition or as a predicate; which one it must be is known only where it is used."""
    errors = []
    for context in ("expr", "pred"):
        try:
            _parse(macro.text, definitions, context, macro)
            return
        except ExpressionError as exc:
            errors.append(exc)
    meaningful = [e for e in errors if not isinstance(e, Ungrammatical)]
    raise meaningful[0] if meaningful else max(errors, key=lambda e: e.start)


@functools.lru_cache(maxsize=4096)
def _parse(text: str, definitions: Definitions, start: str, within: Macro | None) -> Parsed:
    """Parse `text` from the grammar's `start` symbol; `within` is the macro whose body it is."""
    try:
        size = len(text.encode())
    except UnicodeEncodeError as exc:  # a lone surrogate, e.g. from a YAML "\ud800" escape
        raise ExpressionError(f"character {text[exc.start]!r} is not valid Unicode text",
                              text, exc.start) from None
    if size > MAX_EXPRESSION_BYTES:
        raise ExpressionError(f"expression is {size} bytes; the limit is {MAX_EXPRESSION_BYTES}",
                              text, 0, code="too-large")
    if not text.strip():
        raise ExpressionError("empty expression; expected a rule such as trace.has(span.name)",
                              text, 0)
    try:
        tree = _PARSERS[start].parse(text)
    except UnexpectedInput as exc:
        raise _syntax_error(text, exc) from None
    _check_depth(text, tree)
    to_ast = _ToAst(text, definitions, within, size)
    try:
        ast = to_ast.transform(tree)
    except VisitError as exc:
        if isinstance(exc.orig_exc, ExpressionError):
            raise exc.orig_exc from None
        # a gap in the checks above: still a located rule error, never a traceback
        start = exc.obj.meta.start_pos if isinstance(exc.obj, Tree) and not exc.obj.meta.empty \
            else 0
        raise ExpressionError(f"cannot read this expression: {type(exc.orig_exc).__name__}: "
                              f"{exc.orig_exc}", text, start) from None
    if to_ast.spliced:
        _check_expanded_depth(text, ast)
    return Parsed(ast, frozenset(to_ast.uses), to_ast.size)


def parse_duration(text: str) -> int:
    """`200ms`, `1.5s`, `5m`, `2h` to nanoseconds; ValueError otherwise (also beyond what a
    64-bit span timestamp can hold)."""
    match = _DURATION.fullmatch(text.strip())
    if not match:
        raise ValueError(f"invalid duration {text!r}; expected a number and ms, s, m or h")
    nanos = float(match.group(1)) * _DURATION_UNITS_NS[match.group(2)]
    if not nanos < 2**63:
        raise ValueError(f"duration {text.strip()!r} is too long: the limit is about 292 years")
    return int(nanos)


def parse_number(token: str) -> int | float:
    """A NUMBER token: an integer within OTLP's 64 bits, or a finite double; ValueError with
    the reason otherwise."""
    if re.fullmatch(r"-?\d+", token):
        # (compared by digits first: int() refuses over 4300 of them, and slowly)
        if len(token.lstrip("-").lstrip("0")) <= 19 and -2**63 <= (value := int(token)) < 2**63:
            return value
        raise ValueError(f"integer {_shortened(token)} is out of range: span attributes hold "
                         f"64-bit integers, from {-2**63} to {2**63 - 1}")
    number = float(token)
    if not math.isfinite(number):
        raise ValueError(f"number {_shortened(token)} is out of range for a double")
    return number


def _shortened(token: str) -> str:
    return token if len(token) <= 24 else f"{token[:10]}...{token[-6:]} ({len(token)} characters)"


def _syntax_error(text: str, exc: UnexpectedInput) -> Ungrammatical:
    expected = sorted(
        {name for name in getattr(exc, "expected", None) or getattr(exc, "allowed", ())
         if name in _EXPECTED},
        key=list(_EXPECTED).index)
    wanted = ", ".join(_EXPECTED[name] for name in expected[:8]) or "something else"
    end = len(text.rstrip())  # "unexpected end" points just past the last word, not a newline
    if isinstance(exc, UnexpectedEOF):
        return Ungrammatical(f"unexpected end of expression; expected {wanted}", text, end)
    if isinstance(exc, UnexpectedCharacters):
        char = text[exc.pos_in_stream]
        unknown = _unknown_call(text, exc.pos_in_stream)
        if unknown is not None:
            return unknown
        hint = f" ({_HINTS[char]})" if char in _HINTS else ""
        return Ungrammatical(f"unexpected character {char!r}; expected {wanted}{hint}",
                             text, exc.pos_in_stream)
    token: Token = exc.token  # type: ignore[attr-defined]
    if token.type == "$END":
        return Ungrammatical(f"unexpected end of expression; expected {wanted}", text, end)
    start = token.start_pos or 0
    return _unknown_call(text, start) or Ungrammatical(
        f"unexpected {str(token)!r}; expected {wanted}", text, start, start + len(token))


def _unknown_call(text: str, at: int) -> Ungrammatical | None:
    """The error for a call the language does not have, when the parser stopped at its `(`
    (`lower(`, `trace.exists(`, `payment.charge.wher(`) or at the `.` of a method after a
    call (`count(x).were(`); None when the text there is no such call, or calls a real
    function where it cannot stand (then the plain syntax error says what can)."""
    method = _CALLED_METHOD.match(text, at)
    if method is not None:
        return _unknown_method(text, method.group(1), at, method.end(1))
    if not text.startswith("(", at):
        return None
    called = _CALLED_NAME.search(text, 0, at)
    if called is None or text[called.start() - 1:called.start()].isdigit():  # (`1e5(`)
        return None
    name, start = called.group(), called.start()
    if name in _KEYWORDS or _FUNCTIONS.get(name) == name:
        return None
    if "." in name and not (name.startswith("trace.") and name.count(".") == 1):
        dot = name.rindex(".")  # `payment.charge.wher(`: a method on a selector
        return _unknown_method(text, name[dot + 1:], start + dot, at)
    if name.lower() in _STRING_FUNCTIONS:
        message = (f"unknown function '{name}': the language has no string functions; test the "
                   "attribute itself: == compares case-sensitively, contains \"text\" finds a "
                   "substring, matches \"(?i)^text$\" ignores case")
    else:
        close = difflib.get_close_matches(name.lower(), _FUNCTIONS, n=1)
        message = f"unknown function '{name}'; " + (
            f"did you mean '{_FUNCTIONS[close[0]]}'?" if close else
            "the functions are trace.has(...), trace.count(...) and count(...), and the method "
            ".where(...)")
    return Ungrammatical(message, text, start, at, code="unknown-function")


def _unknown_method(text: str, name: str, start: int, end: int) -> Ungrammatical | None:
    """`.name(` after a selector or a call, at `start` (its dot); None for `.where(` itself."""
    if name == "where":
        return None
    close = difflib.get_close_matches(name.lower(), ["where"], n=1)
    hint = "did you mean '.where('?" if close else "the only method is .where(...)"
    return Ungrammatical(f"'.{name}(' is not a method; {hint}", text, start, end,
                         code="unknown-function")


def _check_depth(text: str, tree: Tree) -> None:
    """Refuse trees deep enough to threaten recursion in the transformer or compiled closures."""
    stack: list[tuple[Any, int]] = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            start = node.meta.start_pos if not node.meta.empty else 0
            raise ExpressionError(f"expression nests too deeply (over {MAX_DEPTH} parse levels, "
                                  "about 45 nested parentheses); "
                                  "split it into simpler terms", text, start, code="too-deep")
        stack.extend((child, depth + 1) for child in node.children if isinstance(child, Tree))


def _check_expanded_depth(text: str, tree: syntax.Node) -> None:
    """Macros nest: refuse an expanded tree deeper than any single text may parse."""
    stack = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ExpressionError(f"expression nests too deeply once its macros are expanded "
                                  f"(over {MAX_DEPTH} levels); split it into simpler terms",
                                  text, node.start, node.end, code="too-deep")
        stack.extend((child, depth + 1) for child in syntax.children(node))


def parse_literal(text: str) -> syntax.Literal:
    """A literal written on its own (a list item in a rule file), read as on the right of a
    comparison: a number, `true`/`false`, else a string (so `NO` stays "NO"). ValueError
    for a number no span can hold."""
    if _NUMBER.fullmatch(text):
        return parse_number(text)
    return {"true": True, "false": False}.get(text, text)


def compile_regex(pattern: str) -> re2._Regexp:
    """RE2: linear-time matching, so no rule can backtrack catastrophically on a span."""
    return re2.compile(pattern, _RE2_OPTIONS)


def decode_string(token: str) -> str:
    """Unquote a double-quoted literal. Only \\" and \\\\ are escapes (plus \\n, \\t), so regex
    escapes such as \\d reach `matches` as written."""
    body = token[1:-1]
    return re.sub(r'\\(["\\nt])',
                  lambda m: {'"': '"', "\\": "\\", "n": "\n", "t": "\t"}[m.group(1)], body)


_UNIQUE = object()  # the `unique` keyword, before it is known to sit in `attr == unique`


@dataclass(frozen=True)
class _Use:
    """A macro's name where a condition term, a predicate or a span selector stands: which of
    them is known only to the node that holds it."""

    macro: Macro
    start: int
    end: int


@v_args(meta=True)
class _ToAst(Transformer):  # type: ignore[type-arg]
    def __init__(self, text: str, definitions: Definitions, within: Macro | None,
                 size: int) -> None:
        super().__init__()
        self.text = text
        self.definitions = definitions
        self.within = within
        self.size = size
        self.uses: set[str] = set()
        self.spliced: dict[tuple[int, int], Macro] = {}  # where each expanded macro sits

    def _error(self, message: str, where: Any, code: str = "syntax") -> ExpressionError:
        if isinstance(where, Token):
            return ExpressionError(message, self.text, where.start_pos or 0,
                                   (where.start_pos or 0) + len(where), code)
        macro = self.spliced.get((where.start, where.end)) \
            if isinstance(where, syntax.Node) else None
        if macro is not None:  # found on a macro's expansion, which sits at its use
            message = f"in macro '{macro.name}' ({macro.origin}): {message}"
        return ExpressionError(message, self.text, where.start, where.end, code)

    # --- lists and macros ---

    def _use(self, token: Token) -> _Use | None:
        """A use of the macro `token` names, if one is declared so."""
        macro = self.definitions.macros.get(str(token))
        if macro is None:
            return None
        if self.within is not None and macro.index >= self.within.index:
            raise self._error(self.definitions.order_error(self.within, macro), token,
                              code="macro-order")
        start = token.start_pos or 0
        return _Use(macro, start, start + len(token))

    def _splice(self, use: _Use, context: str) -> Any:
        """The macro's body read as a condition (`expr`) or a predicate (`pred`), placed at
        its use."""
        macro = use.macro
        try:
            body = _parse(macro.text, self.definitions, context, macro)
        except Ungrammatical:  # so, read here, neither is this text (see check_macro)
            kind = "a span predicate: it can stand only inside .where(...)" \
                if context == "expr" else "a condition on the trace, not a span predicate"
            raise Ungrammatical(f"macro '{macro.name}' ({macro.origin}) is {kind}", self.text,
                                use.start, use.end, "macro-use") from None
        except ExpressionError as exc:
            raise self._error(f"in macro '{macro.name}' ({macro.origin}): {exc.message}",
                              use, exc.code) from None
        self.size += body.size
        if self.size > MAX_EXPRESSION_BYTES:
            raise self._error(f"expression is {self.size} bytes once its macros are expanded; "
                              f"the limit is {MAX_EXPRESSION_BYTES}", use, code="too-large")
        self.uses |= body.uses | {macro.name}
        self.spliced[(use.start, use.end)] = macro
        return syntax.relocated(body.tree, use.start, use.end)

    def _macro_query(self, use: _Use, role: str) -> syntax.Query:
        """A macro standing as a span selector: its body must be one span query."""
        tree = self._splice(use, "expr")
        if not isinstance(tree, syntax.Exists):
            macro = use.macro
            raise self._error(f"macro '{macro.name}' ({macro.origin}) is not a single span "
                              f"query such as payment.charge.where(...), so it cannot stand "
                              f"{role}", use, code="macro-use")
        return tree.query

    def _list(self, token: Token) -> tuple[syntax.Literal, ...]:
        items = self.definitions.lists.get(str(token))
        if items is None:
            known = sorted(self.definitions.lists)
            defined = f"lists defined: {', '.join(known)}" if known else \
                "no lists are defined (declare them under 'lists:' in a rule file)"
            raise self._error(f"undefined list '{token}'; {defined}", token,
                              code="undefined-list")
        self.uses.add(str(token))
        return items

    def _duration(self, token: Token) -> int:
        try:
            return parse_duration(token)
        except ValueError as exc:
            raise self._error(str(exc), token, code="out-of-range") from None

    def _number(self, token: Token) -> int | float:
        try:
            return parse_number(token)
        except ValueError as exc:
            raise self._error(str(exc), token, code="out-of-range") from None

    @staticmethod
    def _pos(meta: Any) -> dict[str, int]:
        return {"start": meta.start_pos, "end": meta.end_pos} if not meta.empty else {}

    # --- rule shape ---

    def start(self, meta: Any, children: list[Any]) -> Any:
        return children[0]

    def clauses(self, meta: Any, children: list[Any]) -> syntax.Clauses:
        parts: dict[str, Any] = {}
        for keyword, expr in children[2:]:
            if keyword in parts:
                raise self._error(f"'{keyword}' given twice", keyword)
            parts[str(keyword)] = expr
        return syntax.Clauses(children[1], parts.get("always"), parts.get("never"),
                           **self._pos(meta))

    def clause(self, meta: Any, children: list[Any]) -> tuple[Token, Any]:
        return children[0], children[1]

    # --- trace level ---

    def any_of(self, meta: Any, children: list[Any]) -> Any:
        return children[0] if len(children) == 1 else syntax.Or(tuple(children), **self._pos(meta))

    def all_of(self, meta: Any, children: list[Any]) -> Any:
        return children[0] if len(children) == 1 else syntax.And(tuple(children), **self._pos(meta))

    def negation(self, meta: Any, children: list[Any]) -> syntax.Not:
        return syntax.Not(children[0], **self._pos(meta))

    def exists(self, meta: Any, children: list[Any]) -> Any:
        if isinstance(children[0], _Use):  # a macro standing as a condition term
            return self._splice(children[0], "expr")
        return syntax.Exists(children[0], **self._pos(meta))

    def before(self, meta: Any, children: list[Any]) -> syntax.Before:
        first, second = (self._macro_query(c, "in 'before'") if isinstance(c, _Use) else c
                         for c in (children[0], children[2]))
        within = self._duration(children[4]) if len(children) > 3 else None
        return syntax.Before(first, second, within, **self._pos(meta))

    def after(self, meta: Any, children: list[Any]) -> syntax.Before:
        """`A after B` is `B before A` everywhere."""
        within = self._duration(children[4]) if len(children) > 3 else None
        return syntax.Before(children[2], children[0], within, **self._pos(meta))

    def relative(self, meta: Any, children: list[Any]) -> syntax.Relative:
        within = self._duration(children[4]) if len(children) > 3 else None
        return syntax.Relative(children[0], str(children[1]), within, **self._pos(meta))

    def under_within(self, meta: Any, children: list[Any]) -> syntax.Relative:
        raise self._error("'under' takes no 'within': descent has no time bound", children[3],
                          code="syntax")

    def this_first(self, meta: Any, children: list[Any]) -> syntax.Relative:
        """`this before X` is `X after this`; `this under X` has no meaning here."""
        relation = str(children[1])
        if relation == "under":
            raise self._error("'this under X' is not a form: write 'X under this' (some X "
                              "descends from the span being checked)", children[1],
                              code="misplaced-this")
        within = self._duration(children[4]) if len(children) > 3 else None
        mirrored = "after" if relation == "before" else "before"
        return syntax.Relative(children[2], mirrored, within, **self._pos(meta))

    def count_compare(self, meta: Any, children: list[Any]) -> syntax.CountCompare:
        left, op, right = children
        if isinstance(left, Token):  # `3 < count(x)` reads as `count(x) > 3`
            left, op, right = right, Token(op.type, _FLIPPED[str(op)]), left
        if isinstance(right, Token):
            if not re.fullmatch(r"-?\d+", right):
                raise self._error(f"a count compares with an integer or another count, "
                                  f"not {str(right)!r}", right)
            right = self._number(right)
        return syntax.CountCompare(left, str(op), right, **self._pos(meta))

    def query(self, meta: Any, children: list[Any]) -> syntax.Query | _Use:
        selector, wheres = self._selector_and_wheres(children)
        if isinstance(selector, _Use):
            if not wheres:
                return selector  # a condition term (exists) or a selector (before): see there
            selector, wheres = self._macro_selector(selector, wheres, "before .where(...)")
        where = self._conjoin(wheres, meta)
        for node in walk_preds(where):
            if isinstance(node, syntax.Unique):
                raise self._error("'unique' is reserved for count(...).where(attr == unique)",
                                  node, code="misplaced-unique")
        return syntax.Query(selector, where, **self._pos(meta))

    def count(self, meta: Any, children: list[Any]) -> syntax.Count:
        selector, wheres = self._selector_and_wheres(children)
        if isinstance(selector, _Use):
            selector, wheres = self._macro_selector(selector, wheres, "in count(...)")
        where = self._conjoin(wheres, meta)
        terms = _conjuncts(where)
        uniques = [t for t in terms if isinstance(t, syntax.Unique)]
        rest = [t for t in terms if t is not None and not isinstance(t, syntax.Unique)]
        for term in rest:
            for node in walk_preds(term):
                if isinstance(node, syntax.Unique):
                    raise self._error("'attr == unique' must be a term of its own, joined to "
                                      "the rest with 'and'", node, code="misplaced-unique")
        if len(uniques) > 1:
            raise self._error("count distinct values of one attribute at a time",
                              uniques[1], code="misplaced-unique")
        filtered = None if not rest else rest[0] if len(rest) == 1 else syntax.PredAnd(tuple(rest))
        query = syntax.Query(selector, filtered, **self._pos(meta))
        return syntax.Count(query, uniques[0].attr if uniques else None, **self._pos(meta))

    def _selector_and_wheres(self, children: list[Any]) -> tuple[Any, list[Any]]:
        parts = [c for c in children if not (isinstance(c, Token) and c.type in ("HAS", "COUNT"))]
        return parts[0], parts[1:]

    def _macro_selector(self, use: _Use, wheres: list[Any],
                        role: str) -> tuple[syntax.Selector, list[Any]]:
        """A macro standing as a selector, `.where`s following: its query's selector, and its
        `.where` first (`retried.where(p)` is `payment.charge.where(attempt > 1 and p)`)."""
        query = self._macro_query(use, role)
        return query.selector, [query.where, *wheres] if query.where is not None else wheres

    def _conjoin(self, preds: list[Any], meta: Any) -> Any:
        if not preds:
            return None
        return preds[0] if len(preds) == 1 else syntax.PredAnd(tuple(preds), **self._pos(meta))

    def selector(self, meta: Any, children: list[Token]) -> syntax.Selector | _Use:
        token = children[0]
        if token.type == "NAME":
            self._not_this(token)
            return self._use(token) or syntax.Selector(str(token), **self._pos(meta))
        name = decode_string(token)
        if not name:
            raise self._error("a quoted span name cannot be empty", token)
        return syntax.Selector(name, "*" in name, **self._pos(meta))

    def where(self, meta: Any, children: list[Any]) -> Any:
        return children[1]

    # --- span level ---

    def pred_any(self, meta: Any, children: list[Any]) -> Any:
        return children[0] if len(children) == 1 else syntax.PredOr(tuple(children),
                                                                 **self._pos(meta))

    def pred_all(self, meta: Any, children: list[Any]) -> Any:
        return children[0] if len(children) == 1 else syntax.PredAnd(tuple(children),
                                                                  **self._pos(meta))

    def pred_negation(self, meta: Any, children: list[Any]) -> syntax.PredNot:
        return syntax.PredNot(children[0], **self._pos(meta))

    def bare(self, meta: Any, children: list[Any]) -> Any:
        attr = children[0]
        use = self._use(attr) if isinstance(attr, Token) else None
        if use is not None:  # a macro standing as a predicate
            return self._splice(use, "pred")
        return syntax.Bare(str(attr), **self._pos(meta))

    def compare(self, meta: Any, children: list[Any]) -> Any:
        attr, op, value = children
        attr, op_text = str(attr), str(op)  # (a predicate cannot stand left of an operator)
        if op.type == "IN" and isinstance(value, Token):
            if str(value) == "this" or str(value).startswith("this."):
                raise self._error("'in' takes a list, not 'this.attribute'", value,
                                  code="misplaced-this")
            value = self._list(value)
        elif op.type == "MATCHES":
            value = decode_string(value)
            try:
                compile_regex(value)
            except re2.error as exc:
                reason = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) \
                    else str(exc)
                raise self._error(f"invalid regular expression {value!r} (RE2 syntax): {reason}",
                                  children[2], code="bad-regex") from None
        elif value is _UNIQUE:
            if op_text != "==":
                raise self._error("'unique' only works as 'attr == unique'", op,
                                  code="misplaced-unique")
            return syntax.Unique(attr, **self._pos(meta))
        return syntax.Compare(attr, op_text, value, **self._pos(meta))

    def attr(self, meta: Any, children: list[Token]) -> str:
        """A NAME stays a token, which `bare` may find to be a macro's; quoted, it never is."""
        token = children[0]
        if token.type == "NAME":
            self._not_this(token)
            return token
        return decode_string(token)

    def _not_this(self, token: Token) -> None:
        """`this.x` read as a span or attribute name would silently never match."""
        if str(token) == "this" or str(token).startswith("this."):
            raise self._error(f"'{token}' cannot stand here: 'this.attribute' may stand only "
                              "on the right of a comparison (== != < <= > >= contains) inside "
                              ".where(...), in the always/never of a for_each rule (quote a "
                              "name that really is 'this...')", token, code="misplaced-this")

    def list(self, meta: Any, children: list[Any]) -> tuple[Any, ...]:
        items = tuple(c for c in children if c is not None)
        for item in items:
            if isinstance(item, syntax.ThisAttr):
                raise self._error("a list holds literals, not 'this.attribute'", item,
                                  code="misplaced-this")
        if any(item is _UNIQUE for item in items):
            raise ExpressionError("'unique' cannot be a list item", self.text,
                                  meta.start_pos, meta.end_pos, "misplaced-unique")
        return items

    def value(self, meta: Any, children: list[Token]) -> Any:
        token = children[0]
        kind = token.type
        if kind == "NUMBER":
            return self._number(token)
        if kind == "STRING":
            return decode_string(token)
        if kind == "TRUE":
            return True
        if kind == "FALSE":
            return False
        if kind == "UNIQUE":
            return _UNIQUE
        if kind == "THIS_ATTR":
            return syntax.ThisAttr(str(token)[len("this."):], start=token.start_pos or 0,
                                   end=(token.start_pos or 0) + len(token))
        return str(token)  # a bare identifier on the right is a string


def _conjuncts(pred: Any) -> list[Any]:
    """The terms of a (possibly nested) conjunction: `.where(a).where(b and c)` gives a, b, c."""
    if pred is None:
        return []
    if isinstance(pred, syntax.PredAnd):
        return [term for operand in pred.operands for term in _conjuncts(operand)]
    return [pred]


def walk_preds(pred: Any) -> list[Any]:
    """Every span-level node under `pred` (iteratively: depth is bounded but be frugal)."""
    found, stack = [], [pred] if pred is not None else []
    while stack:
        node = stack.pop()
        found.append(node)
        if isinstance(node, (syntax.PredAnd, syntax.PredOr)):
            stack.extend(node.operands)
        elif isinstance(node, syntax.PredNot):
            stack.append(node.operand)
    return found
