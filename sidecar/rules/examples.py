"""`betrace test`: run every rule's examples (and standalone tests) and report per rule.

An example is a trace in the compact span form and whether the rule must fire on it; a rule
passes when all of its examples come out as declared.
"""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from sidecar.rules.compact import trace_from_compact
from sidecar.rules.ruleset import Example, RuleSet, evaluate


@dataclass(frozen=True)
class ExampleResult:
    example: Example
    fired: bool
    seconds: float
    error: str | None = None  # the rule raised on the example

    @property
    def passed(self) -> bool:
        return self.error is None and self.fired == self.example.violates

    @property
    def title(self) -> str:
        return self.example.description or f"example at {self.example.location}"

    def failure(self) -> str:
        if self.error is not None:
            return f"{self.example.location}: the rule raised {self.error}"
        want = "a violation" if self.example.violates else "no violation"
        got = "the rule fired" if self.fired else "the rule stayed quiet"
        return f"{self.example.location}: expected {want}, but {got}"


def run_examples(ruleset: RuleSet) -> list[ExampleResult]:
    results = []
    for example in ruleset.examples:
        rule = ruleset.rule(example.rule_id)
        assert rule is not None, "the loader resolves every example's rule"
        trace = trace_from_compact(example.spans, seed=f"{example.rule_id}{example.location}")
        started = time.perf_counter()
        verdict = evaluate(trace, (rule,))
        error = next((f"{type(e).__name__}: {e}" for _, e in verdict.failures), None)
        results.append(ExampleResult(example, bool(verdict.violations),
                                     time.perf_counter() - started, error))
    return results


def report(ruleset: RuleSet, results: list[ExampleResult]) -> list[str]:
    """One line per rule (PASS/FAIL/NONE), with each failing example below its rule."""
    by_rule: dict[str, list[ExampleResult]] = {}
    for result in results:
        by_rule.setdefault(result.example.rule_id, []).append(result)
    lines = []
    for rule in ruleset.rules + ruleset.disabled:
        mine = by_rule.get(rule.id, [])
        if not mine:
            lines.append(f"NONE  {rule.id}: no examples")
            continue
        failed = [r for r in mine if not r.passed]
        status = "FAIL" if failed else "PASS"
        lines.append(f"{status}  {rule.id} ({len(mine) - len(failed)}/{len(mine)} examples)")
        lines.extend(f"      - {r.title}: {r.failure()}" for r in failed)
    return lines


def write_junit(results: list[ExampleResult], path: str) -> None:
    suite = ET.Element("testsuite", name="betrace", tests=str(len(results)),
                       failures=str(sum(not r.passed for r in results)),
                       time=f"{sum(r.seconds for r in results):.6f}")
    for result in results:
        case = ET.SubElement(suite, "testcase", classname=result.example.rule_id,
                             name=result.title, time=f"{result.seconds:.6f}")
        if not result.passed:
            ET.SubElement(case, "failure", message=result.failure())
    ET.ElementTree(suite).write(path, encoding="utf-8", xml_declaration=True)
