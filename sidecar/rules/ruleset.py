"""Compiled rules and the rule set: what a rule is, how it judges one trace, and what the loaded
rules read (the projection that prunes spans at ingest)."""

from __future__ import annotations

import difflib
import functools
import hashlib
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from sidecar.dsl import (
    MISSING,
    CompiledExpr,
    References,
    attribute_getter,
    distinct_key,
    glob_matcher,
    memoized,
)
from sidecar.model.errors import Location
from sidecar.model.signals import MAX_VALUE_BYTES, Signal, capped, rfc3339, signal_id
from sidecar.model.spans import Projection, Span, Trace
from sidecar.rules.compact import trace_from_compact

SEVERITIES = ("critical", "high", "medium", "low", "info")
# The keys holding a rule's logic, in the order its form names them (`when+always+never`);
# `for_each` (DESIGN rule 16) is listed so that its rules read `for_each+always` once they load.
FORM_KEYS = ("for_each", "condition", "when", "always", "never")


@dataclass(frozen=True)
class Expected:
    """What a signal must say, as a test asserts it: each part given is checked, the rest not."""

    trace_id: str | None = None  # which trace of a captured file it comes from
    message: str | None = None
    context: dict[str, Any] = field(default_factory=dict)  # only the keys listed
    offending: tuple[str, ...] | None = None  # span names, in the signal's span order


@dataclass(frozen=True)
class Example:
    """A trace written in the compact span form and whether the rule must fire on it (and what
    its signal says); or, for a test, a captured OTLP JSON file and every signal it must give."""

    rule_id: str
    description: str
    violates: bool
    spans: Any = field(repr=False)
    location: Location
    kind: str = "example"  # or "test": from a `tests:` list
    expected: Expected = Expected()  # with violates: what the signal says
    file: str | None = None  # a captured file, replayed instead of `spans`
    expect: tuple[Expected, ...] = ()  # with file: exactly the signals the rule gives there


class Declaration(NamedTuple):
    """A file-level list or macro name, and where it is declared."""

    name: str
    kind: str  # "list" or "macro"
    location: Location


@dataclass(frozen=True)
class RuleWarning:
    """Something `betrace check` points out without refusing the rules (`--strict` refuses)."""

    message: str
    location: Location
    code: str
    rule_id: str | None = None

    def __str__(self) -> str:
        return f"{self.location}: warning[{self.code}]: {self.message}"

    def as_dict(self) -> dict[str, object]:
        loc = self.location
        return {"file": loc.file, "line": loc.line, "column": loc.column, "code": self.code,
                "rule_id": self.rule_id, "message": self.message}


@dataclass(frozen=True)
class Violation:
    """A rule that fired on a trace, with the spans that made it fire."""

    rule: Rule
    trace: Trace
    spans: list[Span]

    def signal(self, mode: str, detected_ns: int, value_limit: int = MAX_VALUE_BYTES) -> Signal:
        """This violation as the signal its sinks write (`mode` is live or replay), each context
        value cut at `value_limit` bytes (see `capped`)."""
        rule, spans = self.rule, sorted(self.spans, key=span_order)
        # the latest offending span (start, then span id): when it happened, and which deploy
        latest = spans[-1] if spans else None
        return Signal(
            signal_id=signal_id(rule.id, self.trace.trace_id),
            rule_id=rule.id,
            rule_name=rule.name,
            severity=rule.severity,
            trace_id=self.trace.trace_id,
            span_ids=[s.span_id for s in spans],
            message=rule.message,
            context={key: capped(value, value_limit) for key, value in self.context().items()},
            mode=mode,
            detected_at=rfc3339(detected_ns),
            violation_time=None if latest is None else rfc3339(latest.start_ns),
            service=None if latest is None else latest.service,
            service_version=None if latest is None else latest.version,
            rule_digest=rule.digest,
        )

    def context(self) -> dict[str, Any]:
        """Each declared attribute: its value, or its distinct values when the spans differ.
        Taken from the offending spans first, else from any span of the trace."""
        out: dict[str, Any] = {}
        for attr in self.rule.context:
            get = attribute_getter(attr)
            values = _distinct(get(s) for s in sorted(self.spans, key=span_order))
            if not values:
                values = _distinct(get(s) for s in sorted(self.trace.spans, key=span_order))
            out[attr] = None if not values else values[0] if len(values) == 1 else values
        return out


_POSITIONS = re.compile(r"\b(start|end)=\d+, ")  # in a syntax tree's repr


@dataclass(frozen=True)
class Rule:
    id: str
    name: str
    severity: str
    description: str
    message: str
    context: tuple[str, ...]
    tags: tuple[str, ...]
    enabled: bool
    form: str  # which logic keys it has, e.g. `condition` or `when+always` (see `rule_form`)
    logic: CompiledExpr = field(repr=False)
    location: Location

    @property
    def refs(self) -> References:
        return self.logic.refs | References(attributes=frozenset(self.context))

    @functools.cached_property
    def digest(self) -> str:
        """What the rule means, hashed (16 hex digits): its id, severity, message, context and
        syntax tree with lists and macros expanded, not where its text sits. Stored with each
        signal, so an investigation can tell which version of a rule found it."""
        tree = _POSITIONS.sub("", repr(self.logic.tree))
        meaning = "\0".join((self.id, self.severity, self.message, ",".join(self.context),
                             self.form, tree))
        return hashlib.sha256(meaning.encode()).hexdigest()[:16]

    @property
    def fires_without_its_spans(self) -> bool:
        """True on a trace holding none of the spans it names, so on every such trace: such
        traces must reach it, and `check` warns (it fires on unrelated traffic too)."""
        return self.logic.fires_on_empty

    def applies(self, trace: Trace) -> bool:
        """In scope for compliance figures: `when` held, or the trace has a span it names, or the
        rule fires without its spans (then every trace is in scope)."""
        return self.logic.applies(trace)

    def evaluate(self, trace: Trace) -> Violation | None:
        """This one rule on one trace (exceptions propagate: `evaluate` below contains them)."""
        if not self.logic.test(trace):
            return None
        return Violation(self, trace, self.logic.witness(trace))


class RuleFailure(NamedTuple):
    """A rule that raised on a trace: reported and counted, and every other rule still ran."""

    rule: Rule
    error: Exception


class Verdict(NamedTuple):
    """What the rules found on one trace."""

    violations: list[Violation]
    failures: list[RuleFailure]
    applied: list[Rule]  # the rules in scope (filled only when asked: replay's compliance)


def evaluate(trace: Trace, rules: Iterable[Rule], scope: bool = False) -> Verdict:
    """The one evaluation of a trace, for the live decision, the check on arrival, replay and
    `betrace test`: each span id counts once (a collector retry re-delivers spans), and a rule
    that raises is reported in `failures` while every other rule still runs."""
    trace = trace.without_repeats()
    violations: list[Violation] = []
    failures: list[RuleFailure] = []
    applied: list[Rule] = []
    for rule in rules:
        logic = rule.logic
        try:
            if scope:  # a rule out of scope cannot fire: no `when`, no span it names, no each
                if not logic.applies(trace):
                    continue
                applied.append(rule)
            if logic.test(trace):
                violations.append(Violation(rule, trace, logic.witness(trace)))
        except Exception as error:  # a rule bug must not hide what the other rules find
            failures.append(RuleFailure(rule, error))
    return _verdict(Verdict, (violations, failures, applied))


_verdict = tuple.__new__  # a Verdict without NamedTuple's Python-level __new__ (once per trace)


@dataclass(frozen=True)
class RuleSet:
    """The enabled rules, every example, and what the rules read (for pruning)."""

    rules: tuple[Rule, ...]
    disabled: tuple[Rule, ...] = ()
    examples: tuple[Example, ...] = ()
    files: tuple[str, ...] = ()
    digest: str = ""
    # the lists and macros the files declare, with where (see `unused_declarations`)
    declarations: tuple[Declaration, ...] = ()

    @property
    def refs(self) -> References:
        refs = References()
        for rule in self.rules:
            refs = refs | rule.refs
        return refs

    def projection(self) -> Projection:
        """Keep spans some rule selects and, on each, the attributes the rules selecting it read,
        and every attribute some rule copies into a signal (a signal's context falls back to any
        span of the trace, so it must not depend on which rule selected that span)."""
        refs = self.refs
        context = frozenset(key for rule in self.rules for key in rule.context)
        names, globs = refs.names, [glob_matcher(g) for g in sorted(refs.globs)]
        wants: Callable[[str], bool] = names.__contains__
        if refs.structure:  # `X under this` follows parent links through spans no rule names
            wants = lambda name: True  # noqa: E731 (their ids are kept, not their attributes)
        elif globs:
            wants = memoized(lambda name: name in names or any(g(name) for g in globs))
        exact: dict[str, set[str]] = {}
        by_glob: list[tuple[Callable[[str], bool], frozenset[str]]] = []
        for rule in self.rules:
            for selector, glob, attributes in rule.logic.refs.selectors:
                reads = attributes | frozenset(rule.context)
                if glob:
                    by_glob.append((glob_matcher(selector), reads))
                else:
                    exact.setdefault(selector, set()).update(reads)
        known: dict[str, frozenset[str]] = {}

        def attributes_for(name: str) -> frozenset[str]:
            found = known.get(name)
            if found is None:
                found = context.union(exact.get(name, ()),
                                      *(reads for matches, reads in by_glob if matches(name)))
                if len(known) < 10_000:  # span names are few; never grow without bound
                    known[name] = found
            return found
        return Projection(wants, refs.attributes, attributes_for, self.every_trace_matters,
                          None if refs.structure or globs else names)

    @property
    def unused_declarations(self) -> list[Declaration]:
        """Lists and macros no rule uses, even through another macro (disabled rules count)."""
        used = frozenset().union(*(rule.logic.uses for rule in self.rules + self.disabled))
        return [declared for declared in self.declarations if declared.name not in used]

    def rule(self, rule_id: str) -> Rule | None:
        return next((r for r in self.rules + self.disabled if r.id == rule_id), None)

    @property
    def every_trace_matters(self) -> bool:
        """Some rule fires on traces without its spans: no trace may be pruned away unseen."""
        return any(rule.fires_without_its_spans for rule in self.rules)

    def warnings(self) -> list[RuleWarning]:
        """What `betrace check` points out without refusing the rules, in file order."""
        every = self.rules + self.disabled
        found = [RuleWarning(f"rule '{rule.id}' fires on every trace without the spans it "
                             "names (it is true on an empty trace), so on unrelated traffic "
                             "too; every trace is kept by id until decided, and counts as "
                             "applicable in replay", rule.location, "fires-without-spans",
                             rule.id)
                 for rule in every if rule.fires_without_its_spans]
        found += [RuleWarning(f"rule '{rule.id}' selects \"{glob}\", which matches every span "
                              "name: pruning is off and every span of every trace is kept "
                              "until decided; name the spans, or narrow the glob (\"GET *\")",
                              rule.location, "keeps-every-span", rule.id)
                  for rule in self.rules for glob in sorted(rule.logic.refs.globs)
                  if not glob.strip("*")]
        found += [RuleWarning(f"{declared.kind} '{declared.name}' is declared but no rule uses "
                              "it", declared.location, f"unused-{declared.kind}")
                  for declared in self.unused_declarations]
        found += self._lone_selectors()
        with_examples = {example.rule_id for example in self.examples}
        found += [RuleWarning(f"rule '{rule.id}' has no examples, so `betrace test` cannot "
                              "show that it fires and that it stays quiet", rule.location,
                              "no-examples", rule.id)
                  for rule in every if rule.id not in with_examples]
        order = {file: index for index, file in enumerate(self.files)}
        return sorted(found, key=lambda w: (order.get(w.location.file, len(order)),
                                            w.location.line, w.location.column))

    def _lone_selectors(self) -> list[RuleWarning]:
        """Span names one rule selects and nothing else names (no other rule, no example
        span): a misspelt name, or a misspelt macro, which reads as a span name."""
        every = self.rules + self.disabled
        selecting = Counter(name for rule in every for name in rule.logic.refs.names)
        in_examples = {span.name for example in self.examples
                       for span in trace_from_compact(example.spans).spans}
        macros = [declared.name for declared in self.declarations if declared.kind == "macro"]
        found = []
        for rule in every:
            for name in sorted(rule.logic.refs.names):
                if selecting[name] > 1 or name in in_examples:
                    continue
                close = difflib.get_close_matches(name, macros, n=1)
                hint = f"; did you mean the macro '{close[0]}'?" if close else \
                    "; is it misspelt?"
                found.append(RuleWarning(f"rule '{rule.id}' selects span '{name}', which no "
                                         f"other rule and no example span names{hint}",
                                         rule.location, "lone-selector", rule.id))
        return found

    def evaluate(self, trace: Trace) -> list[Violation]:
        """The violations of every enabled rule (see `evaluate`)."""
        return evaluate(trace, self.rules).violations


def rule_form(keys: Iterable[str]) -> str:
    """A rule's shape named by the logic keys it has, so `betrace rules` tells `condition`,
    `when+always` and `when+never` rules apart without reading their expressions."""
    present = set(keys)
    return "+".join(key for key in FORM_KEYS if key in present)


def span_order(span: Span) -> tuple[int, str]:
    """Start time, then span id: a stable order whatever order the spans arrived in."""
    return span.start_ns, span.span_id


def _distinct(values: Iterable[Any]) -> list[Any]:
    seen, out = set(), []
    for value in values:
        if value is MISSING:
            continue
        key = distinct_key(value)
        if key not in seen:
            seen.add(key)
            out.append(list(value) if isinstance(value, tuple) else value)
    return out
