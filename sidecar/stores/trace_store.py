"""Trace state: where spans wait, grouped by trace, until their trace is decided.

`TraceStore` is the protocol the assembler talks to; `stores.memory` and `stores.redis` implement
it and pass one contract suite. A trace is due when no span has
arrived for `decision_wait`, or `max_trace_age` after it opened. A decided trace is remembered for
`decided_retention`, so a late span re-opens it with all its earlier spans and a rule that has
already signalled for it stays quiet. Limits never drop data silently: refused spans and
early-decided traces are reported in the results for the caller to count.

"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, TypeVar

from sidecar.model.spans import Span, Trace

T = TypeVar("T")


@dataclass(frozen=True)
class StoreLimits:
    decision_wait: float = 10.0  # seconds without a new span before a trace is decided
    max_trace_age: float = 300.0  # seconds after a trace opened when it is decided regardless
    max_traces: int = 50_000  # traces held (open and recently decided)
    max_spans_per_trace: int = 10_000
    decided_retention: float = 60.0  # seconds a decided trace is kept for late spans
    claim_lease: float = 30.0  # seconds a claimed trace stays with its decider (shared stores)
    # traces known only by id (none of their spans selected), held while some rule fires on
    # traces without its spans; an id costs ~200 bytes where a trace costs kilobytes
    max_trace_ids: int = 200_000
    # bytes of spans held per trace (model.spans.stored_bytes). Rules see whole values, so a
    # count alone does not bound a trace: 150 spans with a 10 MB attribute would hold 1.5 GB.
    # 16 MiB is about ten times a full trace (10,000 spans keeping a few short attributes,
    # ~170 bytes each) and holds a handful of megabyte values, yet caps one hostile trace at
    # 3% of the chart's 512 MiB memory limit
    max_trace_bytes: int = 16 * 1024 * 1024


@dataclass
class AppendResult:
    accepted: int = 0
    rejected: int = 0  # refused: the trace already holds max_spans_per_trace
    rejected_bytes: int = 0  # refused: the span would take the trace over max_trace_bytes
    late: int = 0  # accepted into a trace that had already been decided (it re-opens)
    evicted: int = 0  # open traces pushed to an early decision to make room (max_traces)
    touched: list[str] = field(default_factory=list)  # traces that received spans
    # Traces this batch created and stored as given (every span accepted, none altered): the
    # batch holds the whole trace so far
    created: set[str] = field(default_factory=set)
    decided_on_arrival: int = 0  # of those, how many the caller had named in decide_on_arrival
    ids_dropped: int = 0  # traces known only by id, refused over max_trace_ids: never decided


class Claimed(NamedTuple):
    """A trace handed to one decider; `reason` is idle, max_age, evicted or shutdown.
    `handle` is the store's own (a lease, for shared stores); pass it back to `finish`. `born`
    is when its first span was stored (kept when a late span re-opens it): spans stored before
    a rule reload were pruned for the rules of then."""

    trace: Trace
    reason: str
    due_at: float
    handle: object = None
    born: float = 0.0

    @property
    def trace_id(self) -> str:
        return self.trace.trace_id


class TraceStore(Protocol):
    # `trace_ids`: traces this request names but holds no selected span of, held by id so that
    # a rule true without its spans is decided on them (never decided on arrival, never early)
    def append(self, batch: Mapping[str, list[Span]], now: float,
               decide_on_arrival: Collection[str] = (),
               trace_ids: Collection[str] = ()) -> AppendResult: ...
    def claim_due(self, now: float, limit: int = 1000) -> list[Claimed]: ...
    def finish(self, claimed: Sequence[Claimed]) -> None: ...
    def claim_all(self, now: float) -> list[Claimed]: ...
    def with_traces(self, trace_ids: list[str], use: Callable[[Trace], T]) -> list[T]: ...
    # (rule id, trace id) pairs: True for each signal this caller is to send, then confirmed
    def reserve_signals(self, pairs: Sequence[tuple[str, str]]) -> list[bool]: ...
    def signals_sent(self, pairs: Sequence[tuple[str, str]]) -> None: ...
    def next_due(self) -> float | None: ...
    # the span names and attribute keys the rules read: a store may encode them compactly
    def use_vocabulary(self, words: Sequence[str]) -> None: ...
    def counts(self) -> tuple[int, int]: ...  # (open traces, buffered spans)
    def healthy(self) -> tuple[bool, str]: ...
    def close(self) -> None: ...
