"""Benchmark: `betrace replay` over a month of OmniCart traces, against just parsing the files.

    .venv/bin/python bench/replay.py [--traces N] [--format json|proto|both] [--dir DIR]
                                     [--keep] [--jobs J] [--seed S] [--rotate-mb M]
                                     [--verify] [--no-replay]

The whitepaper's headline: 3.2M payment traces, 7,147 of them violating payment-retry-idempotency,
found in 30 seconds. This script makes that data and times it.

Data, shaped as two OpenTelemetry Collectors' file exporters write it over 29 days:
  N payment traces  POST /checkout (checkout, SERVER) -> order.create (orders) -> payment.charge
                    (payments, CLIENT) x attempts. 20% retry (the retry reuses its
                    payment_intent_id), 1% are split payments (two intents, no retry: must not
                    fire), and exactly round(7147 * N / 3.2M) (at least 1) retry under a new intent.
                    Every span carries service.version: v2.14.0, or the bad deploy v2.15.0 (35%
                    of traffic from day 19 on), which carries 85% of the violations.
  unrelated         0.3 * N traces (GET /catalog, /product/{id}, /search, /cart) no rule selects.
  how it arrives    spans are exported when they end (children before parents) by each service's
                    pod to one of 2 collectors, so most traces have spans in both collectors'
                    files; a collector batches 200-512 spans per ExportTraceServiceRequest, one
                    ResourceSpans per (service, version), and rotates its file past --rotate-mb
                    (100: the exporter's max_megabytes default), so traces straddle files in time.
  formats           json: one ExportTraceServiceRequest per line (the exporter's `format: json`);
                    proto: each marshaled request preceded by its length as a 4-byte big-endian
                    uint32 (`format: proto`; exportMessageAsBuffer in the fileexporter's
                    file_writer.go, and its README's "File Format").
Generation is deterministic (--seed) and cached in --dir keyed by N, seed, rotation size and the
generator's version; --keep leaves it there for the next run (without it, what this run generated
is deleted at the end). The injected violating trace ids are recorded next to the data.

Figures, per format, in one run:
  read only         wall time to read every byte of the files once (this also warms the page
                    cache, so the passes below all read from memory).
  parse-only        orjson.loads of every JSON line, and ExportTraceServiceRequest.FromString
                    of every proto frame, nothing else; in this process, and over J processes.
  decode-only       replay's own reader (sidecar.replay.sources.read_source) with replay's own
                    span filter for the rule, every batch dropped: the decoding replay does,
                    without grouping, spilling or evaluating; in this process and over J.
  replay            `betrace replay` with only payment-retry-idempotency (from rules/payments.yaml),
                    --format jsonl --out FILE --group-by service.version, with --jobs 1 and (when
                    J > 1) --jobs J, as a subprocess: wall time, spans/s, CPU, the peak RSS of
                    its largest process, the ratios to the passes above, the parallel efficiency
                    (jobs-1 wall / (J x jobs-J wall)), and its signals checked against the
                    injected ids (found / missed / extra).
Targets (issue 17), judged on the jobs-J replay: JSON wall <= 1.5x its J-process decode-only
pass; protobuf wall <= 1.5x its J-process parse-only pass; peak RSS <= 1 GB per process; and
30 s at N = 3.2M (scaled linearly at other N, where fixed start-up costs weigh more).
The exit status is 1 when a replay failed or reported anything but exactly the injected traces;
the targets are reported (PASS/FAIL) but do not change it.
--verify reads every proto frame back with the protobuf classes, compares it span by span with
the JSON line of the same batch, and recomputes the violating traces from the data.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import os
import platform
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cache
from pathlib import Path
from typing import Any

import orjson
import yaml
from google.protobuf.internal import api_implementation
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from sidecar.otlp.decoded import SpanFilter
from sidecar.otlp.json_spans import InputError
from sidecar.replay.runner import ReplayOptions, span_filter
from sidecar.replay.sources import read_source
from sidecar.rules import load_rules

ROOT = Path(__file__).resolve().parent.parent
GENERATOR = 2  # bump whenever the generated bytes change: it keys the cache
RULE_ID = "payment-retry-idempotency"
FULL_TRACES, FULL_VIOLATIONS, TARGET_SECONDS = 3_200_000, 7_147, 30.0
TARGET_RATIO, TARGET_RSS_MB = 1.5, 1024
MS, DAY = 10**6, 86_400 * 10**9
START = 1_738_368_000 * 10**9  # 2025-02-01T00:00:00Z
WINDOW = 29 * DAY
DEPLOY = START + 19 * DAY + 14 * 3600 * 10**9  # v2.15.0 rolls out to a canary share
GOOD, BAD, CANARY, BAD_SHARE = "v2.14.0", "v2.15.0", 0.35, 0.85
RETRY_SHARE, SPLIT_SHARE, UNRELATED_SHARE = 0.20, 0.01, 0.30
SLICES, COLLECTORS, BATCH = 8, 2, (200, 512)
INTERNAL, SERVER, CLIENT = 1, 2, 3
UNSET, ERROR = 0, 2
SUFFIX = {"json": ".json", "proto": ".pb"}

# A span: trace_id, span_id, parent_span_id (bytes), name, kind, start, end, status code, status
# message, service, version, constant attributes (cached encodings), variable attributes.
Rec = tuple[bytes, bytes, bytes, str, int, int, int, int, str, str, str,
            tuple[tuple[str, Any], ...], tuple[tuple[str, Any], ...]]
PSPS = (("stripe", "https://api.stripe.com/v1/payment_intents", "api.stripe.com"),
        ("adyen", "https://checkout-live.adyen.com/v71/payments", "checkout-live.adyen.com"))
AGENTS = ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) Mobile/15E148",
          "Mozilla/5.0 (Windows NT 10.0; Win64; x64) Chrome/122.0 Safari/537.36",
          "OmniCart/5.2 (Android 14)", "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_3) Safari/605.1")
SCOPES = {"checkout": ("opentelemetry.instrumentation.flask", "0.45b0"),
          "orders": ("io.opentelemetry.grpc-1.6", "2.1.0-alpha"),
          "payments": ("opentelemetry.instrumentation.requests", "0.45b0"),
          "frontend": ("@opentelemetry/instrumentation-http", "0.49.1"),
          "catalog": ("go.opentelemetry.io/contrib/instrumentation/net/http/otelhttp", "0.49.0"),
          "inventory": ("io.opentelemetry.jdbc", "2.1.0-alpha"),
          "search": ("io.opentelemetry.elasticsearch-rest-7.0", "2.1.0-alpha"),
          "cart": ("opentelemetry.instrumentation.redis", "0.45b0")}
LANGUAGES = {"checkout": "python", "orders": "java", "payments": "python", "frontend": "nodejs",
             "catalog": "go", "inventory": "java", "search": "java", "cart": "python"}
Child = tuple[str, str, int, tuple[tuple[str, Any], ...]]  # name, service, kind, attributes
UNRELATED: tuple[tuple[str, tuple[Child, ...]], ...] = (
    ("GET /catalog", (
        ("catalog.list", "catalog", INTERNAL, (("catalog.page_size", 48),)),
        ("db.query", "catalog", CLIENT, (("db.system", "postgresql"), ("db.name", "catalog"),
                                         ("db.operation", "SELECT"), ("db.sql.table", "products"))),
        ("cache.get", "catalog", CLIENT, (("db.system", "redis"), ("cache.hit", True))))),
    ("GET /product/{id}", (
        ("inventory.lookup", "inventory", CLIENT, (("rpc.system", "grpc"),
                                                   ("rpc.method", "Lookup"))),
        ("db.query", "inventory", CLIENT, (("db.system", "postgresql"), ("db.name", "stock"),
                                           ("db.operation", "SELECT"))))),
    ("GET /search", (
        ("search.query", "search", CLIENT, (("db.system", "elasticsearch"),
                                            ("search.index", "products-v7"))),)),
    ("GET /cart", (
        ("cache.get", "cart", CLIENT, (("db.system", "redis"), ("cache.hit", False))),
        ("db.query", "cart", CLIENT, (("db.system", "postgresql"), ("db.name", "carts"),
                                      ("db.operation", "SELECT"))))),
)


# --- encoding: the OTLP protobuf wire format by hand, OTLP JSON with orjson -------------------
# By hand, with the constant parts encoded once: the same bytes as SerializeToString() of the
# message classes at a sixth of the cost (3.8 vs 23 us per span); --verify parses every frame back.

VARINTS = [bytes([n]) if n < 128 else bytes([n & 0x7F | 0x80, n >> 7]) for n in range(1 << 14)]
FRAME, TIMES = struct.Struct(">I"), struct.Struct("<BQBQ")


def varint(n: int) -> bytes:
    if n < 16384:
        return VARINTS[n]
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def pb(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field."""
    return tag + varint(len(payload)) + payload


def pb_kv(tag: bytes, key: str, value: Any) -> bytes:
    """A KeyValue as field `tag` of its parent (Span.attributes is 9, Resource.attributes 1)."""
    kind, any_value = type(value), b""
    if kind is str:
        text = value.encode()
        any_value = b"\x0a" + varint(len(text)) + text
    elif kind is bool:
        any_value = b"\x10\x01" if value else b"\x10\x00"
    elif kind is int:  # non-negative only, which is all this generator makes
        any_value = b"\x18" + varint(value)
    else:
        any_value = b"\x21" + struct.pack("<d", value)
    body = pb_key(key) + b"\x12" + varint(len(any_value)) + any_value
    return tag + varint(len(body)) + body


@cache
def pb_key(key: str) -> bytes:
    return pb(b"\x0a", key.encode())


def json_kv(key: str, value: Any) -> dict[str, Any]:
    if type(value) is bool:
        return {"key": key, "value": {"boolValue": value}}
    if type(value) is int:  # int64 is a decimal string in OTLP JSON
        return {"key": key, "value": {"intValue": str(value)}}
    if type(value) is float:
        return {"key": key, "value": {"doubleValue": value}}
    return {"key": key, "value": {"stringValue": value}}


@cache
def pb_const(attrs: tuple[tuple[str, Any], ...]) -> bytes:
    return b"".join(pb_kv(b"\x4a", k, v) for k, v in attrs)


@cache
def json_const(attrs: tuple[tuple[str, Any], ...]) -> list[dict[str, Any]]:
    return [json_kv(k, v) for k, v in attrs]


def resource_attrs(service: str, version: str) -> tuple[tuple[str, Any], ...]:
    return (("service.name", service), ("service.namespace", "omnicart"),
            ("service.version", version), ("deployment.environment", "production"),
            ("telemetry.sdk.name", "opentelemetry"), ("telemetry.sdk.language", LANGUAGES[service]),
            ("k8s.cluster.name", "prod-eu-west-1"))


@cache
def pb_resource_scope(service: str, version: str) -> tuple[bytes, bytes]:
    """ResourceSpans.resource (field 1) and ScopeSpans.scope (field 1), encoded once."""
    res = b"".join(pb_kv(b"\x0a", k, v) for k, v in resource_attrs(service, version))
    name, ver = SCOPES[service]
    return pb(b"\x0a", res), pb(b"\x0a", pb(b"\x0a", name.encode()) + pb(b"\x12", ver.encode()))


@cache
def pb_name(name: str) -> bytes:
    return pb(b"\x2a", name.encode())


def pb_span(rec: Rec) -> bytes:
    trace_id, span_id, parent, name, kind, start, end, code, message, _, _, const, var = rec
    parts = [b"\x0a\x10", trace_id, b"\x12\x08", span_id]
    if parent:
        parts += (b"\x22\x08", parent)
    parts += (pb_name(name), b"\x30", VARINTS[kind], TIMES.pack(0x39, start, 0x41, end),
              pb_const(const))
    parts += [pb_kv(b"\x4a", k, v) for k, v in var]
    if code:
        parts.append(pb(b"\x7a", (pb(b"\x12", message.encode()) if message else b"")
                        + b"\x18" + VARINTS[code]))
    return b"".join(parts)


def json_span(rec: Rec) -> dict[str, Any]:
    trace_id, span_id, parent, name, kind, start, end, code, message, _, _, const, var = rec
    span: dict[str, Any] = {"traceId": trace_id.hex(), "spanId": span_id.hex()}
    if parent:
        span["parentSpanId"] = parent.hex()
    span.update(name=name, kind=kind, startTimeUnixNano=str(start), endTimeUnixNano=str(end),
                attributes=json_const(const) + [json_kv(k, v) for k, v in var],
                status={"code": code, "message": message} if message else {})
    return span


def batch_bytes(groups: dict[tuple[str, str], list[Rec]], fmt: str) -> bytes:
    """One ExportTraceServiceRequest: a JSON line, or a length-prefixed protobuf frame."""
    if fmt == "json":
        return orjson.dumps({"resourceSpans": [{
            "resource": {"attributes": json_const(resource_attrs(service, version))},
            "scopeSpans": [{"scope": dict(zip(("name", "version"), SCOPES[service])),
                            "spans": [json_span(rec) for rec in recs]}],
        } for (service, version), recs in groups.items()]}) + b"\n"
    body = b"".join(
        pb(b"\x0a", pb_resource_scope(service, version)[0] + pb(b"\x12", pb_resource_scope(
            service, version)[1] + b"".join(pb(b"\x12", pb_span(rec)) for rec in recs)))
        for (service, version), recs in groups.items())
    return FRAME.pack(len(body)) + body


# --- generation -----------------------------------------------------------------------------

def ident(r: random.Random, prefix: str, bits: int = 96) -> str:
    return f"{prefix}_{r.getrandbits(bits):0{bits // 4}x}"


def payment_trace(r: random.Random, start: int, version: str,
                  violating: bool) -> list[tuple[Rec, int]]:
    """checkout -> order.create -> payment.charge x attempts, each span with its collector."""
    trace_id = r.getrandbits(128).to_bytes(16, "big")
    root_id, order_id = r.getrandbits(64).to_bytes(8, "big"), r.getrandbits(64).to_bytes(8, "big")
    customer, order, cart = ident(r, "cus", 48), ident(r, "ord", 48), ident(r, "cart", 48)
    items, amount = r.randint(1, 6), r.randrange(499, 250_000)
    currency, method = r.choice(("EUR", "EUR", "USD", "GBP")), r.choice(("card", "card", "wallet"))
    psp, url, host = PSPS[r.random() < 0.3]
    attempts = 1
    if violating or r.random() < RETRY_SHARE:
        attempts = r.choices((2, 3, 4), (80, 16, 4))[0]
    split = attempts == 1 and r.random() < SPLIT_SHARE  # gift card + card: two intents, no retry
    fresh = r.randint(2, attempts) if violating else 0  # the attempt that mints a new intent
    intent, clock = ident(r, "pi"), start + r.randrange(5, 40) * MS
    charges: list[Rec] = []
    for attempt in range(1, attempts + split + 1):
        if attempt == fresh or (split and attempt == 2):
            intent = ident(r, "pi")
        failed, status = attempt < attempts, 200
        if failed:
            timeout = r.random() < 0.6
            status = 504 if timeout else 502
            took = (10_000 if timeout else r.randrange(150, 800)) * MS + r.randrange(MS)
        else:
            took = r.randrange(120, 900) * MS + r.randrange(MS)
        const = (("http.method", "POST"), ("http.url", url), ("net.peer.name", host),
                 ("net.peer.port", 443), ("psp", "giftcard" if split and attempt == 2 else psp),
                 ("payment.method", method), ("currency", currency), ("http.status_code", status),
                 ("service.version", version))
        # case study 1's charge_payment: amount, payment_intent_id, attempt, cart.id
        var = (("amount", amount / 100), ("payment_intent_id", intent),
               ("attempt", 1 if split else attempt), ("cart.id", cart), ("order_id", order),
               ("customer_id", customer))
        charges.append((trace_id, r.getrandbits(64).to_bytes(8, "big"), order_id,
                        "payment.charge", CLIENT, clock, clock + took, ERROR if failed else UNSET,
                        "psp timeout after 10s" if status == 504 else
                        "502 Bad Gateway from psp" if failed else "", "payments", version, const,
                        var))
        clock += took + r.randrange(100, 600) * MS  # backoff before the next attempt
    order_end = charges[-1][6] + r.randrange(2, 15) * MS
    order_span: Rec = (
        trace_id, order_id, root_id, "order.create", SERVER, start + r.randrange(2, 5) * MS,
        order_end, UNSET, "", "orders", version,
        (("rpc.system", "grpc"), ("rpc.service", "omnicart.orders.v1.OrderService"),
         ("rpc.method", "CreateOrder"), ("currency", currency), ("db.system", "postgresql"),
         ("service.version", version)),
        (("order_id", order), ("customer_id", customer), ("amount_cents", amount),
         ("cart.items", items)))
    root: Rec = (
        trace_id, root_id, b"", "POST /checkout", SERVER, start,
        order_end + r.randrange(1, 4) * MS, UNSET, "", "checkout", version,
        (("http.method", "POST"), ("http.route", "/checkout"), ("http.scheme", "https"),
         ("net.host.name", "shop.omnicart.example"), ("user_agent.original", r.choice(AGENTS)),
         ("http.status_code", 200), ("service.version", version)),
        (("client.address", f"10.{r.randrange(256)}.{r.randrange(256)}.{r.randrange(256)}"),
         ("customer_id", customer), ("cart.items", items),
         ("http.request_content_length", r.randrange(300, 4000))))
    pods = {service: r.randrange(COLLECTORS) for service in ("checkout", "orders", "payments")}
    return [(rec, pods[rec[9]]) for rec in (root, order_span, *charges)]


def unrelated_trace(r: random.Random, start: int, version: str) -> list[tuple[Rec, int]]:
    """Storefront traffic: nothing in it is named by a payment rule."""
    trace_id, root_id = r.getrandbits(128).to_bytes(16, "big"), r.getrandbits(64).to_bytes(8, "big")
    route, children = r.choice(UNRELATED)
    clock, recs = start + r.randrange(1, 5) * MS, list[Rec]()
    for name, service, kind, const in children:
        took = r.randrange(1, 60) * MS + r.randrange(MS)
        recs.append((trace_id, r.getrandbits(64).to_bytes(8, "big"), root_id, name, kind, clock,
                     clock + took, UNSET, "", service, version,
                     const + (("service.version", version),),
                     (("request.id", ident(r, "req", 64)), ("thread.id", r.randrange(1, 64)))))
        clock += took + r.randrange(1, 5) * MS
    target = route.split()[1].replace("{id}", ident(r, "sku", 32))
    recs.append((trace_id, root_id, b"", route, SERVER, start, clock, UNSET, "", "frontend",
                 version, (("http.method", "GET"), ("http.route", route.split()[1]),
                           ("http.status_code", 200), ("service.version", version)),
                 (("http.target", target), ("user_agent.original", r.choice(AGENTS)))))
    pods = {rec[9]: r.randrange(COLLECTORS) for rec in recs}
    return [(rec, pods[rec[9]]) for rec in recs]


class Rotating:
    """One collector's file exporter for one format: appended to until past `limit` bytes, then
    closed under a rotation-time name as the exporter gives it (traces-2025-02-03T05-02-14.173)."""

    def __init__(self, folder: Path, suffix: str, limit: int, tag: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.suffix, self.limit, self.tag = folder, suffix, limit, tag
        self.file: Any = None
        self.size = self.parts = self.last = 0
        self.done: list[tuple[str, int]] = []

    def write(self, data: bytes, last_ns: int) -> None:
        if self.file is None:
            self.partial = self.folder / f".partial-{self.tag}-{self.parts}"
            self.file = open(self.partial, "wb")  # noqa: SIM115 (held until rotation)
        self.file.write(data)
        self.size, self.last = self.size + len(data), last_ns
        if self.size >= self.limit:
            self.close()

    def close(self) -> None:
        if self.file is None:
            return
        self.file.close()
        stamp = datetime.fromtimestamp(self.last / 1e9, timezone.utc)
        name = f"traces-{stamp:%Y-%m-%dT%H-%M-%S}.{stamp.microsecond // 1000:03d}"
        path = self.folder / f"{name}{self.suffix}"
        if path.exists():  # two slices closing in the same millisecond: keep both
            path = self.folder / f"{name}-{self.tag}{self.suffix}"
        self.partial.rename(path)
        self.done.append((str(path), self.size))
        self.file, self.size, self.parts = None, 0, self.parts + 1


class Collector:
    """A batch processor (200-512 spans per request) in front of one file exporter per format."""

    def __init__(self, r: random.Random, exporters: dict[str, Rotating]) -> None:
        self.r, self.exporters, self.requests = r, exporters, 0
        self.batch: list[Rec] = []
        self.size = r.randint(*BATCH)

    def add(self, rec: Rec) -> None:
        self.batch.append(rec)
        if len(self.batch) >= self.size:
            self.flush()

    def flush(self) -> None:
        if not self.batch:
            return
        groups: dict[tuple[str, str], list[Rec]] = {}
        for rec in self.batch:
            groups.setdefault((rec[9], rec[10]), []).append(rec)
        last = max(rec[6] for rec in self.batch)
        for fmt, exporter in self.exporters.items():
            exporter.write(batch_bytes(groups, fmt), last)
        self.batch, self.size, self.requests = [], self.r.randint(*BATCH), self.requests + 1


@dataclass
class Slice:
    """One worker's share: payment traces [pay_from, pay_to), unrelated [other_from, other_to)."""

    index: int
    n: int
    unrelated: int
    pay_from: int
    pay_to: int
    other_from: int
    other_to: int
    seed: int
    data: str
    formats: tuple[str, ...]
    rotate_bytes: int
    violating: dict[int, str]  # payment trace index -> the version it runs on


@dataclass
class SliceResult:
    files: dict[str, list[tuple[str, int]]]
    spans: int = 0
    payment: int = 0
    other: int = 0
    requests: int = 0
    two_collectors: int = 0
    violations: dict[str, str] = field(default_factory=dict)  # trace id -> version


def generate_slice(task: Slice) -> SliceResult:
    """Traces in start order; their spans leave a heap in end order, as the SDKs export them."""
    r = random.Random(f"{task.seed}:{task.index}")
    pay_step, other_step = WINDOW / task.n, WINDOW / max(task.unrelated, 1)
    starts = [(START + int((i + r.random()) * pay_step), i, True)
              for i in range(task.pay_from, task.pay_to)]
    starts += [(START + int((j + r.random()) * other_step), j, False)
               for j in range(task.other_from, task.other_to)]
    starts.sort()
    collectors = [Collector(r, {fmt: Rotating(Path(task.data) / fmt / f"collector-{c}",
                                              SUFFIX[fmt], task.rotate_bytes, str(task.index))
                                for fmt in task.formats}) for c in range(COLLECTORS)]
    out = SliceResult(files={})
    pending: list[tuple[int, int, Rec, int]] = []
    order = itertools.count()
    for start, index, payment in starts:
        while pending and pending[0][0] <= start:
            _, _, rec, c = heapq.heappop(pending)
            collectors[c].add(rec)
        version = BAD if start >= DEPLOY and r.random() < CANARY else GOOD
        if payment:
            violating = index in task.violating
            version = task.violating.get(index, version)
            spans = payment_trace(r, start, version, violating)
            out.payment += 1
            if violating:
                out.violations[spans[0][0][0].hex()] = version
        else:
            spans = unrelated_trace(r, start, version)
            out.other += 1
        out.spans += len(spans)
        out.two_collectors += len({c for _, c in spans}) > 1
        for rec, c in spans:
            heapq.heappush(pending, (rec[6], next(order), rec, c))
    while pending:
        _, _, rec, c = heapq.heappop(pending)
        collectors[c].add(rec)
    for collector in collectors:
        collector.flush()
        out.requests += collector.requests
        for fmt, exporter in collector.exporters.items():
            exporter.close()
            out.files.setdefault(fmt, []).extend(exporter.done)
    return out


def pick_violations(n: int, seed: int) -> dict[int, str]:
    """Which payment traces violate, and on which version: 85% on the bad deploy (after it
    rolled out), the rest on v2.14.0 anywhere in the month."""
    r = random.Random(f"{seed}:violations")
    count = max(1, round(FULL_VIOLATIONS * n / FULL_TRACES))
    after = min(n, -(-(DEPLOY - START) * n // WINDOW))  # first trace slot starting after DEPLOY
    bad = min(round(count * BAD_SHARE), n - after)
    chosen = dict.fromkeys(r.sample(range(after, n), bad), BAD)
    while len(chosen) < count:
        chosen.setdefault(r.randrange(n), GOOD)
    return chosen


def generate(data: Path, n: int, seed: int, formats: tuple[str, ...], rotate_mb: float,
             workers: int) -> dict[str, Any]:
    """Write the formats' files under `data`, in SLICES tasks over `workers` processes; return
    the facts every manifest shares."""
    for fmt in formats:
        shutil.rmtree(data / fmt, ignore_errors=True)  # a partial earlier attempt
    unrelated = round(n * UNRELATED_SHARE)
    slices = max(1, min(SLICES, n // 1000))
    violating = pick_violations(n, seed)
    tasks = []
    for s in range(slices):
        lo, hi = s * n // slices, (s + 1) * n // slices
        tasks.append(Slice(s, n, unrelated, lo, hi, s * unrelated // slices,
                           (s + 1) * unrelated // slices, seed, str(data), formats,
                           int(rotate_mb * 2**20),
                           {i: v for i, v in violating.items() if lo <= i < hi}))
    started, results = time.perf_counter(), []
    with ProcessPoolExecutor(workers) as pool:
        for done, result in enumerate(pool.map(generate_slice, tasks), 1):
            results.append(result)
            print(f"  slice {done}/{slices} written ({time.perf_counter() - started:.0f}s)",
                  flush=True)
    seconds = time.perf_counter() - started
    facts = {"generator": GENERATOR, "traces": n, "seed": seed, "rotate_mb": rotate_mb,
             "seconds": seconds, "workers": workers,
             "spans": sum(x.spans for x in results),
             "payment_traces": sum(x.payment for x in results),
             "unrelated_traces": sum(x.other for x in results),
             "requests": sum(x.requests for x in results),
             "two_collector_traces": sum(x.two_collectors for x in results)}
    violations = {k: v for x in results for k, v in x.violations.items()}
    assert len(violations) == len(violating), "a violating trace id repeated"
    (data / "violations.json").write_text(json.dumps(violations, indent=0, sort_keys=True))
    for fmt in formats:
        files = sorted((str(Path(p).relative_to(data)), size)
                       for x in results for p, size in x.files[fmt])
        manifest = {**facts, "format": fmt, "files": files}
        (data / f"manifest-{fmt}.json").write_text(json.dumps(manifest, indent=1))
    total = sum(size for fmt in formats for _, size in files_of(data, fmt))
    print(f"generated {facts['spans']:,} spans ({n:,} payment + {unrelated:,} unrelated traces, "
          f"{facts['requests']:,} requests per format) as {'+'.join(formats)} in {seconds:.1f}s "
          f"on {workers} processes: {facts['spans'] / seconds:,.0f} spans/s, "
          f"{total / 2**20 / seconds:,.0f} MB/s written", flush=True)
    return facts


def manifest_of(data: Path, fmt: str) -> dict[str, Any] | None:
    path = data / f"manifest-{fmt}.json"
    return json.loads(path.read_text()) if path.exists() else None


def files_of(data: Path, fmt: str) -> list[tuple[Path, int]]:
    manifest = manifest_of(data, fmt)
    assert manifest is not None
    return [(data / name, size) for name, size in manifest["files"]]


# --- baselines ------------------------------------------------------------------------------

def read_file(path: Path) -> int:
    with open(path, "rb", buffering=0) as f:
        total = 0
        while chunk := f.read(1 << 24):
            total += len(chunk)
    return total


def parse_json_file(path: Path) -> int:
    """orjson.loads of every line, nothing else; the number of lines."""
    loads, lines = orjson.loads, 0
    with open(path, "rb") as f:
        for line in f:
            loads(line)
            lines += 1
    return lines


KEEP: SpanFilter | None = None  # replay's span filter for the rule (set before forking)


def decode_file(path: Path) -> int:
    """Replay's own reader over one file with replay's span filter, every batch dropped: the
    spans kept."""
    assert KEEP is not None
    errors: list[InputError] = []
    kept = sum(len(spans) for batch in read_source(str(path), KEEP, errors)
               for spans in batch.values())
    if errors:
        raise SystemExit(f"{path}: {errors[0]}")
    return kept


def frames(data: bytes) -> Iterator[bytes]:
    """The messages of a file exporter `format: proto` file: a 4-byte big-endian length, then
    that many bytes of ExportTraceServiceRequest."""
    at, end = 0, len(data)
    while at < end:
        (size,) = FRAME.unpack_from(data, at)
        if at + 4 + size > end:
            raise ValueError(f"truncated frame at byte {at}")
        yield data[at + 4:at + 4 + size]
        at += 4 + size


def parse_proto_file(path: Path) -> int:
    """ExportTraceServiceRequest.FromString of every frame, nothing else; the number of frames."""
    parse, count = ExportTraceServiceRequest.FromString, 0
    for frame in frames(path.read_bytes()):
        parse(frame)
        count += 1
    return count


def timed_pass(work: Any, paths: list[Path], processes: int) -> tuple[float, int]:
    """Wall seconds of `work` over every file (in this process when processes == 1)."""
    started = time.perf_counter()
    if processes == 1:
        done = sum(work(path) for path in paths)
    else:
        with ProcessPoolExecutor(processes) as pool:
            done = sum(pool.map(work, sorted(paths, key=lambda p: -p.stat().st_size)))
    return time.perf_counter() - started, done


# --- --verify -------------------------------------------------------------------------------

def canonical_json(doc: dict[str, Any]) -> list[tuple[Any, ...]]:
    def value(v: dict[str, Any]) -> Any:
        ((kind, inner),) = v.items()
        return int(inner) if kind == "intValue" else inner
    out = []
    for rs in doc["resourceSpans"]:
        res = tuple((kv["key"], value(kv["value"])) for kv in rs["resource"]["attributes"])
        for ss in rs["scopeSpans"]:
            scope = (ss["scope"]["name"], ss["scope"]["version"])
            for s in ss["spans"]:
                status = s["status"]
                out.append((res, scope, s["traceId"], s["spanId"], s.get("parentSpanId", ""),
                            s["name"], s["kind"], int(s["startTimeUnixNano"]),
                            int(s["endTimeUnixNano"]), status.get("code", 0),
                            status.get("message", ""),
                            tuple((kv["key"], value(kv["value"])) for kv in s["attributes"])))
    return out


def canonical_proto(msg: ExportTraceServiceRequest) -> list[tuple[Any, ...]]:
    def value(v: Any) -> Any:
        return getattr(v, v.WhichOneof("value"))
    out = []
    for rs in msg.resource_spans:
        res = tuple((kv.key, value(kv.value)) for kv in rs.resource.attributes)
        for ss in rs.scope_spans:
            scope = (ss.scope.name, ss.scope.version)
            for s in ss.spans:
                out.append((res, scope, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(),
                            s.name, s.kind, s.start_time_unix_nano, s.end_time_unix_nano,
                            s.status.code, s.status.message,
                            tuple((kv.key, value(kv.value)) for kv in s.attributes)))
    return out


def verify(data: Path, formats: tuple[str, ...], injected: set[str]) -> bool:
    """Every frame parses; JSON and proto hold the same batches; the data's own violations (the
    rule's semantics, recomputed here) are exactly the injected ones."""
    started, ok = time.perf_counter(), True
    spans = 0
    charges: dict[str, tuple[int, set[str]]] = {}  # trace -> (max attempt, intents)
    files_of_trace: dict[str, set[str]] = {}
    for c in range(COLLECTORS):
        streams: dict[str, Iterator[tuple[str, list[tuple[Any, ...]]]]] = {}
        if "json" in formats:
            streams["json"] = ((p.name, canonical_json(orjson.loads(line)))
                               for p, _ in files_of(data, "json") if f"collector-{c}/" in str(p)
                               for line in p.open("rb"))
        if "proto" in formats:
            streams["proto"] = ((p.name, canonical_proto(ExportTraceServiceRequest.FromString(f)))
                                for p, _ in files_of(data, "proto") if f"collector-{c}/" in str(p)
                                for f in frames(p.read_bytes()))
        for number, batches in enumerate(itertools.zip_longest(*streams.values()), 1):
            if None in batches:
                print(f"!!! verify: collector-{c}: the formats differ in batch count at {number}")
                return False
            (name, batch), *others = batches
            if any(other != batch for _, other in others):
                print(f"!!! verify: collector-{c} batch {number}: json and proto differ")
                ok = False
            spans += len(batch)
            for span in batch:
                files_of_trace.setdefault(span[2], set()).add(f"{c}/{name}")
                if span[5] == "payment.charge":
                    attrs = dict(span[11])
                    attempt, intents = charges.get(span[2], (0, set()))
                    intents.add(attrs["payment_intent_id"])
                    charges[span[2]] = (max(attempt, attrs["attempt"]), intents)
    expected = manifest_of(data, formats[0])
    assert expected is not None
    truth = {t for t, (attempt, intents) in charges.items() if attempt > 1 and len(intents) > 1}
    spread = sum(len(f) > 1 for f in files_of_trace.values())
    print(f"verify: {spans:,} spans in {len(files_of_trace):,} traces read back from "
          f"{' and '.join(formats)} ({expected['spans']:,} written); {len(truth):,} traces violate "
          f"by the rule's semantics, {len(truth & injected):,} of them injected, "
          f"{len(injected - truth)} injected ones not violating; {spread:,} traces "
          f"({spread / len(files_of_trace):.0%}) have spans in more than one file "
          f"({time.perf_counter() - started:.1f}s)")
    return ok and spans == expected["spans"] and truth == injected


# --- the run --------------------------------------------------------------------------------

def betrace() -> str:
    beside = Path(sys.executable).with_name("betrace")
    found = str(beside) if beside.exists() else shutil.which("betrace")
    if found is None:
        raise SystemExit("betrace is not installed: make .venv/.installed (pip install -e .)")
    return found


def rule_dir(tmp: Path) -> Path:
    """A rules directory holding only the catalog's idempotency rule, as shipped."""
    doc = yaml.safe_load((ROOT / "rules" / "payments.yaml").read_text())
    (rule,) = [rule for rule in doc["rules"] if rule["id"] == RULE_ID]
    folder = tmp / "rules"
    folder.mkdir()
    (folder / "payments.yaml").write_text(yaml.safe_dump({"rules": [rule]}, sort_keys=False))
    return folder


@dataclass
class Replay:
    wall: float
    cpu: float
    rss_mb: float
    status: int
    found: int
    missed: int
    extra: int
    duplicates: int
    stderr: list[str]


def run_replay(cmd: list[str], out: Path, injected: set[str]) -> Replay:
    """`betrace replay` as a subprocess, timed; its signals checked against the injected ids.
    CPU and peak RSS are the replay's own and its workers' (os.wait4 of that process: the
    largest of them), not this script's other children's (the parallel passes)."""
    with tempfile.TemporaryFile() as stderr:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        stderr.seek(0)
        lines = stderr.read().decode(errors="replace").splitlines()
    reported: list[str] = []
    if out.exists():
        reported = [orjson.loads(line)["trace_id"] for line in out.open("rb") if line.strip()]
    ids = set(reported)
    return Replay(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024,
                  proc.returncode, len(ids & injected), len(injected - ids), len(ids - injected),
                  len(reported) - len(ids), lines)


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    mem = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    return (f"{os.cpu_count()} CPUs ({model}), {mem:.0f} GiB RAM, load average "
            f"{os.getloadavg()[0]:.2f}; Python {platform.python_version()}, orjson "
            f"{orjson.__version__}, protobuf {api_implementation.Type()}")


def describe(data: Path, n: int, formats: tuple[str, ...]) -> tuple[dict[str, Any], set[str]]:
    """Print what the data is; return its manifest and the injected violating trace ids."""
    facts = manifest_of(data, formats[0])
    assert facts is not None
    violations: dict[str, str] = json.loads((data / "violations.json").read_text())
    spans, traces = facts["spans"], facts["payment_traces"] + facts["unrelated_traces"]
    bad = sum(version == BAD for version in violations.values())
    print(f"data: {n:,} payment traces + {facts['unrelated_traces']:,} unrelated = {traces:,} "
          f"traces, {spans:,} spans ({spans / traces:.2f} per trace), {facts['requests']:,} "
          f"requests per format; {len(violations):,} violating traces injected ({bad:,} on {BAD}, "
          f"{len(violations) - bad:,} on {GOOD}); {facts['two_collector_traces']:,} traces "
          f"({facts['two_collector_traces'] / traces:.0%}) split across the two collectors")
    for fmt in formats:
        files = files_of(data, fmt)
        size = facts[f"bytes_{fmt}"] = sum(size for _, size in files)
        print(f"  {fmt}: {len(files)} files, {size / 2**20:,.1f} MB ({size / spans:,.0f} "
              f"bytes/span, {size / 2**20 * 1e6 / n:,.0f} MB per million payment traces)")
    return facts, set(violations)


def passes(data: Path, fmt: str, spans: int, processes: int) -> dict[str, float]:
    """Time the read-only, parse-only and decode-only passes over one format: their seconds in
    1 and in `processes` processes, by name ("parse 1", "parse J", "decode 1", "decode J")."""
    paths = [path for path, _ in files_of(data, fmt)]
    size = sum(path.stat().st_size for path in paths)
    read, _ = timed_pass(read_file, paths, 1)
    print(f"\n[{fmt}] read only: {read:.2f}s ({size / 2**20 / read:,.0f} MB/s; this also warms "
          "the page cache)", flush=True)
    parse, label = ((parse_json_file, "orjson.loads per line") if fmt == "json" else
                    (parse_proto_file, "ExportTraceServiceRequest.FromString per frame"))
    found: dict[str, float] = {}
    for name, work, what in (("parse", parse, f"parse-only ({label})"),
                             ("decode", decode_file, "decode-only (replay's reader and filter)")):
        one, count = timed_pass(work, paths, 1)
        many, _ = timed_pass(work, paths, processes) if processes > 1 else (one, count)
        found[f"{name} 1"], found[f"{name} J"] = one, many
        unit = "requests" if name == "parse" else "spans kept"
        print(f"[{fmt}] {what}, {count:,} {unit}: {one:.2f}s in 1 process "
              f"({spans / one:,.0f} spans/s), {many:.2f}s in {processes} processes "
              f"({spans / many:,.0f} spans/s)", flush=True)
    return found


def replay_format(cmd: list[str], data: Path, fmt: str, spans: int, injected: set[str],
                  bounds: dict[str, float], jobs: int, target: float
                  ) -> tuple[bool, tuple[str, ...]]:
    """Run and judge one format's replay, with --jobs 1 and --jobs `jobs`: (correct, its
    summary-table row)."""
    paths = [path for path, _ in files_of(data, fmt)]
    out = Path(cmd[cmd.index("--out") + 1])
    walls: dict[int, float] = {}
    correct, peak = True, 0.0
    for j in sorted({1, jobs}):
        timed_pass(read_file, paths, 1)  # the passes before may have evicted some of it
        run = cmd + ["--jobs", str(j)]
        print(f"\n[{fmt}] $ {' '.join(run)} <{len(paths)} files in {data / fmt}>", flush=True)
        out.unlink(missing_ok=True)
        result = run_replay(run + [str(p) for p in paths], out, injected)
        for line in result.stderr if len(result.stderr) <= 40 else ["...",
                                                                      *result.stderr[-40:]]:
            print(f"    | {line}")
        walls[j], peak = result.wall, max(peak, result.rss_mb)
        ok = (result.status == 0 and result.found == len(injected) and not result.missed
              and not result.extra and not result.duplicates)
        correct &= ok
        ratios = ", ".join(f"{result.wall / bound:.2f}x {name}" for name, bound in bounds.items())
        print(f"[{fmt}] replay --jobs {j}: {result.wall:.2f}s wall, {spans / result.wall:,.0f} "
              f"spans/s, CPU {result.cpu:.1f}s ({result.cpu / result.wall:.1f} cores), peak RSS "
              f"of the largest process {result.rss_mb:,.0f} MB, exit status {result.status}; "
              f"{ratios}")
        print(f"[{fmt}] signals: found {result.found:,} of {len(injected):,} injected, missed "
              f"{result.missed:,}, extra {result.extra:,}, duplicate {result.duplicates:,}: "
              f"{'correct' if ok else 'WRONG'}", flush=True)
    wall = walls[jobs]
    if jobs > 1:
        print(f"[{fmt}] parallel efficiency: {walls[1] / (jobs * wall):.0%} ({walls[1]:.2f}s "
              f"with 1 job, {wall:.2f}s with {jobs})")
    # the bound of each format: what its replay cannot beat, measured in this run
    bound_name = "decode J" if fmt == "json" else "parse J"
    ratio = wall / bounds[bound_name]
    verdicts = [f"{'PASS' if ratio <= TARGET_RATIO else 'FAIL'} {ratio:.2f}x {bound_name}",
                f"{'PASS' if peak <= TARGET_RSS_MB else 'FAIL'} RSS {peak:,.0f} MB",
                f"{'PASS' if wall <= target else 'FAIL'} {wall:.2f}s (<= {target:.2f}s)"]
    counts = "correct" if correct else "WRONG"
    return correct, (fmt, f"{wall:.2f}s, {spans / wall:,.0f} spans/s", counts,
                     "; ".join(verdicts))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traces", type=int, default=FULL_TRACES, help="payment traces (N)")
    parser.add_argument("--format", choices=("json", "proto", "both"), default="both")
    parser.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "betrace-bench-replay"),
                        help="where generated data is cached (default: %(default)s)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the data this run generates (and its signals) for reruns")
    parser.add_argument("--jobs", type=int,
                        help="processes of the parallel passes and replay (default: the CPUs)")
    parser.add_argument("--seed", type=int, default=20250301)
    parser.add_argument("--rotate-mb", type=float, default=100.0,
                        help="file rotation size, as the exporter's max_megabytes")
    parser.add_argument("--verify", action="store_true",
                        help="read every frame back and check the data before timing")
    parser.add_argument("--no-replay", action="store_true",
                        help="stop after the parse-only passes (prepares the cache)")
    args = parser.parse_args()
    if args.traces < 1:
        parser.error("--traces must be at least 1")
    formats = ("json", "proto") if args.format == "both" else (args.format,)
    cores = os.cpu_count() or 1
    key = f"n{args.traces}-seed{args.seed}-r{args.rotate_mb:g}-g{GENERATOR}"
    data = Path(args.dir) / f"omnicart-{key}"
    data.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}")
    missing = tuple(fmt for fmt in formats if manifest_of(data, fmt) is None)
    cached = [manifest_of(data, fmt) for fmt in formats if fmt not in missing]
    if cached:
        print(f"cached: {'+'.join(m['format'] for m in cached if m)} data in {data} (generated "
              f"earlier in {cached[0]['seconds'] if cached[0] else 0:.0f}s): generation skipped")
    tmp = Path(tempfile.mkdtemp(prefix="run-", dir=data))
    try:
        if missing:
            print(f"generating {'+'.join(missing)} data in {data} ...", flush=True)
            generate(data, args.traces, args.seed, missing, args.rotate_mb, cores)
        facts, injected = describe(data, args.traces, formats)
        if args.verify and not verify(data, formats, injected):
            print("!!! --verify FAILED")
            return 1
        spans, jobs = facts["spans"], args.jobs or cores
        rules = rule_dir(tmp)
        global KEEP
        KEEP = span_filter(load_rules([str(rules)]),
                           ReplayOptions(group_by="service.version"))
        bounds = {fmt: passes(data, fmt, spans, jobs) for fmt in formats}
        if args.no_replay:
            return 0

        cmd = [betrace(), "replay", "--rules", str(rules), "--format", "jsonl", "--progress",
               "never", "--group-by", "service.version"]
        target = TARGET_SECONDS * args.traces / FULL_TRACES
        rows, failed = list[tuple[str, ...]](), False
        for fmt in formats:
            out = ["--out", str(tmp / f"signals-{fmt}.jsonl")]
            correct, row = replay_format(cmd + out, data, fmt, spans, injected, bounds[fmt],
                                         jobs, target)
            rows.append(row)
            failed |= not correct

        scale = "" if args.traces == FULL_TRACES else (
            f"; 30 s at {FULL_TRACES:,} scaled linearly to {args.traces:,} (fixed start-up costs "
            "make small N look worse)")
        print(f"\n{args.traces:,} payment traces, {spans:,} spans; --jobs {jobs}{scale}")
        print(f"{'format':<8}{'replay':<34}{'signals':<10}targets")
        for fmt, wall, counts, verdict in rows:
            print(f"{fmt:<8}{wall:<34}{counts:<10}{verdict}")
        return 1 if failed else 0
    finally:
        if args.keep:
            print(f"\nkept: data in {data}, rules and signals in {tmp}")
        else:
            shutil.rmtree(tmp)
            for fmt in missing:
                shutil.rmtree(data / fmt, ignore_errors=True)
                (data / f"manifest-{fmt}.json").unlink(missing_ok=True)
            if not any(manifest_of(data, fmt) for fmt in ("json", "proto")):
                shutil.rmtree(data, ignore_errors=True)
            if missing:
                print("\ndeleted the data this run generated (--keep keeps it for reruns)")


if __name__ == "__main__":
    sys.exit(main())
