"""Replay's grouping and evaluation: one process's share of the work.

A `Worker` packs the spans it reads into partitions by trace id as they come (`_spill.Packer`:
the spans in bytes, unpacked back into spans) and, beyond its share of the memory budget (or
after every file when there are several workers), appends each partition's chunk to its file.
A partition is later loaded whole, its traces merged by id (split again first if it would not
fit), and its traces evaluated, each exactly once: most of them from the packed bytes (see
`Worker._evaluate_chunks`), the rest made into spans and evaluated by `sidecar.rules`.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from sidecar.dsl import MISSING, PlainRule, PlainTest, attribute_getter
from sidecar.model.signals import MAX_VALUE_BYTES, Signal
from sidecar.model.spans import NO_ATTRIBUTES, SLOT_DESCRIPTORS, Span, Trace
from sidecar.otlp.decoded import SpanFilter
from sidecar.otlp.json_spans import InputError
from sidecar.replay._spill import Packer, judge, unpack
from sidecar.replay.sources import read_source
from sidecar.rules import Rule, Violation, evaluate, span_order

_LOADED_PER_SPILLED_BYTE = 5  # a packed byte, loaded back as Python objects
_MAX_SPLIT, _MAX_SPLIT_DEPTH = 64, 2  # beyond, one trace is too big to split
_ERRORS_PER_SOURCE = 1000  # reported one by one; beyond, only counted
_CHUNK = struct.Struct("<Q")  # the length of each spilled chunk


@dataclass
class RuleStats:
    """Per rule: traces it applied to, violations, when the first and last happened, and the
    violations by --group-by value."""

    applied: int = 0
    violations: int = 0
    first: str | None = None
    last: str | None = None
    groups: dict[str, int] = field(default_factory=dict)
    errors: int = 0  # traces on which the rule raised (and was not judged)
    error: str | None = None  # the first such: its trace id and the exception

    @property
    def compliance(self) -> float:
        return 100.0 if not self.applied else 100.0 * (1 - self.violations / self.applied)

    def add(self, when: str | None, group: str | None) -> None:
        self.violations += 1
        if when is not None:
            self.first = when if self.first is None else min(self.first, when)
            self.last = when if self.last is None else max(self.last, when)
        if group is not None:
            self.groups[group] = self.groups.get(group, 0) + 1

    def merge(self, other: RuleStats) -> None:
        self.applied += other.applied
        self.violations += other.violations
        self.errors += other.errors
        self.error = self.error or other.error
        for when in (other.first, other.last):
            if when is not None:
                self.first = when if self.first is None else min(self.first, when)
                self.last = when if self.last is None else max(self.last, when)
        for group, count in other.groups.items():
            self.groups[group] = self.groups.get(group, 0) + count


@dataclass(frozen=True)
class Plan:
    """What every worker needs; inherited by the forked workers, never pickled."""

    rules: tuple[Rule, ...]
    keep: SpanFilter
    spill: str  # the temp directory
    partitions: int
    jobs: int
    share: int  # memory budget of one process
    detected_ns: int
    group_by: str | None
    # --since/--until: only traces with a span starting in [since, until) are evaluated (whole,
    # with the spans read beyond the edge); None: every trace
    window: tuple[int, int] | None = None
    value_limit: int = MAX_VALUE_BYTES  # bytes of each context value in a signal


@dataclass
class ReadResult:
    index: int  # of the source
    spans: int
    skipped: int
    errors: list[InputError]
    spilled: int  # bytes written to partition files while reading it


@dataclass
class Outcome:
    traces: int
    signals: list[Signal]
    stats: dict[str, RuleStats]


class Worker:
    """One process's share of the work: the spans read, packed by partition until spilled to the
    partition files (beyond the budget; after every file when there are several processes)."""

    def __init__(self, plan: Plan, slots: Any, tick: Callable[[], None] = lambda: None) -> None:
        self.plan, self.slots, self.tick = plan, slots, tick
        self.tests = _scope_tests(plan.rules)
        # the rules' verdicts as data, for `judge`: None unless every rule has one
        plain = tuple(rule.logic.plain for rule in plan.rules)
        self.plain: tuple[PlainRule, ...] | None = None if None in plain else plain
        self.held = self._packer(plan.partitions, 0)
        self.spilled_bytes = 0

    def read(self, index: int, source: str) -> ReadResult:
        plan, slots, errors, held = self.plan, self.slots, [], self.held
        spans, spilled = 0, self.spilled_bytes

        def progress(position: int) -> None:
            slots[2 * index] = position
            slots[2 * index + 1] = spans
            self.tick()

        for batch in read_source(source, plan.keep, errors, progress):
            spans += held.add(batch)
            if held.size > plan.share:
                self.spill()
        slots[2 * index + 1] = spans
        if plan.jobs > 1:  # the trace may go on in a file another process reads
            self.spill()
        return ReadResult(index, spans, len(errors), errors[:_ERRORS_PER_SOURCE],
                          self.spilled_bytes - spilled)

    def _packer(self, count: int, depth: int) -> Packer:
        """Packs in `count` parts at split depth `depth`, noting of each trace whether a rule
        may apply to it and whether it starts in the window (see _evaluate_chunks)."""
        return Packer(count, depth, SLOT_DESCRIPTORS, self.tests, self.plan.window)

    def spill(self) -> None:
        """Append everything held to the partition files."""
        self._write(self.held.take(), "")

    def _write(self, chunks: list[bytes | None], prefix: str) -> set[str]:
        """Append each part's chunk to partition file `prefix`NNNNN~pid (NNNNN: the part's
        number); the names used."""
        names = set()
        for number, data in enumerate(chunks):
            if data is not None:
                name = f"{prefix}{number:05d}"
                with open(os.path.join(self.plan.spill, f"{name}~{os.getpid()}"), "ab") as out:
                    out.write(_CHUNK.pack(len(data)) + data)
                self.spilled_bytes += _CHUNK.size + len(data)
                names.add(name)
        return names

    def evaluate_held(self) -> Outcome:
        """Evaluate what is held (when nothing was spilled), a partition at a time."""
        return merge(self._evaluate_chunks([chunk])
                     for chunk in self.held.take() if chunk is not None)

    def evaluate_partition(self, name: str, depth: int = 0) -> Outcome:
        """Evaluate the traces spilled to partition `name`; split in parts first if they would
        not fit in memory."""
        paths = [e.path for e in os.scandir(self.plan.spill) if e.name.startswith(name + "~")]
        size = sum(os.path.getsize(p) for p in paths)
        if size * _LOADED_PER_SPILLED_BYTE > self.plan.share and depth < _MAX_SPLIT_DEPTH:
            count = min(_MAX_SPLIT, -(-size * _LOADED_PER_SPILLED_BYTE // self.plan.share))
            split = self._packer(count, depth + 1)
            parts: set[str] = set()
            for path in paths:
                for chunk in _chunks(path):
                    split.add(_unpacked([chunk]))
                    parts |= self._write(split.take(), name + ".")
                os.remove(path)
            return merge(self.evaluate_partition(part, depth + 1) for part in sorted(parts))
        chunks = [chunk for path in paths for chunk in _chunks(path)]
        for path in paths:
            os.remove(path)
        return self._evaluate_chunks(chunks)

    def _evaluate_chunks(self, chunks: list[bytes]) -> Outcome:
        """Evaluate the traces of one partition's chunks. Most traces of a replay are ones no
        rule applies to, and most of the rest are ones no rule fires on: when every rule can be
        told as data, `judge` reads the chunks' entries and judges the traces some rule may
        apply to (all of them, unless the rules' scopes said otherwise span by span: the Packer
        noted it of each trace's entries) from their packed bytes; only the traces where a rule
        may fire, or where it cannot tell, are made and evaluated."""
        if self.plain is None:
            return self._evaluate(_unpacked(chunks).items())
        left, applied, counted = judge(chunks, self.plain)
        outcome = self._evaluate(_unpacked(chunks, left).items())
        outcome.traces += counted  # (as _evaluate counts them: in vain, or without a firing)
        for rule, count in zip(self.plan.rules, applied):
            outcome.stats[rule.id].applied += count
        return outcome

    def evaluate(self, traces: Mapping[str, list[Span]]) -> Outcome:
        return self._evaluate(traces.items())

    def _evaluate(self, traces: Iterable[tuple[str, list[Span]]]) -> Outcome:
        plan = self.plan
        stats = {rule.id: RuleStats() for rule in plan.rules}
        group = attribute_getter(plan.group_by) if plan.group_by is not None else None
        signals = []
        window = plan.window
        evaluated = 0
        may_apply = _applying(plan.rules)
        for trace_id, spans in traces:
            if window is not None and spans and not any(
                    window[0] <= s.start_ns < window[1] for s in spans):
                continue  # (a trace known by id alone was read within the window)
            evaluated += 1
            if may_apply is not None:
                try:
                    if not may_apply(spans):
                        continue  # no rule applies: nothing to count, nothing can fire
                except Exception:  # noqa: BLE001 - `evaluate` reports the rule that raises
                    pass
            verdict = evaluate(Trace(trace_id, spans), plan.rules, scope=True)
            for rule in verdict.applied:
                stats[rule.id].applied += 1
            for rule, error in verdict.failures:
                failed = stats[rule.id]
                failed.errors += 1
                failed.error = failed.error or f"trace {trace_id}: {type(error).__name__}: {error}"
            for violation in verdict.violations:
                found = violation.signal("replay", plan.detected_ns, plan.value_limit)
                stats[violation.rule.id].add(
                    found.violation_time, None if group is None else _group(violation, group))
                signals.append(found)
        return Outcome(evaluated, signals, stats)


def _applying(rules: Iterable[Rule]) -> Callable[[list[Span]], bool] | None:
    """A test of a trace's spans, false only when no rule applies to the trace (most traces of
    a replay, which then need no evaluating); None when some rule's scope takes the whole trace
    to tell (see CompiledExpr.scope)."""
    tests: dict[str, list[Callable[[Span], bool] | None]] = {}
    for rule in rules:
        if rule.logic.scope is None:
            return None
        for name, test, _ in rule.logic.scope:
            tests.setdefault(name, []).append(test)
    named = {name for name, found in tests.items() if None in found}
    checked = {name: tuple(found) for name, found in tests.items() if name not in named}

    def may_apply(spans: list[Span]) -> bool:
        for span in spans:
            name = span.name
            if name in named:
                return True
            found = checked.get(name)
            if found is not None:
                for test in found:
                    if test(span):
                        return True
        return False
    return may_apply


def _scope_tests(rules: Iterable[Rule]) -> dict[str, tuple[PlainTest | None, ...]] | None:
    """For the Packer: by span name, the tests (as data) that a span of the name passes where a
    rule applies (None: any span of it); None when some rule's scope takes the whole trace."""
    tests: dict[str, list[PlainTest | None]] = {}
    for rule in rules:
        if rule.logic.scope is None:
            return None
        for name, test, plain in rule.logic.scope:
            tests.setdefault(name, []).append(None if test is None else plain)
    return {name: tuple(found) for name, found in tests.items()}


def _group(violation: Violation, get: Callable[[Span], Any]) -> str:
    """The --group-by value of a violation: from its offending spans, latest first, else any
    span of its trace; on each span its own attribute, else its resource's."""
    for spans in (violation.spans, violation.trace.spans):
        for span in sorted(spans, key=span_order, reverse=True):
            value = get(span)
            if value is MISSING:
                value = span.group
            if value is not None and value is not MISSING:
                return value if type(value) is str else json.dumps(value, default=str)
    return "(none)"


def _chunks(path: str) -> Iterator[bytes]:
    """A partition file's packed chunks (each written with its length)."""
    with open(path, "rb") as spilled:
        while head := spilled.read(_CHUNK.size):
            (size,) = _CHUNK.unpack(head)
            yield spilled.read(size)


def _unpacked(chunks: Iterable[bytes], only: set[str] | None = None) -> dict[str, list[Span]]:
    """The traces of packed chunks (only those in `only`, when given), each trace's spans
    together."""
    traces: dict[str, list[Span]] = {}
    for chunk in chunks:
        unpack(chunk, traces, Span, SLOT_DESCRIPTORS, NO_ATTRIBUTES, only)
    return traces


def merge(outcomes: Iterable[Outcome]) -> Outcome:
    total = Outcome(0, [], {})
    for outcome in outcomes:
        total.traces += outcome.traces
        total.signals += outcome.signals
        for rule_id, stats in outcome.stats.items():
            total.stats.setdefault(rule_id, RuleStats()).merge(stats)
    return total
