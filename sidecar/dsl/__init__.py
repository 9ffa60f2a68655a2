"""The rule language: grammar, syntax tree, parser, compiler, analysis and TraceQL translation.
May import only `sidecar.model`; other packages use this public API, never the modules inside.

`compile_expression(text)` parses once and returns a `CompiledExpr` to evaluate against many
traces; `parse(text)` gives the syntax tree alone. Both take the `Definitions` (lists and
macros) of the rule files loaded together; `check_macro` checks a macro once, where declared.
"""

from sidecar.dsl.compiler import (
    MISSING,
    CompiledExpr,
    PlainRule,
    PlainTest,
    References,
    ScopeTest,
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
from sidecar.dsl.definitions import NO_DEFINITIONS, Definitions, Macro, name_error
from sidecar.dsl.parser import (
    MAX_EXPRESSION_BYTES,
    check_macro,
    parse,
    parse_duration,
    parse_literal,
)
from sidecar.dsl.traceql import ANY_TRACE, pushdowns, rule_query, span_names_for, traceql_for

__all__ = [
    "ANY_TRACE", "MAX_EXPRESSION_BYTES", "MISSING", "NO_DEFINITIONS", "CompiledExpr",
    "Definitions", "Macro", "PlainRule", "PlainTest", "References", "ScopeTest", "attribute_getter",
    "check_macro",
    "combine_clauses", "combine_for_each", "compile_clause", "compile_expression",
    "compile_selector", "distinct_key", "glob_matcher",
    "memoized", "name_error", "parse", "parse_duration", "parse_literal", "pushdowns",
    "rule_query", "span_names_for", "traceql_for",
]
