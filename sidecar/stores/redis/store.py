"""Trace state in Redis, shared by every sidecar: spans of one trace may reach different sidecars,
and exactly one of them decides it.

Keys (trace keys carry the `{trace_id}` hash tag, so Redis Cluster keeps a trace's keys in one
slot and every Lua script stays single-slot):

    bt:{<trace_id>}:s     list: element 0 the trace's state "st,opened,last,decided_at,
                          lease_until,finished,token" (st 0 open, 2 claimed, 3 decided on
                          arrival; times in ms), then one msgpack record per span
    bt:{<trace_id>}:g     hash rule id -> "sent", or when a decider reserved it (dedupe that
                          survives restarts; a stale reservation is a dead decider's)
    bt:{q<N>}:due         sorted set: trace ids by decision deadline min(last + decision_wait,
                          opened + max_trace_age) in ms, or by lease expiry once claimed
    bt:{q<N>}:n           hash: open traces and buffered spans of shard N (for metrics)
    bt:words:<tag>        the vocabulary records of that tag number strings by (1 day TTL)

Memory is the budget that matters (Redis holds every buffered span of every sidecar), so a
trace is one list whose head is its state, span records are msgpack with binary ids, span names
and attribute keys the rules read are small numbers (a `Vocabulary`), and each trace has one
deadline entry (none when decided on arrival). A trace lives in shard crc32(trace_id) % SHARDS.
Appending is one script call for all the request's traces (one per hash slot on a Cluster),
then one per shard for deadlines and counts: two round trips per Export request, never one per
span. Claiming sets a lease; a sidecar that dies mid-decision leaves the trace to whoever claims
it after the lease. Every trace key has a TTL; the 2 x SHARDS shard keys are a fixed set of
small keys without one (a sorted set vanishes when empty).
"""

from __future__ import annotations

import binascii
import logging
import os
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, NamedTuple, TypeVar

import msgpack
import redis
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException

from sidecar.model.spans import Span, Trace
from sidecar.stores.redis.connection import connect
from sidecar.stores.redis.pipeline import (
    APPEND,
    CLAIM_SHARD,
    CLAIM_TRACE,
    FINISH,
    MAX_ARGS,
    RESERVE_SIGNAL,
    SHARD,
    PerSlot,
    Pipeline,
)
from sidecar.stores.redis.records import PREFIX, Vocabulary, decode_span
from sidecar.stores.trace_store import AppendResult, Claimed, StoreLimits

T = TypeVar("T")
log = logging.getLogger(__name__)
SHARDS = 16
_CLAIMS_PER_CALL = 100  # a claim's reply carries every span: keep it well inside the timeout


def _claim_results(flat: list[bytes]) -> list[tuple[list[bytes], list[bytes]]]:
    """CLAIM_TRACE's flat reply as (head fields, spans) per trace."""
    out, at = [], 0
    while at < len(flat):
        head = flat[at].split(b",")
        at += 1
        count = int(head[4]) if head[0] == b"claimed" else 0
        out.append((head, flat[at:at + count]))
        at += count
    return out


class _ShardUpdates:
    """Deadline and count changes gathered per shard, sent in one script call (one per hash
    slot on a Cluster)."""

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self.shards: dict[int, list[Any]] = {}

    def _ops(self, shard: int) -> list[Any]:
        return self.shards.setdefault(shard, [0, 0])

    def count(self, shard: int, traces: int, spans: int) -> None:
        ops = self._ops(shard)
        ops[0] += traces
        ops[1] += spans

    def due(self, shard: int, trace_id: str, at_ms: int | str) -> None:
        self._ops(shard).extend(("a", trace_id, at_ms))

    def release(self, shard: int, trace_id: str, if_ms: int | str) -> None:
        self._ops(shard).extend(("r", trace_id, if_ms))

    def send(self, batch: Pipeline) -> None:
        calls = PerSlot(batch, SHARD, ())
        for shard, ops in self.shards.items():
            if ops == [0, 0]:
                continue
            keys, triples = self.store._shard_keys(shard), ops[2:]
            for start in range(0, max(len(triples), 1), 3 * MAX_ARGS):
                part = triples[start:start + 3 * MAX_ARGS]
                counts = ops[:2] if start == 0 else [0, 0]
                calls.add(keys, [*counts, len(part) // 3, *part])
        calls.queue()


class _Lease(NamedTuple):
    token: str
    until_ms: int
    shard: int


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


class RedisStore:
    """The TraceStore protocol over Redis (standalone or Cluster).

    `client` is a connected client, or None with `connect` making one on first use (a Redis
    Cluster client must reach a node to be made at all): until it can, every operation raises
    redis.ConnectionError, as a standalone client does while its server is down."""

    def __init__(self, client: redis.Redis | RedisCluster | None,
                 limits: StoreLimits = StoreLimits(), shards: int = SHARDS,
                 connect: Callable[[], redis.Redis | RedisCluster] | None = None) -> None:
        self.limits = limits
        self.shards = shards
        self.ttl = int(limits.max_trace_age + limits.decided_retention + limits.claim_lease) + 60
        self._next_shard = 0
        self._lock = threading.Lock()
        self._connect = connect
        self._connecting = threading.Lock()
        self._client = client
        self.vocabulary = Vocabulary(())
        self._vocabularies = {self.vocabulary.tag: self.vocabulary.words}
        if client is None and connect is None:
            raise ValueError("RedisStore needs a client or a way to connect")

    @property
    def client(self) -> redis.Redis | RedisCluster:
        client = self._client
        if client is None:
            assert self._connect is not None
            with self._connecting:
                if self._client is None:
                    try:
                        self._client = self._connect()
                    except RedisClusterException as exc:  # not a RedisError: say it as one
                        raise redis.ConnectionError(str(exc)) from exc
                client = self._client
        assert client is not None
        return client

    @classmethod
    def from_url(cls, url: str, limits: StoreLimits = StoreLimits()) -> RedisStore:
        """A store on `url`; a cluster none of whose nodes answers yet is connected to later
        (the sidecar starts not ready, rather than not at all)."""
        try:
            return cls(connect(url), limits)
        except RedisClusterException:
            return cls(None, limits, connect=lambda: connect(url))

    def use_vocabulary(self, words: Sequence[str]) -> None:
        """Number these strings in the records appended from now on."""
        vocabulary = Vocabulary(words)
        with self._lock:
            self._vocabularies[vocabulary.tag] = vocabulary.words
        self.vocabulary = vocabulary

    def _words(self, tag: int) -> tuple[str, ...]:
        words = self._vocabularies.get(tag)
        if words is None:  # another sidecar's rule version: read once, it never changes
            packed = self.client.get(f"{PREFIX}words:{tag:08x}")
            if packed is None:
                raise redis.DataError(f"vocabulary {tag:08x} of a stored span is missing")
            words = msgpack.unpackb(packed, use_list=False)
            with self._lock:
                self._vocabularies[tag] = words
        return words

    # --- keys ---

    def _trace_keys(self, trace_id: str) -> list[str]:
        tag = f"{PREFIX}{{{trace_id}}}"
        return [f"{tag}:s", f"{tag}:g"]

    def _shard(self, trace_id: str) -> int:
        return binascii.crc32(trace_id.encode()) % self.shards

    def _shard_keys(self, shard: int) -> list[str]:
        tag = f"{PREFIX}{{q{shard}}}"
        return [f"{tag}:due", f"{tag}:n"]

    # --- protocol ---

    def append(self, batch: Mapping[str, list[Span]], now: float,
               decide_on_arrival: Collection[str] = ()) -> AppendResult:
        limits = self.limits
        fixed = [_ms(now), limits.max_spans_per_trace, _ms(self.ttl),
                 _ms(limits.decided_retention), _ms(limits.decision_wait),
                 _ms(limits.max_trace_age)]
        vocabulary = self.vocabulary
        scripts = Pipeline(self.client)
        scripts.add(vocabulary.key, "SET", vocabulary.key, vocabulary.packed, "EX", 86400)
        appends = PerSlot(scripts, APPEND, fixed)
        order = []
        altered: set[str] = set()  # what rules read back differs from the request's spans
        encode = vocabulary.encoder(altered)
        for trace_id, spans in batch.items():
            encoded = [encode(s) for s in spans]
            keys = self._trace_keys(trace_id)
            # Decided on arrival only when the caller judged what is stored, all in one call.
            flag = b"1" if (trace_id in decide_on_arrival and len(encoded) <= MAX_ARGS
                            and trace_id not in altered) else b"0"
            for start in range(0, len(encoded), MAX_ARGS):
                part = encoded[start:start + MAX_ARGS]
                appends.add(keys, [len(part), flag, *part])
                order.append(trace_id)
        appends.queue()
        result = AppendResult()
        updates = _ShardUpdates(self)
        previous = None
        for trace_id, reply in zip(order, appends.results(scripts.run())):
            taken, refused, late, counted, before = map(int, reply.split(b",", 5)[:5])
            due, made = reply.rsplit(b",", 2)[1:]
            first, previous = trace_id != previous, trace_id  # a trace's parts come in a row
            result.accepted += taken
            result.rejected += refused
            result.late += late
            shard = self._shard(trace_id)
            if taken and (not result.touched or result.touched[-1] != trace_id):
                result.touched.append(trace_id)
            if due:
                updates.due(shard, trace_id, due.decode())
            # Created by the first part; a later part's refusal means it is not whole.
            if first and made:
                result.created.add(trace_id)
            if made == b"q":  # not open: neither counted nor due
                result.decided_on_arrival += 1
            else:
                updates.count(shard, counted, taken + before)
            if refused or trace_id in altered:
                result.created.discard(trace_id)
        self._send(updates)
        return result

    def _send(self, updates: _ShardUpdates) -> None:
        batch = Pipeline(self.client)
        updates.send(batch)
        batch.run()

    def claim_due(self, now: float, limit: int = 1000) -> list[Claimed]:
        limits = self.limits
        now_ms, lease_ms = _ms(now), _ms(now + limits.claim_lease)
        with self._lock:  # rotate the starting shard so no shard starves under load
            start, self._next_shard = self._next_shard, (self._next_shard + 1) % self.shards
        shards = [(start + i) % self.shards for i in range(self.shards)]
        pops = Pipeline(self.client)
        popping = PerSlot(pops, CLAIM_SHARD, [now_ms, limit, lease_ms])
        for shard in shards:
            popping.add(self._shard_keys(shard)[:1], ())
        popping.queue()
        updates = _ShardUpdates(self)
        chosen: list[tuple[str, int, str]] = []
        batch = Pipeline(self.client)
        claims = PerSlot(batch, CLAIM_TRACE, [now_ms, _ms(limits.decision_wait),
                                                _ms(limits.max_trace_age), lease_ms],
                           traces_per_call=_CLAIMS_PER_CALL, split=_claim_results)
        tokens = os.urandom(6).hex()  # this claim's; a trace's token adds its place in it
        for shard, ids in zip(shards, popping.results(pops.run())):
            for raw in ids.split(b",") if ids else ():
                trace_id = raw.decode()
                if len(chosen) >= limit:  # over the limit: due now, for the next call
                    updates.due(shard, trace_id, now_ms)
                    continue
                token = f"{tokens}{len(chosen):x}"
                claims.add(self._trace_keys(trace_id)[:1], [token])
                chosen.append((trace_id, shard, token))
        claimed: list[Claimed] = []
        claims.queue()
        for (trace_id, shard, token), (head, spans) in zip(chosen,
                                                          claims.results(batch.run())):
            verdict = head[0]
            if verdict == b"later":
                updates.due(shard, trace_id, head[1].decode())
            elif verdict in (b"gone", b"done"):
                updates.release(shard, trace_id, lease_ms)
            elif verdict == b"claimed":
                if head[2] == b"0":  # it was open: it leaves the shard's live counts
                    updates.count(shard, -1, -int(head[4]))
                try:  # one unreadable trace must not hold up the others: it stays claimed
                    trace = Trace(trace_id, [decode_span(trace_id, raw, self._words)
                                             for raw in spans])
                except (ValueError, TypeError, LookupError, redis.DataError) as exc:
                    log.error("trace %s cannot be read (%s); retried after the lease",
                              trace_id, exc)
                    continue
                claimed.append(Claimed(trace, head[3].decode(), int(head[1]) / 1000,
                                       _Lease(token, lease_ms, shard)))
            # b"leased": another sidecar is deciding it; its lease says until when
        self._send(updates)
        return claimed

    def finish(self, claimed: Sequence[Claimed]) -> None:
        """Mark decided traces (unless a late span re-opened them meanwhile) and drop their
        deadlines: two round trips per node for the whole batch."""
        if not claimed:
            return
        batch = Pipeline(self.client)
        finishes = PerSlot(batch, FINISH, [_ms(self.limits.decided_retention + 1)])
        for item in claimed:
            lease = item.handle
            assert isinstance(lease, _Lease)
            finishes.add(self._trace_keys(item.trace_id), [lease.token])
        updates = _ShardUpdates(self)
        finishes.queue()
        for item, done in zip(claimed, finishes.results(batch.run())):
            if done:
                lease = item.handle
                assert isinstance(lease, _Lease)
                updates.release(lease.shard, item.trace_id, lease.until_ms)
        self._send(updates)

    def claim_all(self, now: float) -> list[Claimed]:
        """Nothing: the state is shared, and one sidecar stopping must not decide the traces
        other sidecars are still assembling. They (or this one, restarted) decide them."""
        return []

    def with_traces(self, trace_ids: list[str], use: Callable[[Trace], T]) -> list[T]:
        """`use` on each trace still open (a snapshot: Redis holds the live one)."""
        reads = Pipeline(self.client)
        for trace_id in trace_ids:
            key = self._trace_keys(trace_id)[0]
            reads.add(key, "LRANGE", key, 0, -1)
        return [use(Trace(trace_id, [decode_span(trace_id, raw, self._words) for raw in raws[1:]]))
                for trace_id, raws in zip(trace_ids, reads.run())
                if len(raws) > 1 and raws[0][:2] == b"0,"]

    def with_trace(self, trace_id: str, use: Callable[[Trace], T]) -> T | None:
        found = self.with_traces([trace_id], use)
        return found[0] if found else None

    def reserve_signals(self, pairs: Sequence[tuple[str, str]]) -> list[bool]:
        """Reserve (rule, trace) signals, one round trip for all. A reservation is pending until
        `signals_sent`. A decider reserves within milliseconds of its claim and a successor
        claims only after the lease, so a reservation older than half the lease belongs to a
        decider that died before writing: it is taken over. A crash can repeat a signal (same
        signal_id), never lose one."""
        batch = Pipeline(self.client)
        reservations = PerSlot(batch, RESERVE_SIGNAL, [
            _ms(time.time()), _ms(self.limits.claim_lease / 2), _ms(self.ttl)])
        for rule_id, trace_id in pairs:
            reservations.add(self._trace_keys(trace_id)[1:], [rule_id])
        reservations.queue()
        return [bool(reply) for reply in reservations.results(batch.run())]

    def signals_sent(self, pairs: Sequence[tuple[str, str]]) -> None:
        batch = Pipeline(self.client)
        for rule_id, trace_id in pairs:
            key = self._trace_keys(trace_id)[1]
            batch.add(key, "HSET", key, rule_id, "sent")
        batch.run()

    def next_due(self) -> float | None:
        """The earliest deadline (or lease expiry) in any shard."""
        reads = Pipeline(self.client)
        for shard in range(self.shards):
            key = self._shard_keys(shard)[0]
            reads.add(key, "ZRANGE", key, 0, 0, "WITHSCORES")
        scores = [float(reply[0][1] if isinstance(reply[0], list) else reply[1])  # RESP3 / RESP2
                  for reply in reads.run() if reply]
        return min(scores) / 1000 if scores else None

    def counts(self) -> tuple[int, int]:
        reads = Pipeline(self.client)
        for shard in range(self.shards):
            key = self._shard_keys(shard)[1]
            reads.add(key, "HMGET", key, "traces", "spans")
        traces = spans = 0
        for t, s in reads.run():
            traces += int(t or 0)
            spans += int(s or 0)
        return traces, spans

    def healthy(self) -> tuple[bool, str]:
        try:
            self.client.ping()
        except redis.RedisError as exc:
            return False, f"redis unreachable: {exc}"
        return True, "redis ok"

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
