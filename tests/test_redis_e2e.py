"""Several `betrace serve` processes sharing Redis, end to end, with real parts only.

Real redis-server processes (standalone, persistent or not, and a 3-master Redis Cluster, see
redis_servers.py), real `python -m sidecar serve` subprocesses, and as clients the real
OpenTelemetry SDK OTLP gRPC exporter (one TracerProvider per sidecar, a trace's spans spread over
them by passing the parent context) or raw ExportTraceServiceRequest protobufs over a gRPC
channel where a test must see every answer (UNAVAILABLE during an outage) and retry by itself.

What is checked is what DESIGN.md promises for Redis: spans of one trace may reach different
sidecars and exactly one signal comes out per (rule, violating trace), none for clean traces; a
sidecar that dies mid-decision leaves its claimed traces to another after the lease expires; if
Redis is down, ingest answers UNAVAILABLE (and /readyz 503) so the client retries, and nothing
acknowledged is lost; keys carry a `{trace_id}` hash tag so a Cluster works; keys expire.

Two rules: a monotone one (signals as soon as it matches: the early path) and a when/always one
(signals only when the trace is decided: the decision path). Sidecars run with a 1s decision
wait and a 2s claim lease unless a test says otherwise.
"""

from __future__ import annotations

import datetime
import hashlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from opentelemetry import trace as otel_trace
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2
from processes import closed_at_end, free_port, stop
from prometheus_client.parser import text_string_to_metric_families
from redis_servers import RedisServer, start_cluster

REPO = Path(__file__).resolve().parent.parent

PAY, ADMIN = "payment-new-intent", "admin-audit"
RULES = f"""
rules:
  - id: {PAY}
    name: Payment retry used a new payment_intent_id
    severity: critical
    condition: >-
      trace.has(payment.charge).where(attempt > 1)
      and count(payment.charge).where(payment_intent_id == unique) > 1
    signal:
      context: [payment_intent_id]
  - id: {ADMIN}
    name: Admin action must be audited
    severity: high
    when: admin.action
    always: audit.log
"""

TRACE_KEY = re.compile(rb"bt:\{([0-9a-f]{32})\}:[sg]")
SHARD_KEY = re.compile(rb"bt:\{q\d+\}:(due|n)")
WORDS_KEY = re.compile(rb"bt:words:[0-9a-f]{8}")
FORMAT_KEY = b"bt:format"  # the state's format: one fixed key without a TTL


# --- processes ----------------------------------------------------------------------------------

def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("BETRACE_")}


class Proc:
    """A subprocess whose stdout and stderr are collected line by line as they come."""

    def __init__(self, argv: list[str]) -> None:
        self.process = subprocess.Popen(argv, cwd=REPO, env=clean_env(), stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers = [threading.Thread(target=self._read, args=(stream, lines), daemon=True)
                         for stream, lines in ((self.process.stdout, self.out),
                                               (self.process.stderr, self.err))]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream: Any, lines: list[str]) -> None:
        for line in stream:
            lines.append(line.rstrip("\n"))

    @property
    def stderr(self) -> str:
        return "\n".join(self.err)

    def wait_for(self, text: str, timeout: float = 15.0, stdout: bool = False) -> str:
        lines = self.out if stdout else self.err
        deadline = time.monotonic() + timeout
        while True:
            found = next((line for line in list(lines) if text in line), None)
            if found is not None:
                return found
            if self.process.poll() is not None:
                for reader in self._readers:
                    reader.join(2)
                found = next((line for line in list(lines) if text in line), None)
                if found is not None:
                    return found
                raise AssertionError(f"{self.process.args[:4]} exited "
                                     f"({self.process.returncode}) before {text!r}:\n"
                                     f"{self.stderr}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} within {timeout}s:\n{self.stderr}")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def close(self) -> None:
        stop(self.process)
        for reader in self._readers:
            reader.join(5)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


class Serve(Proc):
    """A real `betrace serve` on free loopback ports, logging signals to its own file."""

    def __init__(self, store: str, rules: Path, signals: Path, *extra: str) -> None:
        self.grpc_port, self.metrics_port = free_port(), free_port()
        self.signals = signals
        super().__init__([
            sys.executable, "-m", "sidecar", "serve", "--store", store,
            "--listen", f"127.0.0.1:{self.grpc_port}", "--http-listen", "",
            "--metrics-listen", f"127.0.0.1:{self.metrics_port}", "--decision-wait", "1s",
            "--signals-out", str(signals), "--rules", str(rules), "--claim-lease", "2s",
            *extra])

    def listening(self) -> Serve:
        self.wait_for("betrace listening")
        return self

    def get(self, path: str) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.metrics_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, exc.read().decode()

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples called `name` whose labels include `labels` (0 if none)."""
        status, text = self.get("/metrics")
        assert status == 200
        return sum(sample.value for family in text_string_to_metric_families(text)
                   for sample in family.samples
                   if sample.name == name
                   and all(sample.labels.get(k) == v for k, v in labels.items()))

    def signal_lines(self) -> list[dict[str, Any]]:
        """The complete lines of the signal log (a line being written is not read yet)."""
        try:
            text = self.signals.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.split("\n")[:-1] if line.strip()]

    def clean_stderr(self) -> None:
        for bad in ("Traceback", "CROSSSLOT", "Exception in thread"):
            assert bad not in self.stderr, self.stderr


@pytest.fixture
def rules_file(tmp_path: Path) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(RULES)
    return path


@pytest.fixture
def serve(tmp_path: Path, rules_file: Path) -> Iterator[Callable[..., Serve]]:
    """`serve(store_url, *extra_flags)`: a started (not yet listening) `betrace serve`; every
    one still running is stopped at the end of the test."""
    numbers = itertools.count()

    def start(store: str, *extra: str) -> Serve:
        return Serve(store, rules_file, tmp_path / f"signals-{next(numbers)}.jsonl", *extra)

    yield from closed_at_end(start)


@pytest.fixture
def helpers() -> Iterator[Callable[..., Proc]]:
    """`helpers(*args)`: a `python -c HELPER *args` subprocess, ended at the end of the test."""
    yield from closed_at_end(lambda *args: Proc([sys.executable, "-c", HELPER, *args]))


@pytest.fixture
def redis_cluster() -> Iterator[list[RedisServer]]:
    nodes = start_cluster(3)
    try:
        yield nodes
    finally:
        for node in nodes:
            node.cleanup()


def poll(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


# --- traces ------------------------------------------------------------------------------------

Spec = tuple[str, dict[str, Any]]


def plan(i: int) -> tuple[list[Spec], set[str]]:
    """The spans (below a `checkout` root) of trace number i, and the rules it violates. Every
    violation and every near miss needs spans from two sidecars to be seen as what it is."""
    a, b = f"pi-{i}-a", f"pi-{i}-b"

    def charge(attempt: int, intent: str) -> Spec:
        return "payment.charge", {"attempt": attempt, "payment_intent_id": intent,
                                  "order_id": f"o-{i}"}

    kind = i % 6
    if kind == 0:  # a retry with a new intent: monotone, signals early
        return [charge(1, a), charge(2, b)], {PAY}
    if kind == 1:  # an unaudited admin action: signals only at the decision
        return [("admin.action", {"user_id": f"u-{i}"}), ("db.query", {})], {ADMIN}
    if kind == 2:  # both
        return [("admin.action", {}), charge(1, a), charge(2, b)], {PAY, ADMIN}
    if kind == 3:  # audited: clean only if the audit.log from the other sidecar is seen
        return [("admin.action", {}), ("audit.log", {})], set()
    if kind == 4:  # a retry reusing its intent: clean
        return [charge(1, a), charge(2, a)], set()
    return [charge(1, a), ("db.query", {})], set()  # no rule reads db.query: decided on arrival


def decided_at_deadline(traces: int) -> int:
    """How many of traces 0..traces-1 are decided at a deadline: all but kind 5, whose only
    span a rule reads reaches one sidecar, whole and quiet, so it is decided on arrival."""
    return sum(1 for i in range(traces) if i % 6 != 5)


def send_split(i: int, tracers: list[Any]) -> tuple[str, set[str]]:
    """Trace i through the SDK: the root on one provider, each child on the next one round the
    list, so every sidecar gets some spans of the trace (children use the root as parent)."""
    children, rules = plan(i)
    n = len(tracers)
    root = tracers[i % n].start_span("checkout")
    parent = otel_trace.set_span_in_context(root)
    for j, (name, attrs) in enumerate(children, start=1):
        tracers[(i + j) % n].start_span(name, context=parent, attributes=attrs).end()
    root.end()
    return format(root.get_span_context().trace_id, "032x"), rules


_span_ids = itertools.count(1)


def pb_request(trace_id: str, specs: list[Spec],
               service: str = "checkout") -> trace_service_pb2.ExportTraceServiceRequest:
    """One ExportTraceServiceRequest holding `specs` as spans of one trace (fresh span ids)."""
    def kv(key: str, value: Any) -> common_pb2.KeyValue:
        if isinstance(value, int):
            return common_pb2.KeyValue(key=key, value=common_pb2.AnyValue(int_value=value))
        return common_pb2.KeyValue(key=key, value=common_pb2.AnyValue(string_value=str(value)))

    now = time.time_ns()
    spans = [trace_pb2.Span(
        trace_id=bytes.fromhex(trace_id), span_id=next(_span_ids).to_bytes(8, "big"), name=name,
        kind=trace_pb2.Span.SPAN_KIND_INTERNAL, start_time_unix_nano=now + k * 1000,
        end_time_unix_nano=now + k * 1000 + 500,
        attributes=[kv(key, v) for key, v in attrs.items()])
        for k, (name, attrs) in enumerate(specs)]
    return trace_service_pb2.ExportTraceServiceRequest(resource_spans=[trace_pb2.ResourceSpans(
        resource=resource_pb2.Resource(attributes=[kv("service.name", service)]),
        scope_spans=[trace_pb2.ScopeSpans(scope=common_pb2.InstrumentationScope(name="test"),
                                          spans=spans)])])


def trace_id_for(i: int, run: str) -> str:
    return hashlib.sha256(f"{run}/{i}".encode()).hexdigest()[:32]


class Client:
    """A raw OTLP gRPC client that sees every answer; `send` retries UNAVAILABLE like a
    collector does and returns the codes it got on the way."""

    def __init__(self, port: int) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = trace_service_pb2_grpc.TraceServiceStub(self.channel)

    def once(self, request: trace_service_pb2.ExportTraceServiceRequest) -> grpc.StatusCode:
        try:
            self.stub.Export(request, timeout=5)
            return grpc.StatusCode.OK
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[no-any-return]

    def send(self, request: trace_service_pb2.ExportTraceServiceRequest,
             timeout: float = 30.0) -> list[grpc.StatusCode]:
        codes = []
        deadline = time.monotonic() + timeout
        while True:
            code = self.once(request)
            codes.append(code)
            if code == grpc.StatusCode.OK:
                return codes
            assert code == grpc.StatusCode.UNAVAILABLE, codes
            assert time.monotonic() < deadline, f"still refused after {timeout}s: {codes}"
            time.sleep(0.1)

    def close(self) -> None:
        self.channel.close()


@pytest.fixture
def client() -> Iterator[Callable[[int], Client]]:
    made: list[Client] = []

    def make(port: int) -> Client:
        made.append(Client(port))
        return made[-1]

    try:
        yield make
    finally:
        for c in made:
            c.close()


# --- checks ------------------------------------------------------------------------------------

def found_signals(sidecars: list[Serve]) -> list[tuple[str, str]]:
    """(rule, trace) of every signal in every sidecar's log, duplicates kept."""
    return sorted((s["rule_id"], s["trace_id"]) for p in sidecars for s in p.signal_lines())


def deadline_decisions(sidecars: list[Serve]) -> float:
    """Traces decided at a deadline (not on arrival, which a part quiet on its own may be
    before a later part opens the trace again): once per trace, by one of the sidecars."""
    return sum(p.metric("betrace_traces_decided_total")
               - p.metric("betrace_traces_decided_total", reason="arrival") for p in sidecars)


def expect_exactly(sidecars: list[Serve], expected: list[tuple[str, str]], traces: int | None,
                   timeout: float = 15.0) -> None:
    """Wait for every expected signal (and, if given, for `traces` deadline decisions in all),
    give a straggler a moment to show up, then: each expected signal exactly once, nothing
    else."""
    alive = [p for p in sidecars if p.process.poll() is None]

    def done() -> bool:
        if not set(expected) <= set(found_signals(sidecars)):
            return False
        if any(p.metric("betrace_traces_active") for p in alive):
            return False
        return traces is None or deadline_decisions(alive) >= traces

    poll(done, timeout, f"{len(expected)} signals and {traces} decisions")
    time.sleep(0.3)
    assert found_signals(sidecars) == sorted(expected)
    if traces is not None:
        assert deadline_decisions(alive) == traces
    for p in alive:
        assert p.metric("betrace_traces_active") == 0


def check_ttls(clients: list[redis.Redis]) -> dict[str, int]:
    """Every key is a documented trace key with a TTL, or a per-shard key; counts by kind."""
    kinds = {"s": 0, "g": 0, "shard": 0, "words": 0}
    for c in clients:
        for key in c.scan_iter(count=1000):
            ttl = c.ttl(key)
            if ttl == -2:  # expired between SCAN and TTL
                continue
            if SHARD_KEY.fullmatch(key) or key == FORMAT_KEY:
                kinds["shard"] += 1
                continue
            assert ttl > 0, f"{key!r} has no TTL ({ttl})"
            if WORDS_KEY.fullmatch(key):
                kinds["words"] += 1
                continue
            assert TRACE_KEY.fullmatch(key), f"undocumented key {key!r}"
            kinds[key.decode()[-1]] += 1
    return kinds


# --- 1, 2: split traces, exactly one signal ---------------------------------------------------

def _split_run(urls: str, sidecars_wanted: int, serve: Callable[..., Serve],
               sdk_client: Callable[..., Any], traces: int = 30) -> list[Serve]:
    sidecars = [serve(urls) for _ in range(sidecars_wanted)]
    for p in sidecars:
        p.listening()
    tracers = [sdk_client(p.grpc_port, service=f"svc-{n}").tracer
               for n, p in enumerate(sidecars)]
    expected = []
    for i in range(traces):
        trace_id, rules = send_split(i, tracers)
        expected += [(rule, trace_id) for rule in rules]
    assert len({t for _, t in expected}) == traces // 2  # half of the traces violate
    expect_exactly(sidecars, expected, decided_at_deadline(traces))
    for p in sidecars:
        assert p.metric("betrace_spans_received_total") > 0  # each got its share
        assert p.metric("betrace_store_errors_total") == 0
        p.clean_stderr()
    return sidecars


@pytest.mark.parametrize("sidecars", [2, 3])
def test_traces_split_across_sidecars_signal_exactly_once(
        sidecars: int, redis_factory: Callable[..., RedisServer], serve: Callable[..., Serve],
        sdk_client: Callable[..., Any]) -> None:
    server = redis_factory()
    running = _split_run(server.url, sidecars, serve, sdk_client)
    with redis.Redis(port=server.port) as r:
        kinds = check_ttls([r])
    assert kinds["s"] == 30 and kinds["g"] == 15
    for p in running:
        p.process.send_signal(signal.SIGTERM)
        assert p.process.wait(15) == 0, p.stderr


# --- 3: a decider that dies -------------------------------------------------------------------

HELPER = r"""
import json, sys, time
import redis
from sidecar.stores.redis.store import RedisStore
from sidecar.model.spans import Span
from sidecar.stores.trace_store import StoreLimits

url, want, lease = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
extra = sys.argv[4:]  # append TRACE_ID then mark RULE: append one admin.action, reserve_signals
store = RedisStore(redis.Redis.from_url(url), StoreLimits(decision_wait=1.0, claim_lease=lease))
if extra:
    now = time.time_ns()
    store.append({extra[0]: [Span(extra[0], "00000000000000aa", "admin.action",
                                  start_ns=now, end_ns=now + 1000)]}, time.time())
held = {}
deadline = time.time() + 15
while len(held) < want and time.time() < deadline:
    now = time.time()
    for item in store.claim_due(now):
        held[item.trace.trace_id] = now + lease
    time.sleep(0.02)
if extra:
    assert store.reserve_signals([(extra[1], extra[0])]) == [True]
print(json.dumps({"claimed": sorted(held), "lease_until": held}), flush=True)
time.sleep(3600)  # "deciding": killed with SIGKILL by the test
"""


def _admin_traces(n: int, run: str) -> list[tuple[str, list[Spec], list[Spec], bool]]:
    """n decision-path traces (half violating): (trace id, spans for A, spans for B, violates).
    A violating trace has its admin.action on A only; a clean one its audit.log on B."""
    out = []
    for i in range(n):
        violates = i % 2 == 0
        out.append((trace_id_for(i, run), [("admin.action", {"user_id": f"u-{i}"})],
                    [("db.query", {})] if violates else [("audit.log", {})], violates))
    return out


def _send_batch(client: Client, traces: list[tuple[str, list[Spec]]]) -> None:
    """All in one request, so everything is appended together (and due together)."""
    request = trace_service_pb2.ExportTraceServiceRequest()
    for trace_id, specs in traces:
        request.resource_spans.extend(pb_request(trace_id, specs).resource_spans)
    assert client.send(request) == [grpc.StatusCode.OK]


def _epoch(text: str) -> float:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def test_traces_claimed_by_a_decider_killed_mid_decision_are_decided_after_the_lease(
        redis_factory: Callable[..., RedisServer], serve: Callable[..., Serve],
        helpers: Callable[..., Proc], client: Callable[[int], Client]) -> None:
    server = redis_factory()
    feeder = serve(server.url).listening()
    traces = _admin_traces(10, "lease")
    # In two requests: a clean trace whole in one would be decided on arrival, never claimed.
    _send_batch(client(feeder.grpc_port), [(t, a) for t, a, _, _ in traces])
    _send_batch(client(feeder.grpc_port), [(t, b) for t, _, b, _ in traces])
    feeder.kill()  # acknowledged, due in 1s, undecided: only Redis has them now
    assert feeder.signal_lines() == []

    decider = helpers(server.url, "10", "2.0")
    claim = json.loads(decider.wait_for("claimed", stdout=True, timeout=20))
    assert claim["claimed"] == sorted(t for t, *_ in traces)
    decider.kill()  # holds 10 leases, decided nothing

    heir = serve(server.url).listening()
    expected = [(ADMIN, t) for t, _, _, violates in traces if violates]
    expect_exactly([feeder, heir], expected, traces=10)
    for found in heir.signal_lines():  # not before the dead decider's lease ran out
        assert _epoch(found["detected_at"]) >= claim["lease_until"][found["trace_id"]] - 0.001
    heir.clean_stderr()


def test_a_sidecar_killed_with_buffered_traces_leaves_them_to_another(
        redis_factory: Callable[..., RedisServer], serve: Callable[..., Serve],
        client: Callable[[int], Client]) -> None:
    server = redis_factory()
    doomed, survivor = serve(server.url), serve(server.url)
    doomed.listening()
    survivor.listening()
    traces = _admin_traces(10, "kill")
    to_survivor = client(survivor.grpc_port)
    for trace_id, _, spans, _ in traces:
        assert to_survivor.send(pb_request(trace_id, spans)) == [grpc.StatusCode.OK]
    _send_batch(client(doomed.grpc_port), [(t, a) for t, a, _, _ in traces])
    doomed.kill()
    assert doomed.signal_lines() == []
    expected = [(ADMIN, t) for t, _, _, violates in traces if violates]
    expect_exactly([doomed, survivor], expected, traces=10)
    survivor.clean_stderr()


def test_a_decider_killed_between_dedupe_and_emit_loses_no_signal(
        redis_factory: Callable[..., RedisServer], serve: Callable[..., Serve],
        helpers: Callable[..., Proc]) -> None:
    server = redis_factory()
    trace_id = trace_id_for(0, "sadd-window")
    decider = helpers(server.url, "1", "2.0", trace_id, ADMIN)
    try:
        claim = json.loads(decider.wait_for("claimed", stdout=True, timeout=20))
    except AssertionError as exc:
        pytest.fail(str(exc))  # not the gap this test is about
    if claim["claimed"] != [trace_id]:
        pytest.fail(f"helper claimed {claim}")
    decider.kill()  # marked (ADMIN, trace) as signalled, then died before writing anything
    heir = serve(server.url).listening()
    try:
        poll(lambda: heir.metric("betrace_traces_decided_total") == 1, 10, "the re-decision")
    except AssertionError as exc:
        pytest.fail(str(exc))  # not the gap this test is about
    time.sleep(0.3)
    assert found_signals([heir]) == [(ADMIN, trace_id)]


# --- 4: Redis down during a load --------------------------------------------------------------

def test_redis_outage_answers_unavailable_and_loses_nothing_acknowledged(
        redis_factory: Callable[..., RedisServer], serve: Callable[..., Serve],
        client: Callable[[int], Client]) -> None:
    # Persistent, fsync on every write: what Redis acknowledged survives a crash. (Without
    # persistence a restart loses every buffered span, however the sidecar behaves.)
    server = redis_factory("--appendonly", "yes", "--appendfsync", "always")
    sidecar = serve(server.url, "--decision-wait", "2s").listening()
    c = client(sidecar.grpc_port)
    expected: list[tuple[str, str]] = []

    def requests(first: int, last: int, run: str) -> list[Any]:
        out = []
        for i in range(first, last):
            trace_id = trace_id_for(i, run)
            specs, rules = plan(i)
            expected.extend((rule, trace_id) for rule in rules)
            out += [pb_request(trace_id, specs[:1]), pb_request(trace_id, specs[1:])]
        return out

    # Before: acknowledged, then Redis crashes well within the 2s decision wait.
    for request in requests(0, 12, "before"):
        assert c.send(request) == [grpc.StatusCode.OK]
    # Traces with their first half acknowledged before, the second half sent during the
    # outage: a new intent seen only once both halves are in.
    spanning = [trace_id_for(i, "spanning") for i in range(3)]
    for k, trace_id in enumerate(spanning):
        assert c.send(pb_request(trace_id, [("payment.charge", {
            "attempt": 1, "payment_intent_id": f"pi-{k}-a"})])) == [grpc.StatusCode.OK]
        expected.append((PAY, trace_id))
    server.process.kill()  # SIGKILL: a crash, no shutdown save
    server.process.wait(10)
    server.process = None
    before_outage = [(r, t) for r, t in found_signals([sidecar])]
    assert all(r == PAY for r, _ in before_outage)  # nothing was decided yet

    during = requests(12, 24, "during") + [
        pb_request(t, [("payment.charge", {"attempt": 2, "payment_intent_id": f"pi-{k}-b"})])
        for k, t in enumerate(spanning)]
    assert c.once(during[0]) == grpc.StatusCode.UNAVAILABLE
    codes: list[grpc.StatusCode] = []
    retrying = threading.Thread(target=lambda: [codes.extend(c.send(r)) for r in during],
                                name="retrying-client", daemon=True)
    retrying.start()
    status, body = sidecar.get("/readyz")
    assert status == 503 and "redis unreachable" in body, body
    poll(lambda: sidecar.metric("betrace_store_errors_total", operation="append") >= 2, 5,
         "store errors counted")
    assert sidecar.metric("betrace_export_requests_rejected_total", transport="grpc",
                          reason="unavailable") >= 2
    time.sleep(1.0)  # the outage goes on; the client keeps retrying
    assert retrying.is_alive()

    server.start()  # same port, same directory: the AOF is replayed
    poll(lambda: sidecar.get("/readyz")[0] == 200, 10, "/readyz 200 again")
    retrying.join(30)
    assert not retrying.is_alive()
    assert codes.count(grpc.StatusCode.OK) == len(during)
    assert grpc.StatusCode.UNAVAILABLE in codes

    for request in requests(24, 36, "after"):
        assert c.send(request) == [grpc.StatusCode.OK]
    expect_exactly([sidecar], expected, traces=None, timeout=20)
    sidecar.clean_stderr()


def test_sigterm_while_redis_is_down_exits_0_and_leaves_the_traces_in_redis(
        redis_factory: Callable[..., RedisServer], serve: Callable[..., Serve],
        client: Callable[[int], Client]) -> None:
    """A pod stopped during a Redis outage (a rollout, a node drain): the final decision pass
    cannot reach Redis, so the open traces stay there for the other sidecars (or this one,
    restarted); the sidecar still closes its outputs and exits 0. It used to die of the
    StoreUnavailable with a traceback and exit 1, its queued violation spans lost uncounted."""
    server = redis_factory("--appendonly", "yes", "--appendfsync", "always")
    sidecar = serve(server.url, "--decision-wait", "3s").listening()
    trace_id = trace_id_for(0, "sigterm")
    assert client(sidecar.grpc_port).send(pb_request(trace_id, [("admin.action", {})])) \
        == [grpc.StatusCode.OK]
    server.stop()
    sidecar.process.terminate()
    assert sidecar.process.wait(20) == 0, sidecar.stderr
    sidecar.close()
    assert "could not decide the buffered traces on the way out" in sidecar.stderr
    sidecar.clean_stderr()

    server.start()  # the AOF is replayed: the trace, undecided, is still there
    heir = serve(server.url).listening()
    expect_exactly([sidecar, heir], [(ADMIN, trace_id)], traces=None)


# --- 5: Redis Cluster --------------------------------------------------------------------------

def test_sidecars_on_a_redis_cluster_signal_exactly_once_without_crossslot(
        redis_cluster: list[RedisServer], serve: Callable[..., Serve],
        sdk_client: Callable[..., Any]) -> None:
    url = "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in redis_cluster)
    running = _split_run(url, 2, serve, sdk_client)

    nodes = [redis.Redis(port=n.port) for n in redis_cluster]
    kinds = check_ttls(nodes)
    assert kinds["s"] == 30 and kinds["g"] == 15
    where: dict[bytes, set[int]] = {}
    for index, node in enumerate(nodes):
        for key in node.scan_iter(count=1000):
            if WORDS_KEY.fullmatch(key) or key == FORMAT_KEY:  # no hash tag: read on its own
                continue
            tag = key.split(b"}")[0] + b"}"
            where.setdefault(tag, set()).add(index)
            slot = node.execute_command("CLUSTER", "KEYSLOT", key)
            assert slot == node.execute_command("CLUSTER", "KEYSLOT", tag.split(b"{")[1][:-1])
    assert all(len(holders) == 1 for holders in where.values()), where
    trace_tags = [t for t in where if TRACE_KEY.fullmatch(t + b":s")]
    assert len(trace_tags) == 30
    assert len({i for t in trace_tags for i in where[t]}) > 1  # traces spread over nodes
    for t in trace_tags[:5]:
        trace_id = t[4:-1].decode()
        keyslots = {nodes[0].execute_command("CLUSTER", "KEYSLOT", f"bt:{{{trace_id}}}:{k}")
                    for k in "sg"}
        assert len(keyslots) == 1
    for node in nodes:
        node.close()
    for p in running:
        p.clean_stderr()


# --- 6: every key expires ------------------------------------------------------------------------

def test_every_trace_key_has_a_ttl_and_only_shard_keys_have_none(
        redis_factory: Callable[..., RedisServer], serve: Callable[..., Serve],
        client: Callable[[int], Client]) -> None:
    server = redis_factory()
    sidecar = serve(server.url, "--decided-retention", "30s").listening()
    c = client(sidecar.grpc_port)
    decided = [trace_id_for(i, "decided") for i in range(6)]
    for i, trace_id in enumerate(decided):
        specs, _ = plan(i)
        assert c.send(pb_request(trace_id, specs)) == [grpc.StatusCode.OK]
    poll(lambda: sidecar.metric("betrace_traces_decided_total") == 6, 10, "decisions")
    # Traces appended through this one are due in 30s: they stay open while the keys are read.
    # (Started only now: a sidecar claiming a due trace applies its own decision wait.)
    slow = serve(server.url, "--decided-retention", "30s", "--decision-wait", "30s").listening()
    open_ones = [trace_id_for(i, "open") for i in range(6)]
    to_slow = client(slow.grpc_port)
    for i, trace_id in enumerate(open_ones):  # still open (early signals for some)
        specs, _ = plan(i)
        assert to_slow.send(pb_request(trace_id, specs)) == [grpc.StatusCode.OK]
    poll(lambda: sum(r == PAY for r, t in found_signals([sidecar, slow]) if t in open_ones)
         == 2, 5, "early signals on open traces")

    r = redis.Redis(port=server.port)
    kinds = check_ttls([r])
    assert kinds["s"] == 12 and kinds["g"] == 3 + 2
    for trace_id in decided:  # decided: kept for decided_retention (+1s), then gone
        assert 0 < r.ttl(f"bt:{{{trace_id}}}:s") <= 31
    for trace_id in open_ones:  # open: max_trace_age + retention + lease + 60s at most
        assert 31 < r.ttl(f"bt:{{{trace_id}}}:s") <= 300 + 30 + 2 + 60
    no_ttl = [key for key in r.scan_iter() if r.ttl(key) == -1]
    assert no_ttl and all(SHARD_KEY.fullmatch(key) or key == FORMAT_KEY for key in no_ttl)
    r.close()
    sidecar.clean_stderr()
    slow.clean_stderr()


def test_a_late_span_after_a_signal_does_not_signal_again_once_the_dedupe_ttl_ran_out(
        redis_factory: Callable[..., RedisServer], serve: Callable[..., Serve],
        client: Callable[[int], Client]) -> None:
    """A decided trace remembers its signals for decided_retention; a late span within it
    re-opens the trace, and the re-decision must stay quiet even if it comes after the
    retention of the first decision (the memory store keeps the memory of the signal)."""
    server = redis_factory()
    sidecar = serve(server.url, "--decision-wait", "3s", "--decided-retention", "3s").listening()
    c = client(sidecar.grpc_port)
    trace_id = trace_id_for(0, "late")
    assert c.send(pb_request(trace_id, [("admin.action", {})])) == [grpc.StatusCode.OK]
    poll(lambda: found_signals([sidecar]), 10, "the first signal")
    first = time.monotonic()
    # Late (2s after the first decision, within its 3s retention: re-opens it), then re-decided
    # 3s later, after the first decision's retention (+1s) has run out.
    time.sleep(2.0)
    assert c.send(pb_request(trace_id, [("admin.action", {})])) == [grpc.StatusCode.OK]
    poll(lambda: sidecar.metric("betrace_traces_decided_total") == 2, 10, "the re-decision")
    assert time.monotonic() - first > 4.5  # the timing this test is about
    assert sidecar.metric("betrace_late_spans_total") == 1
    time.sleep(0.3)
    assert found_signals([sidecar]) == [(ADMIN, trace_id)]


# --- 7: Redis not there yet ----------------------------------------------------------------

def test_serve_starts_without_redis_and_becomes_ready_when_it_comes(
        redis_factory: Callable[..., RedisServer], serve: Callable[..., Serve],
        client: Callable[[int], Client]) -> None:
    server = redis_factory(start=False)  # a port with nothing on it yet
    sidecar = serve(server.url).listening()
    status, body = sidecar.get("/readyz")
    assert status == 503 and "redis unreachable" in body, body
    assert sidecar.get("/healthz")[0] == 200
    c = client(sidecar.grpc_port)
    trace_id = trace_id_for(0, "late-redis")
    request = pb_request(trace_id, [("admin.action", {})])
    assert c.once(request) == grpc.StatusCode.UNAVAILABLE
    assert sidecar.metric("betrace_store_errors_total", operation="append") == 1

    server.start()
    poll(lambda: sidecar.get("/readyz")[0] == 200, 10, "/readyz 200")
    assert "redis ok" in sidecar.get("/readyz")[1]
    assert c.send(request) == [grpc.StatusCode.OK]
    expect_exactly([sidecar], [(ADMIN, trace_id)], traces=1)
    assert sidecar.process.poll() is None
    sidecar.clean_stderr()


def test_serve_starts_before_its_redis_cluster_and_becomes_ready_when_it_forms(
        serve: Callable[..., Serve], client: Callable[[int], Client]) -> None:
    ports = [free_port() for _ in range(3)]
    sidecar = serve("redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports)).listening()
    status, body = sidecar.get("/readyz")
    assert status == 503 and "redis unreachable" in body, body
    c = client(sidecar.grpc_port)
    trace_id = trace_id_for(0, "late-cluster")
    request = pb_request(trace_id, [("admin.action", {})])
    assert c.once(request) == grpc.StatusCode.UNAVAILABLE

    nodes = start_cluster(3, ports)
    try:
        poll(lambda: sidecar.get("/readyz")[0] == 200, 10, "/readyz 200")
        assert c.send(request) == [grpc.StatusCode.OK]
        expect_exactly([sidecar], [(ADMIN, trace_id)], traces=1)
        sidecar.clean_stderr()
    finally:
        sidecar.close()
        for node in nodes:
            node.cleanup()


def test_a_store_error_while_scheduling_does_not_stop_deciding(
        redis_factory: Callable[..., RedisServer], serve: Callable[..., Serve],
        client: Callable[[int], Client]) -> None:
    """Any store error in the decide loop (here: Redis refusing the ZRANGE that finds the next
    deadline) is counted and retried; the decide thread must not die of it."""
    server = redis_factory()
    sidecar = serve(server.url).listening()
    admin = redis.Redis(port=server.port)
    admin.execute_command("ACL", "SETUSER", "default", "-zrange")
    try:
        poll(lambda: "no permissions to run the 'zrange'" in sidecar.stderr, 5,
             "the refused ZRANGE")
        time.sleep(0.3)
    finally:
        admin.execute_command("ACL", "SETUSER", "default", "+zrange")
        admin.close()
    c = client(sidecar.grpc_port)
    trace_id = trace_id_for(0, "acl")
    assert c.send(pb_request(trace_id, [("admin.action", {})])) == [grpc.StatusCode.OK]
    expect_exactly([sidecar], [(ADMIN, trace_id)], traces=1, timeout=8)
    assert sidecar.metric("betrace_store_errors_total", operation="decide") >= 1
    sidecar.clean_stderr()
