"""Benchmark: BeTrace beside the collector's own tail sampling, on bench/ingest.py's workloads.

    .venv/bin/python bench/collector.py [--seconds S] [--rounds R] [--requests N]
                                        [--memory-spans N] [--latency-traces N]

Every configuration is a real OpenTelemetry Collector (deploy/otelcol, v0.161.0, found or built
by deploy/build.sh) on free loopback ports, loaded by this process over OTLP gRPC with the
pre-serialized 512-span requests of bench/ingest.py: workload A (every span has a name the rule
selects) and B (10% do), the pool cycled with a fresh trace-id prefix per pass. Every pipeline
ends in batch (its defaults: 8192 spans or 200 ms) -> debug exporter (verbosity basic: a log line
per batch), the same sink everywhere:

  (0) collector       otlp -> batch -> debug: the baseline the differences below are taken from.
  (ii) tail_sampling  otlp -> tail_sampling -> batch -> debug, one ottl_condition policy,
                      sampling_strategy trace-complete (the default: a trace is decided on the
                      1 s tick after decision_wait).
  (ii') span-ingest   the same, sampling_strategy span-ingest: each request's spans are judged
                      as they come; a match samples the trace at once, the rest are held for
                      decision_wait and then dropped.
  (i) BeTrace         (0) plus the chart's otlp_grpc/betrace exporter (uncompressed, as the chart
                      sets it: loopback; retries; a sending queue of 4 consumers, here 8 batches
                      deep with block_on_overflow, so a slow sidecar slows the sender rather than
                      filling a queue for minutes) to `python -m sidecar serve` with the one rule.
  (i') gzip           (i) with the exporter's default `compression: gzip`, which the chart used
                      before this benchmark showed what it costs on loopback.
The rule and the policy are one predicate derived from the workloads: a span named one of the 8
names they select, with status ERROR and code.lineno < 20 (2.6% of A's traces, 0.3% of B's).
BeTrace: `NAME.where(status == ERROR and code.lineno < 20) or ...` over the 8 names (monotone: it
signals as soon as a trace matches); OTTL: `span.status.code == STATUS_CODE_ERROR and
span.attributes["code.lineno"] < 20 and (span.name == "..." or ...)` (the tests that fail most
often first). Both wait DECISION_WAIT (2 s) and hold at most NUM_TRACES
(100,000) traces (tail_sampling num_traces, betrace --max-traces).

Figures, per workload and configuration, in one run:

  spans/s       as fast as the pipeline takes them (4 requests in flight), S seconds after
                DECISION_WAIT + 1 s of the same load (so deciding runs throughout): spans per
                second the deciding stage took (the collector's otelcol_receiver_accepted_spans;
                BeTrace: the sidecar's betrace_spans_received_total).
  CPU s/Mspan   at one offered rate for every configuration of a workload (LOAD of the slowest
                one's spans/s, so that every one keeps up), S seconds after the same warm-up:
                utime+stime (/proc/<pid>/stat, all threads) of each process over the window, per
                million spans offered, for the whole configuration (collector + sidecar).
  deciding      the same minus (0)'s collector at that rate: tail_sampling: collector(ii) -
                collector(0); BeTrace: sidecar + collector(i) - collector(0), the collector's
                extra work being the export to the sidecar. With --rounds R each configuration
                runs R times, interleaved, and each process's median is used. After each run
                the traces sampled (count_traces_sampled, decision=sampled) or signalled (lines
                in --signals-out) are checked against the count this script computes from the
                requests it sent.
  x tail        deciding / tail_sampling's deciding. The goals (issue 14): BeTrace <= 1x on B,
                <= 1.5x on A; the summary also gives the ratios for (i') and to span-ingest.
  RSS MiB       VmRSS summed over the configuration's processes at the end of the CPU window
                (the median over rounds): what the steady state at that rate holds.
  B/held span   with decision_wait 10 min (and betrace --max-trace-age 20 min), after 2 warm-up
                requests, --memory-spans spans sent at the CPU part's rate while no trace falls
                due: (the configuration's VmRSS growth - (0)'s growth under the same sending) /
                spans sent. tail_sampling holds every span; BeTrace the projection of the spans its
                rule selects, on a trace decided on arrival too (until its would-be deadline
                plus --decided-retention, to judge late spans with it).
  latency       one-trace requests (an http.request, and an auth.check that matches) at 20/s to
                an otherwise idle pipeline: from Export returning here (the collector accepted
                the trace's last span) to the sampled trace reaching an OTLP receiver in this
                process (it replaces debug as the sink for this part), or to the signal's line
                in --signals-out (BeTrace).

Absolute figures follow the host (2 shared cores); the ratios are the point. Each run prints the
cores other processes used during its window, and the summary warns when that exceeded 0.1. Every
process started here is stopped at the end of its part, also on Ctrl-C or an error.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import ingest
from ingest import (
    CONCURRENCY,
    EXPORT,
    SELECTED,
    SPANS_PER_REQUEST,
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
    Sidecar,
    free_port,
    kv,
    make_pool,
    request_bytes,
    scrape,
    serialize,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

ROOT = Path(__file__).resolve().parent.parent
DECISION_WAIT = 2  # seconds, both deciders (tail_sampling decides on a 1 s tick)
HOLD_WAIT = 600  # seconds: the memory part, while nothing falls due
NUM_TRACES = 100_000  # tail_sampling num_traces = betrace --max-traces
LINENO = 20  # the predicate: status ERROR and code.lineno below this, on a selected name
LOAD = 0.5  # the CPU part's offered rate, as a share of the slowest sustained rate
RULE_ID, POLICY = "bench-failed-here", "failed-here"
ERROR = Status.STATUS_CODE_ERROR


def rule_yaml() -> str:
    """The one BeTrace rule: a trace violates when one of its spans matches the predicate."""
    where = f"status == ERROR and code.lineno < {LINENO}"
    terms = "\n      or ".join(f"{name}.where({where})" for name in SELECTED)
    return f"rules:\n  - id: {RULE_ID}\n    condition: >-\n      {terms}\n"


def ottl_condition() -> str:
    """The same predicate in OTTL, tail_sampling's ottl_condition (a span matching samples)."""
    names = " or ".join(f'span.name == "{name}"' for name in SELECTED)
    return (f'span.status.code == STATUS_CODE_ERROR and span.attributes["code.lineno"] < {LINENO}'
            f" and ({names})")


def matching_traces(body: bytes) -> tuple[int, int]:
    """(traces of one request the rule and the policy must pick, its traces), computed here."""
    found, traces = set(), set()
    for rs in ExportTraceServiceRequest.FromString(body).resource_spans:
        for ss in rs.scope_spans:
            for span in ss.spans:
                traces.add(span.trace_id)
                if span.name in SELECTED and span.status.code == ERROR and any(
                        a.key == "code.lineno" and a.value.WhichOneof("value") == "int_value"
                        and a.value.int_value < LINENO for a in span.attributes):
                    found.add(span.trace_id)
    return len(found), len(traces)


@dataclass(frozen=True)
class Config:
    key: str
    label: str
    strategy: str | None = None  # tail_sampling's sampling_strategy; None: no tail_sampling
    sidecar: bool = False
    compression: str = "none"  # otlp_grpc/betrace's, as the chart sets it


BASELINE = Config("collector", "(0) collector alone")
TAIL = Config("tail", "(ii) tail_sampling", strategy="trace-complete")
INGEST = Config("ingest", "(ii') tail_sampling span-ingest", strategy="span-ingest")
BETRACE = Config("betrace", "(i) BeTrace sidecar", sidecar=True)
GZIP = Config("gzip", "(i') BeTrace, gzip", sidecar=True, compression="gzip")
CONFIGS = (BASELINE, TAIL, INGEST, BETRACE, GZIP)
DECIDERS = (TAIL, INGEST, BETRACE)  # the memory and latency parts (GZIP's equal BETRACE's)


def otelcol_binary() -> str:
    """deploy/build.sh prints the cached binary (building it once, minutes, if it is not)."""
    out = subprocess.run(["bash", str(ROOT / "deploy" / "build.sh"), "otelcol"], check=True,
                         capture_output=True, text=True, stdin=subprocess.DEVNULL).stdout
    return out.strip().splitlines()[-1]


def collector_config(config: Config, port: int, metrics_port: int, wait: float,
                     sidecar_port: int | None, sink_port: int | None) -> dict:
    """The collector's configuration (written as JSON, which is YAML)."""
    processors: dict = {"batch": {}}
    names = ["batch"]
    if config.strategy:
        processors["tail_sampling"] = {
            "decision_wait": f"{wait:g}s", "num_traces": NUM_TRACES,
            "sampling_strategy": config.strategy,
            "policies": [{"name": POLICY, "type": "ottl_condition", "ottl_condition": {
                "error_mode": "ignore", "span": [ottl_condition()]}}]}
        names = ["tail_sampling", "batch"]
    exporters: dict = {}
    if sink_port is None:
        exporters["debug"] = {"verbosity": "basic"}
    else:  # the latency part: sampled traces come back to this process
        exporters["otlp_grpc/sink"] = {"endpoint": f"127.0.0.1:{sink_port}", "tls": {"insecure": True}}
    if sidecar_port is not None:  # as the chart's otlp_grpc/betrace, with a short blocking queue
        exporters["otlp_grpc/betrace"] = {
            "endpoint": f"127.0.0.1:{sidecar_port}", "tls": {"insecure": True},
            "compression": config.compression,
            "retry_on_failure": {"enabled": True, "initial_interval": "1s",
                                 "max_interval": "30s", "max_elapsed_time": "10m"},
            "sending_queue": {"enabled": True, "num_consumers": 4, "queue_size": 8,
                              "block_on_overflow": True}}
    return {
        "receivers": {"otlp": {"protocols": {"grpc": {"endpoint": f"127.0.0.1:{port}"}}}},
        "processors": processors,
        "exporters": exporters,
        "service": {
            "telemetry": {"logs": {"level": "warn"}, "metrics": {"level": "normal", "readers": [
                {"pull": {"exporter": {"prometheus": {"host": "127.0.0.1",
                                                      "port": metrics_port}}}}]}},
            "pipelines": {"traces": {"receivers": ["otlp"], "processors": names,
                                     "exporters": list(exporters)}}},
    }


def busy_seconds() -> float:
    """CPU seconds every process on the host has used (the busy fields of /proc/stat)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def total(metrics: dict[str, float], name: str, **labels: str) -> float:
    """The sum of a metric's series that carry every given label value."""
    want = [f'{key}="{value}"' for key, value in labels.items()]
    return sum(value for key, value in metrics.items()
               if key.split("{")[0] == name and all(w in key for w in want))


class Pipeline:
    """One configuration's processes: the collector and, for BeTrace, `betrace serve` behind it.
    `export` is a raw-bytes Export stub for the collector's receiver."""

    def __init__(self, tmp: Path, otelcol: str, config: Config, wait: float,
                 sink_port: int | None = None) -> None:
        self.config = config
        self.sidecar: Sidecar | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.channel: grpc.Channel | None = None
        try:
            if config.sidecar:
                self.sidecar = Sidecar(tmp, "--decision-wait", f"{wait:g}s", "--max-trace-age",
                                       f"{max(300, 2 * wait):g}s", "--max-traces",
                                       str(NUM_TRACES), rules="one.yaml")
            port, self.metrics_port = free_port(), free_port()
            path = tmp / f"otelcol-{port}.yaml"
            path.write_text(json.dumps(collector_config(
                config, port, self.metrics_port, wait,
                self.sidecar.grpc_port if self.sidecar else None, sink_port), indent=1))
            self.log = tmp / f"otelcol-{port}.log"
            with open(self.log, "wb") as log:
                self.proc = subprocess.Popen([otelcol, "--config", str(path)], cwd=ROOT,
                                             stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=subprocess.STDOUT)
            ingest.wait_answering(self.metrics, self.proc, self.log, "otelcol")
            self.channel = grpc.insecure_channel(f"127.0.0.1:{port}",
                                                 [("grpc.max_send_message_length", 1 << 26)])
            self.export = self.channel.unary_unary(
                EXPORT, request_serializer=None,
                response_deserializer=ExportTraceServiceResponse.FromString)
            grpc.channel_ready_future(self.channel).result(timeout=10)
        except BaseException:
            self.close()
            raise

    def metrics(self) -> dict[str, float]:
        return scrape(f"http://127.0.0.1:{self.metrics_port}/metrics")

    def pids(self) -> dict[str, int]:
        assert self.proc is not None
        pids = {"collector": self.proc.pid}
        if self.sidecar:
            pids["sidecar"] = self.sidecar.proc.pid
        return pids

    def cpu(self) -> dict[str, float]:
        return {name: ingest.cpu_seconds(pid) for name, pid in self.pids().items()}

    def rss(self) -> dict[str, int]:
        return {name: ingest.rss(pid) for name, pid in self.pids().items()}

    def taken(self) -> float:
        """Spans the deciding stage has taken: the sidecar's count, else the receiver's."""
        if self.sidecar:
            return self.sidecar.received()
        return total(self.metrics(), "otelcol_receiver_accepted_spans")

    def sampled(self) -> int:
        """Traces sampled (tail_sampling) or signalled (BeTrace) so far."""
        if self.sidecar:
            return sum(1 for line in self.sidecar.signals.read_text().splitlines()
                       if json.loads(line)["rule_id"] == RULE_ID)
        return int(total(self.metrics(), "otelcol_processor_tail_sampling_count_traces_sampled",
                         decision="sampled"))

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.sidecar is not None:
            self.sidecar.close(drain=False)  # the figures are read: deciding the rest is waste


def paced(target: Pipeline, pool: list[bytes], first: int, rate: float,
          seconds: float) -> tuple[int, float]:
    """Requests first, first+1, ... each sent at its time for `rate` spans/s over `seconds`,
    from CONCURRENCY threads (a slow reply delays no other); returns (spans accepted, wall)."""
    interval, index = SPANS_PER_REQUEST / rate, itertools.count(first)
    started = time.perf_counter()

    def worker(_: int) -> int:
        accepted = 0
        while True:
            i = next(index)
            due = started + (i - first) * interval
            if due - started >= seconds:
                return accepted
            time.sleep(max(0.0, due - time.perf_counter()))
            reply = target.export(request_bytes(pool, i), timeout=120)
            accepted += SPANS_PER_REQUEST - reply.partial_success.rejected_spans

    with ThreadPoolExecutor(CONCURRENCY) as workers:
        spans = sum(workers.map(worker, range(CONCURRENCY)))
    return spans, time.perf_counter() - started


@dataclass
class Run:
    """One configuration under one load: what its window measured."""

    spans: int  # accepted by the collector in the window
    wall: float
    taken: float  # by the deciding stage in the window (see Pipeline.taken)
    cpu: dict[str, float]  # CPU seconds per process over the window
    rss: int  # bytes, summed over the processes at the end of the window
    others: float  # cores that processes other than these and this one used meanwhile
    sampled: int = 0  # traces sampled / signalled in the whole run, once decided
    expected: int = 0  # ... as computed here from what was sent
    notes: list[str] = field(default_factory=list)

    def per_mspan(self, name: str) -> float:
        return self.cpu.get(name, 0.0) / self.spans * 1e6


def load(tmp: Path, otelcol: str, config: Config, pool: list[bytes], matches: list[int],
         rate: float | None, seconds: float) -> Run:
    """DECISION_WAIT + 1 s of warm-up, then `seconds` measured; at `rate` spans/s, or as fast as
    taken (None). At a rate, then waits for every trace's decision and counts the samples."""
    def send(first: int, secs: float) -> tuple[int, float]:
        if rate is None:
            return ingest.send(p, pool, first, seconds=secs)
        return paced(p, pool, first, rate, secs)

    with contextlib.closing(Pipeline(tmp, otelcol, config, DECISION_WAIT)) as p:
        warm, _ = send(0, DECISION_WAIT + 1.0)
        first = warm // SPANS_PER_REQUEST
        taken0, cpu0, host0, own0 = p.taken(), p.cpu(), busy_seconds(), sum(os.times()[:2])
        spans, wall = send(first, seconds)
        taken1, cpu1, host1, own1 = p.taken(), p.cpu(), busy_seconds(), sum(os.times()[:2])
        cpu = {k: cpu1[k] - cpu0[k] for k in cpu0}
        others = (host1 - host0 - (own1 - own0) - sum(cpu.values())) / wall
        run = Run(spans, wall, taken1 - taken0, cpu, sum(p.rss().values()), max(0.0, others))
        if rate is not None and (config.strategy or config.sidecar):
            sent = first + spans // SPANS_PER_REQUEST
            run.expected = sum(matches[i % len(pool)] for i in range(sent))
            deadline = time.monotonic() + DECISION_WAIT + 3.0  # the last tick, batch, export
            while p.sampled() < run.expected and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(0.5)  # a surplus would show now
            run.sampled = p.sampled()
        if config.strategy:
            early = total(p.metrics(),
                          "otelcol_processor_tail_sampling_sampling_trace_dropped_too_early")
            if early:
                run.notes.append(f"{early:,.0f} traces dropped too early (num_traces)")
        if p.sidecar:
            evicted = total(p.sidecar.metrics(), "betrace_traces_decided_total",
                            reason="evicted")
            if evicted:
                run.notes.append(f"{evicted:,.0f} traces decided early (max_traces)")
        return run


def memory(tmp: Path, otelcol: str, config: Config, pool: list[bytes], spans: int,
           rate: float) -> tuple[dict[str, int], int]:
    """(RSS growth per process, spans sent) while `spans` are sent at `rate` and nothing falls
    due (paced: sent as fast as taken, a collector would also grow by what it queues for a
    slower sidecar, and a Go heap keeps its peak)."""
    with contextlib.closing(Pipeline(tmp, otelcol, config, HOLD_WAIT)) as p:
        ingest.send(p, pool, 0, count=2)  # warm-up: first-request allocations are not per span
        time.sleep(1.0)
        rss0 = p.rss()
        sent, _ = paced(p, pool, 2, rate, spans / rate)
        deadline = time.monotonic() + 30
        while p.sidecar and p.taken() < sent + 2 * SPANS_PER_REQUEST \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.5)  # the batch timeout, the sidecar's last request
        rss1 = p.rss()
    return {name: rss1[name] - rss0[name] for name in rss0}, sent


class Sink:
    """An OTLP gRPC receiver in this process: when each trace id first arrived."""

    def __init__(self) -> None:
        self.seen: dict[str, float] = {}
        self.server = grpc.server(ThreadPoolExecutor(4))
        handler = grpc.unary_unary_rpc_method_handler(
            self._export, request_deserializer=ExportTraceServiceRequest.FromString,
            response_serializer=ExportTraceServiceResponse.SerializeToString)
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            "opentelemetry.proto.collector.trace.v1.TraceService", {"Export": handler})])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def _export(self, request: ExportTraceServiceRequest,
                context: grpc.ServicerContext) -> ExportTraceServiceResponse:
        now = time.perf_counter()
        for rs in request.resource_spans:
            for ss in rs.scope_spans:
                for span in ss.spans:
                    self.seen.setdefault(span.trace_id.hex(), now)
        return ExportTraceServiceResponse()

    def close(self) -> None:
        self.server.stop(grace=None)


def tail_signals(path: Path, seen: dict[str, float], done: threading.Event) -> None:
    """Record when each signal's line appears in the --signals-out file (0.5 ms polling)."""
    with open(path) as log:
        line = ""
        while not done.is_set():
            line += log.readline()
            if not line.endswith("\n"):
                time.sleep(0.0005)
                continue
            signal, line = json.loads(line), ""
            seen.setdefault(signal["trace_id"], time.perf_counter())


def latency_bodies(n: int) -> dict[str, bytes]:
    """n one-trace requests: an http.request (not matching) and an auth.check that matches."""
    bodies = {}
    for i in range(n):
        trace_id = bytes.fromhex("1a7e") + i.to_bytes(14, "big")
        now = time.time_ns()
        root = Span(trace_id=trace_id, span_id=(2 * i + 1).to_bytes(8, "big"),
                    name="http.request", kind=Span.SPAN_KIND_SERVER,
                    start_time_unix_nano=now, end_time_unix_nano=now + 10**7,
                    attributes=[kv("code.lineno", 500)], status=Status(code=1))
        child = Span(trace_id=trace_id, span_id=(2 * i + 2).to_bytes(8, "big"),
                     parent_span_id=root.span_id, name="auth.check", kind=Span.SPAN_KIND_CLIENT,
                     start_time_unix_nano=now, end_time_unix_nano=now + 10**6,
                     attributes=[kv("code.lineno", 7)], status=Status(code=ERROR))
        bodies[trace_id.hex()] = serialize({"edge": [root, child]})
    return bodies


def latency(tmp: Path, otelcol: str, config: Config, n: int,
            rate: float = 20.0) -> tuple[list[float], int]:
    """Milliseconds from Export returning to the trace's sample or signal; how many never came."""
    bodies = latency_bodies(n)
    returned: dict[str, float] = {}
    sink = None if config.sidecar else Sink()
    seen: dict[str, float] = sink.seen if sink else {}
    done = threading.Event()
    tailer = None
    try:
        with contextlib.closing(Pipeline(tmp, otelcol, config, DECISION_WAIT,
                                         sink_port=sink.port if sink else None)) as p:
            if p.sidecar:
                tailer = threading.Thread(target=tail_signals, args=(p.sidecar.signals, seen,
                                                                     done), daemon=True)
                tailer.start()
            started = time.perf_counter()
            for k, (trace_id, body) in enumerate(bodies.items()):
                time.sleep(max(0.0, started + k / rate - time.perf_counter()))
                p.export(body, timeout=10)
                returned[trace_id] = time.perf_counter()
            deadline = time.perf_counter() + DECISION_WAIT + 5
            while len(seen) < n and time.perf_counter() < deadline:
                time.sleep(0.01)
    finally:
        done.set()
        if tailer:
            tailer.join()
        if sink:
            sink.close()
    found = [(seen[t] - returned[t]) * 1000 for t in bodies if t in seen]
    return found, n - len(found)


def median_cpu(runs: list[Run], name: str) -> float:
    """The median over rounds of one process's CPU seconds per million spans."""
    return statistics.median(run.per_mspan(name) for run in runs)


def show(config: Config, what: str, run: Run) -> None:
    cpu = ", ".join(f"{k} {run.per_mspan(k):.2f}" for k in run.cpu)
    check = f"; sampled {run.sampled:,} of {run.expected:,} expected" \
        f"{'' if run.sampled == run.expected else ' (DIFFERENT)'}" if run.expected else ""
    print(f"{config.label:<34} {what}: {run.taken / run.wall:>9,.0f} spans/s taken "
          f"({run.spans / run.wall:,.0f} accepted by the collector); CPU s/Mspan {cpu}; RSS "
          f"{run.rss / 2**20:,.0f} MiB; other processes {run.others:.2f} cores{check}"
          + "".join(f"; {note}" for note in run.notes), flush=True)


def workload(tmp: Path, otelcol: str, label: str, pool: list[bytes],
             args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Every figure of one workload, by configuration key."""
    counted = [matching_traces(body) for body in pool]
    matches = [picked for picked, _ in counted]
    print(f"\n== workload {label}: the rule and the policy must pick {sum(matches):,} of the "
          f"pool's {sum(n for _, n in counted):,} traces", flush=True)
    out: dict[str, dict[str, float]] = {c.key: {} for c in CONFIGS}
    for config in CONFIGS:
        run = load(tmp, otelcol, config, pool, matches, None, args.seconds)
        out[config.key]["sustained"] = run.taken / run.wall
        out[config.key]["others"] = run.others
        show(config, "as fast as taken", run)
    rate = LOAD * min(figures["sustained"] for figures in out.values())
    rate = max(SPANS_PER_REQUEST, round(rate / 1000) * 1000)
    print(f"CPU part at {rate:,.0f} spans/s offered ({LOAD:.0%} of the slowest), "
          f"{args.rounds} round(s)", flush=True)
    runs: dict[str, list[Run]] = {c.key: [] for c in CONFIGS}
    for number in range(args.rounds):
        for config in CONFIGS:
            run = load(tmp, otelcol, config, pool, matches, rate, args.seconds)
            runs[config.key].append(run)
            show(config, f"round {number + 1}", run)
    base = median_cpu(runs["collector"], "collector")
    for config in CONFIGS:
        figures, mine = out[config.key], runs[config.key]
        collector = median_cpu(mine, "collector")
        sidecar = median_cpu(mine, "sidecar") if config.sidecar else 0.0
        figures["rate"] = rate
        figures["whole"] = collector + sidecar
        figures["deciding"] = collector - base + sidecar
        figures["sidecar"], figures["extra"] = sidecar, collector - base
        figures["steady_rss"] = statistics.median(run.rss for run in mine)
        figures["matched"] = float(all(r.sampled == r.expected for r in mine))
        figures["others"] = max(figures["others"], *(run.others for run in mine))
    grown: dict[str, int] = {}
    for config in (BASELINE, *DECIDERS):
        growth, sent = memory(tmp, otelcol, config, pool, args.memory_spans, rate)
        grown[config.key] = sum(growth.values())
        parts = ", ".join(f"{k} +{v / 2**20:.1f} MiB" for k, v in growth.items())
        held = ""
        if config is not BASELINE:
            out[config.key]["rss"] = (grown[config.key] - grown["collector"]) / sent
            held = f": {out[config.key]['rss']:,.0f} bytes per span held beyond (0)'s growth"
        print(f"{config.label:<34} memory: {sent:,} spans sent, RSS {parts}{held}", flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="per measured window")
    parser.add_argument("--rounds", type=int, default=1,
                        help="runs of each configuration at the fixed rate (median per process)")
    parser.add_argument("--requests", type=int, default=200, help="distinct requests per pool")
    parser.add_argument("--memory-spans", type=int, default=100_000)
    parser.add_argument("--latency-traces", type=int, default=100)
    args = parser.parse_args()
    # `kill` too unwinds through every part's cleanup, as Ctrl-C does
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    started = time.perf_counter()
    otelcol = otelcol_binary()
    version = subprocess.run([otelcol, "--version"], check=True, capture_output=True,
                             text=True).stdout
    pools = {"A": make_pool(args.requests, 1.0, 1), "B": make_pool(args.requests, 0.1, 2)}
    print(f"{version.strip()} ({otelcol}); {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f}; {args.requests} requests x {SPANS_PER_REQUEST} spans per "
          f"workload; decision_wait {DECISION_WAIT}s, num_traces {NUM_TRACES:,}")
    print(f"rule: {' '.join(rule_yaml().split('>-')[1].split())}")
    print(f"OTTL: {ottl_condition()}")
    figures: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="betrace-bench-collector-") as name:
        tmp = Path(name)
        (tmp / "one.yaml").write_text(rule_yaml())
        for label, pool in pools.items():
            figures[label] = workload(tmp, otelcol, label, pool, args)
        print("\n== decision latency", flush=True)
        lat: dict[str, tuple[list[float], int]] = {}
        for config in DECIDERS:
            lat[config.key] = latency(tmp, otelcol, config, args.latency_traces)
            found, missing = lat[config.key]
            print(f"{config.label:<34} {len(found)} of {args.latency_traces}, min "
                  f"{min(found, default=0):.0f} ms, max {max(found, default=0):.0f} ms"
                  + (f", {missing} MISSING" if missing else ""), flush=True)
    report(figures, lat)
    print(f"\ntotal {time.perf_counter() - started:.0f}s")
    return 0


def report(figures: dict[str, dict[str, dict[str, float]]],
           lat: dict[str, tuple[list[float], int]]) -> None:
    """The summary table, the ratios and the goals."""
    def quantiles(found: list[float]) -> str:
        if len(found) < 2:
            return "-"
        q = statistics.quantiles(found, n=100, method="inclusive")
        return f"{q[49]:,.0f} / {q[98]:,.0f} ms"

    print(f"\n{'configuration':<36}{'spans/s':>9}{'CPU s/Mspan':>13}{'deciding':>10}"
          f"{'x tail':>8}{'RSS MiB':>9}{'B/held span':>13}   latency p50 / p99")
    for label, by_config in figures.items():
        print(f"{label}: CPU and RSS MiB at {by_config['collector']['rate']:,.0f} spans/s")
        tail = by_config["tail"]["deciding"]
        for config in CONFIGS:
            f = by_config[config.key]
            deciding = "-" if config is BASELINE else f"{f['deciding']:.2f}"
            x_tail = "-" if config is BASELINE else f"{f['deciding'] / tail:.2f}x"
            held = f"{f['rss']:,.0f}" if "rss" in f else "-"
            latency_text = quantiles(lat[config.key][0]) if config.key in lat else "-"
            print(f"  {config.label:<34}{f['sustained']:>9,.0f}{f['whole']:>13.2f}"
                  f"{deciding:>10}{x_tail:>8}{f['steady_rss'] / 2**20:>9,.0f}{held:>13}   "
                  f"{latency_text}")
    print()
    for label, limit in (("B", 1.0), ("A", 1.5)):
        f = figures[label]
        ratio = f["betrace"]["deciding"] / f["tail"]["deciding"]
        print(f"goal {label}: BeTrace's deciding CPU per span <= {limit:g}x tail_sampling's: "
              f"{ratio:.2f}x, {'met' if ratio <= limit else 'NOT met'} (with gzip "
              f"{f['gzip']['deciding'] / f['tail']['deciding']:.2f}x; against span-ingest "
              f"{f['betrace']['deciding'] / f['ingest']['deciding']:.2f}x and "
              f"{f['gzip']['deciding'] / f['ingest']['deciding']:.2f}x)")
    for label, f in figures.items():
        print(f"{label}: BeTrace's deciding CPU s/Mspan = sidecar + the collector's extra: "
              + "; ".join(f"{c.label.split(' ', 1)[0]} {f[c.key]['sidecar']:.2f} + "
                          f"{f[c.key]['extra']:.2f}" for c in (BETRACE, GZIP)))
    busiest = max(f["others"] for by_config in figures.values() for f in by_config.values())
    if busiest > 0.1:
        print(f"!!! WARNING: other processes used up to {busiest:.2f} cores during a measured "
              "window: the figures are noisy (each run's share is printed above)")
    for label, f in figures.items():
        if not all(f[c.key]["matched"] for c in CONFIGS if c is not BASELINE):
            print(f"!!! workload {label}: a configuration sampled a different number of traces "
                  "than the rule picks (see the rounds above)")


if __name__ == "__main__":
    sys.exit(main())
