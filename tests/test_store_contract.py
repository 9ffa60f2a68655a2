"""The TraceStore contract: what every trace store (memory, Redis) must do.

Written against the protocol only (append / claim_due / finish / claim_all / with_traces /
reserve_signals / next_due / counts / close) with explicit `now` values, so no test sleeps. Redis
runs as a real redis-server (see redis_servers.py). A new store joins by adding a param to
`store_factory`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
import redis

from sidecar.model.errors import StoreBusy
from sidecar.model.spans import SPAN_OVERHEAD_BYTES, Span, Trace, stored_bytes
from sidecar.stores import Claimed, StoreLimits, TraceStore
from sidecar.stores.memory import MemoryStore
from sidecar.stores.redis.store import RedisStore

T = TypeVar("T")

A, B, C, D, E = (f"{n:x}" * 32 for n in range(10, 15))  # "aaaa...", "bbbb...", ...

StoreFactory = Callable[..., TraceStore]


def _factory(request: pytest.FixtureRequest, kind: str) -> Iterator[StoreFactory]:
    made: list[TraceStore] = []

    def make(**limits: Any) -> TraceStore:
        limits.setdefault("decision_wait", 10.0)
        limits.setdefault("max_trace_age", 100.0)
        if kind == "memory":
            store: TraceStore = MemoryStore(StoreLimits(**limits))
        else:
            url = request.getfixturevalue("redis_url")
            client = redis.Redis.from_url(url)
            client.flushdb()
            store = RedisStore(client, StoreLimits(**limits))
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


@pytest.fixture(params=["memory", "redis"])
def store_factory(request: pytest.FixtureRequest) -> Iterator[StoreFactory]:
    """`store_factory(**limits)`: a fresh, empty store with these StoreLimits, of every kind;
    closed after the test."""
    yield from _factory(request, request.param)


@pytest.fixture
def local_store_factory(request: pytest.FixtureRequest) -> Iterator[StoreFactory]:
    """The memory store only, for what a shared store deliberately does not do: evict for
    max_traces (Redis is bounded by its maxmemory and TTLs) and decide everything at shutdown
    (one sidecar stopping must not decide the traces its peers are still assembling)."""
    yield from _factory(request, "memory")


def claim(store: TraceStore, now: float, **kwargs: Any) -> list[Claimed]:
    """Claim what is due and finish each, as the assembler does after deciding."""
    claimed = store.claim_due(now, **kwargs)
    store.finish(claimed)
    return claimed


_counter = iter(range(1, 1 << 30))


def spans(trace_id: str, count: int = 1, name: str = "payment.charge") -> list[Span]:
    """`count` new spans of one trace, each with a unique span id."""
    out = []
    for _ in range(count):
        n = next(_counter)
        out.append(Span(trace_id, f"{n:016x}", name, start_ns=n * 1000, end_ns=n * 1000 + 1,
                        attributes={"n": n}))
    return out


def ids(claimed: Claimed) -> set[str]:
    return {s.span_id for s in claimed.trace.spans}


def by_id(claimed: list[Claimed]) -> dict[str, Claimed]:
    out = {c.trace_id: c for c in claimed}
    assert len(out) == len(claimed), f"a trace was claimed twice in one call: {claimed}"
    return out


# --- deciding ---------------------------------------------------------------------------------

def with_trace(store: TraceStore, trace_id: str, use: Callable[[Trace], T]) -> T | None:
    """`use` on one open trace (the protocol's with_traces for one id)."""
    found = store.with_traces([trace_id], use)
    return found[0] if found else None


def test_an_empty_store_has_nothing_due(store_factory: StoreFactory) -> None:
    store = store_factory()
    assert store.next_due() is None
    assert claim(store, 1e9) == []
    assert store.claim_all(1e9) == []
    assert store.counts() == (0, 0)
    assert with_trace(store, A, len) is None


def test_a_trace_is_due_after_decision_wait_without_new_spans_and_not_before(
        store_factory: StoreFactory) -> None:
    store = store_factory(decision_wait=10.0)
    sent = spans(A, 2)
    result = store.append({A: sent}, now=100.0)
    assert (result.accepted, result.rejected, result.late, result.evicted) == (2, 0, 0, 0)
    assert result.touched == [A]
    assert store.next_due() == pytest.approx(110.0)
    assert claim(store, 100.0) == []
    assert claim(store, 109.999) == []
    [claimed] = claim(store, 110.0)
    assert claimed.reason == "idle"
    assert claimed.trace.trace_id == A
    assert ids(claimed) == {s.span_id for s in sent}
    assert claimed.due_at == pytest.approx(110.0)


def test_new_spans_push_the_deadline(store_factory: StoreFactory) -> None:
    store = store_factory(decision_wait=10.0)
    store.append({A: spans(A)}, now=0.0)
    store.append({A: spans(A)}, now=6.0)
    assert claim(store, 10.0) == []  # 10s after the first span, but only 4s after the last
    assert store.next_due() == pytest.approx(16.0)
    assert claim(store, 15.9) == []
    [claimed] = claim(store, 16.0)
    assert len(claimed.trace.spans) == 2 and claimed.reason == "idle"


def test_max_trace_age_decides_a_trace_that_keeps_receiving_spans(
        store_factory: StoreFactory) -> None:
    store = store_factory(decision_wait=10.0, max_trace_age=30.0)
    for now in (0.0, 5.0, 10.0, 15.0, 20.0, 25.0):
        store.append({A: spans(A)}, now=now)
        assert claim(store, now + 4.9) == []  # never idle for decision_wait
    assert store.next_due() == pytest.approx(30.0)
    assert claim(store, 29.9) == []
    [claimed] = claim(store, 30.0)
    assert claimed.reason == "max_age"
    assert len(claimed.trace.spans) == 6
    assert claimed.due_at == pytest.approx(30.0)
    assert store.counts() == (0, 0)


def test_claim_returns_each_trace_once(store_factory: StoreFactory) -> None:
    store = store_factory(decision_wait=1.0)
    store.append({A: spans(A), B: spans(B, 2)}, now=0.0)
    store.append({C: spans(C)}, now=0.5)
    first = by_id(claim(store, 5.0))
    assert set(first) == {A, B, C}
    assert claim(store, 5.0) == []
    assert claim(store, 50.0) == []
    assert store.claim_all(50.0) == []
    assert store.next_due() is None


def test_claim_due_respects_its_limit_and_hands_out_the_rest_later(
        store_factory: StoreFactory) -> None:
    store = store_factory(decision_wait=1.0)
    store.append({t: spans(t) for t in (A, B, C, D, E)}, now=0.0)
    first = claim(store, 2.0, limit=2)
    assert len(first) == 2
    rest = claim(store, 2.0)
    assert len(rest) == 3
    assert {c.trace.trace_id for c in first + rest} == {A, B, C, D, E}


def test_with_trace_reads_an_open_trace_only(store_factory: StoreFactory) -> None:
    store = store_factory(decision_wait=1.0)
    store.append({A: spans(A, 3)}, now=0.0)
    assert with_trace(store, A, lambda trace: (trace.trace_id, len(trace.spans))) == (A, 3)
    assert with_trace(store, B, len) is None
    claim(store, 1.0)
    assert with_trace(store, A, len) is None  # decided: a decider owns it now


# --- decided on arrival: a whole trace no rule fires on ------------------------------------------

def test_a_clean_trace_a_batch_makes_whole_is_decided_on_arrival(
        store_factory: StoreFactory) -> None:
    """Named by the caller (no rule fires on it) and created whole by the batch: no deadline, not open, never
    claimed; the others in the batch are open as usual."""
    store = store_factory(decision_wait=10.0)
    result = store.append({A: spans(A, 2), B: spans(B, 3)}, now=0.0, decide_on_arrival={A})
    assert result.created == {A, B} and result.decided_on_arrival == 1
    assert result.accepted == 5 and sorted(result.touched) == [A, B]
    assert store.counts() == (1, 3)
    assert with_trace(store, A, len) is None and with_trace(store, B, len) == 3
    assert store.next_due() == pytest.approx(10.0)
    assert [c.trace_id for c in claim(store, 10.0)] == [B]
    assert store.next_due() is None
    assert claim(store, 1000.0) == []
    assert store.counts() == (0, 0)


def test_only_a_trace_the_batch_creates_is_decided_on_arrival(
        store_factory: StoreFactory) -> None:
    store = store_factory(decision_wait=10.0)
    store.append({A: spans(A, 2)}, now=0.0)
    grown = store.append({A: spans(A), B: spans(B, 2)}, now=1.0, decide_on_arrival={A})
    assert grown.created == {B} and grown.decided_on_arrival == 0  # the batch holds only part of A
    retried = store.append({B: spans(B, 2)}, now=1.0, decide_on_arrival={B})  # a retry's copy too
    assert retried.created == set() and retried.decided_on_arrival == 0
    claimed = by_id(claim(store, 11.0))
    assert len(claimed[A].trace.spans) == 3 and len(claimed[B].trace.spans) == 4


def test_a_span_within_its_wait_opens_a_trace_decided_on_arrival_again_not_late(
        store_factory: StoreFactory) -> None:
    """Open again, whole: the earlier spans rejoin the open counts, and it opens now (for
    max_trace_age, which counts from here: 5 + 8, not 0 + 8)."""
    store = store_factory(decision_wait=10.0, max_trace_age=8.0)
    early = spans(A, 2)
    store.append({A: early}, now=0.0, decide_on_arrival={A})
    later = spans(A)
    result = store.append({A: later}, now=5.0, decide_on_arrival={A})
    assert result.late == 0 and result.accepted == 1 and result.touched == [A]
    assert result.created == set() and result.decided_on_arrival == 0
    assert store.counts() == (1, 3) and with_trace(store, A, len) == 3
    assert store.next_due() == pytest.approx(13.0)
    assert claim(store, 12.9) == []
    [decided] = claim(store, 13.0)
    assert decided.reason == "max_age" and decided.due_at == pytest.approx(13.0)
    assert ids(decided) == {s.span_id for s in early + later}


def test_open_traces_stay_in_order_of_age_around_one_opened_again(
        store_factory: StoreFactory) -> None:
    """B opens at 1, A (decided on arrival at 0) opens again at 5: B reaches max_trace_age
    first, and A is not held up behind it."""
    store = store_factory(decision_wait=10.0, max_trace_age=12.0)
    store.append({A: spans(A)}, now=0.0, decide_on_arrival={A})
    store.append({B: spans(B)}, now=1.0)
    store.append({A: spans(A)}, now=5.0)
    store.append({A: spans(A), B: spans(B)}, now=9.0)
    assert [c.trace_id for c in claim(store, 13.0)] == [B]
    assert claim(store, 16.9) == []
    assert [c.trace_id for c in claim(store, 17.0)] == [A]


def test_a_refused_span_leaves_a_trace_decided_on_arrival_decided(
        store_factory: StoreFactory) -> None:
    store = store_factory(decision_wait=10.0, max_spans_per_trace=2)
    store.append({A: spans(A, 2)}, now=0.0, decide_on_arrival={A})
    result = store.append({A: spans(A)}, now=5.0)
    assert result.rejected == 1 and result.accepted == 0 and result.late == 0
    assert result.touched == [] and store.counts() == (0, 0)
    assert with_trace(store, A, len) is None and store.next_due() is None
    assert claim(store, 100.0) == []


def test_a_span_after_its_wait_is_late_for_a_trace_decided_on_arrival(
        store_factory: StoreFactory) -> None:
    store = store_factory(decision_wait=10.0, decided_retention=60.0)
    store.append({A: spans(A, 2)}, now=0.0, decide_on_arrival={A})
    result = store.append({A: spans(A)}, now=11.0)
    assert result.late == 1 and result.created == set()
    assert store.counts() == (1, 3)
    assert claim(store, 20.9) == []
    [decided] = claim(store, 21.0)
    assert decided.reason == "idle" and len(decided.trace.spans) == 3


def test_a_trace_decided_on_arrival_is_kept_for_its_retention_then_forgotten(
        store_factory: StoreFactory) -> None:
    """Kept for decided_retention after the deadline it would have had (1 + 5), then
    forgotten: a span arriving later starts a new trace."""
    store = store_factory(decision_wait=1.0, decided_retention=5.0)
    store.append({A: spans(A, 2)}, now=0.0, decide_on_arrival={A})
    store.append({B: spans(B, 2)}, now=0.0, decide_on_arrival={B})
    claim(store, 5.9)
    kept = store.append({A: spans(A)}, now=5.9)
    assert kept.late == 1 and kept.created == set() and with_trace(store, A, len) == 3
    claim(store, 6.1)
    again = store.append({B: spans(B)}, now=6.1)
    assert again.late == 0 and again.created == {B}
    assert with_trace(store, B, len) == 1


def test_redis_keeps_a_trace_decided_on_arrival_for_its_retention_only(redis_url: str) -> None:
    """Its key expires decided_retention (+1s) after the deadline it would have had, not after
    an open trace's TTL; a refused span does not extend it; a span taken opens it, with the
    open trace's TTL."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    store = RedisStore(client, StoreLimits(decision_wait=10.0, decided_retention=60.0,
                                           max_spans_per_trace=3))
    now = time.time()
    store.append({A: spans(A, 3), B: spans(B, 2)}, now=now, decide_on_arrival={A, B})
    keys = {t: f"bt:{{{t}}}:s" for t in (A, B)}
    for key in keys.values():
        assert 70_000 - 2_000 < client.pttl(key) <= 71_000
    assert store.append({A: spans(A)}, now=now + 1).rejected == 1
    assert client.pttl(keys[A]) <= 71_000
    assert store.append({B: spans(B)}, now=now + 1).accepted == 1
    assert client.pttl(keys[B]) > 71_000 and client.pttl(keys[B]) <= store.ttl * 1000


def test_decided_traces_are_forgotten_on_time_whichever_way_they_were_decided(
        store_factory: StoreFactory) -> None:
    """A decided at 101 (kept until 161) is forgotten at 165 although B, decided on arrival at
    100, is kept until 170."""
    store = store_factory(decision_wait=10.0, decided_retention=60.0)
    store.append({A: spans(A)}, now=91.0)
    store.append({B: spans(B)}, now=100.0, decide_on_arrival={B})
    assert [c.trace_id for c in claim(store, 101.0)] == [A]
    claim(store, 165.0)
    again = store.append({A: spans(A)}, now=165.0)
    assert again.late == 0 and again.created == {A}
    assert with_trace(store, A, len) == 1


def test_only_refused_spans_leave_a_decided_trace_decided(store_factory: StoreFactory) -> None:
    store = store_factory(decision_wait=10.0, max_spans_per_trace=2)
    store.append({A: spans(A, 2)}, now=0.0)
    [decided] = claim(store, 10.0)
    result = store.append({A: spans(A)}, now=11.0)
    assert result.rejected == 1 and result.late == 0 and result.touched == []
    assert store.counts() == (0, 0) and store.next_due() is None
    assert with_trace(store, A, len) is None


def test_a_span_racing_the_claim_of_its_trace_is_late(store_factory: StoreFactory) -> None:
    """Its clock read before the claim's: the trace is decided all the same, so the span is
    late and re-opens it for another decision_wait, from the span's time."""
    store = store_factory(decision_wait=10.0, max_trace_age=30.0)
    store.append({A: spans(A)}, now=0.0)
    store.append({A: spans(A)}, now=25.0)
    [decided] = claim(store, 30.010)
    assert decided.reason == "max_age"
    result = store.append({A: spans(A)}, now=30.005)
    assert result.late == 1
    assert store.next_due() == pytest.approx(40.005)
    assert claim(store, 30.02) == []


def test_a_batch_with_refused_spans_does_not_hold_the_whole_trace(
        store_factory: StoreFactory) -> None:
    store = store_factory(max_spans_per_trace=3)
    result = store.append({A: spans(A, 5), B: spans(B, 2)}, now=0.0, decide_on_arrival={A, B})
    assert result.rejected == 2 and result.created == {B} and result.decided_on_arrival == 1
    assert store.counts() == (1, 3) and with_trace(store, A, len) == 3


def test_a_trace_of_more_spans_than_one_script_call_takes_is_stored_whole(
        store_factory: StoreFactory) -> None:
    """A store may leave such a trace open rather than decide it on arrival; either way it
    holds every span."""
    store = store_factory(decision_wait=10.0)
    result = store.append({A: spans(A, 2500)}, now=0.0, decide_on_arrival={A})
    assert result.accepted == 2500 and result.created == {A}
    claimed = claim(store, 10.0)
    if result.decided_on_arrival:
        assert claimed == [] and store.counts() == (0, 0)
    else:
        assert [len(c.trace.spans) for c in claimed] == [2500]


# --- late spans and signalling once -------------------------------------------------------------

def test_a_late_span_reopens_a_decided_trace_with_all_earlier_spans(
        store_factory: StoreFactory) -> None:
    store = store_factory(decision_wait=10.0, decided_retention=60.0)
    early = spans(A, 2)
    store.append({A: early}, now=0.0)
    [decided] = claim(store, 10.0)
    assert store.counts() == (0, 0)
    late = spans(A)
    result = store.append({A: late}, now=12.0)
    assert result.late == 1 and result.accepted == 1 and result.touched == [A]
    assert store.counts() == (1, 3)
    assert with_trace(store, A, len) == 3
    assert claim(store, 21.9) == []  # the re-opened trace waits decision_wait again
    [again] = claim(store, 22.0)
    assert again.reason == "idle"
    assert ids(again) == {s.span_id for s in early + late}
    # The first decider's view is not changed under it by the late span.
    assert ids(decided) == {s.span_id for s in early}


def test_signals_are_reserved_in_one_call_and_a_repeat_within_it_is_refused(
        store_factory: StoreFactory) -> None:
    store = store_factory(decision_wait=1.0)
    store.append({A: spans(A), B: spans(B)}, now=0.0)
    pairs = [("double-charge", A), ("double-charge", B), ("double-charge", A), ("other", A)]
    assert store.reserve_signals(pairs) == [True, True, False, True]
    store.signals_sent(pairs[:2])
    assert store.reserve_signals(pairs) == [False, False, False, False]
    assert store.reserve_signals([]) == []


def test_a_signal_is_reserved_once_per_rule_and_trace(store_factory: StoreFactory) -> None:
    store = store_factory(decision_wait=1.0)
    store.append({A: spans(A), B: spans(B)}, now=0.0)
    assert store.reserve_signals([("double-charge", A)]) == [True]  # early signal, still open
    assert store.reserve_signals([("double-charge", A)]) == [False]
    assert store.reserve_signals([("other-rule", A)]) == [True]
    assert store.reserve_signals([("double-charge", B)]) == [True]
    claim(store, 1.0)
    assert store.reserve_signals([("double-charge", A)]) == [False]  # decided, remembered
    store.append({A: spans(A)}, now=2.0)  # re-open
    assert store.reserve_signals([("double-charge", A)]) == [False]
    assert store.reserve_signals([("other-rule", A)]) == [False]
    claim(store, 3.0)
    assert store.reserve_signals([("double-charge", A)]) == [False]
    assert store.reserve_signals([("needs-late-span", A)]) == [True]
    assert store.reserve_signals([("needs-late-span", A)]) == [False]


# --- limits -------------------------------------------------------------------------------------

def test_max_spans_per_trace_refuses_the_excess_and_reports_it(
        store_factory: StoreFactory) -> None:
    store = store_factory(max_spans_per_trace=3)
    result = store.append({A: spans(A, 2), B: spans(B, 5)}, now=0.0)
    assert result.accepted == 2 + 3 and result.rejected == 2
    result = store.append({A: spans(A, 2)}, now=1.0)
    assert (result.accepted, result.rejected) == (1, 1)
    result = store.append({A: spans(A)}, now=2.0)
    assert (result.accepted, result.rejected) == (0, 1)
    assert with_trace(store, A, len) == 3
    assert with_trace(store, B, len) == 3
    assert store.counts() == (2, 6)
    # A full trace is still decided with what it holds.
    claimed = by_id(claim(store, 100.0))
    assert len(claimed[A].trace.spans) == 3 and len(claimed[B].trace.spans) == 3


def blob(trace_id: str, size: int) -> Span:
    """A span whose one attribute is `size` bytes of text, as a large value a rule reads."""
    [span] = spans(trace_id)
    span.attributes = {"blob": "x" * size}
    return span


def test_stored_bytes_counts_the_text_a_span_holds_in_utf8() -> None:
    span = Span(A, "00000000000000a1", "paiement.débit", service="caisse", version="2.1-é",
                attributes={"montant": 12, "devise": "€", "étapes": ("réservé", "payé"),
                            "brut": b"\0" * 10, "lignes": {"n°": "1"}})
    text = ("paiement.débit" + "caisse" + "2.1-é" + "montant" + "devise" + "€" + "étapes"
            + "réservé" + "payé" + "brut" + "lignes" + "n°" + "1")
    assert stored_bytes(span) == SPAN_OVERHEAD_BYTES + len(text.encode()) + 8 + 10


def test_max_trace_bytes_keeps_the_spans_that_fit_in_order_and_reports_the_others(
        store_factory: StoreFactory) -> None:
    """Budget: three 1,000-byte spans and one small span. In order, each span that fits is
    kept; one bigger than the whole budget, and one that no longer fits, are refused, and a
    later span still fits in the room left. Exactly full is within the budget."""
    small = stored_bytes(spans(A)[0])
    unit = stored_bytes(blob(A, 1000))
    store = store_factory(max_trace_bytes=3 * unit + small)
    first = [blob(A, 1000), blob(A, 1000), blob(A, 10_000), blob(A, 1000), blob(A, 1000)]
    result = store.append({A: first, B: [blob(B, 1000)]}, now=0.0, decide_on_arrival={A, B})
    assert (result.accepted, result.rejected, result.rejected_bytes) == (4, 0, 2)
    assert result.created == {B} and result.decided_on_arrival == 1  # A is not held whole
    assert store.counts() == (1, 3)
    result = store.append({A: [blob(A, 1000)]}, now=1.0)
    assert (result.accepted, result.rejected_bytes, result.touched) == (0, 1, [])
    later = spans(A)
    result = store.append({A: later + spans(A)}, now=2.0)
    assert (result.accepted, result.rejected, result.rejected_bytes) == (1, 0, 1)
    [claimed] = claim(store, 100.0)
    assert ids(claimed) == {s.span_id for s in [*first[:2], first[3], *later]}


def test_a_span_bigger_than_max_trace_bytes_opens_no_trace(store_factory: StoreFactory) -> None:
    store = store_factory(max_trace_bytes=10_000)
    result = store.append({A: [blob(A, 10_000)]}, now=0.0, decide_on_arrival={A})
    assert (result.accepted, result.rejected_bytes, result.touched) == (0, 1, [])
    assert result.created == set() and result.decided_on_arrival == 0
    assert store.counts() == (0, 0) and store.next_due() is None
    assert with_trace(store, A, len) is None and claim(store, 100.0) == []


def test_max_spans_per_trace_and_max_trace_bytes_are_counted_apart(
        store_factory: StoreFactory) -> None:
    """The span refused for its bytes leaves its place to the next one; the one after that
    finds the trace full."""
    unit = stored_bytes(blob(A, 1000))
    store = store_factory(max_spans_per_trace=2, max_trace_bytes=2 * unit)
    batch = [blob(A, 5000), blob(A, 1000), blob(A, 1000), spans(A)[0]]
    result = store.append({A: batch}, now=0.0)
    assert (result.accepted, result.rejected, result.rejected_bytes) == (2, 1, 1)
    assert with_trace(store, A, lambda t: {s.span_id for s in t}) == \
        {s.span_id for s in batch[1:3]}


def test_a_decided_trace_reopened_keeps_counting_its_earlier_bytes(
        store_factory: StoreFactory) -> None:
    """The budget is for everything a trace holds: its spans from before its decision come
    back with it (a shared store keeps the total in the trace's state, through claim and
    finish)."""
    unit = stored_bytes(blob(A, 1000))
    store = store_factory(decision_wait=10.0, max_trace_bytes=2 * unit)
    store.append({A: [blob(A, 1000)]}, now=0.0)
    store.append({A: [blob(A, 1000)]}, now=1.0)
    [decided] = claim(store, 11.0)
    result = store.append({A: [blob(A, 1000)]}, now=12.0)
    assert (result.accepted, result.rejected_bytes, result.late) == (0, 1, 0)
    assert store.counts() == (0, 0)
    result = store.append({A: spans(A)}, now=12.0)
    assert (result.accepted, result.rejected_bytes, result.late) == (0, 1, 0)


def test_max_traces_decides_the_oldest_open_trace_early_as_evicted(
        local_store_factory: StoreFactory) -> None:
    store = local_store_factory(decision_wait=10.0, max_traces=3)
    first = spans(A, 2)
    store.append({A: first}, now=0.0)
    store.append({B: spans(B)}, now=1.0)
    store.append({C: spans(C)}, now=2.0)
    store.append({A: spans(A)}, now=2.5)  # more spans do not make A younger
    result = store.append({D: spans(D)}, now=3.0)
    assert result.evicted == 1 and result.accepted == 1
    assert store.counts()[0] == 3
    due = store.next_due()
    assert due is not None and due <= 3.0  # the evicted trace is due at once
    [evicted] = claim(store, 3.0)  # long before A's decision_wait is up
    assert evicted.trace.trace_id == A and evicted.reason == "evicted"
    assert len(evicted.trace.spans) == 3  # with every span it held: nothing silently dropped
    assert claim(store, 3.0) == []
    rest = by_id(claim(store, 100.0))
    assert set(rest) == {B, C, D} and {c.reason for c in rest.values()} == {"idle"}


def test_a_decider_behind_makes_the_store_refuse_new_traces_not_grow(
        local_store_factory: StoreFactory) -> None:
    """With max_traces traces already pushed out and not yet decided, a batch that would push
    out more is refused whole (StoreBusy: the sender retries) before anything of it is stored;
    spans for traces already held still go in, and the refusal ends with the next claim."""
    store = local_store_factory(decision_wait=10.0, max_traces=4)
    store.append({f"{n:032x}": spans(f"{n:032x}") for n in range(1, 9)}, now=0.0)
    assert store.counts()[0] == 4  # 4 held, 4 pushed out and awaiting their decision
    with pytest.raises(StoreBusy, match="4 trace.s. pushed out by max_traces .4. still await"):
        store.append({A: spans(A), f"{8:032x}": spans(f"{8:032x}")}, now=1.0)
    assert with_trace(store, f"{8:032x}", len) == 1  # nothing of the refused batch was stored
    assert with_trace(store, A, len) is None
    result = store.append({f"{8:032x}": spans(f"{8:032x}")}, now=1.0)  # a held trace: taken
    assert result.accepted == 1
    assert len(claim(store, 1.0)) == 4  # the pushed-out ones, decided early
    assert store.append({A: spans(A)}, now=1.0).evicted == 1


def test_an_evicted_trace_still_signals_at_most_once(local_store_factory: StoreFactory) -> None:
    """An early (monotone) signal sent while the trace was open must not be repeated when the
    evicted trace is decided."""
    store = local_store_factory(decision_wait=10.0, max_traces=2)
    store.append({A: spans(A, 2)}, now=0.0)
    assert store.reserve_signals([("double-charge", A)]) == [True]  # early signal
    store.append({B: spans(B)}, now=1.0)
    store.append({C: spans(C)}, now=2.0)  # evicts A
    assert store.reserve_signals([("double-charge", A)]) == [False]  # evicted, unclaimed
    [evicted] = claim(store, 2.0)
    assert evicted.trace.trace_id == A and evicted.reason == "evicted"
    # The decider now evaluates the evicted trace and asks before signalling:
    assert store.reserve_signals([("double-charge", A)]) == [False]
    assert store.reserve_signals([("other-rule", A)]) == [True]
    assert store.reserve_signals([("other-rule", A)]) == [False]
    # A straggler of the evicted trace opens it anew (its old spans are gone to make room), but
    # what was signalled is still known.
    store.append({A: spans(A)}, now=3.0)
    assert store.reserve_signals([("double-charge", A)]) == [False]


def test_every_trace_of_a_large_evicted_batch_still_signals_at_most_once(
        local_store_factory: StoreFactory) -> None:
    """Under a flood, one claim may hand out as many evicted traces as max_traces; the
    decider asks reserve_signals for each of them after the claim."""
    store = local_store_factory(decision_wait=10.0, max_traces=6)
    traces = [f"{n:032x}" for n in range(1, 13)]
    for now, trace_id in enumerate(traces):
        store.append({trace_id: spans(trace_id)}, now=float(now))
        assert store.reserve_signals([("early-rule", trace_id)]) == [True]
    claimed = by_id(claim(store, 12.0))
    assert set(claimed) == set(traces[:6])
    assert {c.reason for c in claimed.values()} == {"evicted"}
    for trace_id in traces[:6]:
        assert store.reserve_signals([("early-rule", trace_id)]) == [False], trace_id


class _CountedId(str):
    """A trace id that counts how often it is compared with another one."""

    compared = 0

    def __eq__(self, other: object) -> bool:
        _CountedId.compared += 1
        return str.__eq__(self, other)

    __hash__ = str.__hash__


def test_a_signal_for_an_evicted_trace_is_looked_up_not_searched_for(
        local_store_factory: StoreFactory) -> None:
    """With 50k traces waiting for their early decision, each reserve_signals call used to scan
    them all under the store lock (one call for 1,000 traces held it 11 s, and ingest fell from
    60k to 2k traces/s). Counted in comparisons, not timed: one lookup per trace."""
    store = local_store_factory(decision_wait=10.0, max_traces=2500)
    ids = [_CountedId(f"{n:032x}") for n in range(1, 5001)]
    for trace_id in ids:
        store.append({trace_id: spans(trace_id)}, now=1.0)  # the first 2,500 evicted
    _CountedId.compared = 0
    assert store.reserve_signals([("early-rule", t) for t in ids[:1000]]) == [True] * 1000
    assert store.reserve_signals([("early-rule", t) for t in ids[:1000]]) == [False] * 1000
    assert _CountedId.compared <= 2 * 2000  # a scan made about 2 * 1000 * 1,250


def test_a_trace_evicted_twice_before_its_decision_is_decided_once_whole(
        local_store_factory: StoreFactory) -> None:
    store = local_store_factory(decision_wait=10.0, max_traces=2)
    store.append({A: spans(A, 2)}, now=0.0)
    assert store.reserve_signals([("early-rule", A)]) == [True]
    store.append({B: spans(B)}, now=1.0)
    store.append({C: spans(C)}, now=2.0)  # evicts A
    store.append({A: spans(A)}, now=3.0)  # A's straggler re-opens it, evicting B
    [b] = claim(store, 3.0, limit=1)  # the decider takes B, not yet A
    store.append({D: spans(D)}, now=4.0)  # evicts C
    [c] = claim(store, 4.0, limit=1)
    assert (b.trace_id, c.trace_id) == (B, C)
    store.append({E: spans(E)}, now=5.0)  # evicts A again, before its first eviction is decided
    [a] = claim(store, 5.0, limit=1)
    assert a.trace_id == A and a.reason == "evicted"
    assert len(a.trace.spans) == 3  # both parts, in one decision
    assert store.reserve_signals([("early-rule", A)]) == [False]


def test_evicted_traces_not_yet_claimed_are_returned_at_shutdown(
        local_store_factory: StoreFactory) -> None:
    store = local_store_factory(decision_wait=10.0, max_traces=2)
    store.append({A: spans(A)}, now=0.0)
    store.append({B: spans(B)}, now=1.0)
    store.append({C: spans(C)}, now=2.0)  # evicts A, nobody claims it before shutdown
    final = by_id(store.claim_all(3.0))
    assert set(final) == {A, B, C}
    assert store.counts() == (0, 0)
    assert claim(store, 1000.0) == []


def test_a_full_store_forgets_decided_traces_before_evicting_open_ones(
        local_store_factory: StoreFactory) -> None:
    store = local_store_factory(decision_wait=1.0, max_traces=2, decided_retention=60.0)
    store.append({A: spans(A)}, now=0.0)
    assert len(claim(store, 1.0)) == 1  # A decided, remembered for late spans
    store.append({B: spans(B)}, now=2.0)
    result = store.append({C: spans(C)}, now=2.5)  # no room: A goes, not the open B
    assert result.evicted == 0
    assert store.counts() == (2, 2)
    assert claim(store, 2.5) == []


def test_decided_traces_are_forgotten_after_decided_retention(
        store_factory: StoreFactory) -> None:
    store = store_factory(decision_wait=1.0, decided_retention=5.0)
    store.append({A: spans(A, 2), B: spans(B, 2)}, now=0.0)
    assert len(claim(store, 1.0)) == 2  # both decided at 1.0, remembered until 6.0
    store.reserve_signals([("double-charge", A)])
    store.reserve_signals([("double-charge", B)])
    result = store.append({A: spans(A)}, now=5.5)  # within retention: re-opens, whole
    assert result.late == 1 and with_trace(store, A, len) == 3
    claim(store, 7.0)  # housekeeping past B's retention
    result = store.append({B: spans(B)}, now=7.0)
    assert result.late == 0  # B was forgotten: this is a new trace ...
    assert with_trace(store, B, len) == 1  # ... holding only the new span
    assert store.reserve_signals([("double-charge", B)]) == [True]  # nothing to deduplicate


# --- sizes and shutdown ------------------------------------------------------------------------

def test_counts_reflect_open_traces_and_buffered_spans(local_store_factory: StoreFactory) -> None:
    store = local_store_factory(decision_wait=10.0)
    assert store.counts() == (0, 0)
    store.append({A: spans(A, 3)}, now=0.0)
    store.append({B: spans(B, 2)}, now=5.0)
    assert store.counts() == (2, 5)
    store.append({B: spans(B)}, now=6.0)
    assert store.counts() == (2, 6)
    assert len(claim(store, 10.0)) == 1  # A
    assert store.counts() == (1, 3)
    store.append({A: spans(A)}, now=11.0)  # A re-opens with its 3 earlier spans
    assert store.counts() == (2, 7)
    store.claim_all(12.0)
    assert store.counts() == (0, 0)


def test_a_trace_decided_on_arrival_pushed_out_inside_its_wait_counts_as_evicted(
        local_store_factory: StoreFactory) -> None:
    """Inside its wait it is as good as open: losing it to max_traces is an eviction (counted,
    decided again for its signals' memory); past its wait it is forgotten like any decided
    trace."""
    store = local_store_factory(decision_wait=10.0, max_traces=2)
    store.append({A: spans(A)}, now=0.0, decide_on_arrival={A})
    store.append({B: spans(B)}, now=1.0)
    assert store.append({C: spans(C)}, now=2.0).evicted == 1
    [evicted] = claim(store, 2.0)
    assert evicted.trace_id == A and evicted.reason == "evicted"
    store = local_store_factory(decision_wait=1.0, max_traces=2)
    store.append({A: spans(A)}, now=0.0, decide_on_arrival={A})
    store.append({B: spans(B)}, now=1.5)
    assert store.append({C: spans(C)}, now=2.0).evicted == 0
    assert claim(store, 2.0) == [] and with_trace(store, A, len) is None


def test_a_decided_trace_is_forgotten_before_one_decided_on_arrival_inside_its_wait(
        local_store_factory: StoreFactory) -> None:
    """Forgetting a claimed, decided trace costs nothing; B, inside its wait, stays."""
    store = local_store_factory(decision_wait=10.0, max_traces=2)
    store.append({A: spans(A)}, now=-9.0)
    store.append({B: spans(B)}, now=0.0, decide_on_arrival={B})
    assert [c.trace_id for c in claim(store, 1.0)] == [A]
    assert store.append({C: spans(C)}, now=2.0).evicted == 0
    assert claim(store, 2.0) == []
    assert store.append({B: spans(B)}, now=3.0).late == 0 and with_trace(store, B, len) == 2


def test_claim_all_at_shutdown_returns_every_open_trace(local_store_factory: StoreFactory) -> None:
    store = local_store_factory(decision_wait=10.0)
    store.append({A: spans(A)}, now=0.0)
    assert len(claim(store, 10.0)) == 1  # A decided: not open any more
    store.append({B: spans(B, 2), C: spans(C)}, now=11.0)
    store.append({D: spans(D)}, now=12.0)
    store.append({A: spans(A)}, now=13.0)  # A re-opened
    final = by_id(store.claim_all(14.0))
    assert set(final) == {A, B, C, D}
    assert {c.reason for c in final.values()} == {"shutdown"}
    assert len(final[A].trace.spans) == 2 and len(final[B].trace.spans) == 2
    assert store.counts() == (0, 0)
    assert store.next_due() is None
    assert claim(store, 1000.0) == []
    assert store.claim_all(1000.0) == []


def test_a_retry_after_an_append_failed_halfway_leaves_the_trace_due(
        request: pytest.FixtureRequest) -> None:
    """Redis only: the spans are stored by one round trip and the deadline set by the next. If
    the connection drops in between, Export fails and the collector retries the same spans; even
    when the retry is refused outright (max_spans_per_trace), the trace must become due."""

    class DropsTheSecondRoundTrip(RedisStore):
        dropped = False

        def _send(self, updates: Any) -> None:
            if not self.dropped:
                self.dropped = True
                raise redis.ConnectionError("connection reset after the spans were stored")
            super()._send(updates)

    client = redis.Redis.from_url(request.getfixturevalue("redis_url"))
    client.flushdb()
    store = DropsTheSecondRoundTrip(client, StoreLimits(decision_wait=1.0,
                                                        max_spans_per_trace=2))
    try:
        batch = {A: spans(A, 2)}
        with pytest.raises(redis.ConnectionError):
            store.append(batch, now=0.0)
        retry = store.append(batch, now=0.5)  # the collector's retry: both refused
        assert (retry.accepted, retry.rejected) == (0, 2)
        assert store.next_due() == pytest.approx(1.0)
        [decided] = claim(store, 2.0)
        assert decided.trace.trace_id == A and len(decided.trace.spans) == 2
    finally:
        store.close()


def test_an_unreadable_trace_does_not_hold_up_the_others(
        request: pytest.FixtureRequest) -> None:
    """Redis only: a record that cannot be decoded (say its vocabulary is gone) is logged and
    left claimed, and the rest of the batch is decided."""
    client = redis.Redis.from_url(request.getfixturevalue("redis_url"))
    client.flushdb()
    store = RedisStore(client, StoreLimits(decision_wait=1.0))
    try:
        store.append({A: spans(A), B: spans(B)}, now=0.0)
        client.rpush(f"bt:{{{A}}}:s", b"\xc1 not msgpack")
        decided = claim(store, 2.0)
        assert [c.trace.trace_id for c in decided] == [B]
        # Claimed, so no longer open: not counted as such (the spans count is off by the
        # record pushed by hand above, which no append counted).
        assert store.counts()[0] == 0
    finally:
        store.close()


def test_a_span_comes_back_as_it_was_appended(store_factory: StoreFactory) -> None:
    """Every field of a span, its resource's service.name and service.version too (a signal
    names both), with or without them, through every store (Redis: its msgpack records)."""
    store = store_factory(decision_wait=1.0)
    sent = [
        Span(A, "00000000000000a1", "payment.charge", parent_span_id="00000000000000a0",
             start_ns=1_700_000_000_000_000_000, end_ns=1_700_000_000_250_000_000,
             status="ERROR", kind="CLIENT", service="payments", version="2.14.0",
             attributes={"attempt": 2, "ok": False, "ratio": 0.5, "ids": ("a", "b"),
                         "raw": b"\x00\xff", "labels": {"k": "v"}}),
        Span(A, "00000000000000a2", "payment.charge", start_ns=5, end_ns=6, service="payments",
             version=None),
        Span(A, "00000000000000a3", "audit.log", start_ns=7, end_ns=8, service=None,
             version="0.1.0-ünï"),
        Span(A, "00000000000000a4", "audit.log", start_ns=9, end_ns=9, version=""),
    ]
    store.append({A: sent}, now=0.0)
    assert with_trace(store, A, lambda trace: [(s.service, s.version) for s in trace.spans]) \
        == [(s.service, s.version) for s in sent]
    [claimed] = claim(store, 1.0)
    assert claimed.trace is not None
    assert sorted(claimed.trace.spans, key=lambda s: s.span_id) == sent


def test_numbers_beyond_64_bits_are_stored(store_factory: StoreFactory) -> None:
    """OTLP JSON can spell integers no protobuf field carries; the Redis store keeps them as
    their decimal text (and clamps times), where the memory store keeps the int."""
    store = store_factory(decision_wait=1.0)
    big = Span(A, "00000000000000b1", "payment.charge", start_ns=2**70, end_ns=2**70 + 5,
               service="payments", version="2.14.0",
               attributes={"amount": 2**70, "nested": (1, -2**70)})
    store.append({A: [big, *spans(A)]}, now=0.0)  # one packer: it goes on after the big one
    [claimed] = claim(store, 1.0)
    assert claimed.trace is not None and len(claimed.trace.spans) == 2
    [read] = [s for s in claimed.trace.spans if s.span_id == "00000000000000b1"]
    assert (read.service, read.version) == ("payments", "2.14.0")  # the record written again
    if isinstance(store, RedisStore):
        assert read.attributes == {"amount": str(2**70), "nested": (1, str(-2**70))}
        assert read.start_ns == 2**64 - 1
    else:
        assert read.attributes == {"amount": 2**70, "nested": (1, -2**70)}
