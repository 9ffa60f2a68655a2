"""Trace state in Redis, shared by every sidecar: spans of one trace may reach different sidecars,
and exactly one of them decides it.

Keys (trace keys carry the `{trace_id}` hash tag, so Redis Cluster keeps a trace's keys in one
slot and every Lua script stays single-slot):

    bt:{<trace_id>}:s     list: element 0 the trace's state "st,opened,last,decided_at,
                          lease_until,finished,born,bytes,token" (st 0 open, 2 claimed, 3
                          decided on arrival; times in ms; bytes the stored_bytes of its spans,
                          for max_trace_bytes), then one msgpack record per span
    bt:{<trace_id>}:g     hash rule id -> "sent", or when a decider reserved it (dedupe that
                          survives restarts; a stale reservation is a dead decider's)
    bt:{q<N>}:due         sorted set: trace ids by decision deadline min(last + decision_wait,
                          opened + max_trace_age) in ms, or by lease expiry once claimed
    bt:{q<N>}:n           hash: open traces and buffered spans of shard N (for metrics)
    bt:words:<tag>        the vocabulary records of that tag number strings by (1 day TTL)
    bt:format             the format of all of the above (FORMAT): a sidecar finding another one
                          refuses to use the store rather than misread it

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

from sidecar.model.errors import IncompatibleStore, StoreUnavailable
from sidecar.model.spans import Span, Trace, stored_bytes
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
    unavailable_while_down,
)
from sidecar.stores.redis.records import PREFIX, Vocabulary, decode_span
from sidecar.stores.trace_store import AppendResult, Claimed, StoreLimits

T = TypeVar("T")
log = logging.getLogger(__name__)
SHARDS = 16
# The layout of the keys, trace states, scripts' arguments and span records above. Change it
# with any of them: sidecars of different formats must not share a Redis.
# 3: the trace state carries its bytes (a format-2 sidecar would misread it)
FORMAT = "4"  # 4: a span record carries service.version after service.name (one field more)
FORMAT_KEY = f"{PREFIX}format"
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
        return self.shards.setdefault(shard, [0, 0, 0])

    def count(self, shard: int, traces: int, spans: int, by_id: int = 0) -> None:
        """Open traces, buffered spans, and of the open traces those held by id alone."""
        ops = self._ops(shard)
        ops[0] += traces
        ops[1] += spans
        ops[2] += by_id

    def due(self, shard: int, trace_id: str, at_ms: int | str) -> None:
        self._ops(shard).extend(("a", trace_id, at_ms))

    def release(self, shard: int, trace_id: str, if_ms: int | str) -> None:
        self._ops(shard).extend(("r", trace_id, if_ms))

    def send(self, pipeline: Pipeline) -> None:
        calls = PerSlot(pipeline, SHARD, ())
        for shard, ops in self.shards.items():
            if ops == [0, 0, 0]:
                continue
            keys, triples = self.store._shard_keys(shard), ops[3:]
            for start in range(0, max(len(triples), 1), 3 * MAX_ARGS):
                part = triples[start:start + 3 * MAX_ARGS]
                counts = ops[:3] if start == 0 else [0, 0, 0]
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
    StoreUnavailable, as it does while a standalone server is down."""

    def __init__(self, client: redis.Redis | RedisCluster | None,
                 limits: StoreLimits = StoreLimits(), shards: int = SHARDS,
                 connect: Callable[[], redis.Redis | RedisCluster] | None = None) -> None:
        self.limits = limits
        self.shards = shards
        self.ttl = int(limits.max_trace_age + limits.decided_retention + limits.claim_lease) + 60
        self._next_shard = 0
        self._by_id_estimate, self._by_id_read_at = 0, float("-inf")  # see _held_by_id
        self._format_checked = False
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
                    with unavailable_while_down():
                        self._client = self._connect()
                client = self._client
        assert client is not None
        return client

    @classmethod
    def from_url(cls, url: str, limits: StoreLimits = StoreLimits()) -> RedisStore:
        """A store on `url`; a Redis that does not answer yet is connected to later (the sidecar
        starts not ready, rather than not at all). Raises IncompatibleStore when the Redis holds
        another format."""
        try:
            store = cls(connect(url), limits)
        except RedisClusterException:
            return cls(None, limits, connect=lambda: connect(url))
        try:
            store.check_format()
        except StoreUnavailable:
            pass  # checked before the first append or claim
        return store

    def check_format(self) -> None:
        """Claim the store for this FORMAT, or raise IncompatibleStore if it holds another, or
        state from before formats were written (its shard counts, which never expire)."""
        if self._format_checked:
            return
        with unavailable_while_down():
            found = self.client.get(FORMAT_KEY)
            if found is None:
                counts = Pipeline(self.client)
                for shard in range(self.shards):
                    key = self._shard_keys(shard)[1]
                    counts.add(key, "EXISTS", key)
                if any(counts.run()):
                    found = b"1 (none written)"
                elif not self.client.set(FORMAT_KEY, FORMAT, nx=True):
                    found = self.client.get(FORMAT_KEY)  # another sidecar was first
        if found is not None and found.decode(errors="replace") != FORMAT:
            raise IncompatibleStore(
                f"redis holds BeTrace state of format {found.decode(errors='replace')!r} (key "
                f"{FORMAT_KEY}); this sidecar writes format {FORMAT!r}. Run one version per Redis: "
                "finish the rollout, or point this version at an empty Redis (or database).")
        self._format_checked = True

    def use_vocabulary(self, words: Sequence[str]) -> None:
        """Number these strings in the records appended from now on."""
        vocabulary = Vocabulary(words)
        with self._lock:
            self._vocabularies[vocabulary.tag] = vocabulary.words
        self.vocabulary = vocabulary

    def _words(self, tag: int) -> tuple[str, ...]:
        words = self._vocabularies.get(tag)
        if words is None:  # another sidecar's rule version: read once, it never changes
            with unavailable_while_down():
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
               decide_on_arrival: Collection[str] = (),
               trace_ids: Collection[str] = ()) -> AppendResult:
        self.check_format()
        limits = self.limits
        fixed = [_ms(now), limits.max_spans_per_trace, limits.max_trace_bytes, _ms(self.ttl),
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
            sizes = [stored_bytes(s) for s in spans]
            keys = self._trace_keys(trace_id)
            # Decided on arrival only when the caller judged what is stored, all in one call.
            flag = b"1" if (trace_id in decide_on_arrival and len(encoded) <= MAX_ARGS
                            and trace_id not in altered) else b"0"
            for start in range(0, len(encoded), MAX_ARGS):
                part = encoded[start:start + MAX_ARGS]
                appends.add(keys, [len(part), flag, *sizes[start:start + MAX_ARGS], *part])
                order.append(trace_id)
        if trace_ids:  # held by id alone: created while under max_trace_ids, else only kept
            flag = b"i" if self._held_by_id(now) < limits.max_trace_ids else b"b"
            for trace_id in trace_ids:
                appends.add(self._trace_keys(trace_id), [0, flag])
                order.append(trace_id)
        appends.queue()
        result = AppendResult()
        updates = _ShardUpdates(self)
        previous = None
        for trace_id, reply in zip(order, appends.results(scripts.run())):
            taken, refused, refused_bytes, late, counted, before = map(
                int, reply.split(b",", 6)[:6])
            due, made = reply.rsplit(b",", 2)[1:]
            first, previous = trace_id != previous, trace_id  # a trace's parts come in a row
            result.accepted += taken
            result.rejected += refused
            result.rejected_bytes += refused_bytes
            result.late += late
            shard = self._shard(trace_id)
            if taken and (not result.touched or result.touched[-1] != trace_id):
                result.touched.append(trace_id)
            if due:
                updates.due(shard, trace_id, due.decode())
            # Created by the first part; a later part's refusal means it is not whole.
            if first and made in (b"n", b"q"):
                result.created.add(trace_id)
            if made == b"q":  # not open: neither counted nor due
                result.decided_on_arrival += 1
            elif made == b"d":
                result.ids_dropped += 1
            else:
                by_id = 1 if made == b"i" else -1 if made == b"u" else 0
                updates.count(shard, counted, taken + before, by_id)
                self._by_id_estimate += by_id
            if refused or refused_bytes or trace_id in altered:
                result.created.discard(trace_id)
        self._send(updates)
        return result

    def _send(self, updates: _ShardUpdates) -> None:
        pipeline = Pipeline(self.client)
        updates.send(pipeline)
        pipeline.run()

    def claim_due(self, now: float, limit: int = 1000) -> list[Claimed]:
        self.check_format()
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
        pipeline = Pipeline(self.client)
        claims = PerSlot(pipeline, CLAIM_TRACE, [now_ms, _ms(limits.decision_wait),
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
                                                          claims.results(pipeline.run())):
            verdict = head[0]
            if verdict == b"later":
                updates.due(shard, trace_id, head[1].decode())
            elif verdict in (b"gone", b"done"):
                updates.release(shard, trace_id, lease_ms)
            elif verdict == b"claimed":
                if head[2] == b"0":  # it was open: it leaves the shard's live counts
                    by_id = -1 if head[4] == b"0" else 0  # no spans: it was held by id alone
                    updates.count(shard, -1, -int(head[4]), by_id)
                try:  # one unreadable trace must not hold up the others: it stays claimed
                    trace = Trace(trace_id, [decode_span(trace_id, raw, self._words)
                                             for raw in spans])
                except (ValueError, TypeError, LookupError, redis.DataError) as exc:
                    log.error("trace %s cannot be read (%s); retried after the lease",
                              trace_id, exc)
                    continue
                claimed.append(Claimed(trace, head[3].decode(), int(head[1]) / 1000,
                                       _Lease(token, lease_ms, shard), int(head[5]) / 1000))
            # b"leased": another sidecar is deciding it; its lease says until when
        self._send(updates)
        return claimed

    def finish(self, claimed: Sequence[Claimed]) -> None:
        """Mark decided traces (unless a late span re-opened them meanwhile) and drop their
        deadlines: two round trips per node for all of them."""
        if not claimed:
            return
        pipeline = Pipeline(self.client)
        finishes = PerSlot(pipeline, FINISH, [_ms(self.limits.decided_retention + 1)])
        for item in claimed:
            lease = item.handle
            assert isinstance(lease, _Lease)
            finishes.add(self._trace_keys(item.trace_id), [lease.token])
        updates = _ShardUpdates(self)
        finishes.queue()
        for item, done in zip(claimed, finishes.results(pipeline.run())):
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

    def reserve_signals(self, pairs: Sequence[tuple[str, str]]) -> list[bool]:
        """Reserve (rule, trace) signals, one round trip for all. A reservation is pending until
        `signals_sent`. A decider reserves within milliseconds of its claim and a successor
        claims only after the lease, so a reservation older than half the lease belongs to a
        decider that died before writing: it is taken over. A crash can repeat a signal (same
        signal_id), never lose one."""
        pipeline = Pipeline(self.client)
        reservations = PerSlot(pipeline, RESERVE_SIGNAL, [
            _ms(time.time()), _ms(self.limits.claim_lease / 2), _ms(self.ttl)])
        for rule_id, trace_id in pairs:
            reservations.add(self._trace_keys(trace_id)[1:], [rule_id])
        reservations.queue()
        return [bool(reply) for reply in reservations.results(pipeline.run())]

    def signals_sent(self, pairs: Sequence[tuple[str, str]]) -> None:
        pipeline = Pipeline(self.client)
        for rule_id, trace_id in pairs:
            key = self._trace_keys(trace_id)[1]
            pipeline.add(key, "HSET", key, rule_id, "sent")
        pipeline.run()

    def next_due(self) -> float | None:
        """The earliest deadline (or lease expiry) in any shard."""
        reads = Pipeline(self.client)
        for shard in range(self.shards):
            key = self._shard_keys(shard)[0]
            reads.add(key, "ZRANGE", key, 0, 0, "WITHSCORES")
        scores = [float(reply[0][1] if isinstance(reply[0], list) else reply[1])  # RESP3 / RESP2
                  for reply in reads.run() if reply]
        return min(scores) / 1000 if scores else None

    def _held_by_id(self, now: float) -> int:
        """About how many open traces are held by id alone, in every sidecar: read from the
        shards' counts at most once a second, and kept current with this sidecar's own."""
        if now - self._by_id_read_at >= 1.0 or now < self._by_id_read_at:
            reads = Pipeline(self.client)
            for shard in range(self.shards):
                key = self._shard_keys(shard)[1]
                reads.add(key, "HGET", key, "ids")
            self._by_id_estimate = sum(int(count or 0) for count in reads.run())
            self._by_id_read_at = now
        return self._by_id_estimate

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
            with unavailable_while_down():
                self.client.ping()
        except (StoreUnavailable, redis.RedisError) as exc:
            return False, f"redis unreachable: {exc}"
        return True, "redis ok"

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
