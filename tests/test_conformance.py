"""The rule language's semantics as data: every case in tests/conformance/*.yaml.

Each case is an expression (`expr`, expect: is it true for the trace), a rule's clauses
(`rule`, expect: does the rule fire), or text that must fail to load (`error`, a substring of
the message). A case may declare file-level `lists:` and `macros:` (in that order, as written)
for its rule, or give the whole rule file as `document:` text, for what a generated document
cannot hold (a name declared twice).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.model.errors import RuleLoadError
from sidecar.model.spans import Trace
from sidecar.rules import load_rules_text
from sidecar.rules.compact import trace_from_compact

CASES_DIR = Path(__file__).parent / "conformance"


def _cases() -> list[Any]:
    found = []
    for path in sorted(CASES_DIR.glob("*.yaml")):
        for case in yaml.safe_load(path.read_text())["cases"]:
            found.append(pytest.param(case, id=f"{path.stem}:{case['id']}"))
    return found


def _rule_document(case: dict[str, Any]) -> str:
    if "document" in case:
        return str(case["document"])
    clauses = case["rule"] if "rule" in case else {"condition": case["expr"]}
    names = {key: case[key] for key in ("lists", "macros") if key in case}
    return yaml.safe_dump({**names, "rules": [{"id": "case", "severity": "info", **clauses}]},
                          sort_keys=False)


@pytest.mark.parametrize("case", _cases())
def test_conformance(case: dict[str, Any]) -> None:
    document = _rule_document(case)
    if "error" in case:
        with pytest.raises(RuleLoadError) as raised:
            load_rules_text(document)
        assert case["error"].lower() in str(raised.value).lower()
        return
    rule = load_rules_text(document).rules[0]
    trace = trace_from_compact(case["spans"], seed=case["id"])
    assert (rule.evaluate(trace) is not None) == case["expect"]
    shuffled = Trace(trace.trace_id, reversed(trace.spans))
    assert (rule.evaluate(shuffled) is not None) == case["expect"], "span order must not matter"
