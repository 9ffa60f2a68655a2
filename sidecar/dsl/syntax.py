"""The rule language's syntax tree: frozen nodes, each knowing where it sits in its expression.

Trace-level nodes (Exists, CountCompare, Before, Relative, Not, And, Or, Clauses, ForEach)
decide a whole trace; span-level nodes (Compare, Bare, PredNot, PredAnd, PredOr) decide one span
inside `.where(...)`. `this` (ThisAttr, Relative) names the span a `for_each` rule is checking.
`start`/`end` are character offsets into the expression text, for error carets.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, fields, replace
from typing import Any, Union

Literal = Union[str, int, float, bool]


@dataclass(frozen=True)
class Node:
    start: int = field(default=0, kw_only=True, compare=False)
    end: int = field(default=0, kw_only=True, compare=False)


# --- span level ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class ThisAttr(Node):
    """`this.attr` on the right of a comparison: that attribute of the span being checked."""

    attr: str


@dataclass(frozen=True)
class Compare(Node):
    """`attr op value`; op is one of == != < <= > >= in matches contains."""

    attr: str
    op: str
    value: Literal | tuple[Literal, ...] | ThisAttr


@dataclass(frozen=True)
class Unique(Node):
    """`attr == unique` inside count(...).where: count distinct values of attr."""

    attr: str


@dataclass(frozen=True)
class Bare(Node):
    """A bare attribute: true only when it is the boolean true."""

    attr: str


@dataclass(frozen=True)
class PredNot(Node):
    operand: Pred


@dataclass(frozen=True)
class PredAnd(Node):
    operands: tuple[Pred, ...]


@dataclass(frozen=True)
class PredOr(Node):
    operands: tuple[Pred, ...]


Pred = Union[Compare, Unique, Bare, PredNot, PredAnd, PredOr]


# --- trace level --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Selector(Node):
    """Spans whose name is exactly `name`, or matches it as a `*` glob when `glob` is set."""

    name: str
    glob: bool = False


@dataclass(frozen=True)
class Query(Node):
    """The spans a selector picks that satisfy every `.where(...)` (None: no filter)."""

    selector: Selector
    where: Pred | None = None


@dataclass(frozen=True)
class Exists(Node):
    query: Query


@dataclass(frozen=True)
class Count(Node):
    """Spans counted by a query; with `unique`, the number of distinct values of that attribute."""

    query: Query
    unique: str | None = None


@dataclass(frozen=True)
class CountCompare(Node):
    left: Count
    op: str
    right: Count | int


@dataclass(frozen=True)
class Before(Node):
    """Some `first` span starts strictly before some `second` span, at most `within_ns` earlier."""

    first: Query
    second: Query
    within_ns: int | None = None


@dataclass(frozen=True)
class Relative(Node):
    """Some `query` span starts before / after the span being checked (at most `within_ns`
    apart), or descends from it (`under`, through parent_span_id links)."""

    query: Query
    relation: str  # before | after | under
    within_ns: int | None = None


@dataclass(frozen=True)
class Not(Node):
    operand: Expr


@dataclass(frozen=True)
class And(Node):
    operands: tuple[Expr, ...]


@dataclass(frozen=True)
class Or(Node):
    operands: tuple[Expr, ...]


Expr = Union[Exists, CountCompare, Before, Relative, Not, And, Or]


@dataclass(frozen=True)
class Clauses(Node):
    """The in-DSL `when { } always { } never { }` form of a rule."""

    when: Expr
    always: Expr | None = None
    never: Expr | None = None


@dataclass(frozen=True)
class ForEach(Node):
    """A `for_each` rule: checked once per span `each` selects, with `this` naming it; the trace
    violates when for some such span `always` is false or `never` is true."""

    each: Query
    always: Expr | None = None
    never: Expr | None = None


def relocated(node: Any, start: int, end: int) -> Any:
    """`node` and every node under it placed at `start`..`end`: a macro's expansion sits where
    the macro is used, so an error found in it points at the use."""
    if isinstance(node, tuple):
        return tuple(relocated(item, start, end) for item in node)
    if not isinstance(node, Node):
        return node
    changes = {f.name: relocated(getattr(node, f.name), start, end)
               for f in fields(node) if f.name not in ("start", "end")}
    return replace(node, **changes, start=start, end=end)


def children(node: Node) -> Iterator[Node]:
    """The nodes directly under `node`."""
    for f in fields(node):
        value = getattr(node, f.name)
        for item in value if isinstance(value, tuple) else (value,):
            if isinstance(item, Node):
                yield item
