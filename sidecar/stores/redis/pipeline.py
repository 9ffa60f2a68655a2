"""Talking to Redis in as few round trips as possible: commands gathered per node and written at
once (`Pipeline`), and one Lua script call serving many traces or shards (`PerSlot`).

The trace scripts below each serve many traces per call (every trace of a request on a
standalone Redis, the traces of one hash slot on a Cluster): KEYS holds each trace's keys in
turn, ARGV the shared arguments and then each trace's own. Replies are flat arrays of strings
and numbers, never arrays of arrays: Redis 6 writes every nested array of a script's reply to
the socket on its own (a 100-trace reply arrived in 30 to 50 segments, each a wake-up and a read
for the sidecar).
Their sources are scripts/*.lua; those that read or write a trace's state begin with
scripts/state.lua.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from importlib import resources
from typing import Any

import hiredis
import redis
from redis.cluster import RedisCluster
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MasterDownError,
    MovedError,
    NoPermissionError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    TryAgainError,
)

from sidecar.model.errors import StoreUnavailable

MAX_ARGS = 1000  # spans or deadline updates per script call; Lua's unpack has a stack limit
# What Redis says while it cannot serve for now (down, loading, failing over, full, refusing
# this user): the store raises StoreUnavailable, and the collector retries. Anything else (a
# script error) is a bug, said as one.
_TRANSIENT = (redis.ConnectionError, redis.TimeoutError, ClusterDownError, TryAgainError,
              MovedError, AskError, ReadOnlyError, MasterDownError, OutOfMemoryError,
              NoPermissionError, RedisClusterException)


@contextmanager
def unavailable_while_down() -> Iterator[None]:
    """Redis's transient errors as StoreUnavailable."""
    try:
        yield
    except _TRANSIENT as exc:
        raise StoreUnavailable(f"redis: {exc or type(exc).__name__}") from exc


class Script:
    """A Lua script (scripts/<name>.lua, after scripts/state.lua `with_state`), called by its
    SHA1 (EVALSHA) and loaded when Redis answers NOSCRIPT; read on first use."""

    def __init__(self, name: str, with_state: bool = False) -> None:
        self.name, self.with_state = name, with_state

    @functools.cached_property
    def source(self) -> str:
        scripts = resources.files(__package__) / "scripts"
        prefix = (scripts / "state.lua").read_text() if self.with_state else ""
        return prefix + (scripts / f"{self.name}.lua").read_text()

    @functools.cached_property
    def sha(self) -> str:
        return hashlib.sha1(self.source.encode()).hexdigest()


APPEND, CLAIM_TRACE, FINISH = (Script(name, with_state=True)
                                for name in ("append", "claim_trace", "finish"))
SHARD, CLAIM_SHARD, RESERVE_SIGNAL = map(Script, ("shard", "claim_shard", "reserve_signal"))
_SCRIPTS = APPEND, CLAIM_TRACE, FINISH, SHARD, CLAIM_SHARD, RESERVE_SIGNAL


class Pipeline:
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

    def call(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> int:
        return self.add(keys[0], "EVALSHA", script.sha, len(keys), *keys, *args)

    def run(self) -> list[Any]:
        with unavailable_while_down():
            return self._run()

    def _run(self) -> list[Any]:
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
        replies = round_trip(node, commands)
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            round_trip(node, [("SCRIPT", "LOAD", script.source) for script in _SCRIPTS])
            for i, reply in zip(missing, round_trip(node, [commands[i] for i in missing])):
                replies[i] = reply
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies


def round_trip(node: redis.Redis, commands: list[tuple[Any, ...]]) -> list[Any]:
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


class PerSlot:
    """One script call for many traces (or shards): all of them on a standalone Redis, those of
    one hash slot on a Cluster (where a script may touch one slot only). Each brings its keys
    and its own arguments; `results` gives each its element of the reply, in the order added."""

    def __init__(self, pipeline: Pipeline, script: Script, shared: Sequence[Any],
                 traces_per_call: int = MAX_ARGS,
                 split: Callable[[list[Any]], list[Any]] = list) -> None:
        self.pipeline, self.script, self.shared = pipeline, script, list(shared)
        self.split = split  # a call's flat reply -> one result per trace
        self.traces_per_call = traces_per_call
        self.slot = pipeline.client.keyslot if isinstance(pipeline.client, RedisCluster) \
            else None
        self.open: dict[int, tuple[list[str], list[Any], list[int]]] = {}
        self.calls: list[tuple[int, list[int]]] = []  # pipeline position, the traces it serves
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
        if len(call[1]) >= MAX_ARGS or len(call[2]) >= self.traces_per_call:
            self._queue(group)  # keep each script call, and its reply, moderate

    def _queue(self, group: int) -> None:
        keys, args, traces = self.open.pop(group)
        self.calls.append((self.pipeline.call(self.script, keys, args), traces))

    def results(self, replies: list[Any]) -> list[Any]:
        """After the pipeline ran: one result per trace added."""
        out: list[Any] = [None] * self.count
        for position, traces in self.calls:
            for trace, result in zip(traces, self.split(replies[position])):
                out[trace] = result
        return out

    def queue(self) -> PerSlot:
        """Queue the calls still open on the pipeline (before it runs)."""
        for group in list(self.open):
            self._queue(group)
        return self
