"""Replay: run a rule set over recorded traces and report every violation.

Spans of one trace may sit anywhere in the input (any line, any file), so nothing is evaluated
before every source is read; each trace is then evaluated exactly once and yields at most one
signal per rule. Two phases, on `jobs` processes (forked, so they share the compiled rules):

  read      each worker reads whole files (the unit of parallel reading), the next one free,
            and packs the kept spans as they come into P partitions by a hash of the trace id
            (bytes, not Python objects). Beyond its share of the memory budget, and after each
            file when there are several workers (the trace may go on in a file another one
            reads), it appends each partition's chunk to that partition's file in a temp
            directory.
  evaluate  each partition, on the next worker free, is loaded (re-split first if it would not
            fit in its share) and its traces evaluated: from the packed bytes where the rules
            can be judged as data, else rebuilt as spans. With one process and everything
            within the budget nothing touches the disk: the partitions are evaluated from memory.

Results do not depend on jobs, budget or file order: signals are sorted by rule, violation time
and trace; statistics are sums. The budget counts the packed bytes of held spans; the signals
themselves are held for sorting.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Any

from sidecar.model.signals import MAX_VALUE_BYTES, Signal
from sidecar.model.spans import Span
from sidecar.otlp.decoded import SpanFilter
from sidecar.otlp.json_spans import InputError
from sidecar.replay.backend import DEFAULT_LIMIT, TraceBackend
from sidecar.replay.partitions import Outcome, Plan, ReadResult, RuleStats, Worker
from sidecar.replay.progress import Progress
from sidecar.rules import Rule, RuleSet


def _quarter_of_memory() -> int:
    """A quarter of the machine's memory, at least 512 MiB: replay is a batch job."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 4 << 30
    return max(512 << 20, total // 4)


# Without --memory, each process's share of held spans (their packed bytes; a partition loaded is
# re-split beyond a fifth of it): one process replaying 3.2M traces peaked at 719 MB of RSS
# (bench/replay.py), under 1 GB; never more than a quarter of the machine
DEFAULT_SHARE = 640 << 20
DEFAULT_EDGE_NS = 5 * 60 * 10**9  # the live sidecar's default max trace age
_MAX_PARTITIONS = 512
_WHOLE_TRACES_PER_ROUND = 1000  # whole traces from a store evaluated at a time
_POLL_SECONDS = 0.2


@dataclass(frozen=True)
class ReplayOptions:
    memory: int | None = None  # bytes of buffered spans, all processes (None: DEFAULT_SHARE each)
    jobs: int = 1
    spill_dir: str | None = None  # where the temp directory goes (default: tempfile's)
    since_ns: int | None = None  # evaluate traces with a span starting at or after this
    until_ns: int | None = None  # ... and before this
    edge_ns: int = DEFAULT_EDGE_NS  # spans this far outside are read too: such traces whole
    group_by: str | None = None  # break violations down by this attribute
    value_limit: int = MAX_VALUE_BYTES  # bytes of each context value in a signal


@dataclass
class ReplaySummary:
    sources: int = 0
    spans_read: int = 0
    traces: int = 0
    signals: int = 0
    seconds: float = 0.0
    errors: list[InputError] = field(default_factory=list)  # at most 1000 per source
    skipped: int = 0  # every malformed input item, reported or not
    rules: dict[str, RuleStats] = field(default_factory=dict)
    group_by: str | None = None
    spilled_bytes: int = 0

    @property
    def rule_errors(self) -> int:
        """Traces some rule raised on (each such rule was not judged there)."""
        return sum(stats.errors for stats in self.rules.values())

    def lines(self) -> list[str]:
        """The human summary printed to stderr."""
        out = [(f"replayed {self.traces} traces ({self.spans_read} spans kept) from "
                f"{self.sources} source(s) in {self.seconds:.2f}s: {self.signals} signal(s)")]
        for rule_id, stats in self.rules.items():
            when = f", first {stats.first}, last {stats.last}" if stats.violations else ""
            out.append(f"  {rule_id}: {stats.violations} violation(s) in {stats.applied} "
                       f"applicable trace(s), {stats.compliance:.2f}% compliant{when}")
            ranked = sorted(stats.groups.items(), key=lambda item: (-item[1], item[0]))
            for group, count in ranked:
                out.append(f"    {self.group_by}={group}: {count} "
                           f"({100 * count / stats.violations:.1f}%)")
            if stats.errors:
                out.append(f"    RULE ERROR on {stats.errors} trace(s), which it did not judge; "
                           f"first: {stats.error}")
        if self.skipped:
            out.append(f"  skipped {self.skipped} malformed input item(s)")
        if self.spilled_bytes:
            out.append(f"  spilled {self.spilled_bytes / 2**20:.1f} MiB to disk")
        return out


def _window(options: ReplayOptions) -> tuple[int, int] | None:
    if options.since_ns is None and options.until_ns is None:
        return None
    return options.since_ns or 0, 2**64 if options.until_ns is None else options.until_ns


def span_filter(ruleset: RuleSet, options: ReplayOptions) -> SpanFilter:
    """What replay keeps of what it reads: the spans the rules select (with the --group-by
    attribute), starting within the window widened by `edge_ns` on each side."""
    window = _window(options)
    return SpanFilter.of(ruleset.projection(),
                         None if window is None else max(0, window[0] - options.edge_ns),
                         None if window is None else window[1] + options.edge_ns,
                         options.group_by)


def replay(ruleset: RuleSet, sources: Sequence[str], emit: Callable[[Signal], None],
           on_error: Callable[[InputError], None] = lambda e: None,
           options: ReplayOptions = ReplayOptions(),
           progress: Progress | None = None) -> ReplaySummary:
    """Evaluate every trace in `sources` (expanded: files or "-") once and pass each signal to
    `emit`, in a stable order, once all are found; malformed input goes to `on_error` in source
    order. An unreadable source raises OSError; the temp directory is removed in every case."""
    started = time.perf_counter()
    summary = ReplaySummary(sources=len(sources), group_by=options.group_by)
    summary.rules = {rule.id: RuleStats() for rule in ruleset.rules}
    window = _window(options)
    keep = span_filter(ruleset, options)
    jobs = max(1, min(options.jobs, len(sources)))  # files are the unit of parallel reading
    memory = options.memory or min(DEFAULT_SHARE * jobs, _quarter_of_memory())
    share = max(1, memory // jobs)
    total = sum(os.path.getsize(s) for s in sources if s != "-")
    # enough partitions that no process waits long for the last one (16 each), and each one,
    # loaded, fits its process's share
    partitions = min(_MAX_PARTITIONS, max(16 * jobs, -(-total // share)))
    progress = progress or Progress("never")
    with tempfile.TemporaryDirectory(prefix="betrace-replay-", dir=options.spill_dir) as spill, \
            _gc_paused():
        plan = Plan(ruleset.rules, keep, spill, partitions, jobs, share, time.time_ns(),
                    options.group_by, window, options.value_limit)
        run = _run_here if jobs == 1 else _run_pool
        reads, outcomes, summary.spilled_bytes = run(plan, sources, progress, jobs)
    progress.clear()
    return _summarize(summary, reads, outcomes, emit, on_error, started)


def replay_one_rule(rule: Rule, path: str) -> tuple[list[Signal], list[str]]:
    """One rule (enabled or not) over every trace of one captured file, as `replay` evaluates
    them: what `betrace test` checks a file test against. Besides the signals, what went wrong
    (input skipped, the rule raising), each a sentence."""
    signals: list[Signal] = []
    problems: list[str] = []
    summary = replay(RuleSet((rule,)), [path], signals.append,
                     on_error=lambda error: problems.append(f"{error} (skipped)"))
    stats = summary.rules[rule.id]
    if stats.errors:
        problems.append(f"the rule raised on {stats.errors} trace(s); first: {stats.error}")
    return signals, problems


def replay_backend(ruleset: RuleSet, backend: TraceBackend[Any], emit: Callable[[Signal], None],
                   on_error: Callable[[InputError], None] = lambda e: None,
                   options: ReplayOptions = ReplayOptions(), *, limit: int = DEFAULT_LIMIT,
                   progress: Progress | None = None) -> ReplaySummary:
    """`replay` over the traces a store (Tempo, Jaeger) finds between options.since_ns and
    options.until_ns (both required); its search figures are in `backend.stats`. The store
    returns each trace whole, so traces are evaluated as they arrive, a round at a time, in this
    process (the time goes into HTTP, not into evaluating)."""
    if options.since_ns is None or options.until_ns is None:
        raise ValueError(f"replay from {backend.name} needs --since (and --until, default now)")
    started = time.perf_counter()
    summary = ReplaySummary(sources=1, group_by=options.group_by)
    summary.rules = {rule.id: RuleStats() for rule in ruleset.rules}
    # The range picks traces (the store's search); each is then evaluated whole, spans outside
    # the range included: cutting a trace at the range's edge could make a rule cry wolf.
    keep = SpanFilter.of(ruleset.projection(), group_by=options.group_by)
    plan = Plan(ruleset.rules, keep, "", 1, 1, options.memory or DEFAULT_SHARE, time.time_ns(),
                options.group_by, None, options.value_limit)
    worker = Worker(plan, [0, 0])
    progress = progress or Progress("never")
    errors: list[InputError] = []
    outcomes: list[Outcome] = []
    pending: dict[str, list[Span]] = {}
    spans = 0
    for trace_id, found in backend.traces(
            ruleset, options.since_ns, options.until_ns, errors=errors, limit=limit,
            projection=keep.projection, resource_key=keep.resource_key):
        spans += len(found)
        pending[trace_id] = found
        if len(pending) >= _WHOLE_TRACES_PER_ROUND:
            outcomes.append(worker.evaluate(pending))
            pending = {}
        if progress.due():
            progress.reading(0, spans)
    outcomes.append(worker.evaluate(pending))
    progress.clear()
    read = ReadResult(0, spans, len(errors), errors, 0)
    return _summarize(summary, [read], outcomes, emit, on_error, started)


def _summarize(summary: ReplaySummary, reads: list[ReadResult], outcomes: list[Outcome],
               emit: Callable[[Signal], None], on_error: Callable[[InputError], None],
               started: float) -> ReplaySummary:
    """Fold what the workers report into the summary and emit the signals in a stable order."""
    for result in sorted(reads, key=lambda r: r.index):
        summary.spans_read += result.spans
        summary.skipped += result.skipped
        summary.errors += result.errors
        for error in result.errors:
            on_error(error)
    signals: list[Signal] = []
    for outcome in outcomes:
        summary.traces += outcome.traces
        signals += outcome.signals
        for rule_id, stats in outcome.stats.items():
            summary.rules[rule_id].merge(stats)
    signals.sort(key=lambda s: (s.rule_id, s.violation_time or "", s.trace_id))
    for found in signals:
        emit(found)
    summary.signals = len(signals)
    summary.seconds = time.perf_counter() - started
    return summary


def _run_here(plan: Plan, sources: Sequence[str], progress: Progress,
              jobs: int) -> tuple[list[ReadResult], list[Outcome], int]:
    """jobs = 1: read and evaluate in this process, spilling only beyond the budget."""
    slots = [0] * (2 * len(sources))

    def tick() -> None:
        if progress.due():
            progress.reading(sum(slots[0::2]), sum(slots[1::2]))

    worker = Worker(plan, slots, tick)
    reads = [worker.read(index, source) for index, source in enumerate(sources)]
    if not worker.spilled_bytes:
        return reads, [worker.evaluate_held()], 0
    worker.spill()
    outcomes = []
    for number in range(plan.partitions):
        progress.evaluating(number, plan.partitions)
        outcomes.append(worker.evaluate_partition(f"{number:05d}"))
    return reads, outcomes, worker.spilled_bytes


def _run_pool(plan: Plan, sources: Sequence[str], progress: Progress,
              jobs: int) -> tuple[list[ReadResult], list[Outcome], int]:
    """jobs > 1: each source, then each partition, to whichever worker process is free.
    Plain processes and pipes rather than a Pool, so that a worker that dies fails the run
    instead of hanging it."""
    context = multiprocessing.get_context("fork")  # workers inherit the compiled rules
    slots = context.Array("q", 2 * len(sources), lock=False)  # one writer per source

    def reading(done: int) -> None:
        if progress.due():
            progress.reading(sum(slots[0::2]), sum(slots[1::2]))

    def evaluating(done: int) -> None:
        progress.evaluating(done, plan.partitions)

    workers: list[_Process] = []
    stdin = os.dup(0) if "-" in sources else None  # a child's own stdin is /dev/null
    try:
        workers += (_Process(context, plan, slots, number, stdin) for number in range(jobs))
        if stdin is not None:
            os.close(stdin)
            stdin = None
        reads = _share(workers, "read", list(enumerate(sources)), reading)
        names = [(f"{number:05d}",) for number in range(plan.partitions)]
        outcomes = _share(workers, "evaluate_partition", names, evaluating)
    finally:
        if stdin is not None:
            os.close(stdin)
        for worker in workers:
            worker.stop()
    return reads, outcomes, sum(r.spilled for r in reads)


def _share(workers: list[_Process], method: str, tasks: list[tuple[Any, ...]],
           tick: Callable[[int], None]) -> list[Any]:
    """Run `method` on every task, each on the next free worker; `tick(done)` while waiting."""
    todo, idle, busy, results = tasks[::-1], list(workers), {}, []
    while todo or busy:
        while idle and todo:
            worker = idle.pop()
            worker.send(method, todo.pop())
            busy[worker.connection] = worker
        for ready in wait(list(busy), timeout=_POLL_SECONDS):
            worker = busy.pop(ready)
            results.append(worker.receive())
            idle.append(worker)
        tick(len(results))
    return results


class _Process:
    """A forked worker process running the `Worker` methods sent over a pipe."""

    def __init__(self, context: Any, plan: Plan, slots: Any, number: int,
                 stdin: int | None) -> None:
        self.connection, theirs = context.Pipe()
        self.process = context.Process(target=_serve, args=(theirs, plan, slots, stdin),
                                       name=f"betrace-replay-{number}", daemon=True)
        self.process.start()
        theirs.close()

    def send(self, method: str, arguments: tuple[Any, ...]) -> None:
        self.connection.send((method, arguments))

    def receive(self) -> Any:
        try:
            failed, value = self.connection.recv()
        except EOFError:
            self.process.join()
            raise RuntimeError(f"{self.process.name} died (exit status "
                               f"{self.process.exitcode})") from None
        if failed:
            raise value
        return value

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.terminate()
        self.process.join()
        self.connection.close()


def _serve(connection: Any, plan: Plan, slots: Any, stdin: int | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's, which stops us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # and the parent's stop() terminates us
    if stdin is not None:  # the parent's, for the worker that gets "-"
        sys.stdin = open(stdin, encoding="utf-8", closefd=True)  # noqa: SIM115
    worker = Worker(plan, slots)
    while True:
        try:
            method, arguments = connection.recv()
        except EOFError:  # the parent is gone
            return
        try:
            connection.send((False, getattr(worker, method)(*arguments)))
        except Exception as exc:  # noqa: BLE001 - raised again in the parent
            connection.send((True, exc))


@contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while millions of records are alive: it would rescan them
    over and over (it triples the cost of rebuilding traces) and they hold no cycles."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
