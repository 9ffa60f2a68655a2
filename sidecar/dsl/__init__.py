"""The rule language: grammar, syntax tree, parser and compiler.

`compile_expression(text)` parses once and returns a `CompiledExpr` to evaluate against many
traces; `parse(text)` gives the syntax tree alone.
"""

from sidecar.dsl.compiler import CompiledExpr, compile_expression
from sidecar.dsl.parser import parse, parse_duration

__all__ = ["CompiledExpr", "compile_expression", "parse", "parse_duration"]
