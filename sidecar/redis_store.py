"""Trace state in Redis, shared by every sidecar: spans of one trace may reach different sidecars,
and exactly one of them decides it.

Keys (every trace key carries the `{trace_id}` hash tag, so Redis Cluster keeps a trace's keys
in one slot and the Lua scripts stay single-slot):

    bt:{<trace_id>}:s     list of encoded spans
    bt:{<trace_id>}:m     hash: o opened, l last span, st 0 open / 2 claimed, dt claimed at,
                          tok claim token, lx lease until, f decided (the claim finished)
    bt:{<trace_id>}:g     hash rule id -> "sent", or when a decider reserved it (dedupe that
                          survives restarts; a stale reservation is a dead decider's)
    bt:{q<N>}:due         sorted set: trace ids by decision deadline (or lease expiry)
    bt:{q<N>}:age         sorted set: trace ids by opened + max_trace_age
    bt:{q<N>}:n           hash: open traces and buffered spans of shard N (for metrics)

A trace lives in shard crc32(trace_id) % SHARDS. Appending is one script per trace plus the
deadline updates, all pipelined: one round trip per Export request, never one per span.
Claiming sets a lease; a sidecar that dies mid-decision leaves the trace to whoever claims it
after the lease. Every trace key has a TTL, so no trace outlives its usefulness; the per-shard
keys are a fixed set of 3 x SHARDS small keys without one (their sorted sets vanish when empty).
"""

from __future__ import annotations

import binascii
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import orjson
import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException

from sidecar.span import KINDS, STATUSES, Span, Trace
from sidecar.store import AppendResult, Claimed, StoreLimits

T = TypeVar("T")
SHARDS = 16
PREFIX = "bt"
_MAX_ARGS = 1000  # spans per script call; Lua's unpack has a stack limit
_STATUS_CODE = {name: i for i, name in enumerate(STATUSES)}
_KIND_CODE = {name: i for i, name in enumerate(KINDS)}

# KEYS: spans, meta, signals. ARGV: now, max_spans, ttl, retention, span...
_APPEND = """
local now = tonumber(ARGV[1])
local n = #ARGV - 4
local st = redis.call('HGET', KEYS[2], 'st')
local late, fresh, before = 0, 0, 0
if st == '2' and now > tonumber(redis.call('HGET', KEYS[2], 'dt')) + tonumber(ARGV[4]) then
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])  -- decided long ago: forgotten, start afresh
  st = false
end
if not st then
  fresh = 1
  redis.call('HSET', KEYS[2], 'o', ARGV[1])
end
local have = redis.call('LLEN', KEYS[1])
local take = math.min(n, math.max(tonumber(ARGV[2]) - have, 0))
if take > 0 then
  if st == '2' then
    late, fresh, before = take, 1, have
    redis.call('HSET', KEYS[2], 'o', ARGV[1])
    redis.call('HDEL', KEYS[2], 'f')
  end
  redis.call('RPUSH', KEYS[1], unpack(ARGV, 5, 4 + take))
  redis.call('HSET', KEYS[2], 'l', ARGV[1], 'st', '0')
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('EXPIRE', KEYS[3], ARGV[3])  -- a re-opened trace keeps the memory of its signals
return {take, n - take, late, fresh, before}
"""

# KEYS: due, age. ARGV: now, limit, lease_until. Returns id, reason, id, reason, ...
_CLAIM_SHARD = """
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])) do
  redis.call('ZADD', KEYS[1], ARGV[3], id)
  table.insert(out, id); table.insert(out, 'idle')
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])) do
  redis.call('ZREM', KEYS[2], id)
  redis.call('ZADD', KEYS[1], ARGV[3], id)
  table.insert(out, id); table.insert(out, 'max_age')
end
return out
"""

# KEYS: signals. ARGV: rule, now, stale_after, ttl. 1 when this caller may signal.
_RESERVE_SIGNAL = """
local state = redis.call('HGET', KEYS[1], ARGV[1])
if state == 'sent' then return 0 end
if state and tonumber(ARGV[2]) - tonumber(state) < tonumber(ARGV[3]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""

# KEYS: spans, meta. ARGV: now, wait, max_age, token, lease_until.
_CLAIM_TRACE = """
local m = redis.call('HMGET', KEYS[2], 'st', 'o', 'l', 'lx', 'f')
local st, now = m[1], tonumber(ARGV[1])
if not st or not m[3] then return {'gone'} end
if st == '2' and m[5] then return {'done'} end
if st ~= '0' and tonumber(m[4]) > now then return {'leased'} end
local due = math.min(tonumber(m[3]) + tonumber(ARGV[2]), tonumber(m[2]) + tonumber(ARGV[3]))
if st == '0' and due > now then return {'later', tostring(due)} end
redis.call('HSET', KEYS[2], 'st', '2', 'dt', ARGV[1], 'tok', ARGV[4], 'lx', ARGV[5])
local out = {'claimed', tostring(due), st}
for _, span in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do table.insert(out, span) end
return out
"""

# KEYS: spans, meta, signals. ARGV: token, retention.
_FINISH = """
if redis.call('HGET', KEYS[2], 'tok') ~= ARGV[1] or redis.call('HGET', KEYS[2], 'st') ~= '2' then
  return 0
end
redis.call('HSET', KEYS[2], 'f', '1')
for _, key in ipairs(KEYS) do redis.call('EXPIRE', key, ARGV[2]) end
return 1
"""

# KEYS: due, age. ARGV: id, score the caller set. Drops the due entry unless an append moved
# it since (the trace re-opened), and the trace's age deadline.
_RELEASE = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) == tonumber(ARGV[2]) then redis.call('ZREM', KEYS[1], ARGV[1]) end
redis.call('ZREM', KEYS[2], ARGV[1])
return 0
"""


class _Batch:
    """Commands queued on pipelines, one per Redis node (cluster pipelines refuse scripts), then
    run: one round trip per node. Replies come back in the order the commands were added."""

    def __init__(self, client: redis.Redis | RedisCluster) -> None:
        self.client = client
        self.pipes: dict[str, tuple[Any, list[int]]] = {}
        self.count = 0

    def add(self, key: str, queue: Callable[[Any], object]) -> None:
        if isinstance(self.client, RedisCluster):
            node = self.client.get_node_from_key(key)
            name = node.name
        else:
            node, name = None, ""
        group = self.pipes.get(name)
        if group is None:
            connection = self.client if node is None else self.client.get_redis_connection(node)
            group = self.pipes[name] = (connection.pipeline(transaction=False), [])
        queue(group[0])
        group[1].append(self.count)
        self.count += 1

    def run(self) -> list[Any]:
        replies: list[Any] = [None] * self.count
        try:
            for pipe, positions in self.pipes.values():
                for position, reply in zip(positions, pipe.execute()):
                    replies[position] = reply
        except (redis.exceptions.MovedError, redis.exceptions.AskError):
            if isinstance(self.client, RedisCluster):
                self.client.nodes_manager.initialize()  # slots moved: learn the new layout
            raise
        return replies


@dataclass(frozen=True)
class _Lease:
    token: str
    until: float
    shard: int


def connect(url: str) -> redis.Redis | RedisCluster:
    """`redis://[:password@]host:port/db`, `rediss://...` (TLS), `unix:///path.sock`, or
    `redis+cluster://host:port[,host:port...]` (`rediss+cluster://` for TLS)."""
    options = {"socket_timeout": 2.0, "socket_connect_timeout": 2.0}
    scheme = url.split("://", 1)[0]
    if scheme in ("redis+cluster", "rediss+cluster"):
        parts = urlsplit(url)
        nodes = [ClusterNode(*_host_port(hp)) for hp in parts.netloc.rsplit("@", 1)[-1].split(",")]
        return RedisCluster(startup_nodes=nodes, password=parts.password,
                            username=parts.username or None, ssl=scheme == "rediss+cluster",
                            **options)
    if scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"store {url!r}: expected memory, redis://, rediss://, unix:// or "
                         "redis+cluster://")
    return redis.Redis.from_url(url, **options)


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{text!r} is not HOST:PORT")
    return host, int(port)


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
        self._client: redis.Redis | RedisCluster | None = None
        if client is not None:
            self._use(client)
        elif connect is None:
            raise ValueError("RedisStore needs a client or a way to connect")

    def _use(self, client: redis.Redis | RedisCluster) -> None:
        self._append = client.register_script(_APPEND)
        self._claim_shard = client.register_script(_CLAIM_SHARD)
        self._claim_trace = client.register_script(_CLAIM_TRACE)
        self._finish = client.register_script(_FINISH)
        self._release = client.register_script(_RELEASE)
        self._reserve_signal = client.register_script(_RESERVE_SIGNAL)
        self._client = client  # last: a client seen by another thread has its scripts

    @property
    def client(self) -> redis.Redis | RedisCluster:
        client = self._client
        if client is None:
            assert self._connect is not None
            with self._connecting:
                if self._client is None:
                    try:
                        self._use(self._connect())
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

    # --- keys ---

    def _trace_keys(self, trace_id: str) -> list[str]:
        tag = f"{PREFIX}:{{{trace_id}}}"
        return [f"{tag}:s", f"{tag}:m", f"{tag}:g"]

    def _shard(self, trace_id: str) -> int:
        return binascii.crc32(trace_id.encode()) % self.shards

    def _shard_keys(self, shard: int) -> list[str]:
        tag = f"{PREFIX}:{{q{shard}}}"
        return [f"{tag}:due", f"{tag}:age", f"{tag}:n"]

    # --- protocol ---

    def append(self, batch: Mapping[str, list[Span]], now: float) -> AppendResult:
        limits = self.limits
        scripts = _Batch(self.client)
        order = []
        for trace_id, spans in batch.items():
            encoded = [encode_span(s) for s in spans]
            keys = self._trace_keys(trace_id)
            for start in range(0, len(encoded), _MAX_ARGS):
                args = [repr(now), limits.max_spans_per_trace, self.ttl,
                        limits.decided_retention, *encoded[start:start + _MAX_ARGS]]
                scripts.add(keys[0], lambda p, keys=keys, args=args:
                            self._append(keys=keys, args=args, client=p))
                order.append(trace_id)
        result = AppendResult()
        updates = _Batch(self.client)
        opened: dict[int, list[int]] = {}
        for trace_id, (taken, refused, late, fresh, before) in zip(order, scripts.run()):
            result.accepted += taken
            result.rejected += refused
            result.late += late
            shard = self._shard(trace_id)
            due, age, _ = self._shard_keys(shard)
            if taken:
                result.touched.append(trace_id)
                updates.add(due, lambda p, due=due, t=trace_id:
                            p.zadd(due, {t: now + limits.decision_wait}))
                updates.add(age, lambda p, age=age, t=trace_id:
                            p.zadd(age, {t: now + limits.max_trace_age}, nx=True))
            counts = opened.setdefault(shard, [0, 0])
            counts[0] += fresh
            counts[1] += taken + before
        for shard, (traces, spans) in opened.items():
            self._count(updates, shard, traces, spans)
        updates.run()
        return result

    def _count(self, batch: _Batch, shard: int, traces: int, spans: int) -> None:
        counter = self._shard_keys(shard)[2]
        batch.add(counter, lambda p: p.hincrby(counter, "traces", traces))
        batch.add(counter, lambda p: p.hincrby(counter, "spans", spans))

    def claim_due(self, now: float, limit: int = 1000) -> list[Claimed]:
        lease_until = now + self.limits.claim_lease
        with self._lock:  # rotate the starting shard so no shard starves under load
            start, self._next_shard = self._next_shard, (self._next_shard + 1) % self.shards
        shards = [(start + i) % self.shards for i in range(self.shards)]
        pops = _Batch(self.client)
        for shard in shards:
            keys = self._shard_keys(shard)[:2]
            pops.add(keys[0], lambda p, keys=keys: self._claim_shard(
                keys=keys, args=[repr(now), limit, repr(lease_until)], client=p))
        candidates: list[tuple[str, str, int]] = []
        for shard, reply in zip(shards, pops.run()):
            for i in range(0, len(reply), 2):
                candidates.append((reply[i].decode(), reply[i + 1].decode(), shard))
        chosen: list[tuple[str, str, int, str]] = []
        seen: set[str] = set()
        claims, follow_up = _Batch(self.client), _Batch(self.client)
        for trace_id, reason, shard in candidates:
            if trace_id in seen:
                continue
            seen.add(trace_id)
            if len(chosen) >= limit:  # over the limit: due now, for the next call
                due = self._shard_keys(shard)[0]
                follow_up.add(due, lambda p, due=due, t=trace_id: p.zadd(due, {t: now}))
                continue
            token = uuid.uuid4().hex
            keys = self._trace_keys(trace_id)[:2]
            args = [repr(now), self.limits.decision_wait, self.limits.max_trace_age, token,
                    repr(lease_until)]
            claims.add(keys[0], lambda p, keys=keys, args=args:
                       self._claim_trace(keys=keys, args=args, client=p))
            chosen.append((trace_id, reason, shard, token))
        claimed: list[Claimed] = []
        left: dict[int, list[int]] = {}
        for (trace_id, reason, shard, token), reply in zip(chosen, claims.run()):
            verdict = reply[0].decode()
            due, age, _ = self._shard_keys(shard)
            if verdict == "later":
                follow_up.add(due, lambda p, due=due, t=trace_id, at=float(reply[1]):
                              p.zadd(due, {t: at}))
            elif verdict in ("gone", "done"):
                follow_up.add(due, lambda p, keys=[due, age], t=trace_id: self._release(
                    keys=keys, args=[t, repr(lease_until)], client=p))
            elif verdict == "claimed":
                spans = [decode_span(trace_id, raw) for raw in reply[3:]]
                if reply[2] == b"0":  # it was open: it leaves the shard's live counts
                    counts = left.setdefault(shard, [0, 0])
                    counts[0] -= 1
                    counts[1] -= len(spans)
                claimed.append(Claimed(Trace(trace_id, spans), reason, float(reply[1]),
                                       _Lease(token, lease_until, shard)))
            # "leased": another sidecar is deciding it; its lease says until when
        for shard, (traces, spans) in left.items():
            self._count(follow_up, shard, traces, spans)
        follow_up.run()
        return claimed

    def finish(self, claimed: Sequence[Claimed]) -> None:
        """Mark decided traces (unless a late span re-opened them meanwhile) and drop their
        deadlines: two round trips per node for the whole batch."""
        finishes = _Batch(self.client)
        for item in claimed:
            keys = self._trace_keys(item.trace.trace_id)
            token = item.handle.token  # type: ignore[attr-defined]
            finishes.add(keys[0], lambda p, keys=keys, token=token: self._finish(
                keys=keys, args=[token, int(self.limits.decided_retention) + 1], client=p))
        releases = _Batch(self.client)
        for item, done in zip(claimed, finishes.run()):
            if done:
                lease = item.handle
                assert isinstance(lease, _Lease)
                keys = self._shard_keys(lease.shard)[:2]
                releases.add(keys[0], lambda p, keys=keys, t=item.trace.trace_id, at=lease.until:
                             self._release(keys=keys, args=[t, repr(at)], client=p))
        releases.run()

    def claim_all(self, now: float) -> list[Claimed]:
        """Nothing: the state is shared, and one sidecar stopping must not decide the traces
        other sidecars are still assembling. They (or this one, restarted) decide them."""
        return []

    def with_traces(self, trace_ids: list[str], use: Callable[[Trace], T]) -> list[T]:
        """`use` on each trace still open (a snapshot: Redis holds the live one)."""
        reads = _Batch(self.client)
        for trace_id in trace_ids:
            spans_key, meta_key, _ = self._trace_keys(trace_id)
            reads.add(meta_key, lambda p, k=meta_key: p.hget(k, "st"))
            reads.add(spans_key, lambda p, k=spans_key: p.lrange(k, 0, -1))
        replies = reads.run()
        return [use(Trace(trace_id, [decode_span(trace_id, raw) for raw in raws]))
                for trace_id, state, raws in zip(trace_ids, replies[::2], replies[1::2])
                if state == b"0" and raws]

    def with_trace(self, trace_id: str, use: Callable[[Trace], T]) -> T | None:
        found = self.with_traces([trace_id], use)
        return found[0] if found else None

    def signal_once(self, rule_id: str, trace_id: str) -> bool:
        """Reserve the (rule, trace) signal. The reservation is pending until `signal_sent`. A
        decider reserves within milliseconds of its claim and a successor claims only after the
        lease, so a reservation older than half the lease belongs to a decider that died before
        writing: it is taken over. A crash can repeat a signal (same signal_id), never lose one."""
        return bool(self._reserve_signal(
            keys=[self._trace_keys(trace_id)[2]],
            args=[rule_id, repr(time.time()), self.limits.claim_lease / 2, self.ttl]))

    def signal_sent(self, rule_id: str, trace_id: str) -> None:
        key = self._trace_keys(trace_id)[2]
        self.client.hset(key, rule_id, "sent")

    def next_due(self) -> float | None:
        """The earliest deadline (or lease expiry) in any shard."""
        reads = _Batch(self.client)
        for shard in range(self.shards):
            for key in self._shard_keys(shard)[:2]:
                reads.add(key, lambda p, k=key: p.zrange(k, 0, 0, withscores=True))
        scores = [score for reply in reads.run() for _, score in reply]
        return min(scores) if scores else None

    def counts(self) -> tuple[int, int]:
        reads = _Batch(self.client)
        for shard in range(self.shards):
            key = self._shard_keys(shard)[2]
            reads.add(key, lambda p, k=key: p.hmget(k, "traces", "spans"))
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


def encode_span(span: Span) -> bytes:
    """A compact JSON array; bytes attribute values become hex text (JSON has no bytes)."""
    return orjson.dumps(
        [span.span_id, span.parent_span_id, span.name, span.start_ns,
         span.end_ns - span.start_ns, _STATUS_CODE[span.status] * 8 + _KIND_CODE[span.kind],
         span.service, span.attributes],
        default=_jsonable)


def decode_span(trace_id: str, raw: bytes) -> Span:
    span_id, parent, name, start, duration, codes, service, attributes = orjson.loads(raw)
    for key, value in attributes.items():
        if type(value) is list:
            attributes[key] = _tuple(value)
    return Span(trace_id, span_id, name, parent_span_id=parent, start_ns=start,
                end_ns=start + duration, status=STATUSES[codes >> 3], kind=KINDS[codes & 7],
                service=service, attributes=attributes)


def _tuple(values: list[Any]) -> tuple[Any, ...]:
    return tuple(_tuple(v) if type(v) is list else v for v in values)


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(f"cannot store {type(value).__name__} in Redis")
