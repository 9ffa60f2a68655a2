"""`betrace test`: run every rule's examples (and standalone tests) and report per rule.

An example is a trace in the compact span form, whether the rule must fire on it and, when it
must, what its signal says (message, context, offending spans). A file test replays a captured
OTLP JSON file and lists every signal the rule must give there, no more, no fewer. A rule passes
when all of its examples come out as declared; each failure says what was expected and what came.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sidecar.dsl import distinct_key
from sidecar.model.signals import Signal
from sidecar.rules.compact import trace_from_compact
from sidecar.rules.ruleset import Example, Expected, Rule, RuleSet, evaluate, span_order

# One rule over every trace of a captured file, as `betrace replay` evaluates them: its signals,
# and what went wrong on the way (malformed input, the rule raising), each a sentence. Replay
# may not be imported here (`rules` comes before it), so the command line passes it in.
ReplayFile = Callable[[Rule, str], tuple[list[Signal], list[str]]]


@dataclass(frozen=True)
class ExampleResult:
    example: Example
    fired: bool
    seconds: float
    error: str | None = None  # the rule raised, or the captured file could not be replayed
    mismatches: tuple[str, ...] = ()  # each what was expected against what came

    @property
    def passed(self) -> bool:
        return self.error is None and not self.mismatches

    @property
    def title(self) -> str:
        return self.example.description or f"{self.example.kind} at {self.example.location}"

    def failure(self) -> str:
        """Where, which example of which rule, and what went wrong: the report's line and the
        JUnit failure's message alike."""
        example = self.example
        named = f" '{example.description}'" if example.description else ""
        what = self.error if self.error is not None else "; ".join(self.mismatches)
        return f"{example.location}: {example.kind}{named} of {example.rule_id}: {what}"


def only_rules(ruleset: RuleSet, rule_ids: Sequence[str]) -> RuleSet:
    """The rule set cut down to the rules named, with their examples (`betrace test --rule`);
    ValueError names an unknown id and the known ids closest to it."""
    known = sorted(rule.id for rule in ruleset.rules + ruleset.disabled)
    for rule_id in rule_ids:
        if rule_id not in known:
            close = difflib.get_close_matches(rule_id, known, n=5, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}?" if close else \
                f"the rules loaded are {', '.join(known) or 'none'}"
            raise ValueError(f"no rule '{rule_id}' in the files given; {hint}")
    wanted = set(rule_ids)
    return dataclasses.replace(
        ruleset, rules=tuple(r for r in ruleset.rules if r.id in wanted),
        disabled=tuple(r for r in ruleset.disabled if r.id in wanted),
        examples=tuple(e for e in ruleset.examples if e.rule_id in wanted))


def run_examples(ruleset: RuleSet, replay_file: ReplayFile | None = None) -> list[ExampleResult]:
    """Every example and test of the rule set; file tests need `replay_file`."""
    results = []
    for example in ruleset.examples:
        rule = ruleset.rule(example.rule_id)
        assert rule is not None, "the loader resolves every example's rule"
        started = time.perf_counter()
        if example.file is None:
            fired, error, mismatches = _run_spans(rule, example)
        elif replay_file is None:
            fired, error, mismatches = False, "captured files are replayed by `betrace test`", ()
        else:
            fired, error, mismatches = _run_file(rule, example, replay_file)
        results.append(ExampleResult(example, fired, time.perf_counter() - started, error,
                                     mismatches))
    return results


def _run_spans(rule: Rule, example: Example) -> tuple[bool, str | None, tuple[str, ...]]:
    trace = trace_from_compact(example.spans, seed=f"{example.rule_id}{example.location}")
    verdict = evaluate(trace, (rule,))
    fired = bool(verdict.violations)
    if verdict.failures:
        error = verdict.failures[0].error
        return fired, f"the rule raised {type(error).__name__}: {error}", ()
    if fired != example.violates:
        want = "a violation" if example.violates else "no violation"
        got = "the rule fired" if fired else "the rule stayed quiet"
        return fired, None, (f"expected {want}, but {got}",)
    if not fired:
        return False, None, ()
    violation = verdict.violations[0]
    offending = [span.name for span in sorted(violation.spans, key=span_order)]
    signal = violation.signal("replay", time.time_ns())
    return True, None, tuple(_compare(example.expected, signal, offending))


def _run_file(rule: Rule, example: Example,
              replay_file: ReplayFile) -> tuple[bool, str | None, tuple[str, ...]]:
    """The file's signals against `expect`, matched by trace id."""
    assert example.file is not None
    try:
        signals, problems = replay_file(rule, example.file)
    except OSError as exc:
        return False, f"cannot replay {example.file}: {exc}", ()
    if problems:
        return bool(signals), "; ".join(problems), ()
    found = {signal.trace_id: signal for signal in signals}
    mismatches = []
    for expected in example.expect:
        signal = found.pop(expected.trace_id or "", None)
        if signal is None:
            mismatches.append(f"expected a signal for trace {expected.trace_id}, got none")
        else:
            mismatches += (f"trace {expected.trace_id}: {mismatch}"
                           for mismatch in _compare(expected, signal))
    mismatches += (f"unexpected signal for trace {trace_id}" for trace_id in found)
    return bool(signals), None, tuple(mismatches)


def _compare(expected: Expected, signal: Signal, offending: Sequence[str] = ()) -> list[str]:
    """Each asserted part of a signal that differs, as `what: expected X, got Y` (a signal
    carries span ids; the offending spans' names come with it, in its span order)."""
    found = []
    if expected.message is not None and expected.message != signal.message:
        found.append(f"message: expected {_shown(expected.message)}, "
                     f"got {_shown(signal.message)}")
    for key, want in expected.context.items():
        if key not in signal.context:
            found.append(f"context.{key}: expected {_shown(want)}, but the signal's context "
                         f"has no {key} (it has {', '.join(signal.context) or 'nothing'})")
        elif not _same(want, signal.context[key]):
            found.append(f"context.{key}: expected {_shown(want)}, "
                         f"got {_shown(signal.context[key])}")
    if expected.offending is not None and list(expected.offending) != list(offending):
        found.append(f"offending: expected [{', '.join(expected.offending)}], "
                     f"got [{', '.join(offending)}]")
    return found


def _same(expected: Any, got: Any) -> bool:
    """Equal as the rule language compares values: numbers by value, a boolean only to a
    boolean, lists item by item (YAML's `1` is not the signal's `true`)."""
    if isinstance(expected, (list, tuple)) and isinstance(got, (list, tuple)):
        return len(expected) == len(got) and all(map(_same, expected, got))
    if isinstance(expected, dict) and isinstance(got, dict):
        return expected.keys() == got.keys() and all(_same(v, got[k]) for k, v in
                                                     expected.items())
    return bool(distinct_key(expected) == distinct_key(got))


def _shown(value: Any) -> str:
    """A value as JSON writes it, so that "2" and 2 look different in a failure."""
    return json.dumps(value, ensure_ascii=False, default=str)


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
        lines.extend(f"      - {r.failure()}" for r in failed)
    return lines


def write_junit(results: list[ExampleResult], path: str) -> None:
    suite = ET.Element("testsuite", name="betrace", tests=str(len(results)),
                       failures=str(sum(not r.passed for r in results)),
                       time=f"{sum(r.seconds for r in results):.6f}")
    for result in results:
        case = ET.SubElement(suite, "testcase", classname=result.example.rule_id,
                             name=result.title, time=f"{result.seconds:.6f}")
        if not result.passed:
            failure = ET.SubElement(case, "failure", message=result.failure())
            failure.text = result.failure()
    ET.ElementTree(suite).write(path, encoding="utf-8", xml_declaration=True)
