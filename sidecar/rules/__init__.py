"""Rules: YAML rule files to a checked, compiled `RuleSet`; rule examples and `betrace test`.
May import `sidecar.model` and the public API of `sidecar.dsl` (its `__init__`), nothing else.
"""

from sidecar.rules.compact import CompactSpanError, trace_from_compact
from sidecar.rules.loading import (
    EXAMPLE_KEYS,
    RULE_KEYS,
    SIGNAL_KEYS,
    load_rules,
    load_rules_text,
    rule_files,
)
from sidecar.rules.ruleset import (
    SEVERITIES,
    Example,
    Rule,
    RuleFailure,
    RuleSet,
    Verdict,
    Violation,
    evaluate,
    span_order,
)

__all__ = [
    "EXAMPLE_KEYS", "RULE_KEYS", "SEVERITIES", "SIGNAL_KEYS", "CompactSpanError", "Example", "Rule",
    "RuleFailure", "RuleSet", "Verdict", "Violation", "evaluate", "load_rules", "load_rules_text",
    "rule_files", "span_order", "trace_from_compact",
]
