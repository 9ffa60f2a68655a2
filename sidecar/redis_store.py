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
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, NamedTuple, TypeVar
from urllib.parse import urlsplit

import hiredis
import msgpack
import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import NoScriptError, RedisClusterException

from sidecar.span import KINDS, STATUSES, Span, Trace
from sidecar.store import AppendResult, Claimed, StoreLimits

T = TypeVar("T")
log = logging.getLogger("betrace")
SHARDS = 16
PREFIX = "bt:"
_MAX_ARGS = 1000  # spans or deadline updates per script call; Lua's unpack has a stack limit
_CLAIMS_PER_CALL = 100  # a claim's reply carries every span: keep it well inside the timeout
_STATUS_CODE = {name: i for i, name in enumerate(STATUSES)}
_KIND_CODE = {name: i for i, name in enumerate(KINDS)}
_U64 = 2**64 - 1

# The trace state at the head of its list, read and written by every trace script.
_STATE = """
local function state(key)
  local raw = redis.call('LINDEX', key, 0)
  if not raw then return nil end
  local st, o, l, dt, lx, f, tok =
    string.match(raw, '^(%d),(%d*),(%d*),(%d*),(%d*),(%d?),(.*)$')
  return {st = st, o = tonumber(o), l = tonumber(l), dt = tonumber(dt), lx = tonumber(lx),
          f = f, tok = tok}
end
local function num(x) if x then return string.format('%d', x) end return '' end
local function save(key, m)
  redis.call('LSET', key, 0, table.concat({m.st, num(m.o), num(m.l), num(m.dt), num(m.lx),
                                          m.f or '', m.tok or ''}, ','))
end
"""

# The trace scripts below each serve many traces per call (every trace of a request on a
# standalone Redis, the traces of one hash slot on a Cluster): KEYS holds each trace's keys in
# turn, ARGV the shared arguments and then each trace's own. Replies are flat arrays of strings
# and numbers, never arrays of arrays: Redis 6 writes every nested array of a script's reply to
# the socket on its own (a 100-trace reply arrived in 30 to 50 segments, each a wake-up and a read
# for the sidecar).

# KEYS: spans, signals of each trace. ARGV: now, max_spans, ttl, retention, wait, max_age, then
# per trace: its span count, '1' if the caller found it quiet, its spans. Per trace one string
# "taken,refused,late,counted,spans before,deadline,made": counted 1 when the trace (re)joins
# the open traces, deadline '' unless it is open, made 'n' when this call created it open and 'q'
# when it created it decided on arrival (quiet, every span taken: no deadline, st 3 with its
# would-be deadline as the time decided).
_APPEND = _STATE + """
local now, limit, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local retention, wait, max_age = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local function append(spans, signals, first, n, quiet)
  local m = state(spans)
  local late, counted, before, made = 0, 0, 0, ''
  if m and m.st ~= '0' and now > m.dt + retention then
    redis.call('DEL', spans, signals)  -- decided long ago: forgotten, start afresh
    m = nil
  end
  local have = 0
  if m then have = redis.call('LLEN', spans) - 1 end
  local take = math.min(n, math.max(limit - have, 0))
  local due = ''
  if take > 0 then
    if not m then
      counted, made = 1, 'n'
      m = {o = now}
      redis.call('RPUSH', spans, '')  -- the state's place
    elseif m.st ~= '0' then  -- decided: a span re-opens it with its earlier spans; it is late
      counted, before = 1, have  -- unless decided on arrival and still inside its wait
      if m.st == '2' or now > m.dt then late = take end
      m = {o = now}
    end
    m.st, m.l = '0', now
    redis.call('RPUSH', spans, unpack(ARGV, first, first + take - 1))
    if made == 'n' and quiet == '1' and take == n then
      counted, made = 0, 'q'
      m.st, m.dt = '3', now + math.min(wait, max_age)
    end
    save(spans, m)
  end
  if m and m.st == '0' then  -- also when nothing was taken: a retry re-sends the deadline
    due = num(math.min(m.l + wait, m.o + max_age))  -- that a failed round trip left unset
  end
  if made == 'q' then  -- kept for late spans as if decided at its deadline
    redis.call('PEXPIRE', spans, m.dt - now + retention + 1000)
  elseif due ~= '' then
    redis.call('PEXPIRE', spans, ttl)
    redis.call('PEXPIRE', signals, ttl)  -- a re-opened trace keeps the memory of its signals
  end
  return table.concat({take, n - take, late, counted, before, due, made}, ',')
end
local out, at = {}, 7
for k = 1, #KEYS, 2 do
  local n = tonumber(ARGV[at])
  out[#out + 1] = append(KEYS[k], KEYS[k + 1], at + 2, n, ARGV[at + 1])
  at = at + 2 + n
end
return out
"""

# KEYS: spans of each trace. ARGV: now, wait, max_age, lease_until, then per trace its token.
# Per trace a head "claimed,deadline,previous st,reason,span count" then its spans, or the head
# alone: "later,deadline", "gone", "done" (decided, also on arrival), "leased".
_CLAIM_TRACE = _STATE + """
local now, wait, max_age, lease = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]),
                                  tonumber(ARGV[4])
local out = {}
local function claim(spans, token)
  local m = state(spans)
  if not m or not m.l then out[#out + 1] = 'gone' return end
  if m.st == '3' or (m.st == '2' and m.f == '1') then out[#out + 1] = 'done' return end
  if m.st == '2' and m.lx > now then out[#out + 1] = 'leased' return end
  local idle, aged = m.l + wait, m.o + max_age
  local due = math.min(idle, aged)
  if m.st == '0' and due > now then out[#out + 1] = 'later,' .. num(due) return end
  local n = redis.call('LLEN', spans) - 1
  local reason = 'idle'
  if aged <= idle then reason = 'max_age' end
  out[#out + 1] = table.concat({'claimed', num(due), m.st, reason, n}, ',')
  m.st, m.dt, m.lx, m.f, m.tok = '2', now, lease, nil, token
  save(spans, m)
  for _, span in ipairs(redis.call('LRANGE', spans, 1, -1)) do out[#out + 1] = span end
end
for k = 1, #KEYS do claim(KEYS[k], ARGV[4 + k]) end
return out
"""

# KEYS: spans, signals of each trace. ARGV: retention, then per trace its token. Per trace: 1
# when its claim was still the trace's.
_FINISH = _STATE + """
local function finish(spans, signals, token)
  local m = state(spans)
  if not m or m.st ~= '2' or m.tok ~= token then return 0 end
  m.f = '1'
  save(spans, m)
  redis.call('PEXPIRE', spans, ARGV[1])
  redis.call('PEXPIRE', signals, ARGV[1])
  return 1
end
local out = {}
for k = 1, #KEYS, 2 do out[#out + 1] = finish(KEYS[k], KEYS[k + 1], ARGV[1 + (k + 1) / 2]) end
return out
"""

# KEYS: due, counts of each shard. ARGV per shard: open traces delta, spans delta, how many
# (op, id, score) triples follow, the triples: 'a' sets the deadline; 'r' drops it unless
# something moved it since (a late span re-opened the trace).
_SHARD = """
local at = 1
for k = 1, #KEYS, 2 do
  local due, counts, n = KEYS[k], KEYS[k + 1], tonumber(ARGV[at + 2])
  if ARGV[at] ~= '0' then redis.call('HINCRBY', counts, 'traces', ARGV[at]) end
  if ARGV[at + 1] ~= '0' then redis.call('HINCRBY', counts, 'spans', ARGV[at + 1]) end
  for i = at + 3, at + 3 * n, 3 do
    if ARGV[i] == 'a' then
      redis.call('ZADD', due, ARGV[i + 2], ARGV[i + 1])
    else
      local score = redis.call('ZSCORE', due, ARGV[i + 1])
      if score and tonumber(score) == tonumber(ARGV[i + 2]) then
        redis.call('ZREM', due, ARGV[i + 1])
      end
    end
  end
  at = at + 3 + 3 * n
end
return 0
"""

# KEYS: due of each shard. ARGV: now, limit, lease_until. Per shard: its due trace ids joined by
# ',' (at most `limit` in all), moved to their lease expiry.
_CLAIM_SHARD = """
local left, out = tonumber(ARGV[2]), {}
for k = 1, #KEYS do
  local ids = {}
  if left > 0 then
    ids = redis.call('ZRANGEBYSCORE', KEYS[k], '-inf', ARGV[1], 'LIMIT', 0, left)
    for _, id in ipairs(ids) do redis.call('ZADD', KEYS[k], ARGV[3], id) end
    left = left - #ids
  end
  out[k] = table.concat(ids, ',')
end
return out
"""

# KEYS: signals of each (rule, trace). ARGV: now, stale_after, ttl (ms), then per pair its rule.
# Per pair: 1 when this caller may signal.
_RESERVE_SIGNAL = """
local now, stale, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local function reserve(signals, rule)
  local state = redis.call('HGET', signals, rule)
  if state == 'sent' then return 0 end
  if state and now - tonumber(state) < stale then return 0 end
  redis.call('HSET', signals, rule, ARGV[1])
  redis.call('PEXPIRE', signals, ttl)
  return 1
end
local out = {}
for k = 1, #KEYS do out[k] = reserve(KEYS[k], ARGV[3 + k]) end
return out
"""


class _Script:
    """A Lua script, called by its SHA1 (EVALSHA) and loaded when Redis answers NOSCRIPT."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


_SCRIPTS = APPEND, CLAIM_TRACE, FINISH, SHARD, CLAIM_SHARD, RESERVE_SIGNAL = tuple(map(_Script, (
    _APPEND, _CLAIM_TRACE, _FINISH, _SHARD, _CLAIM_SHARD, _RESERVE_SIGNAL)))


class _Batch:
    """Commands gathered per Redis node, then sent: one round trip per node. Replies come back in
    the order the commands were added."""

    def __init__(self, client: redis.Redis | RedisCluster) -> None:
        self.client = client
        self.nodes: dict[str, tuple[redis.Redis, list[tuple[int, tuple[Any, ...]]]]] = {}
        self.count = 0

    def add(self, key: str, *command: Any) -> int:
        """Queue a command for the node holding `key`; its position in `run()`'s replies."""
        if isinstance(self.client, RedisCluster):
            node = self.client.get_node_from_key(key)
            connection, name = self.client.get_redis_connection(node), node.name
        else:
            connection, name = self.client, ""
        self.nodes.setdefault(name, (connection, []))[1].append((self.count, command))
        self.count += 1
        return self.count - 1

    def call(self, script: _Script, keys: Sequence[str], args: Sequence[Any]) -> int:
        return self.add(keys[0], "EVALSHA", script.sha, len(keys), *keys, *args)

    def run(self) -> list[Any]:
        replies: list[Any] = [None] * self.count
        try:
            for node, commands in self.nodes.values():
                for (position, _), reply in zip(commands,
                                                self._execute(node, [c for _, c in commands])):
                    replies[position] = reply
        except (redis.exceptions.MovedError, redis.exceptions.AskError):
            if isinstance(self.client, RedisCluster):
                self.client.nodes_manager.initialize()  # slots moved: learn the new layout
            raise
        return replies

    @staticmethod
    def _execute(node: redis.Redis, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Run on one node; scripts it does not know yet (a new or restarted Redis) are loaded
        and only the commands refused with NOSCRIPT run again (the others did run)."""
        replies = _round_trip(node, commands)
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            _round_trip(node, [("SCRIPT", "LOAD", script.source) for script in _SCRIPTS])
            for i, reply in zip(missing, _round_trip(node, [commands[i] for i in missing])):
                replies[i] = reply
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies


def _round_trip(node: redis.Redis, commands: list[tuple[Any, ...]]) -> list[Any]:
    """Write every command at once and read every reply (an error reply as its exception).
    hiredis packs the commands: redis-py's pipeline costs twice the client CPU per command,
    and a sidecar sends several commands per trace."""
    pool = node.connection_pool
    connection = pool.get_connection()
    try:
        connection.send_packed_command([b"".join([hiredis.pack_command(c) for c in commands])])
        replies: list[Any] = []
        for _ in commands:
            try:
                replies.append(connection.read_response())
            except redis.ResponseError as exc:
                replies.append(exc)
    except BaseException:
        connection.disconnect()  # replies may be left unread: never reuse it
        raise
    finally:
        pool.release(connection)
    return replies


class _PerSlot:
    """One script call for many traces (or shards): all of them on a standalone Redis, those of
    one hash slot on a Cluster (where a script may touch one slot only). Each brings its keys
    and its own arguments; `results` gives each its element of the reply, in the order added."""

    def __init__(self, batch: _Batch, script: _Script, shared: Sequence[Any],
                 traces_per_call: int = _MAX_ARGS,
                 split: Callable[[list[Any]], list[Any]] = list) -> None:
        self.batch, self.script, self.shared = batch, script, list(shared)
        self.split = split  # a call's flat reply -> one result per trace
        self.traces_per_call = traces_per_call
        self.slot = batch.client.keyslot if isinstance(batch.client, RedisCluster) else None
        self.open: dict[int, tuple[list[str], list[Any], list[int]]] = {}
        self.calls: list[tuple[int, list[int]]] = []  # batch position, the traces it serves
        self.count = 0

    def add(self, keys: Sequence[str], args: Sequence[Any]) -> None:
        group = self.slot(keys[0]) if self.slot else 0
        call = self.open.get(group)
        if call is None:
            call = self.open[group] = ([], list(self.shared), [])
        call[0].extend(keys)
        call[1].extend(args)
        call[2].append(self.count)
        self.count += 1
        if len(call[1]) >= _MAX_ARGS or len(call[2]) >= self.traces_per_call:
            self._queue(group)  # keep each script call, and its reply, moderate

    def _queue(self, group: int) -> None:
        keys, args, traces = self.open.pop(group)
        self.calls.append((self.batch.call(self.script, keys, args), traces))

    def results(self, replies: list[Any]) -> list[Any]:
        """After the batch ran: one result per trace added."""
        out: list[Any] = [None] * self.count
        for position, traces in self.calls:
            for trace, result in zip(traces, self.split(replies[position])):
                out[trace] = result
        return out

    def queue(self) -> _PerSlot:
        """Queue the calls still open on the batch (before it runs)."""
        for group in list(self.open):
            self._queue(group)
        return self


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

    def send(self, batch: _Batch) -> None:
        calls = _PerSlot(batch, SHARD, ())
        for shard, ops in self.shards.items():
            if ops == [0, 0]:
                continue
            keys, triples = self.store._shard_keys(shard), ops[2:]
            for start in range(0, max(len(triples), 1), 3 * _MAX_ARGS):
                part = triples[start:start + 3 * _MAX_ARGS]
                counts = ops[:2] if start == 0 else [0, 0]
                calls.add(keys, [*counts, len(part) // 3, *part])
        calls.queue()


class Vocabulary:
    """Span names and attribute keys the rules read, numbered, so a record carries a number for
    them instead of the string (attribute keys alone are a third of a typical record). The tag is
    a digest of the words, so a tag always means the same words: sidecars on other rule versions
    find them under bt:words:<tag>, written again with every append batch so they outlive every
    record that uses them."""

    def __init__(self, words: Sequence[str]) -> None:
        self.words = tuple(words)
        self.number = {word: i for i, word in enumerate(self.words)}
        self.packed = msgpack.packb(self.words)
        self.tag = int.from_bytes(hashlib.sha256(self.packed).digest()[:4], "big")
        self.key = f"{PREFIX}words:{self.tag:08x}"

    def encode(self, span: Span) -> bytes:
        return self.encoder(set())(span)

    def encoder(self, altered: set[str]) -> Callable[[Span], bytes]:
        """A function making one msgpack record per span: the vocabulary's tag, binary ids,
        start and duration in ns, status and kind in one small int, then name, service and the
        attributes as a flat key, value, ... array (their OTLP types kept: bytes stay bytes).
        One per batch: it reuses its packer (a packer per span costs a third more). Traces
        whose records had to differ from their spans (numbers beyond 64 bits) go in `altered`."""
        number, tag, pack = self.number, self.tag, msgpack.Packer().pack

        def encode(span: Span) -> bytes:
            flat: list[Any] = []
            for key, value in span.attributes.items():
                flat.append(number.get(key, key))
                flat.append(value)
            record = (tag, bytes.fromhex(span.span_id), bytes.fromhex(span.parent_span_id),
                      span.start_ns, span.end_ns - span.start_ns,
                      _STATUS_CODE[span.status] * 8 + _KIND_CODE[span.kind],
                      number.get(span.name, span.name), span.service, flat)
            try:
                return pack(record)
            except OverflowError:  # a number beyond 64 bits: OTLP JSON can spell, not carry it
                altered.add(span.trace_id)
                return pack((*record[:3], min(max(record[3], 0), _U64),
                             max(min(record[4], 2**63 - 1), -2**63), *record[5:8],
                             [_storable(item) for item in flat]))
        return encode


def decode_span(trace_id: str, raw: bytes, words: Callable[[int], tuple[str, ...]]) -> Span:
    """A record back as a Span; `words(tag)` gives the vocabulary the record was written with."""
    tag, span_id, parent, start, duration, codes, name, service, flat = msgpack.unpackb(
        raw, use_list=False)
    vocabulary = words(tag)
    if type(name) is int:
        name = vocabulary[name]
    pairs = iter(flat)
    attributes = {vocabulary[key] if type(key) is int else key: value
                  for key, value in zip(pairs, pairs)}
    return Span.of(trace_id, span_id.hex(), name, parent.hex(), start, start + duration,
                   STATUSES[codes >> 3], KINDS[codes & 7], service, attributes)


class _Lease(NamedTuple):
    token: str
    until_ms: int
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
               quiet: Collection[str] = ()) -> AppendResult:
        limits = self.limits
        fixed = [_ms(now), limits.max_spans_per_trace, _ms(self.ttl),
                 _ms(limits.decided_retention), _ms(limits.decision_wait),
                 _ms(limits.max_trace_age)]
        vocabulary = self.vocabulary
        scripts = _Batch(self.client)
        scripts.add(vocabulary.key, "SET", vocabulary.key, vocabulary.packed, "EX", 86400)
        appends = _PerSlot(scripts, APPEND, fixed)
        order = []
        altered: set[str] = set()  # what rules read back differs from the request's spans
        encode = vocabulary.encoder(altered)
        for trace_id, spans in batch.items():
            encoded = [encode(s) for s in spans]
            keys = self._trace_keys(trace_id)
            # Decided on arrival only when the caller judged what is stored, all in one call.
            flag = b"1" if (trace_id in quiet and len(encoded) <= _MAX_ARGS
                            and trace_id not in altered) else b"0"
            for start in range(0, len(encoded), _MAX_ARGS):
                part = encoded[start:start + _MAX_ARGS]
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
                result.quiet += 1
            else:
                updates.count(shard, counted, taken + before)
            if refused or trace_id in altered:
                result.created.discard(trace_id)
        self._send(updates)
        return result

    def _send(self, updates: _ShardUpdates) -> None:
        batch = _Batch(self.client)
        updates.send(batch)
        batch.run()

    def claim_due(self, now: float, limit: int = 1000) -> list[Claimed]:
        limits = self.limits
        now_ms, lease_ms = _ms(now), _ms(now + limits.claim_lease)
        with self._lock:  # rotate the starting shard so no shard starves under load
            start, self._next_shard = self._next_shard, (self._next_shard + 1) % self.shards
        shards = [(start + i) % self.shards for i in range(self.shards)]
        pops = _Batch(self.client)
        popping = _PerSlot(pops, CLAIM_SHARD, [now_ms, limit, lease_ms])
        for shard in shards:
            popping.add(self._shard_keys(shard)[:1], ())
        popping.queue()
        updates = _ShardUpdates(self)
        chosen: list[tuple[str, int, str]] = []
        batch = _Batch(self.client)
        claims = _PerSlot(batch, CLAIM_TRACE, [now_ms, _ms(limits.decision_wait),
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
        batch = _Batch(self.client)
        finishes = _PerSlot(batch, FINISH, [_ms(self.limits.decided_retention + 1)])
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
        reads = _Batch(self.client)
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
        batch = _Batch(self.client)
        reservations = _PerSlot(batch, RESERVE_SIGNAL, [
            _ms(time.time()), _ms(self.limits.claim_lease / 2), _ms(self.ttl)])
        for rule_id, trace_id in pairs:
            reservations.add(self._trace_keys(trace_id)[1:], [rule_id])
        reservations.queue()
        return [bool(reply) for reply in reservations.results(batch.run())]

    def signals_sent(self, pairs: Sequence[tuple[str, str]]) -> None:
        batch = _Batch(self.client)
        for rule_id, trace_id in pairs:
            key = self._trace_keys(trace_id)[1]
            batch.add(key, "HSET", key, rule_id, "sent")
        batch.run()

    def next_due(self) -> float | None:
        """The earliest deadline (or lease expiry) in any shard."""
        reads = _Batch(self.client)
        for shard in range(self.shards):
            key = self._shard_keys(shard)[0]
            reads.add(key, "ZRANGE", key, 0, 0, "WITHSCORES")
        scores = [float(reply[0][1] if isinstance(reply[0], list) else reply[1])  # RESP3 / RESP2
                  for reply in reads.run() if reply]
        return min(scores) / 1000 if scores else None

    def counts(self) -> tuple[int, int]:
        reads = _Batch(self.client)
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


def _storable(value: Any) -> Any:
    """Integers beyond 64 bits as their decimal text, everything else as it is."""
    if type(value) is int and not -2**63 <= value <= _U64:
        return str(value)
    if type(value) is tuple:
        return tuple(map(_storable, value))
    if type(value) is dict:
        return {key: _storable(item) for key, item in value.items()}
    return value
