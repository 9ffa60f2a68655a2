"""The embedded trace store: all state in this process, guarded by one lock.

A trace that a batch creates, whole (every span accepted), and that the caller names in
`decide_on_arrival` (no rule fires on it) is decided on arrival: it gets no deadline, so nobody
claims it. It is kept like a decided trace, as if decided at the deadline it would have had: a
span arriving before that deadline opens it again (not late; it opens then, for
`max_trace_age`), one arriving after it is late. Traces known by id alone (`trace_ids`) wait in
their own list under `max_trace_ids`, and are decided as empty traces.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TypeVar

from sidecar.model.errors import StoreBusy
from sidecar.model.spans import Span, Trace, stored_bytes
from sidecar.stores.trace_store import AppendResult, Claimed, StoreLimits

T = TypeVar("T")


class _Entry:
    __slots__ = ("trace", "size", "born", "opened", "last_seen", "signalled", "decided_until",
                 "arrival_deadline")

    def __init__(self, trace: Trace, now: float) -> None:
        self.trace = trace
        self.size = 0  # stored_bytes of its spans, against max_trace_bytes
        self.born = now  # when its first span came: kept when a late span re-opens it
        self.opened = now
        self.last_seen = now
        self.signalled: set[str] | None = None  # made on the first signal: most traces have none
        self.decided_until: float | None = None  # set while decided: kept until then
        self.arrival_deadline: float | None = None  # decided on arrival: its would-be deadline


def _fitting(spans: list[Span], sizes: list[int], room: int,
             free: int) -> tuple[list[Span], int, int, int]:
    """The spans, in order, that fit in `room` more spans and `free` more bytes: (those kept,
    their bytes, how many were refused over the count, how many over the bytes). A span that
    does not fit is refused, and a later, smaller one may still fit (as the Redis store's
    append script does)."""
    kept: list[Span] = []
    used = over_count = over_bytes = 0
    for span, size in zip(spans, sizes):
        if len(kept) >= room:
            over_count += 1
        elif used + size > free:
            over_bytes += 1
        else:
            kept.append(span)
            used += size
    return kept, used, over_count, over_bytes


class MemoryStore:
    """All state in this process, guarded by one lock (the GIL serialises the work anyway)."""

    def __init__(self, limits: StoreLimits = StoreLimits()) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._by_activity: OrderedDict[str, _Entry] = OrderedDict()  # open, least recent first
        self._by_age: OrderedDict[str, _Entry] = OrderedDict()  # open, oldest first
        # Decided traces, kept for late spans: claimed ones by time of decision, those decided
        # on arrival by time of arrival (each in the order it expires).
        self._decided: OrderedDict[str, _Entry] = OrderedDict()
        self._decided_on_arrival: OrderedDict[str, _Entry] = OrderedDict()
        # Open traces pushed out by max_traces, waiting for the decider (by id: a signal for
        # one is looked up, not searched for)
        self._evicted: dict[str, _Entry] = {}
        # Rules that signalled on evicted traces already handed out: the spans are gone, but the
        # decision (and a late span) must not signal the same (rule, trace) again. Pruned to
        # max_traces at each claim, once the batch claimed before has been decided.
        self._evicted_signals: OrderedDict[str, set[str]] = OrderedDict()
        self._spans = 0
        # Open traces known only by id: (opened, last seen), least recently seen first
        self._ids: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def append(self, batch: Mapping[str, list[Span]], now: float,
               decide_on_arrival: Collection[str] = (),
               trace_ids: Collection[str] = ()) -> AppendResult:
        result = AppendResult()
        limits = self.limits
        with self._lock:
            if len(self._entries) + len(batch) > limits.max_traces:
                self._refuse_when_behind(batch)
            for trace_id in trace_ids:
                self._seen(trace_id, now, result)
            for trace_id, spans in batch.items():
                entry = self._entries.get(trace_id)
                new = whole = entry is None
                if entry is None:
                    self._make_room(result, now)
                    entry = self._entries[trace_id] = _Entry(Trace(trace_id, ()), now)
                    entry.signalled = self._evicted_signals.pop(trace_id, entry.signalled)
                    known = self._ids.pop(trace_id, None)
                    if known is not None:  # known by id until now: it keeps its age
                        entry.born = entry.opened = known[0]
                        whole = False
                room = limits.max_spans_per_trace - len(entry.trace.spans)
                sizes = [stored_bytes(span) for span in spans]
                size = sum(sizes)
                if room < len(spans) or entry.size + size > limits.max_trace_bytes:
                    spans, size, over_count, over_bytes = _fitting(
                        spans, sizes, room, limits.max_trace_bytes - entry.size)
                    result.rejected += over_count
                    result.rejected_bytes += over_bytes
                    whole = False
                if not spans:
                    if new:  # made for nothing: forget it again
                        del self._entries[trace_id]
                    continue
                if entry.decided_until is not None:
                    # Decided: the span re-opens it with its earlier spans, in a fresh Trace (a
                    # decider may still be reading the old one). It is late unless the trace was
                    # decided on arrival and would still be waiting.
                    del (self._decided if entry.arrival_deadline is None
                         else self._decided_on_arrival)[trace_id]
                    if entry.arrival_deadline is None or now > entry.arrival_deadline:
                        result.late += len(spans)
                    entry.opened, entry.decided_until, entry.arrival_deadline = now, None, None
                    entry.trace = Trace(trace_id, entry.trace.spans)
                    self._by_age[trace_id] = entry
                    self._spans += len(entry.trace.spans)
                entry.trace.add(spans)
                entry.size += size
                entry.last_seen = now
                result.accepted += len(spans)
                result.touched.append(trace_id)
                if whole:
                    result.created.add(trace_id)
                if whole and trace_id in decide_on_arrival:  # as of its would-be deadline
                    entry.arrival_deadline = now + min(limits.decision_wait, limits.max_trace_age)
                    entry.decided_until = entry.arrival_deadline + limits.decided_retention
                    self._decided_on_arrival[trace_id] = entry
                    result.decided_on_arrival += 1
                    continue
                if new:
                    self._by_age[trace_id] = entry
                self._by_activity[trace_id] = entry
                self._by_activity.move_to_end(trace_id)
                self._spans += len(spans)
        return result

    def _refuse_when_behind(self, batch: Mapping[str, list[Span]]) -> None:
        """Raise StoreBusy, before storing any of it, when `batch` would push traces out while
        max_traces of them already await their early decision: then the held traces and those
        awaiting are at most twice max_traces, however fast traces come. (A trace decided on
        arrival is counted as one that would be pushed out, as it is while inside its wait.)"""
        new = sum(1 for trace_id, spans in batch.items()
                  if spans and trace_id not in self._entries)
        pushed_out = new - (self.limits.max_traces - len(self._entries) + len(self._decided))
        if pushed_out > 0 and len(self._evicted) + pushed_out > self.limits.max_traces:
            raise StoreBusy(f"{len(self._evicted)} trace(s) pushed out by max_traces "
                            f"({self.limits.max_traces}) still await their decision: retry "
                            "later")

    def _seen(self, trace_id: str, now: float, result: AppendResult) -> None:
        """A span of `trace_id` that no rule selects: the trace is still in flight. Held by id
        when not held already (an open trace's wait starts again; a decided one stays so)."""
        entry = self._entries.get(trace_id)
        if entry is not None:
            if entry.decided_until is None:
                entry.last_seen = now
                self._by_activity.move_to_end(trace_id)
            return
        known = self._ids.pop(trace_id, None)
        if known is None and len(self._ids) >= self.limits.max_trace_ids:
            result.ids_dropped += 1
            return
        opened = now if known is None else known[0]
        # Never seen later than its age allows: it falls due by max_trace_age at the latest
        self._ids[trace_id] = (opened, min(now, opened + self.limits.max_trace_age
                                           - self.limits.decision_wait))

    def _make_room(self, result: AppendResult, now: float) -> None:
        """Forget the oldest decided trace, else push the oldest open one to a decision now. A
        trace decided on arrival and still inside its wait is as good as open: its loss counts
        as an eviction (and it is decided again, for the count and its signals' memory)."""
        if len(self._entries) < self.limits.max_traces:
            return
        if self._decided or self._decided_on_arrival:
            trace_id, entry = (self._decided or self._decided_on_arrival).popitem(last=False)
            del self._entries[trace_id]
            if entry.arrival_deadline is not None and now <= entry.arrival_deadline:
                self._evict(trace_id, entry)
                result.evicted += 1
            return
        trace_id, entry = self._by_age.popitem(last=False)
        self._by_activity.pop(trace_id, None)
        del self._entries[trace_id]
        self._spans -= len(entry.trace.spans)
        self._evict(trace_id, entry)
        result.evicted += 1

    def _evict(self, trace_id: str, entry: _Entry) -> None:
        """Queue an open trace for an early decision; a trace evicted again before that (its
        later spans re-opened it) is decided once, with every span."""
        earlier = self._evicted.pop(trace_id, None)
        if earlier is not None:
            entry.trace = Trace(trace_id, earlier.trace.spans + entry.trace.spans)
            entry.born = min(entry.born, earlier.born)
            if earlier.signalled:
                entry.signalled = earlier.signalled | (entry.signalled or set())
        self._evicted[trace_id] = entry

    def claim_due(self, now: float, limit: int = 1000) -> list[Claimed]:
        wait, max_age = self.limits.decision_wait, self.limits.max_trace_age
        claimed: list[Claimed] = []
        with self._lock:
            self._prune_evicted_signals()
            while self._evicted and len(claimed) < limit:
                trace_id, entry = self._evicted.popitem()
                self._remember_evicted(trace_id, entry)
                claimed.append(Claimed(entry.trace, "evicted", now, born=entry.born))
            while self._by_activity and len(claimed) < limit:
                trace_id, entry = next(iter(self._by_activity.items()))
                if entry.last_seen + wait > now:
                    break
                claimed.append(self._decide(trace_id, entry, "idle", entry.last_seen + wait, now))
            while self._by_age and len(claimed) < limit:
                trace_id, entry = next(iter(self._by_age.items()))
                if entry.opened + max_age > now:
                    break
                claimed.append(self._decide(trace_id, entry, "max_age", entry.opened + max_age,
                                            now))
            while self._ids and len(claimed) < limit:
                trace_id, (opened, last_seen) = next(iter(self._ids.items()))
                due = min(last_seen + wait, opened + max_age)
                if due > now:
                    break
                claimed.append(self._decide_id(trace_id, "idle" if due < opened + max_age
                                               else "max_age", due, now, opened))
            for decided in (self._decided, self._decided_on_arrival):  # forget what has expired
                while decided:
                    trace_id, entry = next(iter(decided.items()))
                    if entry.decided_until is None or entry.decided_until > now:
                        break
                    del decided[trace_id]
                    del self._entries[trace_id]
        return claimed

    def _remember_evicted(self, trace_id: str, entry: _Entry) -> None:
        self._evicted_signals[trace_id] = entry.signalled if entry.signalled is not None \
            else set()
        self._evicted_signals.move_to_end(trace_id)

    def _prune_evicted_signals(self) -> None:
        while len(self._evicted_signals) > self.limits.max_traces:
            self._evicted_signals.popitem(last=False)

    def _decide_id(self, trace_id: str, reason: str, due_at: float, now: float,
                   born: float) -> Claimed:
        """A trace known only by id is decided as the empty trace it is, and remembered like
        any decided trace (for its signals, and for a span that re-opens it)."""
        del self._ids[trace_id]
        entry = _Entry(Trace(trace_id, ()), now)
        entry.born = born
        if len(self._entries) >= self.limits.max_traces and self._decided:
            del self._entries[self._decided.popitem(last=False)[0]]
        if len(self._entries) < self.limits.max_traces:  # else not remembered: never evict for it
            entry.decided_until = now + self.limits.decided_retention
            self._entries[trace_id] = self._decided[trace_id] = entry
        return Claimed(entry.trace, reason, due_at, born=born)

    def _decide(self, trace_id: str, entry: _Entry, reason: str, due_at: float,
                now: float) -> Claimed:
        self._by_activity.pop(trace_id, None)
        self._by_age.pop(trace_id, None)
        self._spans -= len(entry.trace.spans)
        entry.decided_until = now + self.limits.decided_retention
        self._decided[trace_id] = entry
        return Claimed(entry.trace, reason, due_at, born=entry.born)

    def claim_all(self, now: float) -> list[Claimed]:
        """Every open trace, for a final decision at shutdown."""
        with self._lock:
            self._prune_evicted_signals()
            claimed = []
            for trace_id, entry in self._evicted.items():
                self._remember_evicted(trace_id, entry)
                claimed.append(Claimed(entry.trace, "shutdown", now, born=entry.born))
            self._evicted.clear()
            claimed += [self._decide(trace_id, entry, "shutdown", now, now)
                        for trace_id, entry in list(self._by_age.items())]
            claimed += [self._decide_id(trace_id, "shutdown", now, now, opened)
                        for trace_id, (opened, _) in list(self._ids.items())]
        return claimed

    def finish(self, claimed: Sequence[Claimed]) -> None:
        """Nothing to do: a trace is decided the moment it is claimed (one decider per process)."""

    def with_traces(self, trace_ids: list[str], use: Callable[[Trace], T]) -> list[T]:
        """`use` on each open trace among `trace_ids`, while no span can be added to it."""
        with self._lock:
            found = []
            for trace_id in trace_ids:
                entry = self._entries.get(trace_id)
                if entry is not None and entry.decided_until is None:
                    found.append(use(entry.trace))
            return found

    def reserve_signals(self, pairs: Sequence[tuple[str, str]]) -> list[bool]:
        """True for the first caller per (rule, trace) while the trace is remembered."""
        with self._lock:
            return [self._first_signal(rule_id, trace_id) for rule_id, trace_id in pairs]

    def _first_signal(self, rule_id: str, trace_id: str) -> bool:
        entry = self._entries.get(trace_id)
        if entry is None:
            entry = self._evicted.get(trace_id)
        if entry is not None:
            if entry.signalled is None:
                entry.signalled = set()
            signalled = entry.signalled
        else:
            signalled = self._evicted_signals.get(trace_id)
        if signalled is None:
            return True  # forgotten already: nothing left to deduplicate against
        if rule_id in signalled:
            return False
        signalled.add(rule_id)
        return True

    def signals_sent(self, pairs: Sequence[tuple[str, str]]) -> None:
        """Nothing to confirm: a process that dies takes its memory store along."""

    def next_due(self) -> float | None:
        with self._lock:
            if self._evicted:
                return 0.0
            times = [min(last_seen + self.limits.decision_wait,
                         opened + self.limits.max_trace_age)
                     for opened, last_seen in list(self._ids.values())[:1]]
            if self._by_activity:
                times.append(next(iter(self._by_activity.values())).last_seen
                             + self.limits.decision_wait)
            if self._by_age:
                times.append(next(iter(self._by_age.values())).opened + self.limits.max_trace_age)
            return min(times) if times else None

    def use_vocabulary(self, words: Sequence[str]) -> None:
        """Nothing to encode: spans stay objects."""

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return len(self._by_age) + len(self._ids), self._spans

    def healthy(self) -> tuple[bool, str]:
        return True, "memory store"

    def close(self) -> None:
        """Nothing to release: memory goes with the process."""
