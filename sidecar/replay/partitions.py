"""Replay's grouping and evaluation: one process's share of the work.

A `Worker` groups the records it reads by trace id and, beyond its share of the memory budget
(or after every file when there are several workers), appends them to partition files by a hash
of the trace id, one packed chunk at a time (`_spill.pack`: the spans in bytes, unpacked back
into spans). A partition is later loaded whole, split again first if it would not fit, and its
traces evaluated, each exactly once.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

from sidecar.dsl import MISSING, attribute_getter
from sidecar.model.signals import MAX_VALUE_BYTES, Signal
from sidecar.model.spans import NO_ATTRIBUTES, SLOT_DESCRIPTORS, Span, Trace
from sidecar.otlp.decoded import SpanFilter
from sidecar.otlp.json_spans import InputError
from sidecar.replay._spill import pack, unpack
from sidecar.replay.sources import read_source
from sidecar.rules import Rule, Violation, evaluate, span_order

_SPAN_BYTES, _ATTRIBUTE_BYTES = 400, 150  # Python memory of a held record, and per attribute
_ID_BYTES = 200  # a trace held by its id alone
_LOADED_PER_SPILLED_BYTE = 5  # a packed byte, loaded back as Python objects
_MAX_SPLIT, _MAX_SPLIT_DEPTH = 64, 2  # beyond, one trace is too big to split
_ERRORS_PER_SOURCE = 1000  # reported one by one; beyond, only counted
_CHUNK = struct.Struct("<Q")  # the length of each spilled chunk
_ATTRIBUTES = attrgetter("attributes")


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
    """One process's share of the work: the records read, by trace id, until spilled to the
    partition files (beyond the budget; after every file when there are several processes)."""

    def __init__(self, plan: Plan, slots: Any, tick: Callable[[], None] = lambda: None) -> None:
        self.plan, self.slots, self.tick = plan, slots, tick
        self.buffer: dict[str, list[Span]] = {}
        self.weight = 0  # estimated bytes held
        self.spilled_bytes = 0

    def read(self, index: int, source: str) -> ReadResult:
        plan, slots, errors = self.plan, self.slots, []
        spans, spilled = 0, self.spilled_bytes

        def progress(position: int) -> None:
            slots[2 * index] = position
            slots[2 * index + 1] = spans
            self.tick()

        for batch in read_source(source, plan.keep, errors, progress):
            spans += self._hold(batch)
            if self.weight > plan.share:
                self.spill()
        slots[2 * index + 1] = spans
        if plan.jobs > 1:  # the trace may go on in a file another process reads
            self.spill()
        return ReadResult(index, spans, len(errors), errors[:_ERRORS_PER_SOURCE],
                     self.spilled_bytes - spilled)

    def _hold(self, batch: dict[str, list[Span]]) -> int:
        """Add a batch to the buffer; its spans."""
        buffer, count, attributes, bare = self.buffer, 0, 0, 0
        for trace_id, spans in batch.items():
            bare += not spans
            bucket = buffer.get(trace_id)
            if bucket is None:
                buffer[trace_id] = spans
            else:
                bucket.extend(spans)
            count += len(spans)
            attributes += sum(map(len, map(_ATTRIBUTES, spans)))
        self.weight += count * _SPAN_BYTES + attributes * _ATTRIBUTE_BYTES + bare * _ID_BYTES
        return count

    def spill(self) -> None:
        """Append everything held to the partition files."""
        spilled, self.buffer, self.weight = self.buffer.items(), {}, 0
        self._write(spilled, "", self.plan.partitions, 0)

    def _write(self, items: Iterable[tuple[str, list[Span]]], prefix: str, count: int,
               depth: int) -> set[str]:
        """Append `items` (traces' spans) to `count` partition files named `prefix`NNNNN~pid;
        the names used."""
        parts: list[list[tuple[str, list[Span]]]] = [[] for _ in range(count)]
        for item in items:
            parts[_partition(item[0], count, depth)].append(item)
        names = set()
        for number, part in enumerate(parts):
            if part:
                name = f"{prefix}{number:05d}"
                data = pack(part, SLOT_DESCRIPTORS)
                with open(os.path.join(self.plan.spill, f"{name}~{os.getpid()}"), "ab") as out:
                    out.write(_CHUNK.pack(len(data)) + data)
                self.spilled_bytes += _CHUNK.size + len(data)
                names.add(name)
        return names

    def evaluate_partition(self, name: str, depth: int = 0) -> Outcome:
        """Evaluate the traces spilled to partition `name`; split in parts first if they would
        not fit in memory."""
        paths = [e.path for e in os.scandir(self.plan.spill) if e.name.startswith(name + "~")]
        size = sum(os.path.getsize(p) for p in paths)
        if size * _LOADED_PER_SPILLED_BYTE > self.plan.share and depth < _MAX_SPLIT_DEPTH:
            count = min(_MAX_SPLIT, -(-size * _LOADED_PER_SPILLED_BYTE // self.plan.share))
            parts: set[str] = set()
            for path in paths:
                for chunk in _chunks(path):
                    parts |= self._write(chunk, name + ".", count, depth + 1)
                os.remove(path)
            return merge(self.evaluate_partition(part, depth + 1) for part in sorted(parts))
        spilled: dict[str, list[Span]] = {}
        for path in paths:
            for chunk in _chunks(path):
                for trace_id, spans in chunk:
                    bucket = spilled.get(trace_id)
                    if bucket is None:
                        spilled[trace_id] = spans
                    else:
                        bucket.extend(spans)
            os.remove(path)
        return self._evaluate(spilled.items())

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
        for name, test in rule.logic.scope:
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


def _partition(trace_id: str, count: int, depth: int) -> int:
    """A trace's partition among `count`: each split depth hashes other digits of the id."""
    return int(trace_id[24 - 8 * depth:32 - 8 * depth], 16) % count


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


def _chunks(path: str) -> Iterator[list[tuple[str, list[Span]]]]:
    """The traces of a partition file, one packed chunk (written with its length) at a time."""
    with open(path, "rb") as spilled:
        while head := spilled.read(_CHUNK.size):
            (size,) = _CHUNK.unpack(head)
            yield unpack(spilled.read(size), Span, SLOT_DESCRIPTORS, NO_ATTRIBUTES)


def merge(outcomes: Iterable[Outcome]) -> Outcome:
    total = Outcome(0, [], {})
    for outcome in outcomes:
        total.traces += outcome.traces
        total.signals += outcome.signals
        for rule_id, stats in outcome.stats.items():
            total.stats.setdefault(rule_id, RuleStats()).merge(stats)
    return total
