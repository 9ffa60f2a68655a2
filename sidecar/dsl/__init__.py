"""The rule language: grammar, syntax tree, parser, compiler, analysis and TraceQL translation.
May import only `sidecar.model`; other packages use this public API, never the modules inside.

`compile_expression(text)` parses once and returns a `CompiledExpr` to evaluate against many
traces; `parse(text)` gives the syntax tree alone.
"""

from sidecar.dsl.compiler import (
    MISSING,
    CompiledExpr,
    References,
    attribute_getter,
    combine_clauses,
    combine_for_each,
    compile_clause,
    compile_expression,
    compile_selector,
    distinct_key,
    glob_matcher,
    memoized,
)
from sidecar.dsl.parser import MAX_EXPRESSION_BYTES, parse, parse_duration
from sidecar.dsl.traceql import ANY_TRACE, pushdowns, rule_query, traceql_for

__all__ = [
    "ANY_TRACE", "MAX_EXPRESSION_BYTES", "MISSING", "CompiledExpr", "References",
    "attribute_getter",
    "combine_clauses", "combine_for_each", "compile_clause", "compile_expression",
    "compile_selector", "distinct_key", "glob_matcher",
    "memoized", "parse", "parse_duration", "pushdowns", "rule_query", "traceql_for",
]
